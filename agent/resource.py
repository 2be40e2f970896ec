"""Host resource detection: who is sending (service.*) and from where (host.*, os.*).

Follows the Collector's resourcedetection `system` detector and OpenTelemetry semantic conventions:
host.name, host.id (the machine-id), host.arch (amd64, arm64, ...), os.type ("linux"),
os.description (os-release name and version, then the uname fields, as the OpenTelemetry SDKs
build it), os.version. service.instance.id is a UUID derived from the machine-id and the service
name, so it is the same after a restart. Attributes from the config win over detected ones.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional

from agent import __version__
from agent.config import frozen_dict
from agent.model import Resource

log = logging.getLogger("hostagent.resource")

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")

@dataclass(frozen=True)
class ResourceConfig:
    service_name: str = "hostagent"
    # extra resource attributes; these win over detected ones
    attributes: Mapping[str, str] = frozen_dict()


# namespace for service.instance.id = uuid5(INSTANCE_NAMESPACE, "<machine-id>/<service.name>")
INSTANCE_NAMESPACE = uuid.UUID("6f1c1f0e-5f5e-4c44-9d57-1f3c3b0d7a21")

# platform.machine() -> host.arch (semantic-convention values); unknown machines pass through
ARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64", "aarch64_be": "arm64",
    "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86", "x86": "x86",
    "ppc": "ppc32", "ppcle": "ppc32", "ppc64": "ppc64", "ppc64le": "ppc64",
    "s390x": "s390x", "ia64": "ia64",
}


def host_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ARCH:
        return ARCH[machine]
    if machine.startswith("arm"):
        return "arm32"
    return machine


def machine_id() -> Optional[str]:
    for path in MACHINE_ID_FILES:
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    return None


def os_release() -> dict:
    """The fields of os-release(5), unquoted."""
    for path in OS_RELEASE_FILES:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            for escaped, plain in (("\\$", "$"), ('\\"', '"'), ("\\'", "'"), ("\\`", "`"), ("\\\\", "\\")):
                value = value.replace(escaped, plain)
            values[key.strip()] = value
        return values
    return {}


def os_description(release: dict, uname: os.uname_result) -> str:
    """'<NAME> <VERSION> (<sysname> <nodename> <release> <version> <machine>)', falling back to
    PRETTY_NAME and then to the uname part alone, as the OpenTelemetry SDK's os detector does."""
    name, version = release.get("NAME", ""), release.get("VERSION") or release.get("VERSION_ID", "")
    distro = f"{name} {version}" if name and version else release.get("PRETTY_NAME", "")
    uname_text = " ".join((uname.sysname, uname.nodename, uname.release, uname.version, uname.machine))
    return f"{distro} ({uname_text})" if distro else uname_text


def instance_id(host_id: Optional[str], service_name: str, hostname: str) -> str:
    return str(uuid.uuid5(INSTANCE_NAMESPACE, f"{host_id or hostname}/{service_name}"))


def detect(cfg) -> Resource:
    """The agent's resource from a ResourceConfig: detected attributes, then cfg.attributes on top."""
    hostname = socket.gethostname()
    host_id = machine_id()
    if host_id is None:
        log.warning("no machine-id found in %s: host.id is not set and service.instance.id is "
                    "derived from the host name", " or ".join(MACHINE_ID_FILES))
    release = os_release()
    uname = os.uname()
    detected = [
        ("service.name", cfg.service_name),
        ("service.version", __version__),
        ("service.instance.id", instance_id(host_id, cfg.service_name, hostname)),
        ("host.name", hostname),
    ]
    if host_id is not None:
        detected.append(("host.id", host_id))
    detected += [
        ("host.arch", host_arch(platform.machine() or uname.machine)),
        ("os.type", "linux"),
        ("os.description", os_description(release, uname)),
    ]
    version = release.get("VERSION_ID")
    if version:
        detected.append(("os.version", version))
    return Resource(tuple(detected)).merged(tuple((str(k), str(v)) for k, v in cfg.attributes.items()))
