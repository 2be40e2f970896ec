"""Kernel signals by workload on the real kernel: runqlat, biolatency and syscalls keyed by the
cgroup of the task an event belongs to (ebpf.attribution: workload), under the run's loader.

Each test makes its own cgroups under the cgroup v2 mount (unique names: this worktree's tag and
the pid), starts processes inside them (they join before exec, so every event of theirs is theirs)
and removes them afterwards.

"Exact" below means: the programs are detached before the maps are read for the last time. The
test keeps its own descriptors of the maps (os.dup) and unloads the probe, so no event can land
between reading the keyed maps and reading the host-wide count; both hold exactly the events of
one window, from load to detach. The host-wide count is COUNT_EVENTS's per-CPU counter, bumped by
the same program at every keyed update (bpf/include/maps.h), so the sum over every workload
(the host, unresolved and overflow series included) must equal it.
"""
import ctypes as ct
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import Resource
from agent.procfs.identity import cgroup2_mount
from agent.procfs.workload import CGROUP_OVERFLOW, WorkloadResolver, classify
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.source import MAP_OVERFLOW, EbpfSource
from agent.sources.ebpf.biolatency import BiolatencyProbe
from agent.sources.ebpf.config import EbpfConfig
from agent.sources.ebpf.histogram import OVERFLOW_ATTRIBUTES, Attribution, Exp2Bucket
from agent.sources.ebpf.maps import BpfMap
from agent.sources.ebpf.runqlat import RunqKey, RunqlatProbe
from agent.sources.ebpf.syscalls import SyscallsProbe
from tests.ebpf_helpers import attached, ebpf_config, misses
from tests.helpers import (SYSCALL_LOOP, SYSCALLS_FAILING, SYSCALLS_SUCCEEDING, diskstats, hostagent,  # noqa: F401
                           loop_device, new_map)

MOUNT = cgroup2_mount()
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not MOUNT, reason="needs root and a cgroup v2 mount")

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
SLEEPER = "import time\nfor _ in range({n}): time.sleep({interval})\n"


class Cgroup:
    """A cgroup of the test's own under the v2 mount; a `suffix` of ".service" makes it a systemd
    service's workload, none a top-level slice's."""

    def __init__(self, tag: str, suffix: str = ""):
        self.name = f"hostagent-key1-{os.getpid()}-{tag}{suffix}"
        self.path = os.path.join(MOUNT, self.name)
        os.mkdir(self.path)
        self.id = os.stat(self.path).st_ino          # the cgroup v2 id
        self.workload = classify("/" + self.name)
        self.procs: list = []

    def run(self, code: str, **kw) -> subprocess.Popen:
        """`python -c code` started inside this cgroup (it joins before exec)."""
        procs = os.path.join(self.path, "cgroup.procs")

        def join():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=join, **kw)
        self.procs.append(p)
        return p

    def remove(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(self.path):
            try:
                os.rmdir(self.path)
            except OSError:                 # the last exited task still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def cgroups():
    """make(tag, suffix) -> Cgroup; every one removed afterwards."""
    made = []

    def make(tag, suffix=""):
        made.append(Cgroup(tag, suffix))
        return made[-1]
    try:
        yield make
    finally:
        for c in made:
            c.remove()


def wait_all(procs, timeout=60):
    for p in procs:
        assert p.wait(timeout=timeout) == 0


@pytest.fixture
def detach():
    """detach(probe, body) -> {map name: BpfMap}: `probe` attached while body(probe) runs, then
    unloaded; its keyed maps and ha_events outlive it on descriptors of ours (closed at teardown),
    and the probe reads them from then on."""
    fds = []

    def run(probe, body):
        with attached(probe) as p:
            body(p)
            maps = {m.name: BpfMap.from_fd(os.dup(m.fd), m.name)
                    for m in [p.hist, p.overflow, p.obj.map("ha_events")]}
            fds.extend(m.fd for m in maps.values())
        probe.hist, probe.overflow = maps[probe.hist.name], maps[probe.overflow.name]
        return maps
    try:
        yield run
    finally:
        for fd in fds:
            os.close(fd)


def settled(read, timeout=10):
    """read() again until two reads agree (a program finishing on another CPU as it was
    detached); bounded."""
    deadline = time.monotonic() + timeout
    last = read()
    while True:
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


WORKLOAD_KEYS = {"container.id", "linux.systemd.unit", "process.linux.cgroup", "otel.metric.overflow"}


def by_workload(metric, attributes=()) -> dict:
    """{workload attributes: count or value} of the points of `metric` that carry every one of
    `attributes`, the other attributes summed over."""
    out = {}
    for pt in metric.points if metric is not None else ():
        if not set(attributes) <= set(pt.attributes):
            continue
        w = tuple(a for a in pt.attributes if a[0] in WORKLOAD_KEYS)
        out[w] = out.get(w, 0) + (pt.count if hasattr(pt, "count") else pt.value)
    return out


def metric(probe, name):
    return {m.name: m for m in probe.collect(time.time_ns(), 0)}.get(name)


def host_wide(maps) -> int:
    return maps["ha_events"].sum(ct.c_uint32(0))


def kernel_cgroups(m) -> set:
    return set(m.read(RunqKey)[0]["cgroup"].tolist())


# --- runqlat ---------------------------------------------------------------------------------

def test_runqlat_contention_is_attributed_to_the_waiting_workload(cgroups, detach):
    """6 busy loops on 2 cores in A, a sleeper in B: A's waits are many times B's, and B's are
    there (its wakeups are attributed to the woken task, not to whoever woke it); the sum over
    every workload equals the host-wide count of the same window, before and after A and B are
    removed (then their entries are folded into the totals and deleted from the kernel map)."""
    a, b = cgroups("a", ".service"), cgroups("b")
    probe = RunqlatProbe(workloads=WorkloadResolver(), count_events=True)

    def contention(p):
        sleeper = b.run(SLEEPER.format(n=40, interval=0.05))
        wait_all([a.run(BUSY.format(seconds=2.0)) for _ in range(6)] + [sleeper])
        metric(p, RunqlatProbe.METRIC)          # A and B resolved while they exist
    maps = detach(probe, contention)

    counts, events = settled(lambda: (by_workload(metric(probe, RunqlatProbe.METRIC)), host_wide(maps)))
    in_a, in_b = counts.get(a.workload.attributes, 0), counts.get(b.workload.attributes, 0)
    print(f"runqlat waits: A {in_a}, B {in_b}, all workloads {sum(counts.values())}, host-wide {events}")
    assert in_b >= 20
    assert in_a >= 5 * in_b
    assert sum(counts.values()) == events

    a.remove()
    b.remove()
    assert by_workload(metric(probe, RunqlatProbe.METRIC)) == counts
    assert not {a.id, b.id} & kernel_cgroups(maps["runq_latency"])


# --- biolatency ------------------------------------------------------------------------------

WRITER = """
import mmap, os
buf = mmap.mmap(-1, 4096)
buf.write(os.urandom(4096))
fd = os.open({dev!r}, os.O_RDWR | os.O_DIRECT)
for i in range({n}):
    os.pwritev(fd, [buf], i * 4096)
    os.fsync(fd)
os.close(fd)
"""


def test_biolatency_direct_writes_are_attributed_to_the_writer(cgroups, loop_device):  # noqa: F811
    """fsync'd O_DIRECT writes to a loop device from A only, a sleeper in B: A has block I/O
    latency on that device (every write), B none on it; the cgroup is taken when the request
    starts, in A, and used at completion, in interrupt context. (B's own start may read its files
    from the root disk, cold in a fresh clone: I/O that is B's, on another device.)"""
    a, b = cgroups("a", ".service"), cgroups("b")
    n, disk = 25, os.path.basename(loop_device)
    with attached(BiolatencyProbe(workloads=WorkloadResolver())) as p:
        before = diskstats(disk)["write"][0]
        sleeper = b.run(SLEEPER.format(n=10, interval=0.05))
        wait_all([a.run(WRITER.format(dev=loop_device, n=n)), sleeper])
        written = diskstats(disk)["write"][0] - before     # the writes, and each fsync's empty preflush write
        skipped = misses(p)
        writes = by_workload(metric(p, BiolatencyProbe.METRIC), [("device", disk), ("operation", "write")])
        on_disk = by_workload(metric(p, BiolatencyProbe.METRIC), [("device", disk)])
    print(f"writes on {disk} by workload: {writes}; /proc/diskstats: {written}")
    assert written >= n
    assert written - skipped <= writes.get(a.workload.attributes, 0) <= written
    assert b.workload.attributes not in on_disk, on_disk


# --- syscalls --------------------------------------------------------------------------------

FAILING, SUCCEEDING, CALLER = SYSCALLS_FAILING, SYSCALLS_SUCCEEDING, SYSCALL_LOOP


@pytest.mark.parametrize("latency", [False, True], ids=["count", "latency"])
def test_syscalls_are_attributed_to_the_calling_workload(cgroups, latency):
    """A process in A makes known calls (Python itself makes neither getppid nor fchdir); the
    counts of A are exactly those, B's sleeper has none of them."""
    a, b = cgroups("a", ".service"), cgroups("b")
    with attached(SyscallsProbe(latency=latency, workloads=WorkloadResolver())) as p:
        sleeper = b.run(SLEEPER.format(n=10, interval=0.05))
        wait_all([a.run(CALLER), sleeper])
        calls = metric(p, SyscallsProbe.CALLS)
        errors = metric(p, SyscallsProbe.ERRORS)
    assert by_workload(calls, [("syscall", "getppid")]).get(a.workload.attributes) == SUCCEEDING
    assert by_workload(calls, [("syscall", "fchdir")]).get(a.workload.attributes) == FAILING
    assert by_workload(errors, [("syscall", "fchdir"), ("error.type", "EBADF")]).get(a.workload.attributes) == FAILING
    assert b.workload.attributes not in by_workload(calls, [("syscall", "getppid")])
    assert b.workload.attributes in by_workload(calls)        # its own calls (sleeping) are there


# --- overflow --------------------------------------------------------------------------------

def test_overflow_loses_nothing(cgroups):
    """A keyed map of 8 entries and more cgroups than fit: what does not fit is counted under the
    overflow cgroup, exported as its own series (otel.metric.overflow=true) and in
    hostagent.ebpf.map.overflow; the sum over every series still equals the host-wide count."""
    probe = RunqlatProbe(workloads=WorkloadResolver(), max_keys=8, count_events=True)
    source = EbpfSource(EbpfConfig(**ebpf_config()), SelfMetrics(), Resource(()), probes={"runqlat": probe})
    fds = []
    try:
        assert source.probes, source.statuses
        groups = [cgroups(f"o{i}") for i in range(6)]
        wait_all([g.run(SLEEPER.format(n=20, interval=0.01)) for g in groups])
        [group] = source.collect()
        self_metric = {m.name: m for m in group.metrics}[MAP_OVERFLOW]
        [point] = self_metric.points
        assert dict(point.attributes) == {"probe": "runqlat", "map": "runq_latency"}
        assert point.value > 0
        maps = {m.name: BpfMap.from_fd(os.dup(m.fd), m.name)
                for m in [probe.hist, probe.overflow, probe.obj.map("ha_events")]}
        fds = [m.fd for m in maps.values()]
    finally:
        source.close()
    try:
        assert maps["runq_latency"].max_entries == 8
        probe.hist, probe.overflow = maps["runq_latency"], maps["runq_latency_overflow"]
        counts, events = settled(lambda: (by_workload(metric(probe, RunqlatProbe.METRIC)), host_wide(maps)))
        print(f"runqlat by workload with 8 keys: {counts}; host-wide {events}")
        assert sum(counts.values()) == events
        overflowed = counts.get(OVERFLOW_ATTRIBUTES, 0)
        assert overflowed > 0
        assert probe.map_overflows() == {"runq_latency": overflowed}
    finally:
        for fd in fds:
            os.close(fd)


# --- folding gone cgroups (user space against a map made here) -------------------------------

PERCPU_HASH = 5
STEP = st.one_of(st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 65), st.integers(1, 1000)),
                 st.tuples(st.just("remove"), st.integers(0, 2)),
                 st.tuples(st.just("collect")))


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(STEP, max_size=25), fold_limit=st.sampled_from([2, 16384]))
def test_gone_cgroups_fold_into_exact_totals(steps, fold_limit):
    """Whatever is written for three cgroups, whichever of them go and whenever the agent reads:
    each workload's histogram is everything written for it, and after a read no entry of a gone
    cgroup is left in the map. With room for only 2 folded keys, what does not fit goes to the
    overflow series: the total stays exact and is counted as overflowed."""
    hist = new_map(PERCPU_HASH, ct.sizeof(RunqKey), ct.sizeof(Exp2Bucket), 1024)
    overflow = new_map(PERCPU_HASH, ct.sizeof(RunqKey), ct.sizeof(Exp2Bucket), 64)
    hist.name, overflow.name = "runq_latency", "runq_latency_overflow"      # as the probe's maps
    groups = [Cgroup(f"fold{i}") for i in range(3)]
    attribution = Attribution(WorkloadResolver(), fold_limit=fold_limit)
    truth: dict = {}
    try:
        for g in groups:
            attribution.workloads.resolve(g.id)      # seen alive, as a running agent sees them
        for step in steps:
            if step[0] == "add" and os.path.exists(groups[step[1]].path):
                _, i, slot, n = step
                add(hist, RunqKey(groups[i].id, slot), n)
                into = truth.setdefault(groups[i].workload.attributes, {}).setdefault(slot, [0, 0])
                into[0] += n
                into[1] += n * 3
            elif step[0] == "remove":
                groups[step[1]].remove()
            elif step[0] == "collect":
                attribution.histogram(hist, overflow, RunqKey)
                gone = {g.id for g in groups if not os.path.exists(g.path)}
                assert not gone & kernel_cgroups(hist)
        read = {w: b for (w, _), b in attribution.histogram(hist, overflow, RunqKey).items()}
        overflowed = read.pop(OVERFLOW_ATTRIBUTES, {})
        assert attribution.overflowed["runq_latency"] == sum(c for c, _ in overflowed.values())
        if fold_limit > 1000:
            assert read == truth and not overflowed
        for w, buckets in read.items():         # each workload: at most what was written for it
            for slot, (c, t) in buckets.items():
                assert c <= truth[w][slot][0] and t <= truth[w][slot][1]
        total = {}
        for buckets in list(read.values()) + [overflowed]:
            for slot, (c, t) in buckets.items():
                total[slot] = [total.get(slot, [0, 0])[0] + c, total.get(slot, [0, 0])[1] + t]
        expected = {}
        for buckets in truth.values():
            for slot, (c, t) in buckets.items():
                expected[slot] = [expected.get(slot, [0, 0])[0] + c, expected.get(slot, [0, 0])[1] + t]
        assert total == expected
    finally:
        for g in groups:
            g.remove()
        attribution.workloads.close()
        os.close(hist.fd)
        os.close(overflow.fd)


def add(m, key, n) -> None:
    """count += n, sum += 3n on CPU 0 of the per-CPU {count, sum} at `key`."""
    raw = m.lookup(key)
    words = list(np.frombuffer(raw, dtype=np.uint64)) if raw else [0] * (m.buffer_size // 8)
    words[0] += n
    words[1] += 3 * n
    m.update(key, np.array(words, dtype=np.uint64).tobytes())


# --- config ----------------------------------------------------------------------------------

def test_attribution_config(tmp_path):
    """ebpf.attribution: workload (the default) gives the probes one resolver, host none (and so
    does ebpf.enabled: false); anything else is refused in one line, status 2."""
    assert EbpfConfig().attribution == "workload"
    bad = tmp_path / "agent.yaml"
    bad.write_text("ebpf:\n  attribution: pods\n")
    out = hostagent("check-config", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == "hostagent: config: ebpf.attribution: must be one of workload, host, got 'pods'"
    for attribution, keyed in (("workload", True), ("host", False)):
        source = EbpfSource(EbpfConfig(attribution=attribution), SelfMetrics(), Resource(()), probes={})
        try:
            assert (source.workloads is not None) == keyed
        finally:
            source.close()
    source = EbpfSource(EbpfConfig(enabled=False), SelfMetrics(), Resource(()))
    assert source.workloads is None
    source.close()
    resolver = WorkloadResolver()
    try:
        for cls in (RunqlatProbe, BiolatencyProbe, SyscallsProbe):
            assert cls.create(None, workloads=resolver).attribution.workloads is resolver
            assert cls.create(None).params(())["BY_CGROUP"] is False
    finally:
        resolver.close()


@settings(max_examples=30, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 65), st.integers(1, 2**32)),
                        max_size=60))
def test_any_cgroup_id_is_read_bounded_and_exact(entries):
    """Cgroup ids that name no cgroup (any u64, 0 and the overflow id included), as a damaged or
    foreign map could hold: every count is exported once (unresolved, overflow or folded), the
    folded keys stay within the limit, and the map keeps no entry of a cgroup that is not alive."""
    hist = new_map(PERCPU_HASH, ct.sizeof(RunqKey), ct.sizeof(Exp2Bucket), 128)
    overflow = new_map(PERCPU_HASH, ct.sizeof(RunqKey), ct.sizeof(Exp2Bucket), 128)
    hist.name, overflow.name = "runq_latency", "runq_latency_overflow"
    attribution = Attribution(WorkloadResolver(), fold_limit=8)
    try:
        written = {}
        for cgroup, slot, n in entries:
            add(hist, RunqKey(cgroup, slot), n)
            written[slot] = written.get(slot, 0) + n
        for _ in range(2):          # a second read: folded totals are not counted twice
            read = attribution.histogram(hist, overflow, RunqKey)
            counts = {}
            for buckets in read.values():
                for slot, (c, _) in buckets.items():
                    counts[slot] = counts.get(slot, 0) + c
            assert counts == written
            assert len(attribution._folded["runq_latency"]) <= 8 + 66      # the limit, then overflow keys
            assert kernel_cgroups(hist) <= {0, CGROUP_OVERFLOW} | {c for c in kernel_cgroups(hist)
                                                                   if attribution.workloads.alive(c)}
    finally:
        attribution.workloads.close()
        os.close(hist.fd)
        os.close(overflow.fd)
