"""The .deb and .rpm, end to end on this machine: built from the checkout, their layout, the
default config, the systemd unit, then the .deb installed for real (/opt, /etc, /var/lib, /usr/bin),
run the way the unit runs it (its ExecStart, confined like the unit confines it by
packaging/unit-sandbox.py on the host's own kernel and processes, with a notify socket; under a
real systemd in tests/test_systemd_container.py), reloaded,
stopped, upgraded, removed and purged. The .rpm is installed into a scratch root. Needs root,
dpkg, rpmbuild, systemd-analyze and python3-seccomp (install.sh --dev provides them); whatever
happens, the package is purged at the end.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import yaml

from agent.sources.ebpf.syscalls import SYSCALL_OTHER, syscall_names, syscall_table
from tests.helpers import ROOT, clean_env, free_port

PACKAGING = os.path.join(ROOT, "packaging")
UNIT_NAME = "hostagent.service"
DEB_UNIT = "/lib/systemd/system/" + UNIT_NAME
WANTS_LINK = "/etc/systemd/system/multi-user.target.wants/" + UNIT_NAME
CONFIG = "/etc/hostagent/agent.yaml"
QUEUE_DIR = "/var/lib/hostagent/queue"
MAX_EXPOSURE = 3.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages: needs root"),
    pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a dpkg-based host"),
]


def sh(*cmd, check=True, timeout=300, env=None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env=env or dict(clean_env(), DEBIAN_FRONTEND="noninteractive"), **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: install.sh --dev must install the {package} package")


def installed_version():
    p = sh("dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", "hostagent", check=False)
    status, _, version = p.stdout.partition(" ")
    return version if p.returncode == 0 and status not in ("", "not-installed", "config-files") else None


def purge() -> None:
    if sh("dpkg-query", "-W", "hostagent", check=False).returncode == 0:
        sh("dpkg", "--purge", "hostagent", check=False)


# --- building ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(hostagent_deb, tmp_path_factory):
    """Both packages at the checkout's version, and a .deb one version higher for the upgrade."""
    require("dpkg-deb", "dpkg")
    require("rpmbuild", "rpm")
    out = tmp_path_factory.mktemp("packages")
    started = time.monotonic()

    def build(script, *args):
        p = sh(os.path.join(PACKAGING, script), "--out", str(out), *args, timeout=600)
        return p.stdout.strip().splitlines()[-1]

    deb = hostagent_deb  # built once for this module and tests/test_systemd_container.py
    version = sh("dpkg-deb", "--field", deb, "Version").stdout.strip()
    newer = version + "+1"
    deb_newer = build("build-deb.sh", "--version", newer)
    rpm = build("build-rpm.sh")
    print(f"built 2 packages in {time.monotonic() - started:.0f}s")
    return {"deb": deb, "deb_newer": deb_newer, "rpm": rpm, "version": version, "newer": newer}


def test_package_names_follow_the_conventions(built):
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    assert os.path.basename(built["deb"]) == f"hostagent_{built['version']}_{arch}.deb"
    assert os.path.basename(built["deb_newer"]) == f"hostagent_{built['newer']}_{arch}.deb"
    assert re.fullmatch(rf"hostagent-{re.escape(built['version'])}\.[a-z0-9_]+\.rpm", os.path.basename(built["rpm"]))
    assert sh("dpkg", "--compare-versions", built["newer"], "gt", built["version"], check=False).returncode == 0


def deb_entries(deb) -> dict:
    """path -> (type char, symlink target) from dpkg-deb -c."""
    entries = {}
    for line in sh("dpkg-deb", "-c", deb).stdout.splitlines():
        fields = line.split(None, 5)
        name, _, target = fields[5].partition(" -> ")
        path = "/" + name.removeprefix("./").rstrip("/")
        entries[path] = (fields[0][0], target, fields[0], fields[1])
    return entries


LAYOUT = ["/opt/hostagent/agent/cli.py", "/opt/hostagent/agent/__main__.py",
          "/opt/hostagent/agent/sources/ebpf/probe.py", "/opt/hostagent/bpf/include",
          "/opt/hostagent/venv/pyvenv.cfg", "/opt/hostagent/venv/bin/hostagent",
          "/opt/hostagent/venv/bin/python3", "/etc/hostagent/agent.yaml", "/var/lib/hostagent",
          "/usr/bin/hostagent", "/usr/share/doc/hostagent/operations.md"]


# What the target needs no more with CO-RE: a compiler, LLVM, kernel headers, bcc.
COMPILER_PACKAGES = {"python3-bpfcc", "libbpfcc", "bpfcc-tools", "clang", "clang-14", "llvm", "libllvm14",
                     "libclang-cpp14", "linux-headers-generic", "linux-headers-amd64", "linux-headers-arm64"}
EM_BPF = 247


def package_names(field: str) -> set:
    """The package names in a Depends-like field (alternatives included, versions dropped)."""
    return {alt.split("(")[0].strip() for dep in field.split(",") for alt in dep.split("|") if alt.strip()}


def bpf_objects() -> list:
    """The object each bpf/<name>.bpf.c compiles to."""
    return sorted(n[:-len(".c")] + ".o" for n in os.listdir(os.path.join(ROOT, "bpf")) if n.endswith(".bpf.c"))


def test_deb_ships_bpf_objects(built, tmp_path):
    sh("dpkg-deb", "--extract", built["deb"], str(tmp_path))
    # the system call table, for hosts without headers: the same as this build host's headers
    assert syscall_table(str(tmp_path / "opt/hostagent/bpf/build")) == \
        {nr: name for nr, name in syscall_names().items() if nr < SYSCALL_OTHER}
    for name in bpf_objects():
        with open(tmp_path / "opt/hostagent/bpf/build" / name, "rb") as f:
            header = f.read(20)
        # an ELF relocatable object for the BPF machine, little-endian on this host
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[16:18], "little") == 1, name
        assert int.from_bytes(header[18:20], "little") == EM_BPF, name


def test_deb_layout_and_metadata(built):
    entries = deb_entries(built["deb"])
    for path in LAYOUT + [DEB_UNIT]:
        assert path in entries, f"{path} not in the .deb"
    assert entries["/usr/bin/hostagent"][:2] == ("l", "/opt/hostagent/venv/bin/hostagent")
    assert entries["/opt/hostagent/venv/bin/python3"][:2] == ("l", "/usr/bin/python3")
    assert entries[CONFIG][2:] == ("-rw-r-----", "root/root")
    assert entries["/var/lib/hostagent"][2] == "drwxr-x---"
    assert all(owner == "root/root" for _, _, _, owner in entries.values())
    # every BPF program of the checkout sits beside the agent package, where the probes look
    for name in os.listdir(os.path.join(ROOT, "bpf")):
        if name != "build":  # a checkout's own objects: the package builds its own
            assert f"/opt/hostagent/bpf/{name}" in entries
    # ... with its CO-RE object and the system call table, nothing else from the build (vmlinux.h
    # stays on the build host)
    assert {p for p in entries if p.startswith("/opt/hostagent/bpf/build/")} == \
        {f"/opt/hostagent/bpf/build/{name}" for name in bpf_objects() + ["syscalls.txt"]}
    # byte code ships (nothing is written under /opt at run time), pip does not
    assert "/opt/hostagent/agent/__pycache__" in entries
    assert not any("/site-packages/pip/" in p or p.endswith("/bin/pip") for p in entries)

    fields = {k: sh("dpkg-deb", "--field", built["deb"], k).stdout.strip()
              for k in ("Package", "Architecture", "Depends", "Recommends", "Suggests")}
    assert fields["Package"] == "hostagent"
    major, minor = sh("/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])").stdout.split()
    assert f"python3 (>= {major}.{minor})" in fields["Depends"]
    # CO-RE: libbpf1 on the target; bcc and headers (the fallback, with LLVM and clang) are only
    # suggested, so that apt installs no compiler with the package
    depends = package_names(fields["Depends"])
    assert "libbpf1" in depends
    assert not (depends | package_names(fields["Recommends"])) & COMPILER_PACKAGES, fields
    assert {"python3-bpfcc", "linux-headers-generic"} <= package_names(fields["Suggests"])

    control = tempfile.mkdtemp()
    try:
        sh("dpkg-deb", "--control", built["deb"], control)
        assert open(os.path.join(control, "conffiles")).read().split() == [CONFIG]
        for script in ("postinst", "prerm", "postrm"):
            assert os.access(os.path.join(control, script), os.X_OK)
            sh("sh", "-n", os.path.join(control, script))
    finally:
        shutil.rmtree(control)


def rpm_entries(rpm) -> dict:
    out = sh("rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEFLAGS:fflags}|%{FILENAMES}|%{FILELINKTOS}\n]",
             rpm).stdout
    entries = {}
    for line in out.splitlines():
        head, path, target = line.split("|")
        mode, _, flags = head.partition(" ")
        entries[path] = (mode[0], target, mode, flags)
    return entries


def test_rpm_layout_and_metadata(built):
    entries = rpm_entries(built["rpm"])
    unitdir = "/usr/lib/systemd/system"
    for path in LAYOUT + [f"{unitdir}/{UNIT_NAME}"]:
        assert path in entries, f"{path} not in the .rpm"
    assert entries["/usr/bin/hostagent"][:2] == ("l", "/opt/hostagent/venv/bin/hostagent")
    assert "c" in entries[CONFIG][3] and "n" in entries[CONFIG][3], "agent.yaml must be %config(noreplace)"
    assert entries[CONFIG][2] == "-rw-r-----"
    assert entries["/var/lib/hostagent"][2] == "drwxr-x---"
    # the same files as the .deb, the unit directory aside
    deb_files = {p.replace("/lib/systemd/system/", unitdir + "/") for p, e in deb_entries(built["deb"]).items()
                 if e[0] != "d"}
    assert {p for p, e in entries.items() if e[0] != "d"} == deb_files

    requires = sh("rpm", "-qp", "--requires", built["rpm"]).stdout
    assert "libbpf.so.1" in requires and "python(abi) =" in requires
    assert "bcc" not in requires and not sh("rpm", "-qp", "--recommends", built["rpm"]).stdout.strip()
    suggests = sh("rpm", "-qp", "--suggests", built["rpm"]).stdout
    assert "python3-bcc" in suggests and "kernel-devel" in suggests
    scripts = sh("rpm", "-qp", "--scripts", built["rpm"]).stdout
    assert "check-config" in scripts and "systemctl" in scripts


def test_rpm_installs_into_a_scratch_root(built, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    sh("rpm", "--root", str(root), "--initdb")
    # --noscripts: the scratch root has no shell to run them with
    sh("rpm", "-i", "--root", str(root), "--nodeps", "--noscripts", built["rpm"])
    listed = set(sh("rpm", "-ql", "--root", str(root), "hostagent").stdout.split())
    assert listed == set(rpm_entries(built["rpm"]))
    for path in LAYOUT + [f"/usr/lib/systemd/system/{UNIT_NAME}"]:
        assert os.path.lexists(f"{root}{path}"), path
    assert os.readlink(f"{root}/usr/bin/hostagent") == "/opt/hostagent/venv/bin/hostagent"
    assert sh("rpm", "-qc", "--root", str(root), "hostagent").stdout.split() == [CONFIG]


# --- the default config and the unit, from the checkout --------------------------------------------

def uncommented(text: str) -> str:
    """The default config with its commented-out settings (`#key: value`, not `## prose`) enabled."""
    return "".join(line[1:] for line in text.splitlines(keepends=True)
                   if line.startswith("#") and not line.startswith("##"))


def test_default_config_shows_the_defaults(tmp_path):
    shipped = open(os.path.join(PACKAGING, "agent.yaml")).read()
    assert yaml.safe_load(shipped) is None, "the shipped config sets nothing: every value is commented out"
    enabled = tmp_path / "enabled.yaml"
    enabled.write_text(uncommented(shipped))
    assert set(yaml.safe_load(enabled.read_text())) >= {"collection_interval", "exporter", "ebpf", "health"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    agent = [sys.executable, "-m", "agent", "check-config"]
    with_values = sh(*agent, str(enabled), cwd=ROOT, env=clean_env())
    defaults = sh(*agent, str(empty), cwd=ROOT, env=clean_env())
    assert with_values.stdout == defaults.stdout, "a value shown in packaging/agent.yaml is not the default"


def unit_settings(path) -> dict:
    """[Service] key -> list of values (keys may repeat)."""
    settings, section = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_settings():
    s = unit_settings(os.path.join(PACKAGING, UNIT_NAME))
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/usr/bin/hostagent run --config /etc/hostagent/agent.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"] and s["StateDirectory"] == ["hostagent"]
    assert s["WatchdogSec"] and s["MemoryMax"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/hostagent"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_BPF", "CAP_PERFMON"} <= caps and "CAP_SYS_ADMIN" not in caps
    # it hides /lib/modules, where bcc finds the kernel headers
    assert "ProtectKernelModules" not in s


def test_systemd_security_exposure(capsys):
    require("systemd-analyze", "systemd")
    p = sh("systemd-analyze", "security", "--offline=true", "--no-pager", os.path.join(PACKAGING, UNIT_NAME))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout
    with capsys.disabled():
        print(f"\nsystemd-analyze security: {UNIT_NAME} exposure {m.group(1)} (target <= {MAX_EXPOSURE})")
    assert float(m.group(1)) <= MAX_EXPOSURE, p.stdout


# --- the .deb on this machine ----------------------------------------------------------------------

class NotifySocket:
    """What systemd gives a Type=notify service: a datagram socket in NOTIFY_SOCKET (under /run,
    like systemd's: the service has a private /tmp)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="hostagent-notify-", dir="/run")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list = []
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().split("\n"))

    def wait_for(self, message: str, timeout: float, after: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if message in self.messages[after:]:
                return self.messages.index(message, after)
            time.sleep(0.05)
        raise AssertionError(f"no {message} within {timeout}s; got {self.messages}")

    def close(self):
        self._closed = True
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def sandboxed(unit_path: str, *command) -> list:
    """A command (default: the unit's ExecStart) confined as the unit's settings confine it."""
    return ["/usr/bin/python3", os.path.join(PACKAGING, "unit-sandbox.py"), unit_path,
            *(("--", *command) if command else ())]


# What the package owns or purges; anything already there (a checkout's agent writing its default
# /var/lib/hostagent, say) is moved aside for the test and put back afterwards.
PACKAGE_PATHS = ("/etc/hostagent", "/var/lib/hostagent", "/opt/hostagent", "/usr/bin/hostagent")


def keep_out_of_the_way() -> dict:
    moved = {}
    for path in PACKAGE_PATHS:
        if os.path.lexists(path):
            aside = f"{path}.test-aside-{os.getpid()}"
            os.rename(path, aside)
            moved[path] = aside
    return moved


def put_back(moved: dict) -> None:
    for path, aside in moved.items():
        if not os.path.lexists(path):
            os.rename(aside, path)


def tree_digest(top: str) -> dict:
    """relative path -> sha256 of every file below top."""
    out = {}
    for d, _, files in os.walk(top):
        for name in files:
            path = os.path.join(d, name)
            out[os.path.relpath(path, top)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def generation_seen(receiver, generation: str) -> bool:
    return any(res.get("test.generation") == generation for res, _, _ in receiver.all_metrics())


def test_deb_install_run_reload_upgrade_purge(built, grpc_receiver, tmp_path):
    require("systemd-analyze", "systemd")
    if sh("/usr/bin/python3", "-c", "import seccomp", check=False).returncode != 0:
        pytest.fail("python3-seccomp is missing: install.sh --dev must install it")
    if installed_version() is not None:
        pytest.fail(f"hostagent {installed_version()} is already installed here; this test installs and purges "
                    "the package: remove it first (dpkg --purge hostagent)")
    purge()  # config files left by an earlier removal
    set_aside = keep_out_of_the_way()
    agent = None
    notify = NotifySocket()
    log_path = tmp_path / "agent.log"
    try:
        # --- install: dependencies are already there (install.sh), nothing else is pulled in
        sh("dpkg", "--install", built["deb"])
        assert installed_version() == built["version"]
        sh("dpkg", "--verify", "hostagent")
        for path in LAYOUT + [DEB_UNIT]:
            assert os.path.lexists(path), path
        assert os.path.realpath("/usr/bin/hostagent") == "/opt/hostagent/venv/bin/hostagent"
        assert oct(os.stat("/var/lib/hostagent").st_mode & 0o777) == "0o750"
        assert os.path.realpath(WANTS_LINK) == os.path.realpath(DEB_UNIT), "postinst enables the unit"

        assert sh("/usr/bin/hostagent", "version").stdout.strip() == f"hostagent {built['version']}"
        sh("/usr/bin/hostagent", "check-config", CONFIG)
        # the venv runs the distro interpreter: bcc (python3-bpfcc) is importable beside its own dependencies
        sh("/opt/hostagent/venv/bin/python3", "-I", "-c",
           "import bcc, grpc, numpy, yaml; assert grpc.__file__.startswith('/opt/hostagent/venv/'), grpc.__file__")
        sh("systemd-analyze", "verify", DEB_UNIT)

        # --- hostagent probes: the unit's sandbox keeps every probe this host can run
        full = {p["name"]: p["state"] for p in json.loads(sh("/usr/bin/hostagent", "probes", "--json").stdout)}
        confined = {p["name"]: p["state"] for p in
                    json.loads(sh(*sandboxed(DEB_UNIT, "/usr/bin/hostagent", "probes", "--json")).stdout)}
        assert full and confined == full, f"the unit's sandbox turns probes off: {full} -> {confined}"

        # --- an edited config: the test receiver, fast intervals, a marker resource attribute
        health_port = free_port()
        shipped = open(CONFIG).read()

        def configure(generation: str) -> None:
            text = shipped + "\n# local settings\n" + yaml.safe_dump({
                "collection_interval": "1s",
                "shutdown_timeout": "5s",
                "resource": {"attributes": {"test.generation": generation}},
                "batch": {"timeout": "200ms"},
                "exporter": {"type": "otlp", "otlp": {"endpoint": grpc_receiver.endpoint},
                             "retry": {"initial_interval": "200ms", "max_interval": "1s"}},
                "health": {"endpoint": f"127.0.0.1:{health_port}"},
            })
            with open(CONFIG, "w") as f:
                f.write(text)

        configure("1")
        sh("/usr/bin/hostagent", "check-config", CONFIG)

        # --- run ExecStart as systemd would: confined, notify socket, watchdog, minimal environment
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"}
        log = open(log_path, "w")
        agent = subprocess.Popen(sandboxed(DEB_UNIT), env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        agent_log = lambda: log_path.read_text()  # noqa: E731

        try:
            ready = notify.wait_for("READY=1", 60)
            notify.wait_for("WATCHDOG=1", 10, after=ready)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{agent_log()}") from None
        assert grpc_receiver.wait_for(lambda r: generation_seen(r, "1"), 30), agent_log()
        assert {"system.cpu.time", "system.memory.usage"} <= grpc_receiver.metric_names()
        if "on" in full.values():  # eBPF loads in the unit's sandbox
            assert grpc_receiver.wait_for(
                lambda r: any("ebpf" in scope for _, scope, _ in r.all_metrics()), 60), agent_log()
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/", timeout=5) as response:
            assert response.status == 200

        # --- SIGHUP (ExecReload): a changed config takes effect ...
        configure("2")
        agent.send_signal(signal.SIGHUP)
        assert grpc_receiver.wait_for(lambda r: generation_seen(r, "2"), 30), agent_log()
        # ... and a broken one is rejected while the running config goes on
        edited = open(CONFIG).read()
        with open(CONFIG, "a") as f:
            f.write("collection_interval: often\n")
        agent.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert agent.poll() is None, agent_log()
        before = len(grpc_receiver.metrics)
        assert grpc_receiver.wait_for(lambda r: len(r.metrics) > before + 1, 15), agent_log()
        assert generation_seen(grpc_receiver, "2")
        with open(CONFIG, "w") as f:
            f.write(edited)

        # --- SIGTERM: STOPPING=1, drain, exit 0
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, agent_log()
        notify.wait_for("STOPPING=1", 5)
        agent = None

        # nothing was written under /opt at run time: every file there belongs to the package
        owned = set(sh("dpkg-query", "--listfiles", "hostagent").stdout.split())
        strays = [os.path.join(d, f) for d, dirs, files in os.walk("/opt/hostagent") for f in files + dirs
                  if os.path.join(d, f) not in owned]
        assert strays == []

        # --- upgrade: the edited config and the persistent queue survive, the code is replaced
        os.makedirs(QUEUE_DIR, exist_ok=True)
        with open(os.path.join(QUEUE_DIR, "test-marker"), "w") as f:
            f.write("queued payload")
        queue = tree_digest(QUEUE_DIR)
        sh("dpkg", "--install", built["deb_newer"])
        assert installed_version() == built["newer"]
        assert sh("/usr/bin/hostagent", "version").stdout.strip() == f"hostagent {built['newer']}"
        assert open(CONFIG).read() == edited
        assert tree_digest(QUEUE_DIR) == queue
        assert not [n for n in os.listdir("/etc/hostagent") if n != "agent.yaml"], os.listdir("/etc/hostagent")

        # --- postinst refuses a config that does not validate, and configures once it is fixed
        with open(CONFIG, "a") as f:
            f.write("collection_interval: often\n")
        bad = sh("dpkg", "--install", built["deb_newer"], check=False)
        assert bad.returncode != 0 and "collection_interval" in bad.stderr, bad.stderr
        with open(CONFIG, "w") as f:
            f.write(edited)
        sh("dpkg", "--configure", "--pending")
        assert installed_version() == built["newer"]

        # --- remove keeps config and state, purge removes everything
        sh("dpkg", "--remove", "hostagent")
        for path in ("/opt/hostagent", "/usr/bin/hostagent", DEB_UNIT):
            assert not os.path.lexists(path), f"{path} left after dpkg --remove"
        assert open(CONFIG).read() == edited
        assert tree_digest(QUEUE_DIR) == queue

        sh("dpkg", "--purge", "hostagent")
        for path in ("/opt/hostagent", "/etc/hostagent", "/var/lib/hostagent", "/usr/bin/hostagent", DEB_UNIT,
                     WANTS_LINK, "/etc/systemd/system/" + UNIT_NAME):
            assert not os.path.lexists(path), f"{path} left after dpkg --purge"
        assert sh("dpkg-query", "-W", "hostagent", check=False).returncode != 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        notify.close()
        purge()
        put_back(set_aside)
