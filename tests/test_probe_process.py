"""The process probe on the real kernel: exec and exit records for processes this test spawns,
matched exactly by pid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agent.model import Resource, Severity
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.config import EbpfConfig
from agent.procfs.workload import WorkloadResolver
from agent.sources.ebpf.cgroups import CgroupsProbe
from agent.sources.ebpf.process import EXEC_EVENT, EXIT_EVENT, ProcessProbe, exit_status
from tests.ebpf_helpers import attached, object_layout_problems
from tests.helpers import Events, short_lived_cgroups

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")


def test_record_layouts_match_the_objects_btf():
    probe = ProcessProbe()
    assert set(probe.structs) == {"exec_event", "exit_event", "proc_info"}
    assert (probe.structs["exec_event"], probe.structs["exit_event"]) == (EXEC_EVENT, EXIT_EVENT)
    assert object_layout_problems(probe) == []


def test_exit_status_decoding():
    assert exit_status(0) == ("success", 0, 0, False)
    assert exit_status(3 << 8) == ("failure", 3, 0, False)
    assert exit_status(9) == ("signal", 137, 9, False)
    assert exit_status(11 | 0x80) == ("signal", 139, 11, True)


@pytest.fixture
def source():
    src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource((("host.name", "test"),)), probes={"process": ProcessProbe})
    events = Events()
    try:
        assert [s.state for s in src.statuses] == ["on"], src.statuses
        src.start(events.emit)
        src.events = events
        yield src
    finally:
        src.close()


def counters(src) -> dict:
    out = {}
    for group in src.collect():
        for m in group.metrics:
            for p in m.points:
                out[(m.name, p.attributes)] = p.value
    return out


@needs_root
def test_spawned_processes_give_exactly_one_exec_and_one_exit_each(source):
    before = counters(source)
    codes = {}
    procs = []
    for i in range(50):
        k = (0, 1, 3, 42, 255)[i % 5]
        p = subprocess.Popen(["/bin/sh", "-c", f"exit {k}"])
        codes[p.pid] = k
        procs.append(p)
    for p in procs:
        assert p.wait() == codes[p.pid]
    execs = source.events.wait_for("process.exec", codes, 50)
    exits = source.events.wait_for("process.exit", codes, 50)

    assert sorted(dict(r.attributes)["process.pid"] for r in execs) == sorted(codes)
    for r in execs:
        a = dict(r.attributes)
        assert a["process.parent_pid"] == os.getpid()
        assert a["process.executable.path"] == "/bin/sh"
        assert a["process.executable.name"] == "sh"
        assert a["process.real_user.id"] == os.getuid()
        assert a["process.owner"] == "root"
        assert abs(r.time_ns - time.time_ns()) < 60e9

    assert sorted(dict(r.attributes)["process.pid"] for r in exits) == sorted(codes)
    for r in exits:
        a = dict(r.attributes)
        assert a["process.exit.code"] == codes[a["process.pid"]]
        assert a["process.parent_pid"] == os.getpid()
        assert "linux.process.exit.signal" not in a
        assert 0 < a["linux.process.lifetime"] < 30
        assert a["process.creation.time"] <= a["process.exit.time"]
        assert r.severity == Severity.INFO

    after = counters(source)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    successes = sum(1 for k in codes.values() if k == 0)
    assert delta(("system.linux.process.execs", ())) >= 50
    assert delta(("system.linux.process.exits", (("exit.class", "success"),))) >= successes
    assert delta(("system.linux.process.exits", (("exit.class", "failure"),))) >= 50 - successes
    assert delta(("system.linux.process.forks", ())) >= 50
    ring = (("probe", "process"), ("ring", "exec_events"))
    assert after[("hostagent.ebpf.ringbuf.dropped", ring)] == 0
    assert after[("hostagent.ebpf.ringbuf.skipped_records", ring + (("reason", "invalid"),))] == 0


@needs_root
def test_killed_process_exit_shows_the_signal(source):
    p = subprocess.Popen(["sleep", "30"])
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    (record,) = source.events.wait_for("process.exit", [p.pid], 1)
    a = dict(record.attributes)
    assert a["process.exit.code"] == 128 + signal.SIGKILL
    assert a["linux.process.exit.signal"] == "SIGKILL"
    assert a["linux.process.exit.core_dumped"] is False
    assert a["process.executable.name"] == "sleep"
    assert record.severity == Severity.WARN


@needs_root
def test_multithreaded_process_exits_once(source):
    code = ("import threading, time\n"
            "ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(4)]\n"
            "[t.start() for t in ts]\n"
            "time.sleep(0.05)\n"
            "raise SystemExit(7)\n")        # exit_group() while the threads still run
    p = subprocess.Popen([sys.executable, "-c", code])
    assert p.wait() == 7
    exits = source.events.wait_for("process.exit", [p.pid], 1)
    assert len(exits) == 1
    assert dict(exits[0].attributes)["process.exit.code"] == 7


@needs_root
def test_process_older_than_the_probe_has_parent_and_start():
    """Processes that existed before loading are known from /proc (the probe seeds its map)."""
    p = subprocess.Popen(["/bin/sh", "-c", "read line; exec /bin/true"], stdin=subprocess.PIPE)
    time.sleep(0.2)
    src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource(()), probes={"process": ProcessProbe})
    events = Events()
    try:
        src.start(events.emit)
        p.communicate(b"go\n", timeout=10)
        (exec_,) = events.wait_for("process.exec", [p.pid], 1)
        (exit_,) = events.wait_for("process.exit", [p.pid], 1)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        src.close()
    assert dict(exec_.attributes)["process.parent_pid"] == os.getpid()
    assert dict(exec_.attributes)["process.executable.path"] == "/bin/true"
    a = dict(exit_.attributes)
    assert a["process.parent_pid"] == os.getpid() and a["process.exit.code"] == 0
    assert a["process.executable.name"] == "true"
    assert 0.15 < a["linux.process.lifetime"] < 30


# --- cgroups ---------------------------------------------------------------------------------------

@needs_root
def test_records_of_a_cgroup_removed_before_they_are_read_carry_its_cgroup():
    """No reader thread: the records are read after their cgroups are gone, as happens to a
    container that lives 50 ms. The resolver the cgroups probe feeds still names each cgroup."""
    resolver = WorkloadResolver(SelfMetrics())
    with attached(CgroupsProbe.create(None, workloads=resolver)), \
            attached(ProcessProbe.create(None, workloads=resolver)) as probe:
        ran = short_lived_cgroups(10, lifetime=0)
        records = probe.poll()
    by_pid = {}
    for r in records:
        by_pid.setdefault(dict(r.attributes)["process.pid"], []).append(r)
    for cg in ran:
        mine = by_pid.get(cg["pid"], [])
        assert sorted(r.event_name for r in mine) == ["process.exec", "process.exit"], cg
        for r in mine:
            a = dict(r.attributes)
            assert a["process.linux.cgroup"] == "0::" + cg["path"], a
            assert a.get("container.id") == cg["container_id"], a
    assert resolver.unresolved == 0
