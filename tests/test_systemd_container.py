"""hostagent.service under a real systemd. PID 1 of the test machine need not be systemd: a Debian 12
root (.ci/systemd-root.sh, cached under /var/cache/hostagent-test) boots with systemd-nspawn, the
checkout's .deb is installed in it with apt (--no-install-recommends), and the unit is driven with
systemctl as an administrator drives it: start (Type=notify), the eBPF probes under the unit's
sandbox loaded through CO-RE on a root without clang, LLVM, kernel headers or bcc, reload, the
watchdog, the journal, `systemd-analyze security`, stop/start with a backlog in the persistent
queue, purge. The tests share one container (module scope) and run in file order; each leaves the
service running with the base test config.

The container: --volatile=overlay (the cached root stays read-only; changes go to a tmpfs that
disappears at power-off), its own network namespace (the agent's health port and the test
receiver see nothing of the host's), CAP_BPF and CAP_PERFMON and the bpf and perf_event_open
system calls passed in (systemd-nspawn withholds them by default), tracefs mounted (libbpf finds
the tracepoints there), no kernel headers (the host's /lib/modules and /usr/src stay outside), and its
own cgroup below one this module creates and removes. What a container cannot show (the unit's sandbox on a host kernel with
the host's processes) stays in test_packaging.py with packaging/unit-sandbox.py.

Needs root, systemd-nspawn (systemd-container), debootstrap and, for the first build of the root,
the machine's Debian mirror (install.sh --dev installs the tools).
"""
import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time

import pytest
import yaml

from tests.helpers import ROOT
from tests.otlp_receiver import HttpReceiver

UNIT = "hostagent.service"
CONFIG = "/etc/hostagent/agent.yaml"
STATE = "/var/lib/hostagent"
QUEUE_DIR = STATE + "/queue/otlp"
DROPIN = "/etc/systemd/system/hostagent.service.d/test-watchdog.conf"
MAX_EXPOSURE = 3.0
# The container's private network namespace has nothing else listening.
RECEIVER_PORT = 4318
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
       "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="boots a container: needs root"),
    pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a dpkg-based host"),
]


def report(request, msg: str) -> None:
    """A measurement, shown in the test output even with -q."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nsystemd container: {msg}")


def run(*cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


# --- cgroups: the container runs below one this module creates, so nothing is left behind -------

def cgroup_roots() -> list:
    """Hierarchies systemd-nspawn places the container in: the unified one and, on a hybrid
    host, the named systemd one."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["/sys/fs/cgroup"]
    return [d for d in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd") if os.path.isdir(d)]


def cgroup_pids(path: str) -> set:
    pids = set()
    for d, _, _ in os.walk(path):
        with contextlib.suppress(FileNotFoundError):
            pids |= {int(p) for p in open(os.path.join(d, "cgroup.procs")).read().split()}
    return pids


def remove_cgroup(path: str) -> None:
    for _ in range(50):
        pids = cgroup_pids(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for d, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(d)


# --- the container ----------------------------------------------------------------------------------

class Container:
    installed = ""  # apt's output
    started = ""  # the unit's ActiveState right after the install

    def __init__(self, root: str, workdir: str):
        self.root, self.workdir = root, workdir
        self.name = f"hostagent-test-{os.getpid()}"
        self.cgroups = [os.path.join(r, self.name) for r in cgroup_roots()]
        self.log = os.path.join(workdir, "nspawn.log")
        self.proc = None
        self.leader = None

    def boot(self, timeout: float = 120) -> float:
        started = time.monotonic()
        nspawn = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "--volatile=overlay",
                  "--private-network", "--console=pipe", f"--machine={self.name}", "--directory", self.root,
                  "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf perf_event_open"]
        for cg in self.cgroups:
            os.mkdir(cg)
        # join the cgroups first, then become systemd-nspawn
        enter = "".join(f"echo $$ > {shlex.quote(cg)}/cgroup.procs; " for cg in self.cgroups)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["sh", "-ec", f'{enter}exec "$@"', "sh", *nspawn], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            assert self.proc.poll() is None, f"systemd-nspawn exited {self.proc.returncode}:\n{self.nspawn_log()}"
            assert time.monotonic() < deadline, f"no container init within {timeout}s:\n{self.nspawn_log()}"
            with contextlib.suppress(FileNotFoundError):
                for pid in open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split():
                    if open(f"/proc/{pid}/comm").read().strip() == "systemd":
                        self.leader = int(pid)
            time.sleep(0.1)
        # systemd-nspawn mounts /sys/kernel over a bind of tracefs: mount it inside, as install.sh does
        # (/sys/kernel/btf/vmlinux, which CO-RE relocates against, is there either way)
        if os.path.ismount("/sys/kernel/tracing"):
            self.sh("mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing")
        # empty until PID 1 answers on its socket
        state = poll(lambda: self.sh("systemctl", "is-system-running", "--wait", check=False,
                                     timeout=max(1, deadline - time.monotonic())).stdout.strip(),
                     deadline - time.monotonic(), "the container's systemd answers")
        assert state in ("running", "degraded"), \
            f"the container's systemd is {state!r}:\n{self.sh('systemctl', '--failed', check=False).stdout}"
        return time.monotonic() - started

    def nspawn_log(self) -> str:
        return open(self.log, errors="replace").read()[-4000:]

    def sh(self, *cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
        """A command inside the container (all its namespaces), as root."""
        return run("nsenter", f"--target={self.leader}", "--all", "--", *cmd, check=check, timeout=timeout, env=ENV)

    def path(self, path: str) -> str:
        """The host's way to a file inside the container."""
        return f"/proc/{self.leader}/root{path}"

    def write(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(self.path(path)), exist_ok=True)
        with open(self.path(path), "w") as f:
            f.write(text)

    def systemctl(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        return self.sh("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, prop: str) -> str:
        return self.systemctl("show", "--property", prop, "--value", UNIT).stdout.strip()

    def journal(self, invocation: str = None) -> list:
        """The unit's journal entries (PID 1's about the unit and the agent's own), of one
        invocation (one start) when given."""
        self.sh("journalctl", "--sync")
        # journald labels a process's lines from a context it reads per PID and caches for a few
        # seconds. In this container the agent's first lines are sometimes read while its process
        # still counts as PID 1's (init.scope), so they are missing from --unit: they are taken by
        # the agent's syslog identifier too.
        out = self.sh("journalctl", "--unit", UNIT, "--output", "json", "--no-pager").stdout + \
            self.sh("journalctl", f"SYSLOG_IDENTIFIER={UNIT.split('.')[0]}", "--output", "json", "--no-pager").stdout
        by_cursor = {e["__CURSOR"]: e for e in map(json.loads, filter(str.strip, out.splitlines()))}
        entries = sorted(by_cursor.values(), key=lambda e: int(e["__MONOTONIC_TIMESTAMP"]))
        for e in entries:
            if isinstance(e.get("MESSAGE"), list):  # not UTF-8: bytes
                e["MESSAGE"] = bytes(e["MESSAGE"]).decode(errors="replace")
            e.setdefault("MESSAGE", "")
        if invocation:
            # ... and such lines carry no invocation ID: the agent's lines are also taken by its PID,
            # from when it was started for this invocation (PID 1's debug line "Forked ... as N", or
            # the unit's current main process)
            ours = [e for e in entries if invocation in (e.get("INVOCATION_ID"), e.get("_SYSTEMD_INVOCATION_ID"))]
            since = {m.group(1): int(e["__MONOTONIC_TIMESTAMP"]) for e in ours
                     for m in [re.search(r"Forked \S+ as (\d+)", e["MESSAGE"])] if m}
            if self.show("InvocationID") == invocation and self.show("MainPID") != "0":
                since.setdefault(self.show("MainPID"), int(self.show("ExecMainStartTimestampMonotonic")))
            ours_ids = {id(e) for e in ours}
            entries = [e for e in entries if id(e) in ours_ids or (
                e.get("_PID") in since and int(e["__MONOTONIC_TIMESTAMP"]) >= since[e["_PID"]])]
        return entries

    def wait_journal(self, pattern: str, invocation: str, timeout: float = 60, count: int = 1) -> re.Match:
        """The count-th line of the invocation matching pattern, once there."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in (re.search(pattern, e["MESSAGE"]) for e in self.journal(invocation)) if m]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                lines = "\n".join(e["MESSAGE"] for e in self.journal(invocation))
                raise AssertionError(f"no journal line matching {pattern!r} within {timeout}s:\n{lines}")
            time.sleep(0.3)

    def poweroff(self, timeout: float = 60) -> None:
        if self.proc is not None:
            # systemd-nspawn turns SIGTERM into an orderly shutdown of the container
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for cg in self.cgroups:
            remove_cgroup(cg)


libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_network_namespace(pid: int, make):
    """make(), run in a thread that has joined the network namespace of pid: the sockets it opens
    (a receiver's listening socket) belong to that namespace."""
    result = {}

    def target():
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                result["error"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            result["value"] = make()
        except BaseException as e:  # re-raised in the caller
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def items_received(receiver, generation: str) -> int:
    """Data points and log records of one config generation, as the queue counts its items."""
    points = sum(len(getattr(m, m.WhichOneof("data")).data_points) for res, _, m in receiver.all_metrics()
                 if res.get("test.generation") == generation)
    return points + sum(1 for res, _, _ in receiver.all_logs() if res.get("test.generation") == generation)


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.2)


def agent_config(generation: str, **overrides) -> str:
    """/etc/hostagent/agent.yaml for the tests: fast intervals, a marker resource attribute."""
    settings = {"collection_interval": "1s", "shutdown_timeout": "2s", "batch": {"timeout": "200ms"},
                "resource": {"attributes": {"test.generation": generation}}}
    settings.update(overrides)
    return "# test settings\n" + yaml.safe_dump(settings)


@pytest.fixture(scope="module")
def container(hostagent_deb, tmp_path_factory, request):
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install.sh --dev must install the {package} package")
    started = time.monotonic()
    root = run(os.path.join(ROOT, ".ci", "systemd-root.sh"), timeout=1200).stdout.strip().splitlines()[-1]
    report(request, f"root {root} ready in {time.monotonic() - started:.0f}s")
    c = Container(root, str(tmp_path_factory.mktemp("container")))
    try:
        booted = c.boot()
        state = c.sh("systemctl", "is-system-running", check=False).stdout.strip()
        report(request, f"booted to {state} in {booted:.1f}s")
        # every dependency is in the root already: apt installs the package alone (the container
        # has no network to download anything from); postinst enables and starts the service
        shutil.copy(hostagent_deb, c.path("/root/"))
        c.installed = c.sh("apt-get", "install", "--yes", "--no-install-recommends",
                           "/root/" + os.path.basename(hostagent_deb), timeout=300).stdout
        c.started = c.show("ActiveState")
        # the tests run with fast intervals
        c.write(CONFIG, agent_config("1"))
        c.systemctl("restart", UNIT)
        yield c
    finally:
        c.poweroff()
    assert not [line for line in open("/proc/self/mounts") if root in line], "mounts of the root left behind"


# --- the tests, in order ----------------------------------------------------------------------------

def test_apt_installs_the_deb_offline_and_starts_the_service(container):
    assert re.search(r"^0 upgraded, 1 newly installed", container.installed, re.M), container.installed
    assert container.sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "hostagent").stdout.startswith("ii")
    assert container.systemctl("is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    # postinst's start is a Type=notify start: it returns once the service is up
    assert container.started == "active"
    # this systemd knows every setting of the unit
    verify = container.sh("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # every program the unit runs comes from the package or one it depends on
    depends = container.sh("dpkg-query", "-W", "-f", "${Depends}", "hostagent").stdout
    needed = {re.sub(r"[ (].*", "", d.strip()) for d in depends.split(",")} | {"hostagent"}
    for key in ("ExecStart", "ExecReload"):
        program = re.search(r"path=(\S+)", container.show(key)).group(1)
        owner = container.sh("dpkg-query", "--search", program).stdout.split(":")[0]
        assert owner in needed, f"{key} runs {program} from {owner}, which hostagent does not depend on ({depends})"


# Packages a CO-RE host does without: the compiler, LLVM, kernel headers, bcc.
COMPILER_PACKAGES = re.compile(r"^(clang(-\d+)?|llvm(-.*)?|libllvm\d+|libclang.*|linux-headers-.*|python3-bpfcc|libbpfcc|"
                               r"bpfcc-tools|gcc(-\d+)?|cpp(-\d+)?)$")


def test_probes_run_through_core_without_a_compiler_or_headers(container, request):
    installed = container.sh("dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n").stdout.splitlines()
    names = [line.split()[0] for line in installed if line.split()[1:2] == ["ii"]]
    assert not [n for n in names if COMPILER_PACKAGES.match(n)], names
    assert container.sh("sh", "-c", "command -v clang clang-14 llc gcc", check=False).stdout.strip() == ""
    krel = os.uname().release
    assert not os.path.lexists(container.path(f"/lib/modules/{krel}/build"))
    assert not os.path.lexists(container.path(f"/lib/modules/{krel}/source"))
    assert container.sh("python3", "-c", "import bcc", check=False).returncode != 0, "bcc is importable"
    assert os.path.exists(container.path("/sys/kernel/btf/vmlinux"))
    # every probe `hostagent probes` shows on loads through CO-RE
    rows = json.loads(container.sh("hostagent", "probes", "--json").stdout)
    on = {p["name"]: p.get("loader") for p in rows if p["state"] == "on"}
    assert on and set(on.values()) == {"core"}, rows
    text = container.sh("hostagent", "probes").stdout
    assert all(re.search(rf"^{name}\s+on\s+core\b", text, re.M) for name in on), text
    report(request, f"probes on through CO-RE without compiler or headers: {sorted(on)}")


def test_start_reaches_active_only_after_ready(container):
    assert container.show("Type") == "notify"
    container.systemctl("stop", UNIT)
    container.systemctl("log-level", "debug")  # PID 1 then logs each notification and state change
    try:
        container.systemctl("start", UNIT)
    finally:
        container.systemctl("log-level", "info")
    assert container.show("ActiveState") == "active"
    pid, invocation = container.show("MainPID"), container.show("InvocationID")
    container.wait_journal(r"Changed start -> running", invocation)
    messages = [e["MESSAGE"] for e in container.journal(invocation) if e.get("_PID") == "1"]
    ready = [i for i, m in enumerate(messages) if re.search(rf"notification message from PID {pid} \(.*READY=1", m)]
    activating = messages.index("hostagent.service: Changed dead -> start")
    running = messages.index("hostagent.service: Changed start -> running")
    assert ready and activating < ready[0] < running, "\n".join(messages)


def probe_states(rows) -> dict:
    return {p["name"]: p["state"] for p in rows}


def test_probes_load_under_the_unit_sandbox(container, request):
    # unconfined, in the container: what this kernel and the container allow
    everything = probe_states(json.loads(container.sh("hostagent", "probes", "--json").stdout))
    expected = {name for name, state in everything.items() if state == "on"}
    assert expected, f"no probe can load in the container: {everything}"
    # the service, under hostagent.service's sandbox: the same probes load
    invocation = container.show("InvocationID")
    # the probes load after READY=1
    m = container.wait_journal(r"ebpf_probes on=(\S*)", invocation, timeout=180)
    assert set(m.group(1).split(",")) == expected, m.group(0)
    # ... and their data is exported
    out = container.path(STATE + "/otlp/metrics.jsonl")

    def ebpf_scopes():
        if not os.path.exists(out):
            return set()
        scopes = set()
        for line in open(out):
            if not line.endswith("\n"):  # being written
                break
            for rm in json.loads(line).get("resourceMetrics", []):
                scopes |= {sm["scope"]["name"] for sm in rm.get("scopeMetrics", []) if "ebpf" in sm["scope"]["name"]}
        return scopes
    scopes = poll(ebpf_scopes, 120, "eBPF metrics in the file exporter output")
    report(request, f"probes on under the unit: {sorted(expected)}; exported: {sorted(scopes)}")


def test_reload_applies_a_new_config(container):
    pid = container.show("MainPID")
    invocation = container.show("InvocationID")
    moved = STATE + "/reloaded/metrics.jsonl"
    container.write(CONFIG, agent_config("2", exporter={"file": {"path": moved}}))
    container.systemctl("reload", UNIT)
    # the same process, now writing where the new config says
    poll(lambda: os.path.exists(container.path(moved)) and '"2"' in open(container.path(moved)).read(), 60,
         f"metrics of the reloaded config in {moved}")
    assert container.show("MainPID") == pid and container.show("ActiveState") == "active"
    container.wait_journal(r"logger=hostagent\.runtime reloaded", invocation)

    # a config that does not validate is rejected; the running one goes on
    container.write(CONFIG, agent_config("2", exporter={"file": {"path": moved}}) + "collection_interval: often\n")
    container.systemctl("reload", UNIT)
    container.wait_journal(r"reload_rejected .*collection_interval", invocation)
    size = os.path.getsize(container.path(moved))
    poll(lambda: os.path.getsize(container.path(moved)) > size, 60, "the running config goes on exporting")
    assert container.show("MainPID") == pid and container.show("ActiveState") == "active"

    container.write(CONFIG, agent_config("1"))
    container.systemctl("reload", UNIT)


def test_a_config_error_fails_the_start_without_restarts(container):
    container.write(CONFIG, agent_config("1") + "collection_interval: often\n")
    try:
        assert container.systemctl("restart", UNIT, check=False).returncode != 0
        # exit status 2 (a config error) is final: the unit fails instead of restarting every RestartSec
        state = poll(lambda: container.show("SubState") in ("failed", "auto-restart") and container.show("SubState"),
                     60, "the start fails")
        assert (state, container.show("ExecMainStatus")) == ("failed", "2")
        invocation = container.show("InvocationID")
        container.wait_journal(r"collection_interval", invocation)
    finally:
        container.write(CONFIG, agent_config("1"))
        container.systemctl("reset-failed", UNIT, check=False)
        container.systemctl("restart", UNIT)


def test_watchdog_restarts_a_stopped_agent(container):
    # hostagent.service's WatchdogSec (60s) made short so that the test is quick, and the stopped
    # process aborted quickly too (TimeoutAbortSec: SIGKILL after the watchdog's SIGABRT)
    container.write(DROPIN, "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\nRestartSec=1s\n")
    container.systemctl("daemon-reload")
    try:
        container.systemctl("log-level", "debug")
        container.systemctl("restart", UNIT)
        pid, invocation = container.show("MainPID"), container.show("InvocationID")
        restarts = container.show("NRestarts")
        # the agent keeps the watchdog fed while it runs (it pings every second: five pings outlast
        # the 3s limit) ...
        container.wait_journal(rf"notification message from PID {pid} \(.*WATCHDOG=1", invocation, count=5)
        # ... and when it stops responding, systemd kills it and starts a new one
        container.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)
        container.wait_journal(r"Watchdog timeout", invocation)
        poll(lambda: container.show("NRestarts") != restarts and container.show("ActiveState") == "active", 60,
             "a restart after the watchdog timeout")
        assert container.show("MainPID") != pid
    finally:
        container.systemctl("log-level", "info")
        os.unlink(container.path(DROPIN))
        container.systemctl("daemon-reload")
        container.systemctl("restart", UNIT)


def test_journal_has_the_agent_lines(container):
    pid, invocation = container.show("MainPID"), container.show("InvocationID")
    container.wait_journal(r"logger=hostagent\.runtime started version=", invocation)
    agent = [e for e in container.journal(invocation) if e.get("_PID") == pid]
    assert agent and all(e.get("SYSLOG_IDENTIFIER") == "hostagent" for e in agent), agent[:3]
    info = [e for e in agent if " level=info " in e["MESSAGE"]]
    assert info and all(e.get("PRIORITY") == "6" and e["MESSAGE"].startswith("ts=") for e in info), info[:3]
    # what a user reads: `journalctl -u hostagent` has the agent's lines (a reload logs fresh ones,
    # past the seconds in which journald may still take the process for PID 1's; see journal())
    def in_unit_journal():
        container.systemctl("reload", UNIT)
        time.sleep(2)
        text = container.sh("journalctl", "--unit", UNIT, "--no-pager").stdout
        return re.search(rf"hostagent\[{pid}\]: .*logger=hostagent\.runtime reloaded", text)
    poll(in_unit_journal, 60, f"the agent's lines in journalctl --unit {UNIT}")


def test_systemd_analyze_security_of_the_installed_unit(container, request):
    out = container.sh("systemd-analyze", "security", "--no-pager", UNIT).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    report(request, f"systemd-analyze security {UNIT}: exposure {m.group(1)} (at most {MAX_EXPOSURE})")
    assert float(m.group(1)) <= MAX_EXPOSURE, out


def test_stop_keeps_the_queue(container, request):
    otlp = {"type": "otlp", "otlp": {"protocol": "http/protobuf", "endpoint": f"http://127.0.0.1:{RECEIVER_PORT}",
                                     "compression": "none"},
            "queue": {"type": "persistent"}, "retry": {"initial_interval": "200ms", "max_interval": "1s"}}
    # the backend is down: batches wait in the persistent queue under the state directory
    container.write(CONFIG, agent_config("queued", exporter=otlp))
    container.systemctl("restart", UNIT)
    invocation = container.show("InvocationID")
    container.wait_journal(r"export_queue type=persistent directory=" + QUEUE_DIR, invocation)
    container.wait_journal(r"export_retry ", invocation)
    # a line's level is its journal priority: `journalctl -p warning` shows the retries
    warnings = [e for e in container.journal(invocation) if " level=warning " in e["MESSAGE"]]
    assert warnings and all(e.get("PRIORITY") == "4" for e in warnings), warnings[:3]
    container.systemctl("stop", UNIT)
    queued = int(container.wait_journal(r"shutdown_queued items=(\d+)", invocation).group(1))
    assert queued > 0 and os.listdir(container.path(QUEUE_DIR))

    # the next start finds every item on disk and delivers it once the backend is up
    receiver = in_network_namespace(container.leader, lambda: HttpReceiver(RECEIVER_PORT).start())
    try:
        container.write(CONFIG, agent_config("after", exporter=otlp))
        container.systemctl("start", UNIT)
        invocation = container.show("InvocationID")
        found = int(container.wait_journal(r"export_queue type=persistent .* items=(\d+)", invocation).group(1))
        assert found == queued
        assert receiver.wait_for(lambda r: items_received(r, "queued") >= queued, 60), \
            f"{items_received(receiver, 'queued')} of {queued} queued items delivered"
        assert receiver.wait_for(lambda r: items_received(r, "after") > 0, 30)
        delivered = items_received(receiver, "queued")
        report(request, f"stop/start: {queued} queued items kept on disk, {delivered} delivered")
    finally:
        receiver.stop()
    container.write(CONFIG, agent_config("1"))
    container.systemctl("restart", UNIT)


def test_apt_remove_keeps_state_and_purge_removes_it(container):
    container.sh("apt-get", "remove", "--yes", "hostagent", timeout=300)
    assert container.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert os.path.isdir(container.path(QUEUE_DIR)) and os.path.exists(container.path(CONFIG))
    container.sh("apt-get", "purge", "--yes", "hostagent", timeout=300)
    for path in (STATE, "/etc/hostagent", "/opt/hostagent", "/usr/bin/hostagent", "/lib/systemd/system/" + UNIT,
                 "/etc/systemd/system/multi-user.target.wants/" + UNIT, "/etc/systemd/system/" + UNIT):
        assert not os.path.lexists(container.path(path)), f"{path} left after apt purge"
    assert container.sh("dpkg-query", "-W", "hostagent", check=False).returncode != 0
    assert container.systemctl("list-unit-files", UNIT, check=False).stdout.count(UNIT) == 0
