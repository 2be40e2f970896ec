"""biolatency: block I/O latency per device and operation (bpf/biolatency.bpf.c)."""
from __future__ import annotations

import ctypes as ct
import logging
import os
from typing import Optional

from agent.model import Metric, MetricKind
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts
from agent.sources.ebpf.probe import Probe

log = logging.getLogger("hostagent.ebpf")

# Linux 6.5+ with BTF: what /proc/diskstats counts, with the latency the kernel adds to it
# (raw tracepoints, reading the request). Otherwise: commands handed to the driver, issue to complete.
ACCOUNTING_TRACEPOINTS = ("block:block_io_done", "block:block_rq_complete")
DRIVER_TRACEPOINTS = ("block:block_rq_issue", "block:block_rq_complete")

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

MINOR_BITS = 20     # the kernel's dev_t: major << 20 | minor


class BioKey(ct.Structure):
    """struct bio_key"""
    _fields_ = [("dev", ct.c_uint32), ("op", ct.c_uint32), ("slot", ct.c_uint32)]


class DeviceNames:
    """Kernel dev_t -> block device name (vda, nvme0n1, dm-0), from /sys/dev/block/MAJ:MIN/uevent;
    looked up again on a miss so hot-plugged devices get their names."""

    def __init__(self, sysfs: str = "/sys/dev/block"):
        self.sysfs = sysfs
        self._names: dict = {}

    def name(self, dev: int) -> str:
        cached = self._names.get(dev)
        if cached is not None:
            return cached
        major, minor = dev >> MINOR_BITS, dev & ((1 << MINOR_BITS) - 1)
        name = self._read(major, minor)
        if name is None:
            return f"{major}:{minor}"       # gone or not yet visible: not cached
        self._names[dev] = name
        return name

    def _read(self, major: int, minor: int) -> Optional[str]:
        try:
            with open(os.path.join(self.sysfs, f"{major}:{minor}", "uevent")) as f:
                for line in f:
                    if line.startswith("DEVNAME="):
                        return line.strip().partition("=")[2]
        except OSError:
            return None
        return None


class BiolatencyProbe(Probe):
    name = "biolatency"
    description = "block I/O latency per device and operation (exponential histogram, ns)"
    tracepoints = ACCOUNTING_TRACEPOINTS + DRIVER_TRACEPOINTS   # either pair; see select_tracepoints
    default_enabled = True
    structs = {"bio_key": BioKey, "exp2_bucket": histogram.Exp2Bucket}

    METRIC = "system.linux.disk.io.latency"
    metrics = (METRIC,)

    def __init__(self, devices: Optional[DeviceNames] = None):
        self.devices = devices or DeviceNames()

    def select_tracepoints(self, available):
        if all(map(available, ACCOUNTING_TRACEPOINTS)) and accounting_params() is not None:
            return ACCOUNTING_TRACEPOINTS
        if all(map(available, DRIVER_TRACEPOINTS)):
            return DRIVER_TRACEPOINTS
        return None

    def programs(self, tracepoints: tuple) -> tuple:
        if tuple(tracepoints) == ACCOUNTING_TRACEPOINTS:       # raw tracepoints: they read the request
            return ("raw_tp__block_io_done", "raw_tp__block_rq_complete")
        return super().programs(tracepoints)

    def unused_maps(self, tracepoints: tuple) -> tuple:
        return ("bio_started",) if tuple(tracepoints) == ACCOUNTING_TRACEPOINTS else ()

    def params(self, tracepoints: tuple) -> dict:
        if tuple(tracepoints) != ACCOUNTING_TRACEPOINTS:
            return {}
        params = accounting_params()
        if params is None:
            raise RuntimeError("the running kernel's BTF lacks what the accounting variant reads")
        return params

    def setup(self, obj) -> None:
        super().setup(obj)
        self.hist = obj.map("bio_latency")

    def _attributes(self, raw: tuple):
        dev, op = raw
        return (("device", self.devices.name(dev)), ("operation", OPERATIONS.get(op, "other")))

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        groups = histogram.read_exp2(self.hist, BioKey)
        points = histogram.exp2_points(groups, self._attributes, start_ns, now_ns)
        if not points:
            return []
        return [Metric(self.METRIC, "Block I/O request latency, per device and operation.", "ns",
                       MetricKind.EXPONENTIAL_HISTOGRAM, points)]
