"""biolatency: block I/O latency per device and operation (bpf/biolatency.bpf.c)."""
from __future__ import annotations

import ctypes as ct
import os
from typing import Optional

from agent.model import Metric, MetricKind
from agent.sources.ebpf import histogram
from agent.sources.ebpf.probe import Probe

# Linux 6.5+: the request's accounted lifetime (iostat's await); older kernels: issue to complete.
ACCOUNTING_TRACEPOINTS = ("block:block_io_start", "block:block_io_done")
DRIVER_TRACEPOINTS = ("block:block_rq_issue", "block:block_rq_complete")

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

    METRIC = "system.linux.disk.io.latency"

    def __init__(self, devices: Optional[DeviceNames] = None):
        self.devices = devices or DeviceNames()

    def select_tracepoints(self, available):
        for pair in (ACCOUNTING_TRACEPOINTS, DRIVER_TRACEPOINTS):
            if all(available(tp) for tp in pair):
                return pair
        return None

    def cflags(self, tracepoints: tuple) -> list:
        return ["-DBIO_ACCOUNTING"] if tuple(tracepoints) == ACCOUNTING_TRACEPOINTS else []

    def setup(self, bpf) -> None:
        super().setup(bpf)
        self.hist = bpf[b"bio_latency"]

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
