"""The oom probe on the real kernel: a process of this test OOM-killed inside a memory cgroup
with a small limit, created for the test and removed afterwards."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time

import pytest

from agent.model import Resource, Severity
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.config import EbpfConfig
from agent.sources.ebpf.oom import OOM_EVENT, OomProbe
from agent.sources.ebpf.process import ProcessProbe
from tests.ebpf_helpers import object_layout_problems
from tests.helpers import Events

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs and creates cgroups")
LIMIT = 32 * 2**20


def test_record_layout_matches_the_objects_btf():
    probe = OomProbe()
    assert probe.structs == {"oom_event": OOM_EVENT}
    assert object_layout_problems(probe) == []


def _memory_cgroup_root():
    """(directory under which to create a cgroup, limit file name), v1 memory controller first."""
    v1 = "/sys/fs/cgroup/memory"
    if os.path.exists(os.path.join(v1, "memory.limit_in_bytes")):
        return v1, "memory.limit_in_bytes"
    for v2 in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                if "memory" in f.read().split():
                    return v2, "memory.max"
        except OSError:
            continue
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int):
    found = _memory_cgroup_root()
    if found is None:
        pytest.skip("no memory cgroup controller")
    root, limit_file = found
    path = os.path.join(root, f"hostagent-test-oom-{os.getpid()}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(limit))
        yield path
    finally:
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():               # anything left inside
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        assert not os.path.exists(path), f"could not remove {path}"


def oom_kills(src) -> int:
    for group in src.collect():
        for m in group.metrics:
            if m.name == "system.linux.oom.kills":
                return sum(p.value for p in m.points)
    raise AssertionError("no system.linux.oom.kills metric")


@needs_root
def test_oom_kill_in_a_memory_cgroup_gives_one_record():
    src = EbpfSource(EbpfConfig(), SelfMetrics(), Resource(()), probes={"oom": OomProbe, "process": ProcessProbe})
    events = Events()
    hog = None
    try:
        assert [s.state for s in src.statuses] == ["on", "on"], src.statuses
        src.start(events.emit)
        before = oom_kills(src)
        with memory_cgroup(LIMIT) as cgroup:
            # tail keeps the whole of an endless line in memory until the OOM killer stops it
            hog = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec tail /dev/zero"])
            try:
                assert hog.wait(60) == -signal.SIGKILL
            finally:
                if hog.poll() is None:
                    hog.kill()
                    hog.wait()
        records = events.wait_for("linux.oom.kill", [hog.pid], 1)
        (exit_,) = events.wait_for("process.exit", [hog.pid], 1)
        after = oom_kills(src)
    finally:
        src.close()
    assert len(records) == 1
    record = records[0]
    a = dict(record.attributes)
    assert record.severity == Severity.WARN
    assert a["process.executable.name"] == "tail"
    assert a["process.real_user.id"] == 0
    assert LIMIT // 2 < a["linux.oom.rss.anon"] <= LIMIT
    assert a["linux.oom.total_vm"] >= a["linux.oom.rss.anon"]
    assert a["linux.oom.trigger.pid"] == hog.pid                    # it was allocating itself
    assert after - before >= 1          # the counter is host-wide: other OOM kills meanwhile count too
    assert dict(exit_.attributes)["linux.process.exit.signal"] == "SIGKILL"
