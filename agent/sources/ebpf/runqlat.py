"""runqlat: run-queue latency, the time a runnable thread waits for a CPU (bpf/runqlat.bpf.c)."""
from __future__ import annotations

import ctypes as ct

from agent.model import Metric, MetricKind
from agent.sources.ebpf import histogram
from agent.sources.ebpf.probe import Probe


class RunqKey(ct.Structure):
    """struct runq_key"""
    _fields_ = [("slot", ct.c_uint32)]


class RunqlatProbe(Probe):
    name = "runqlat"
    description = "run-queue latency: how long runnable threads wait for a CPU (exponential histogram, ns)"
    tracepoints = ("sched:sched_wakeup", "sched:sched_wakeup_new", "sched:sched_switch")
    default_enabled = True
    structs = {"runq_key": RunqKey, "exp2_bucket": histogram.Exp2Bucket}

    METRIC = "system.linux.cpu.runqueue.latency"
    metrics = (METRIC,)

    def setup(self, obj) -> None:
        super().setup(obj)
        self.hist = obj.map("runq_latency")

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        groups = histogram.read_exp2(self.hist, RunqKey)
        points = histogram.exp2_points(groups, lambda raw: (), start_ns, now_ns)
        if not points:
            return []
        return [Metric(self.METRIC, "Time runnable threads waited on a CPU run queue.", "ns",
                       MetricKind.EXPONENTIAL_HISTOGRAM, points)]
