"""biolatency: block I/O latency per device and operation (bpf/biolatency.bpf.c), per workload:
the workload of the task that issued the I/O."""
from __future__ import annotations

import ctypes as ct
import logging
from typing import Optional

from agent.model import Metric, MetricKind
from agent.procfs.devices import DeviceNames
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts

log = logging.getLogger("hostagent.ebpf")

# Linux 6.5+ with BTF: what /proc/diskstats counts, with the latency the kernel adds to it
# (raw tracepoints, reading the request). Otherwise: commands handed to the driver, issue to complete.
ACCOUNTING_TRACEPOINTS = ("block:block_io_done", "block:block_rq_complete")
DRIVER_TRACEPOINTS = ("block:block_rq_issue", "block:block_rq_complete")
# by workload, the accounting variant also remembers who started each request
ACCOUNTING_OWNER = "block:block_io_start"

# -D name -> what BTF must say for the accounting variant (see bpf/biolatency.bpf.c)
BTF_MEMBERS = {
    "BIO_RQ_Q": ("request", "q"),
    "BIO_RQ_CMD_FLAGS": ("request", "cmd_flags"),
    "BIO_RQ_RQ_FLAGS": ("request", "rq_flags"),
    "BIO_RQ_START_TIME_NS": ("request", "start_time_ns"),
    "BIO_Q_DISK": ("request_queue", "disk"),
    "BIO_DISK_MAJOR": ("gendisk", "major"),
    "BIO_DISK_FIRST_MINOR": ("gendisk", "first_minor"),
}
BTF_ENUMERATORS = {
    "BIO_RQF_IO_STAT": ("rqf_flags", "__RQF_IO_STAT"),
    "BIO_RQF_FLUSH_SEQ": ("rqf_flags", "__RQF_FLUSH_SEQ"),
    "BIO_REQ_OP_BITS": ("req_flag_bits", "__REQ_FAILFAST_DEV"),      # the first flag bit after the op
    "BIO_REQ_OP_FLUSH": ("req_op", "REQ_OP_FLUSH"),
    "BIO_REQ_OP_DISCARD": ("req_op", "REQ_OP_DISCARD"),
    "BIO_REQ_OP_SECURE_ERASE": ("req_op", "REQ_OP_SECURE_ERASE"),
}


def accounting_params() -> Optional[dict]:
    """The parameters of the accounting variant from the running kernel's BTF, or None when BTF
    is missing or lacks one of them (then the driver pair is used)."""
    facts = btf_facts(BTF_MEMBERS.values(), BTF_ENUMERATORS.values())
    if facts is None:
        return None
    values = {flag: facts[key] for flag, key in {**BTF_MEMBERS, **BTF_ENUMERATORS}.items()}
    missing = sorted(flag for flag, v in values.items() if v is None)
    if missing:
        log.info("biolatency_accounting_unavailable missing=%s", ",".join(missing))
        return None
    return {"BIO_ACCOUNTING": True, **values}

# BIO_OP_* in bpf/biolatency.bpf.c
OPERATIONS = {0: "read", 1: "write", 2: "flush", 3: "discard", 4: "other"}

class BioKey(ct.Structure):
    """struct bio_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("dev", ct.c_uint32), ("op", ct.c_uint32), ("slot", ct.c_uint32),
                ("pad", ct.c_uint32)]


class BioStart(ct.Structure):
    """struct bio_start"""
    _fields_ = [("at", ct.c_uint64), ("cgroup", ct.c_uint64)]


class BiolatencyProbe(histogram.KeyedProbe):
    name = "biolatency"
    description = "block I/O latency per device and operation (exponential histogram, ns)"
    # either pair (see select_tracepoints), block_io_start with the accounting pair by workload
    tracepoints = ACCOUNTING_TRACEPOINTS + (ACCOUNTING_OWNER,) + DRIVER_TRACEPOINTS
    default_enabled = True
    structs = {"bio_key": BioKey, "bio_start": BioStart, "exp2_bucket": histogram.Exp2Bucket}
    MAX_KEYS = "BIO_MAX_KEYS"
    keyed_maps = ("bio_latency",)

    METRIC = "system.linux.disk.io.latency"
    metrics = (METRIC,)

    def __init__(self, devices: Optional[DeviceNames] = None, **keyed):
        super().__init__(**keyed)
        self.devices = devices or DeviceNames()

    def _accounting(self) -> tuple:
        return ACCOUNTING_TRACEPOINTS + ((ACCOUNTING_OWNER,) if self.attribution.by_cgroup else ())

    def select_tracepoints(self, available):
        if all(map(available, self._accounting())) and accounting_params() is not None:
            return self._accounting()
        if all(map(available, DRIVER_TRACEPOINTS)):
            return DRIVER_TRACEPOINTS
        return None

    def _is_accounting(self, tracepoints: tuple) -> bool:
        return tuple(tracepoints[:2]) == ACCOUNTING_TRACEPOINTS

    def programs(self, tracepoints: tuple) -> tuple:
        if self._is_accounting(tracepoints):       # raw tracepoints: they read the request
            return tuple("raw_tp__" + tp.partition(":")[2] for tp in tracepoints)
        return super().programs(tracepoints)

    def unused_maps(self, tracepoints: tuple) -> tuple:
        if self._is_accounting(tracepoints):
            return ("bio_started",) + (() if self.attribution.by_cgroup else ("bio_owners",))
        return ("bio_owners",)

    def params(self, tracepoints: tuple) -> dict:
        params = super().params(tracepoints)
        if not self._is_accounting(tracepoints):
            return params
        accounting = accounting_params()
        if accounting is None:
            raise RuntimeError("the running kernel's BTF lacks what the accounting variant reads")
        return {**params, **accounting}

    def setup(self, obj) -> None:
        super().setup(obj)
        self.hist = obj.map("bio_latency")
        self.overflow = obj.map("bio_latency_overflow")

    def _attributes(self, raw: tuple):
        dev, op = raw
        return (("device", self.devices.name(dev)), ("operation", OPERATIONS.get(op, "other")))

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        groups = self.attribution.histogram(self.hist, self.overflow, BioKey)
        points = histogram.exp2_points(groups, histogram.by_workload(self._attributes), start_ns, now_ns)
        if not points:
            return []
        return [Metric(self.METRIC, "Block I/O request latency, per device and operation.", "ns",
                       MetricKind.EXPONENTIAL_HISTOGRAM, points)]
