"""runqlat on the real kernel: CPU contention makes the run-queue latency histogram grow."""
import os
import subprocess
import sys
import time

import pytest

from agent.model import ExponentialHistogramPoint, MetricKind
from agent.procfs.workload import WorkloadResolver
from agent.sources.ebpf.runqlat import RunqlatProbe
from tests.ebpf_helpers import attached, checked_structs

# ebpf.attribution: the probe keyed by cgroup (the default) and host-wide
ATTRIBUTIONS = {"workload": WorkloadResolver, "host": lambda: None}


@pytest.fixture(params=ATTRIBUTIONS)
def probe(request):
    """The probe compiled, attached and set up by the loader, per attribution; always unloaded."""
    with attached(RunqlatProbe(workloads=ATTRIBUTIONS[request.param]())) as p:
        yield p


def histogram(p, start):
    """The probe's histogram over every workload: one point whose buckets add those of all."""
    metrics = p.collect(time.time_ns(), start)
    if not metrics:
        return None
    [m] = metrics
    assert (m.name, m.unit, m.kind) == (RunqlatProbe.METRIC, "ns", MetricKind.EXPONENTIAL_HISTOGRAM)
    if p.attribution.workloads is None:
        [point] = m.points
        assert point.attributes == ()
        return point
    return merged(m.points)


def merged(points) -> ExponentialHistogramPoint:
    """Scale-0 points with the same start added bucket by bucket."""
    lo = min(p.positive_offset for p in points if p.positive_counts)
    hi = max(p.positive_offset + len(p.positive_counts) for p in points if p.positive_counts)
    counts = [0] * (hi - lo)
    for p in points:
        assert p.scale == 0 and p.start_time_ns == points[0].start_time_ns
        for i, c in enumerate(p.positive_counts):
            counts[p.positive_offset - lo + i] += c
    return ExponentialHistogramPoint(
        attributes=(), start_time_ns=points[0].start_time_ns, time_ns=points[0].time_ns,
        count=sum(p.count for p in points), sum=sum(p.sum for p in points), scale=0,
        zero_count=sum(p.zero_count for p in points), positive_offset=lo, positive_counts=counts)


def test_key_layout_matches_bpf(probe):
    assert {"runq_key", "runq_wait"} <= checked_structs(probe)


def test_cpu_contention_grows_histogram(probe):
    start = time.time_ns()
    before = histogram(probe, start)
    n0 = before.count if before else 0
    busy = "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(2 * os.cpu_count())]
    try:
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    after = histogram(probe, start)
    assert after is not None and after.count - n0 >= 20
    assert after.scale == 0 and after.start_time_ns == start
    assert sum(after.positive_counts) + after.zero_count == after.count
    # 2 busy processes per CPU for 1 s: some waits last a scheduler slice (>= ~1 ms)
    top = after.positive_offset + len(after.positive_counts) - 1
    assert 2 ** (top + 1) >= 1_000_000
    assert after.sum / after.count > 0
