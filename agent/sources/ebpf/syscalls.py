"""syscalls: system call counts, errors per errno and latency per syscall (bpf/syscalls.bpf.c),
per workload: the workload of the calling task.

Off by default: any program on raw_syscalls adds to every system call on the host (with latency,
as the agent runs it: about 290 ns a call on a 2-vCPU VM, against 474 for bcc's `syscount -L`;
counting only, latency=False: about 120 ns against syscount's 156; docs/performance.md).
"""
from __future__ import annotations

import ctypes as ct
import errno
import functools
import glob
import os
import re
from typing import Optional

from agent.model import Metric, MetricKind, NumberPoint
from agent.sources.ebpf import histogram

SYSCALL_SLOTS = 1024                # mirrors bpf/syscalls.bpf.c
SYSCALL_OTHER = SYSCALL_SLOTS - 1

# errno values the kernel uses inside (include/linux/errno.h) that can reach sys_exit
KERNEL_ERRNOS = {
    512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND", 515: "ENOIOCTLCMD",
    516: "ERESTART_RESTARTBLOCK", 517: "EPROBE_DEFER", 518: "EOPENSTALE", 519: "ENOPARAM",
    521: "EBADHANDLE", 522: "ENOTSYNC", 523: "EBADCOOKIE", 524: "ENOTSUPP", 525: "ETOOSMALL",
    526: "ESERVERFAULT", 527: "EBADTYPE", 528: "EJUKEBOX", 529: "EIOCBQUEUED",
    530: "ERECALLCONFLICT", 531: "ENOGRACE",
}

# where the native syscall table is, most specific first (linux-libc-dev, kernel headers)
UNISTD_HEADERS = (
    "/usr/include/*-linux-gnu*/asm/unistd_64.h",
    "/usr/include/asm/unistd_64.h",
    "/usr/include/*-linux-gnu*/asm/unistd.h",
    "/usr/include/asm-generic/unistd.h",
    "/lib/modules/{release}/build/arch/*/include/generated/uapi/asm/unistd_64.h",
)
_NR_DEFINE = re.compile(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", re.M)


class SyscallKey(ct.Structure):
    """struct syscall_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("nr", ct.c_uint32), ("slot", ct.c_uint32)]


class SyscallCall(ct.Structure):
    """struct syscall_call"""
    _fields_ = [("cgroup", ct.c_uint64), ("nr", ct.c_uint32), ("pad", ct.c_uint32)]


class SyscallError(ct.Structure):
    """struct syscall_error"""
    _fields_ = [("cgroup", ct.c_uint64), ("nr", ct.c_uint32), ("err", ct.c_uint32)]


SYSCALL_TABLE = "syscalls.txt"      # bpf/build.sh writes it beside the objects
MAX_TABLE_BYTES = 1 << 16
_TABLE_LINE = re.compile(r"^(\d{1,4}) ([a-z0-9_]{1,64})$", re.M)


def syscall_table(directory: str) -> dict:
    """{number: name} from the system call table bpf/build.sh wrote into `directory` with the
    objects ({} when there is none): what names the calls on a host without headers. Lines that
    are not `<number> <name>` are left out."""
    try:
        with open(os.path.join(directory, SYSCALL_TABLE), encoding="ascii", errors="replace") as f:
            text = f.read(MAX_TABLE_BYTES)
    except OSError:
        return {}
    return {int(nr): name for nr, name in _TABLE_LINE.findall(text) if int(nr) < SYSCALL_OTHER}


@functools.lru_cache(maxsize=1)
def syscall_names() -> dict:
    """{number: name} for this machine's native ABI, from the installed headers or else bcc."""
    release = os.uname().release
    for pattern in UNISTD_HEADERS:
        for path in sorted(glob.glob(pattern.format(release=release))):
            try:
                with open(path) as f:
                    table = {int(nr): name for name, nr in _NR_DEFINE.findall(f.read())}
            except OSError:
                continue
            if len(table) > 100:
                return table
    try:
        from bcc.syscall import syscalls
        return {nr: name.decode() for nr, name in syscalls.items()}
    except Exception:   # no bcc, or its table has no entry for this architecture
        return {}


def syscall_name(nr: int, names: Optional[dict] = None) -> str:
    """The name of system call `nr`, from `names` (default: syscall_names())."""
    if nr == SYSCALL_OTHER:
        return "other"
    return (syscall_names() if names is None else names).get(nr) or f"syscall_{nr}"


def errno_name(err: int) -> str:
    return errno.errorcode.get(err) or KERNEL_ERRNOS.get(err) or f"E{err}"


class SyscallsProbe(histogram.KeyedProbe):
    name = "syscalls"
    description = "system calls per syscall, failed calls per errno, and a latency histogram per syscall (ns)"
    tracepoints = ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit")
    default_enabled = False     # adds ~290 ns to every system call on the host (see module doc)
    structs = {"syscall_key": SyscallKey, "syscall_call": SyscallCall, "syscall_error": SyscallError,
               "exp2_bucket": histogram.Exp2Bucket}
    MAX_KEYS = "SYSCALL_MAX_KEYS"
    keyed_maps = ("syscall_latency", "syscall_calls")

    CALLS = "system.linux.syscalls"
    ERRORS = "system.linux.syscall.errors"
    DURATION = "system.linux.syscall.duration"
    metrics = (CALLS, ERRORS, DURATION)

    def __init__(self, latency: bool = True, target_tgid: Optional[int] = None, **keyed):
        super().__init__(**keyed)
        self.latency = latency
        self.target_tgid = target_tgid

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "SyscallsProbe":
        return cls(latency=not (options and options.counting_only), workloads=workloads)

    def select_tracepoints(self, available):
        wanted = self.tracepoints if self.latency else ("raw_syscalls:sys_exit",)
        return wanted if all(available(tp) for tp in wanted) else None

    def programs(self, tracepoints: tuple) -> tuple:
        # latency: raw tracepoints on both (no argument record is built); counting: sys_exit's
        return ("raw_tp__sys_enter", "raw_tp__sys_exit") if self.latency else super().programs(tracepoints)

    def unused_maps(self, tracepoints: tuple) -> tuple:
        if self.latency:
            return ("syscall_counts", "syscall_calls", "syscall_calls_overflow")
        unused = ("syscall_starts", "syscall_latency", "syscall_latency_overflow")
        return unused + (("syscall_counts",) if self.attribution.by_cgroup else ("syscall_calls",))

    def params(self, tracepoints: tuple) -> dict:
        params = {**super().params(tracepoints), "SYSCALL_LATENCY": self.latency}
        if self.target_tgid is not None:
            params["TARGET_TGID"] = int(self.target_tgid)
        return params

    def setup(self, obj) -> None:
        super().setup(obj)
        # the table built with the objects, else the installed headers' or bcc's
        self.names = (obj.directory and syscall_table(obj.directory)) or syscall_names()
        self.errors = obj.map("syscall_errors")
        self.errors_overflow = obj.map("syscall_errors_overflow")
        if self.latency:
            self.durations = obj.map("syscall_latency")
            self.durations_overflow = obj.map("syscall_latency_overflow")
        elif self.attribution.by_cgroup:
            self.calls = obj.map("syscall_calls")
            self.calls_overflow = obj.map("syscall_calls_overflow")
        else:
            self.counts = obj.map("syscall_counts")

    def syscall(self, nr: int) -> str:
        return syscall_name(nr, self.names)

    def _calls(self) -> dict:
        """{(workload attributes, nr): calls} when counting only."""
        if self.attribution.by_cgroup:
            return {(w, f[0]): words[0] for (w, f), words in
                    self.attribution.read(self.calls, SyscallCall, self.calls_overflow).items()}
        keys, values = self.counts.read(ct.c_uint32)
        return {((), int(k)): int(v) for k, v in zip(keys.tolist(), values[:, 0].tolist()) if v}

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        metrics = []
        if self.latency:
            groups = self.attribution.histogram(self.durations, self.durations_overflow, SyscallKey)
            calls = {(w, f[0]): n for (w, f), n in histogram.counts_of(groups).items()}
            points = histogram.exp2_points(groups, histogram.by_workload(lambda f: (("syscall", self.syscall(f[0])),)),
                                           start_ns, now_ns)
            if points:
                metrics.append(Metric(self.DURATION, "Time from entering to leaving a system call.",
                                      "ns", MetricKind.EXPONENTIAL_HISTOGRAM, points))
        else:
            calls = self._calls()
        if calls:
            metrics.append(Metric(self.CALLS, "System calls made.", "{call}", MetricKind.SUM, [
                NumberPoint((("syscall", self.syscall(nr)),) + w, n, start_ns, now_ns)
                for (w, nr), n in sorted(calls.items(), key=lambda c: (c[0][1], c[0][0]))], monotonic=True))

        errors = {}
        for (w, (nr, err)), (n,) in self.attribution.read(self.errors, SyscallError, self.errors_overflow).items():
            attributes = (("syscall", self.syscall(nr)), ("error.type", errno_name(err))) + w
            errors[attributes] = errors.get(attributes, 0) + n
        if errors:
            metrics.append(Metric(self.ERRORS, "System calls that returned an error.", "{call}",
                                  MetricKind.SUM, [NumberPoint(a, n, start_ns, now_ns)
                                                   for a, n in errors.items()], monotonic=True))
        return metrics
