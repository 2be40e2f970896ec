"""runqlat: run-queue latency, the time a runnable thread waits for a CPU (bpf/runqlat.bpf.c),
per workload: the workload of the thread that waited."""
from __future__ import annotations

import ctypes as ct
import logging

from agent.model import Metric, MetricKind
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts

log = logging.getLogger("hostagent.ebpf")

# -D name -> the member whose offset bcc's program reads the woken task's cgroup through
# (bpf/runqlat.bpf.c; CO-RE relocates the same reads itself)
BTF_MEMBERS = {
    "RUNQ_TASK_PID": ("task_struct", "pid"),
    "RUNQ_TASK_CGROUPS": ("task_struct", "cgroups"),
    "RUNQ_CSS_SET_DFL_CGRP": ("css_set", "dfl_cgrp"),
    "RUNQ_CGROUP_KN": ("cgroup", "kn"),
    "RUNQ_KERNFS_NODE_ID": ("kernfs_node", "id"),
}


class RunqKey(ct.Structure):
    """struct runq_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("slot", ct.c_uint32), ("pad", ct.c_uint32)]


class RunqWait(ct.Structure):
    """struct runq_wait"""
    _fields_ = [("at", ct.c_uint64), ("cgroup", ct.c_uint64)]


class RunqlatProbe(histogram.KeyedProbe):
    name = "runqlat"
    description = "run-queue latency: how long runnable threads wait for a CPU (exponential histogram, ns)"
    tracepoints = ("sched:sched_wakeup", "sched:sched_wakeup_new", "sched:sched_switch")
    default_enabled = True
    structs = {"runq_key": RunqKey, "runq_wait": RunqWait, "exp2_bucket": histogram.Exp2Bucket}
    MAX_KEYS = "RUNQ_MAX_KEYS"
    keyed_maps = ("runq_latency",)

    METRIC = "system.linux.cpu.runqueue.latency"
    metrics = (METRIC,)

    def programs(self, tracepoints: tuple) -> tuple:
        if self.attribution.by_cgroup:      # BTF-typed wakeups: their argument is the woken task
            return ("tp_btf__sched_wakeup", "tp_btf__sched_wakeup_new", "sched__sched_switch")
        return super().programs(tracepoints)

    def params(self, tracepoints: tuple) -> dict:
        offsets = {}
        if self.attribution.by_cgroup:
            facts = btf_facts(BTF_MEMBERS.values())
            offsets = {flag: None if facts is None else facts[member] for flag, member in BTF_MEMBERS.items()}
            missing = sorted(flag for flag, v in offsets.items() if v is None)
            if missing:     # bcc without BTF (CO-RE has it, relocates these reads and ignores the values)
                log.warning("runqlat_attribution_unavailable reason=\"the kernel's BTF lacks %s\" "
                            "(host-wide run-queue latency)", ",".join(missing))
                self.attribution = histogram.Attribution(None)
                offsets = {}
        return {**super().params(tracepoints), **offsets}

    def setup(self, obj) -> None:
        super().setup(obj)
        self.hist = obj.map("runq_latency")
        self.overflow = obj.map("runq_latency_overflow")

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        groups = self.attribution.histogram(self.hist, self.overflow, RunqKey)
        points = histogram.exp2_points(groups, histogram.by_workload(lambda raw: ()), start_ns, now_ns)
        if not points:
            return []
        return [Metric(self.METRIC, "Time runnable threads waited on a CPU run queue.", "ns",
                       MetricKind.EXPONENTIAL_HISTOGRAM, points)]
