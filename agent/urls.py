"""Host and URL helpers shared by config sections and exporters (bottom layer: imports nothing
from agent.*)."""
from __future__ import annotations

import ipaddress
import re

_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?.*@", re.S)  # to the last @: a password may hold a /


def is_loopback(host: str) -> bool:
    """`host` is localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """`url` with its userinfo (user:password@, token@) replaced by ***@, for every message that
    shows an endpoint (a valid config has none: see agent.export.otlp.parse_endpoint)."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url, count=1)
