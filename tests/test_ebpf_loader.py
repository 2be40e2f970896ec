"""Feature checks and loading: what is on and why the rest is off, one probe's failure never
stopping another, the kernel facts probes build on (BTF offsets, tracepoint fields), and the
same API without privileges."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import EbpfSource, ProbeStatus, check, format_table
from agent.sources.ebpf.config import EbpfConfig, ProbeConfig
from agent.sources.ebpf.loader import (btf_member_offset, layout_problems, privilege_problem, tracepoint_available,
                                       tracepoint_fields)
from agent.sources.ebpf import libbpf
from agent.sources.ebpf.libbpf import LOG_BYTES
from agent.sources.ebpf.probe import Probe
from agent.sources.ebpf.process import ProcessProbe
from agent.sources.ebpf.registry import PROBES
from agent.sources.ebpf.ringbuf import PAGE_SIZE
from tests.ebpf_helpers import CORE_EVENT, DATA, CoreTestProbe, attached, compile_core, core_objects
from tests.helpers import ROOT, finishes, hostagent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")

GOOD_PROGRAM = b"""
BPF_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    int zero = 0;
    hits.increment(zero);
    return 0;
}
"""


class FileProbe(Probe):
    """A probe whose program is a given text, written to a temporary file."""
    tracepoints = ("sched:sched_process_exec",)

    def __init__(self, name: str, text: bytes, tracepoints=None, default_enabled=True, fail_setup=False):
        self.name, self.default_enabled, self.fail_setup = name, default_enabled, fail_setup
        if tracepoints is not None:
            self.tracepoints = tracepoints
        self._file = tempfile.NamedTemporaryFile(suffix=".bpf.c")
        self._file.write(text)
        self._file.flush()
        self.closed = False

    @property
    def source_file(self) -> str:
        return self._file.name

    def setup(self, bpf) -> None:
        super().setup(bpf)
        if self.fail_setup:
            raise RuntimeError("no such map")

    def close(self) -> None:
        self.closed = True


def by_name(statuses) -> dict:
    return {s.name: s for s in statuses}


def test_registry_holds_the_event_probes():
    for name in ("process", "oom", "signals"):
        assert PROBES[name].name == name
        assert os.path.exists(PROBES[name]().source_file)


@needs_root
def test_check_as_root_says_on_for_every_default_probe():
    statuses = by_name(check(EbpfConfig()))
    for name in ("process", "oom", "signals"):
        assert statuses[name].state == "on" and statuses[name].reason == ""
    assert statuses["process"].tracepoints == ProcessProbe.tracepoints + ProcessProbe.argv_tracepoints
    for name, cls in PROBES.items():
        if not cls.default_enabled:
            assert statuses[name].state == "off" and "off by default" in statuses[name].reason


def test_config_switches():
    off = by_name(check(EbpfConfig(enabled=False)))
    assert all(s.state == "off" and "ebpf.enabled" in s.reason for s in off.values())
    cfg = EbpfConfig(probes={"oom": ProbeConfig(enabled=False)})
    oom = by_name(check(cfg))["oom"]
    assert oom.state == "off" and oom.reason == "disabled in config (ebpf.probes.oom.enabled: false)"
    quiet = FileProbe("quiet", GOOD_PROGRAM, default_enabled=False)
    assert check(EbpfConfig(), {"quiet": quiet})[0].reason.startswith("off by default")
    if os.geteuid() == 0:
        on = check(EbpfConfig(probes={"quiet": ProbeConfig(enabled=True)}), {"quiet": quiet})
        assert on[0].state == "on"


@needs_root
def test_missing_tracepoint_turns_only_that_probe_off():
    probes = {"ghost": FileProbe("ghost", GOOD_PROGRAM, ("nosuch:event", "sched:sched_process_exec")),
              "good": FileProbe("good", GOOD_PROGRAM)}
    statuses = by_name(check(EbpfConfig(), probes))
    assert statuses["ghost"].state == "off"
    assert statuses["ghost"].reason == "tracepoint missing on this kernel: nosuch:event"
    assert statuses["good"].state == "on"


@needs_root
def test_a_failing_probe_never_stops_the_others(caplog):
    broken = FileProbe("broken", b"TRACEPOINT_PROBE(sched, sched_process_exec) { return undefined_thing; }")
    unattached = FileProbe("unattached", GOOD_PROGRAM, ("sched:sched_process_exec", "sched:sched_process_exit"))
    failing = FileProbe("failing", GOOD_PROGRAM, fail_setup=True)
    good = FileProbe("good", GOOD_PROGRAM)
    caplog.set_level(logging.INFO, logger="hostagent.ebpf")
    src = EbpfSource(EbpfConfig(loader="bcc"), SelfMetrics(), Resource(()),
                     probes={"broken": broken, "unattached": unattached, "failing": failing, "good": good})
    try:
        s = by_name(src.statuses)
        assert s["broken"].state == "off"
        assert s["broken"].reason.startswith("compile failed:") and "undefined_thing" in s["broken"].reason
        assert s["unattached"].state == "off"
        assert s["unattached"].reason == "not attached to sched:sched_process_exit"
        assert s["failing"].state == "off" and s["failing"].reason == "setup failed: no such map"
        assert failing.closed
        assert s["good"].state == "on" and list(src.probes) == ["good"]
    finally:
        src.close()
    assert good.closed
    # the log says once which probes are off and why
    off_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ebpf_probes_off")]
    assert len(off_lines) == 1
    for name in ("broken", "unattached", "failing"):
        assert f"{name}=" in off_lines[0]


def test_format_table_and_json():
    statuses = [ProbeStatus("process", ("sched:sched_process_exec",), "on", loader="core"),
                ProbeStatus("syscalls", ("raw_syscalls:sys_enter",), "off", "off by default")]
    table = format_table(statuses).splitlines()
    assert table[0].split() == ["PROBE", "STATE", "LOADER", "TRACEPOINTS", "/", "REASON"]
    assert table[1].split() == ["process", "on", "core", "sched:sched_process_exec"]
    assert table[2].split(None, 3) == ["syscalls", "off", "-", "off by default"]
    as_json = json.loads(json.dumps([s.as_dict() for s in statuses]))
    assert as_json[0]["loader"] == "core" and as_json[1]["reason"] == "off by default"


@needs_root
def test_tracepoint_fields_come_from_the_format_file():
    fields = tracepoint_fields("sched:sched_process_exec")
    assert fields["filename"].data_loc and fields["pid"].size == 4 and fields["pid"].signed
    assert "common_pid" not in fields
    assert tracepoint_available("sched:sched_process_exec")
    assert not tracepoint_available("sched:no_such_event")
    assert tracepoint_fields("nosuch:event") == {}


BTF_CHECK = b"""
BPF_ARRAY(out, u64, 4);
TRACEPOINT_PROBE(task, task_rename)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TEST_TGID)
        return 0;
    u64 task = bpf_get_current_task();
    int pid = 0, tgid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), (void *)(task + PID_OFFSET));
    bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(task + TGID_OFFSET));
    int k0 = 0, k1 = 1, k2 = 2;
    u64 v0 = pid, v1 = tgid, v2 = id;
    out.update(&k0, &v0);
    out.update(&k1, &v1);
    out.update(&k2, &v2);
    return 0;
}
"""


@needs_root
def test_btf_offsets_read_the_running_kernels_task_struct():
    import ctypes
    from bcc import BPF
    pid_off, tgid_off = btf_member_offset("task_struct", "pid"), btf_member_offset("task_struct", "tgid")
    assert pid_off is not None and tgid_off == pid_off + 4
    assert btf_member_offset("task_struct", "exit_code") is not None
    assert btf_member_offset("task_struct", "no_such_member") is None
    assert btf_member_offset("no_such_struct", "pid") is None
    b = BPF(text=BTF_CHECK, cflags=[f"-DTEST_TGID={os.getpid()}", f"-DPID_OFFSET={pid_off}",
                                    f"-DTGID_OFFSET={tgid_off}"])
    libc = ctypes.CDLL(None)
    name = ctypes.create_string_buffer(16)
    try:
        libc.prctl(16, name, 0, 0, 0)
        libc.prctl(15, b"btf-check", 0, 0, 0)
        libc.prctl(15, name, 0, 0, 0)
        out = b[b"out"]
        pid, tgid, id_ = (out[ctypes.c_int(i)].value for i in range(3))
    finally:
        b.cleanup()
    assert (tgid, pid) == (id_ >> 32, id_ & 0xFFFFFFFF) and tgid == os.getpid()


@needs_root
def test_close_wakes_the_reader_at_once():
    src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource(()), probes={"process": ProcessProbe}, poll_interval=3600.0)
    src.start(lambda batch: None)
    thread = src._thread
    time.sleep(0.1)
    finishes(src.close)                          # woken, not after the hour's poll interval
    assert not thread.is_alive()
    src.close()                                  # twice is harmless
    assert src.collect() == []


UNPRIVILEGED = """
import json
from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import EbpfSource, check, format_table
from agent.sources.ebpf.config import EbpfConfig
statuses = check(EbpfConfig())
src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource(()))
src.start(lambda batch: None)
groups = src.collect()
src.close()
format_table(statuses)
print(json.dumps({"check": [s.as_dict() for s in statuses],
                  "source": [s.as_dict() for s in src.statuses], "groups": len(groups)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
@pytest.mark.parametrize("drop", [
    ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],      # nobody
    ["--bounding-set=-all", "--inh-caps=-all"],                                  # root, no capabilities
], ids=["nobody", "root-without-caps"])
def test_without_privileges_everything_is_off_and_nothing_raises(drop):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(["setpriv", *drop, sys.executable, "-c", UNPRIVILEGED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["groups"] == 0
    for statuses in (out["check"], out["source"]):
        assert {s["name"] for s in statuses} == set(PROBES)
        for s in statuses:
            assert s["state"] == "off"
            if PROBES[s["name"]].default_enabled:
                assert s["reason"].startswith("not permitted:") and "CAP_BPF" in s["reason"]
    assert proc.stderr.count("ebpf_probes_off") == 1


def test_privilege_problem_as_this_process():
    assert (privilege_problem() is None) == (os.geteuid() == 0)


def _compiler_code_rss_kib() -> int:
    """Resident KiB of this process's libLLVM/libclang code mappings."""
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):
                counting = len(parts) >= 6 and parts[1] == "r-xp" and \
                    os.path.basename(parts[5]).startswith(("libLLVM", "libclang"))
            elif counting and parts[0] == "Rss:":
                total += int(parts[1])
    return total


@needs_root
def test_loading_gives_back_the_compilers_code_pages():
    """Compiling touches ~80 MB of LLVM/clang code the agent never runs again until a reload;
    after loading, none of it stays resident in the agent."""
    only_signals = EbpfConfig(loader="bcc", probes={name: ProbeConfig(enabled=name == "signals") for name in PROBES})
    src = EbpfSource(only_signals, SelfMetrics(), Resource(()))
    try:
        assert [s.name for s in src.statuses if s.on] == ["signals"]
        assert _compiler_code_rss_kib() < 1024
    finally:
        src.close()


# --- CO-RE: precompiled objects through libbpf ------------------------------------------------

class RejectedProbe(Probe):
    name = "core_rejected"
    tracepoints = ("sched:sched_process_exec",)


@pytest.fixture(scope="module")
def core_dir(tmp_path_factory):
    """tests/data/*.bpf.c built as CO-RE objects."""
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("the kernel has no BTF")
    out = str(tmp_path_factory.mktemp("core"))
    for name in ("core_test", "core_rejected"):
        compile_core(os.path.join(DATA, f"{name}.bpf.c"), out)
    return out


def _bpf_fds() -> int:
    """This process's open BPF program, map and link fds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf")
        except OSError:
            pass
    return count


def _point(groups, metric: str, probe: str) -> int:
    return next(p.value for g in groups for m in g.metrics if m.name == metric
                for p in m.points if dict(p.attributes)["probe"] == probe)


@needs_root
def test_core_object_loads_with_its_parameters_and_reads_through_the_map_layer(core_dir):
    fds = _bpf_fds()
    probe = CoreTestProbe()
    src = EbpfSource(EbpfConfig(loader="core", object_dir=core_dir), SelfMetrics(), Resource(()), probes={"core_test": probe})
    try:
        (status,) = src.statuses
        assert (status.state, status.loader, status.tracepoints) == ("on", "core", CoreTestProbe.tracepoints)
        for _ in range(5):
            os.getppid()
        os.getpgid(0)                                 # its program was not selected: autoload off
        assert probe.calls.sum(0) == 5 and probe.calls.sum(1) == 0
        keys, values = probe.by_pid.read(np.uint32)
        assert keys.tolist() == [os.getpid()] and values.tolist() == [[5]]
        (ring,) = probe.ring_buffers
        assert ring.size == 2 * PAGE_SIZE             # the size the probe asked for, not the object's
        records = ring.drain()
        # tag and target_tgid came from .rodata; ppid from a BPF_CORE_READ relocated to this kernel
        assert records.tolist() == [(77, os.getpid(), os.getppid())] * 5
        groups = src.collect()
        assert _point(groups, "hostagent.ebpf.runs", "core_test") >= 5
        assert _point(groups, "hostagent.ebpf.run_time", "core_test") > 0
        assert _point(groups, "hostagent.ebpf.skipped_events", "core_test") == 0
    finally:
        src.close()
    assert _bpf_fds() == fds                          # programs, maps, links: all closed


@needs_root
def test_a_rejected_core_object_says_why_and_stops_no_other(core_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="hostagent.ebpf")
    # bcc uses the same system libbpf and sets its own print function (or none) at times
    libbpf.library().libbpf_set_print(libbpf._PRINT_FN())                 # a NULL function: no messages
    good = CoreTestProbe()
    src = EbpfSource(EbpfConfig(loader="core", object_dir=core_dir), SelfMetrics(), Resource(()),
                     probes={"core_rejected": RejectedProbe(), "core_test": good})
    try:
        s = by_name(src.statuses)
        assert s["core_test"].on and list(src.probes) == ["core_test"]
        assert s["core_rejected"].state == "off"
        reason = s["core_rejected"].reason
        assert reason.startswith("load core_rejected.bpf.o:") and "verifier: R0 invalid mem access" in reason, reason
    finally:
        src.close()
    verifier = [r.getMessage() for r in caplog.records if r.name == "hostagent.ebpf.libbpf"]
    assert any("invalid mem access" in line for line in verifier), verifier   # the verifier's own words
    assert max(map(len, verifier)) <= LOG_BYTES + 300        # a log of any length is cut to its end
    # libbpf printed only for the load done again to say why: nothing of the probe that loaded
    assert not [line for line in verifier if "core_test" in line], verifier


@needs_root
def test_a_record_layout_that_differs_from_the_object_turns_the_probe_off(core_dir):
    fds = _bpf_fds()
    stale = CoreTestProbe()
    stale.structs = {"core_test_event": np.dtype([("tag", "<u8"), ("pid", "<u4"), ("tid", "<u4")])}
    good = CoreTestProbe()
    good.structs = {"core_test_event": CORE_EVENT}
    for probe, reason in ((stale, "layout mismatch: struct core_test_event (C) and its Python mirror differ: "
                                  "('ppid', 12, 4) != ('tid', 12, 4)"),
                          (good, "")):
        src = EbpfSource(EbpfConfig(loader="core", object_dir=core_dir), SelfMetrics(), Resource(()), probes={"core_test": probe})
        try:
            assert src.statuses[0].reason == reason
        finally:
            src.close()
    assert _bpf_fds() == fds


@needs_root
def test_loader_choice_and_its_reasons(core_dir, tmp_path):
    bcc_probe = {"good": FileProbe("good", GOOD_PROGRAM)}
    core_probe = {"core_test": CoreTestProbe()}
    missing = check(EbpfConfig(loader="core", object_dir=str(tmp_path)), core_probe)[0]
    assert (missing.state, missing.loader, missing.reason) == ("off", "core", "object missing (run bpf/build.sh)")
    first = check(EbpfConfig(object_dir=core_dir), core_probe)[0]
    assert (first.loader, first.fallback) == ("core", "")                               # auto: CO-RE first
    fallback = check(EbpfConfig(object_dir=str(tmp_path)), bcc_probe)[0]
    assert (fallback.state, fallback.loader) == ("on", "bcc")                           # auto: else bcc
    assert fallback.fallback == "object missing (run bpf/build.sh)"                     # ... and why
    forced = check(EbpfConfig(loader="bcc", object_dir=core_dir), core_probe)[0]
    assert forced.loader == "bcc"


HIDDEN = """
import json, sys
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.config import EbpfConfig
from agent.model import Resource
from agent.sources.ebpf.source import EbpfSource, check
from tests.ebpf_helpers import CoreTestProbe
core_dir, objects = sys.argv[1], sys.argv[2]
out = {"core": [s.as_dict() for s in check(EbpfConfig(loader="core", object_dir=core_dir), {"core_test": CoreTestProbe()})]}
src = EbpfSource(EbpfConfig(object_dir=core_dir), SelfMetrics(), Resource(()), probes={"core_test": CoreTestProbe()})
out["core_test"] = [s.as_dict() for s in src.statuses]
src.close()
src = EbpfSource(EbpfConfig(object_dir=objects), SelfMetrics(), Resource(()))
out["registry"] = [s.as_dict() for s in src.statuses]
out["bcc_imported"] = "bcc" in sys.modules
src.close()
print(json.dumps(out))
"""


def _hidden(over: list, cover: str, core_dir: str) -> dict:
    """HIDDEN run in a private mount namespace with `cover` bind-mounted over each path of `over`."""
    mounts = " && ".join(f"mount --bind {cover} {path}" for path in over)
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f'{mounts} && exec "$0" -c "$1" "$2" "$3"', sys.executable, HIDDEN, core_dir,
                           core_objects()], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_root
def test_without_btf_the_bcc_fallback_loads_the_probes(core_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out = _hidden(["/sys/kernel/btf/vmlinux"], str(empty), core_dir)
    (core,) = out["core"]
    assert core["state"] == "off" and core["reason"].startswith("no BTF"), core
    (core_test,) = out["core_test"]       # auto falls back to bcc, which has no source for it
    assert core_test["loader"] == "bcc" and core_test["state"] == "off"
    on = {s["name"]: s["loader"] for s in out["registry"] if s["state"] == "on"}
    assert on == {name: "bcc" for name, cls in PROBES.items() if cls.default_enabled}, out["registry"]
    assert all(s["fallback"].startswith("no BTF") for s in out["registry"] if s["state"] == "on")


@needs_root
def test_without_kernel_headers_probes_load_through_core(core_dir, tmp_path):
    release = os.uname().release
    hidden = [p for p in (f"/lib/modules/{release}/build", f"/lib/modules/{release}/source") if os.path.exists(p)]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _hidden(hidden, str(empty), core_dir)
    (core_test,) = out["core_test"]
    assert (core_test["state"], core_test["loader"]) == ("on", "core"), core_test
    registry = {s["name"]: s for s in out["registry"]}
    built = [name for name, cls in PROBES.items() if cls.default_enabled
             and os.path.exists(cls().object_file(core_objects()))]
    for name in built:
        assert (registry[name]["state"], registry[name]["loader"]) == ("on", "core"), registry[name]
    for name in set(PROBES) - set(built):
        assert registry[name]["state"] == "off"       # no headers for bcc, no object for CO-RE
    assert out["bcc_imported"] == (len(built) < sum(cls.default_enabled for cls in PROBES.values()))


def test_the_probes_doc_table_is_the_registry():
    """docs/probes.md's table lists every registered probe, in order, with its default, its
    tracepoints, and documents every metric the probe declares."""
    import re
    doc = open(os.path.join(ROOT, "docs", "probes.md")).read()
    rows = re.findall(r"^\| \[(\w+)\]\(#\1\) \| (on|\*\*off\*\*) \| (.*?) \| (.*?) \|$", doc, re.M)
    assert [name for name, *_ in rows] == list(PROBES)
    for name, default, tracepoints, _ in rows:
        cls = PROBES[name]
        assert (default == "on") == cls.default_enabled, name
        assert set(re.findall(r"`(\w+:\w+)`", tracepoints)) == set(cls.tracepoints), name
        assert cls.metrics and all(f"`{metric}`" in doc for metric in cls.metrics), name
        assert f"\n## {name}\n" in doc, name


@needs_root
def test_probe_options_from_config():
    from agent.sources.ebpf.loader import plan
    cfg = EbpfConfig(probes={"syscalls": ProbeConfig(enabled=True, counting_only=True),
                             "tcp": ProbeConfig(port=443)})
    plans = {p.status.name: p for p in plan(cfg, PROBES)}
    assert plans["syscalls"].status.tracepoints == ("raw_syscalls:sys_exit",)      # no latency programs
    assert plans["syscalls"].probe.programs(plans["syscalls"].tracepoints) == ("raw_syscalls__sys_exit",)
    assert plans["tcp"].probe.params(plans["tcp"].tracepoints)["TARGET_PORT"] == 443
    default = {p.status.name: p for p in plan(EbpfConfig(probes={"syscalls": ProbeConfig(enabled=True)}), PROBES)}
    assert default["syscalls"].probe.latency and "TARGET_PORT" not in default["tcp"].probe.params(())


@pytest.mark.parametrize("section, message", [
    ({"probes": {"tcp": {"counting_only": True}}},
     "ebpf.probes.tcp.counting_only: only the syscalls probe has this option"),
    ({"probes": {"syscalls": {"port": 80}}}, "ebpf.probes.syscalls.port: only the tcp probe has this option"),
    ({"probes": {"tcp": {"port": 70000}}},
     "ebpf.probes.tcp.port: must be a port number 1..65535 or 0 (all), got 70000"),
    ({"probes": {"tcp": {"port": -1}}}, "ebpf.probes.tcp.port: must be a port number 1..65535 or 0 (all), got -1"),
    ({"object_dir": "bpf/build"}, "ebpf.object_dir: must be an absolute path, got 'bpf/build'"),
])
def test_probe_options_are_checked(tmp_path, section, message):
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"ebpf": section}))
    res = hostagent("check-config", str(path))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_unknown_loader_is_a_config_error(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"ebpf": {"loader": "llvm"}}))
    res = hostagent("check-config", str(path))
    assert res.returncode == 2 and "ebpf.loader" in res.stderr and "auto, core, bcc" in res.stderr, res.stderr


WITHOUT_SYS_ADMIN = """
import json, sys
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.config import EbpfConfig
from agent.model import Resource
from agent.sources.ebpf.source import EbpfSource
src = EbpfSource(EbpfConfig(loader=sys.argv[1], object_dir=sys.argv[2]), SelfMetrics(), Resource(()))
names = {m.name for g in src.collect() for m in g.metrics}
print(json.dumps({"statuses": [s.as_dict() for s in src.statuses], "metrics": sorted(names)}))
src.close()
"""


@needs_root
@pytest.mark.parametrize("loader", ["core", "bcc"])
def test_probes_load_with_the_units_capabilities(loader):
    """The packaged unit keeps CAP_BPF and CAP_PERFMON, not CAP_SYS_ADMIN: every default probe
    loads and is checked all the same; run-time stats, which need CAP_SYS_ADMIN, are not exported."""
    if loader == "core" and not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    caps = "-all,+bpf,+perfmon,+dac_read_search,+sys_ptrace"
    proc = subprocess.run(["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-c",
                           WITHOUT_SYS_ADMIN, loader, core_objects()], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    on = {s["name"]: s["loader"] for s in out["statuses"] if s["state"] == "on"}
    assert on == {name: loader for name, cls in PROBES.items() if cls.default_enabled}, out["statuses"]
    assert "hostagent.ebpf.skipped_events" in out["metrics"]
    if open("/proc/sys/kernel/bpf_stats_enabled").read().strip() == "0":
        assert "hostagent.ebpf.runs" not in out["metrics"]


def test_ring_slots_and_wakeups_are_set_from_each_probes_ring_spec():
    """A ring's drop-counter slot and wakeup interval are parameters from its probe's `rings`
    (RingProbe.params), never matched by hand: every one the CO-RE object declares is set, each
    ring at its index."""
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    for name, cls in PROBES.items():
        probe = cls.create(None)
        obj = libbpf.BpfObject.open(probe.object_file(core_objects()))
        try:
            declared = {v for v in obj.rodata_layout() if v.startswith("HA_RING_") or v.endswith("_WAKEUP_EVERY")}
        finally:
            obj.close()
        rings = getattr(probe, "rings", ())
        params = probe.params(tuple(probe.tracepoints))
        assert declared == {f"HA_RING_{r.param}" for r in rings} | {f"HA_{r.param}_WAKEUP_EVERY" for r in rings}, name
        assert [params[f"HA_RING_{r.param}"] for r in rings] == list(range(len(rings))), name


PYTHON_BTF_PARSES = r"""
import json, sys
from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf import btf
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.config import EbpfConfig, ProbeConfig
from agent.sources.ebpf.registry import PROBES
parsed = []
init = btf.Btf.__init__
def spy(self, data):
    parsed.append(len(data))
    init(self, data)
btf.Btf.__init__ = spy
src = EbpfSource(EbpfConfig(loader=sys.argv[1], object_dir=sys.argv[2],
                            probes={name: ProbeConfig(enabled=True) for name in PROBES}), SelfMetrics(), Resource(()))
print(json.dumps({"on": sorted(s.name for s in src.statuses if s.on), "parsed": parsed,
                  "bcc": "bcc" in sys.modules}))
src.close()
"""


@needs_root
def test_core_loads_every_probe_without_parsing_the_kernels_btf_in_python():
    """The CO-RE path asks the kernel's BTF only through libbpf (in C); btf.py reads the objects'
    own BTF (a few KB each), never the kernel's 6 MB; bcc is never imported."""
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    proc = subprocess.run([sys.executable, "-c", PYTHON_BTF_PARSES, "core", core_objects()], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["on"] == sorted(PROBES), proc.stderr
    assert max(out["parsed"], default=0) < os.path.getsize("/sys/kernel/btf/vmlinux") // 10, out["parsed"]
    assert not out["bcc"]


@needs_root
@pytest.mark.parametrize("loader", ["core", "bcc"])
@pytest.mark.parametrize("name", list(PROBES))
def test_every_registered_probe_loads_under_each_loader(name, loader):
    """Each probe of the registry, on each loader: it loads, its structs equal their Python
    mirrors where the object's BTF has them, and a collection works."""
    if loader == "core" and not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    with attached(PROBES[name].create(None), loader=loader) as probe:
        assert probe.obj.loader == loader
        assert layout_problems(probe, probe.obj) == []
        if loader == "core":                  # the other variant's maps are not made
            for unused in probe.unused_maps(tuple(probe.select_tracepoints(tracepoint_available))):
                with pytest.raises(KeyError):
                    probe.obj.map(unused)
        probe.collect(time.time_ns(), time.time_ns())
        probe.poll()


def test_probes_command_says_which_loader_and_why(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"ebpf": {"loader": "core", "object_dir": str(tmp_path)}}))
    res = hostagent("probes", "--json", "--config", str(path))
    assert res.returncode == 0, res.stderr
    statuses = json.loads(res.stdout)
    assert {s["name"] for s in statuses} == set(PROBES)
    for s in statuses:
        assert s["state"] == "off"
        if PROBES[s["name"]].default_enabled and os.geteuid() == 0:
            assert (s["loader"], s["reason"]) == ("core", "object missing (run bpf/build.sh)"), s
    table = hostagent("probes", "--config", str(path)).stdout.splitlines()
    assert table[0].split()[:3] == ["PROBE", "STATE", "LOADER"]


def test_probes_command_piped_into_a_reader_that_is_gone_says_nothing_more():
    """`hostagent probes --json | true`: the reader has exited before the command writes; the
    closed pipe ends the command quietly, without a traceback."""
    proc = subprocess.run(f"{sys.executable} -m agent probes --json | true", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.stderr == ""


@needs_root
@pytest.mark.parametrize("attribution", ["workload", "host"])
def test_probes_command_lists_the_tracepoints_a_run_attaches(tmp_path, attribution):
    """`hostagent probes` makes the probes as a run does (under ebpf.attribution: workload with
    the workload resolver, which adds biolatency's block_io_start), so the tracepoints it lists
    are those the agent attaches."""
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"ebpf": {"attribution": attribution, "object_dir": core_objects()}}))
    res = hostagent("probes", "--json", "--config", str(path))
    assert res.returncode == 0, res.stderr
    listed = {s["name"]: s["tracepoints"] for s in json.loads(res.stdout) if s["state"] == "on"}
    source = EbpfSource(EbpfConfig(attribution=attribution, object_dir=core_objects()), SelfMetrics(),
                        Resource(()))
    try:
        attached_tps = {s.name: list(s.tracepoints) for s in source.statuses if s.on}
    finally:
        source.close()
    assert listed == attached_tps


@needs_root
def test_a_damaged_object_file_turns_off_its_probe_only(tmp_path):
    """Object files are outside data: a file of random bytes and an empty one each turn off their
    own probe with a reason in words, and the other probes load."""
    objects = tmp_path / "objects"
    shutil.copytree(core_objects(), objects)
    (objects / "runqlat.bpf.o").write_bytes(os.urandom(4096))
    (objects / "signals.bpf.o").write_bytes(b"")
    src = EbpfSource(EbpfConfig(loader="core", object_dir=str(objects)), SelfMetrics(), Resource(()))
    try:
        statuses = {s.name: s for s in src.statuses}
        for name in ("runqlat", "signals"):
            assert not statuses[name].on and "BPF object format invalid" in statuses[name].reason, statuses[name]
        assert all(statuses[name].on for name in ("biolatency", "tcp", "process", "oom")), statuses
    finally:
        src.close()
