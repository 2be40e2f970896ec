"""Host metrics scrapers, named and shaped like the OpenTelemetry Collector's hostmetrics receiver.

One scraper per Collector scraper (cpu, disk, filesystem, load, memory, network, paging, processes,
system; the per-process `process` scraper lives in process.py). Every metric is defined once, in
TABLE below: name, description, unit, instrument, monotonicity, value type and whether it is on by
default. Emit sites only name the metric; the table decides the rest, and METRICS (used by config
validation) is derived from it. The scrapers' configs are here too; agent/components.py lists the
scrapers (SCRAPERS) and makes the `scrapers` config section from that table.

As in the Collector, sums are cumulative and start at the host's boot time; a metric with no data
points on this host (no swap device, no conntrack module) is left out. The scrapers read /proc and
/sys directly where psutil lacks a field the Collector reports (pending disk operations, slab
memory, conntrack) or where psutil is slow (TCP connection states without the per-process socket
scan). Conditions of the host (a missing file, a permission, a stale mount) never raise out of
collect(): they are logged once per kind, counted, and that part of the scrape is skipped.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import threading
import time
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import psutil

from agent import __version__
from agent.config import ConfigError, check_patterns, compile_pattern, did_you_mean, frozen_dict
from agent.model import Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope, now_ns
from agent.sources import Source

log = logging.getLogger("hostagent.sources.host")

SCOPE_PREFIX = "hostagent/scrapers/"

# What a host can throw at a scraper: missing or unreadable files, odd or incomplete contents
# (a field this kernel does not have), vanished objects.
HOST_ERRORS = (OSError, ValueError, IndexError, KeyError, psutil.Error)


# --- the metric table -------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricDef:
    name: str
    description: str
    unit: str
    kind: MetricKind
    value_type: type  # int or float: every point's value is converted to it
    monotonic: bool = False
    enabled: bool = True  # on by default


def _sum(name: str, unit: str, value_type: type, monotonic: bool, description: str,
         enabled: bool = True) -> MetricDef:
    return MetricDef(name, description, unit, MetricKind.SUM, value_type, monotonic, enabled)


def _gauge(name: str, unit: str, value_type: type, description: str, enabled: bool = True) -> MetricDef:
    return MetricDef(name, description, unit, MetricKind.GAUGE, value_type, False, enabled)


OFF = False  # readability: optional metrics, off unless switched on in config

TABLE: dict = {
    "cpu": (
        _sum("system.cpu.time", "s", float, True,
             "Total seconds each logical CPU spent on each mode."),
        _gauge("system.cpu.utilization", "1", float,
               "Difference in system.cpu.time since the last measurement per logical CPU, divided by "
               "the elapsed time (value in interval [0,1]).", OFF),
        _sum("system.cpu.physical.count", "{cpu}", int, False, "Number of available physical CPUs.", OFF),
        _sum("system.cpu.logical.count", "{cpu}", int, False, "Number of available logical CPUs.", OFF),
        _gauge("system.cpu.frequency", "Hz", float, "Current frequency of the CPU core in Hz.", OFF),
    ),
    "disk": (
        _sum("system.disk.io", "By", int, True, "Disk bytes transferred."),
        _sum("system.disk.operations", "{operations}", int, True, "Disk operations count."),
        _sum("system.disk.io_time", "s", float, True, "Time disk spent activated."),
        _sum("system.disk.operation_time", "s", float, True, "Time spent in disk operations."),
        _sum("system.disk.weighted_io_time", "s", float, True,
             "Time disk spent activated multiplied by the queue length."),
        _sum("system.disk.pending_operations", "{operations}", int, False,
             "The queue size of pending I/O operations."),
        _sum("system.disk.merged", "{operations}", int, True,
             "The number of disk reads/writes merged into single physical disk access operations."),
    ),
    "filesystem": (
        _sum("system.filesystem.usage", "By", int, False, "Filesystem bytes used."),
        _sum("system.filesystem.inodes.usage", "{inodes}", int, False, "FileSystem inodes used."),
        _gauge("system.filesystem.utilization", "1", float, "Fraction of filesystem bytes used.", OFF),
    ),
    "load": (
        _gauge("system.cpu.load_average.1m", "{thread}", float, "Average CPU Load over 1 minute."),
        _gauge("system.cpu.load_average.5m", "{thread}", float, "Average CPU Load over 5 minutes."),
        _gauge("system.cpu.load_average.15m", "{thread}", float, "Average CPU Load over 15 minutes."),
    ),
    "memory": (
        _sum("system.memory.usage", "By", int, False, "Bytes of memory in use."),
        _gauge("system.memory.utilization", "1", float, "Percentage of memory bytes in use.", OFF),
        _sum("system.memory.limit", "By", int, False, "Total bytes of memory available.", OFF),
        _gauge("system.memory.page_size", "By", int,
               "A constant value for the system's configured page size.", OFF),
        _sum("system.linux.memory.available", "By", int, False,
             "An estimate of how much memory is available for starting new applications, without "
             "swapping.", OFF),
        _sum("system.linux.memory.dirty", "By", int, False,
             "The amount of dirty memory according to /proc/meminfo.", OFF),
        _sum("system.memory.linux.shared", "By", int, False,
             "Shared memory usage, including tmpfs filesystems and System V/POSIX shared memory.", OFF),
        _sum("system.memory.linux.hugepages.limit", "{page}", int, False,
             "Total number of hugepages available.", OFF),
        _gauge("system.memory.linux.hugepages.page_size", "By", int, "System hugepage size in bytes.", OFF),
        _gauge("system.memory.linux.hugepages.reserved", "{page}", int,
               "Number of reserved hugepages (committed to but not yet allocated).", OFF),
        _gauge("system.memory.linux.hugepages.surplus", "{page}", int,
               "Number of surplus hugepages (overcommitted beyond the persistent pool).", OFF),
        _sum("system.memory.linux.hugepages.usage", "{page}", int, False,
             "Number of hugepages in use by state.", OFF),
        _gauge("system.memory.linux.hugepages.utilization", "1", float,
               "Percentage of hugepages in use by state.", OFF),
    ),
    "network": (
        _sum("system.network.connections", "{connections}", int, False, "The number of connections."),
        _sum("system.network.dropped", "{packets}", int, True, "The number of packets dropped."),
        _sum("system.network.errors", "{errors}", int, True, "The number of errors encountered."),
        _sum("system.network.io", "By", int, True, "The number of bytes transmitted and received."),
        _sum("system.network.packets", "{packets}", int, True, "The number of packets transferred."),
        _sum("system.network.conntrack.count", "{entries}", int, False,
             "The count of entries in conntrack table.", OFF),
        _sum("system.network.conntrack.max", "{entries}", int, False,
             "The limit for entries in the conntrack table.", OFF),
    ),
    "paging": (
        _sum("system.paging.usage", "By", int, False, "Swap (unix) or pagefile (windows) usage."),
        _sum("system.paging.operations", "{operations}", int, True, "The number of paging operations."),
        _sum("system.paging.faults", "{faults}", int, True, "The number of page faults."),
        _gauge("system.paging.utilization", "1", float,
               "Swap (unix) or pagefile (windows) utilization.", OFF),
    ),
    "processes": (
        _sum("system.processes.count", "{processes}", int, False,
             "Total number of processes in each state."),
        _sum("system.processes.created", "{processes}", int, True, "Total number of created processes."),
    ),
    "process": (
        _sum("process.cpu.time", "s", float, True, "Total CPU seconds broken down by different states."),
        _gauge("process.cpu.utilization", "1", float,
               "Percentage of total CPU time used by the process since last scrape, expressed as a "
               "value between 0 and 1. On the first scrape, no data point is emitted for this metric.",
               OFF),
        _sum("process.memory.usage", "By", int, False, "The amount of physical memory in use."),
        _sum("process.memory.virtual", "By", int, False, "Virtual memory size."),
        _gauge("process.memory.utilization", "1", float,
               "Percentage of total physical memory that is used by the process.", OFF),
        _sum("process.disk.io", "By", int, True, "Disk bytes transferred."),
        _sum("process.disk.operations", "{operations}", int, True,
             "Number of disk operations performed by the process.", OFF),
        _sum("process.paging.faults", "{faults}", int, True,
             "Number of page faults the process has made.", OFF),
        _sum("process.signals_pending", "{signals}", int, False,
             "Number of pending signals for the process.", OFF),
        _sum("process.threads", "{threads}", int, False, "Process threads count.", OFF),
        _sum("process.open_file_descriptors", "{count}", int, False,
             "Number of file descriptors in use by the process.", OFF),
        _sum("process.handles", "{count}", int, False,
             "Number of handles held by the process (Windows only; never emitted here).", OFF),
        _sum("process.context_switches", "{count}", int, True,
             "Number of times the process has been context switched.", OFF),
        _gauge("process.uptime", "s", float, "The time the process has been running.", OFF),
    ),
    "system": (
        _gauge("system.uptime", "s", float, "The time the system has been running"),
    ),
    # not the Collector's: the semantic-conventions proposal for Linux PSI (agent/sources/cgroups.py)
    "pressure": tuple(
        _sum(f"system.{resource}.linux.pressure.total", "s", float, True,
             f"Total time tasks were stalled waiting for {what} (some: at least one task, full: "
             f"all non-idle tasks at once), of the host or of a workload's cgroup.")
        for resource, what in (("cpu", "a CPU"), ("memory", "memory"), ("io", "I/O"),
                               ("irq", "a CPU taken by interrupts"))),
    # not the Collector's: per workload, as cAdvisor; container.* of the semantic conventions for
    # containers, the same under cgroup.* for services, scopes and slices (agent/sources/cgroups.py)
    "cgroups": tuple(d for prefix, who in (("container", "container"), ("cgroup", "workload's cgroup"))
                     for d in (
        _sum(f"{prefix}.cpu.time", "s", float, True, f"Total CPU time consumed by the {who}, by mode."),
        _sum(f"{prefix}.memory.usage", "By", int, False, f"Memory usage of the {who}."),
        _sum(f"{prefix}.memory.working_set", "By", int, False,
             f"Memory usage of the {who} less its inactive file pages."),
        _sum(f"{prefix}.disk.io", "By", int, True, f"Disk bytes transferred by the {who}."),
        _sum(f"{prefix}.disk.operations", "{operation}", int, True, f"Disk operations of the {who}."),
    )),
}

# scraper name -> {metric name: enabled by default}; config validation checks switches against it
METRICS: dict = {scraper: {d.name: d.enabled for d in defs} for scraper, defs in TABLE.items()}


def enabled_metrics(scraper: str, switches: Mapping) -> frozenset:
    """The metrics a scraper emits: the defaults, overridden by per-metric config switches."""
    enabled = dict(METRICS[scraper])
    for name, switch in switches.items():
        if name in enabled:
            enabled[name] = bool(getattr(switch, "enabled", switch))
    return frozenset(name for name, on in enabled.items() if on)


# --- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricSwitch:
    enabled: bool = True


@dataclass(frozen=True)
class ScraperConfig:
    enabled: bool = True
    # per-metric switches, e.g. {"system.cpu.utilization": {"enabled": true}}
    metrics: Mapping[str, MetricSwitch] = frozen_dict()


@dataclass(frozen=True)
class FilteredScraperConfig(ScraperConfig):
    # regular expressions matched in full against the scraper's subject: the device for disk and
    # network, the mount point for filesystem, the executable name for process
    include: tuple = ()
    exclude: tuple = ()


PSEUDO_FILESYSTEMS = ("autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs",
                      "devpts", "devtmpfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay",
                      "proc", "procfs", "pstore", "rpc_pipefs", "securityfs", "selinuxfs",
                      "squashfs", "sysfs", "tracefs")


@dataclass(frozen=True)
class FilesystemScraperConfig(FilteredScraperConfig):
    exclude_fs_types: tuple = PSEUDO_FILESYSTEMS


def check_scrapers(scrapers, key: str) -> None:
    """The `scrapers` section (one field per scraper): each metric switch names a metric of its
    scraper (METRICS), each include/exclude filter compiles."""
    for f in dataclasses.fields(scrapers):
        known = METRICS[f.name]
        for metric in getattr(scrapers, f.name).metrics:
            if metric not in known:
                raise ConfigError(f"{key}.{f.name}.metrics.{metric}", "unknown metric" + did_you_mean(metric, known))
        for pattern_key in ("include", "exclude"):
            check_patterns(getattr(getattr(scrapers, f.name), pattern_key, ()), f"{key}.{f.name}.{pattern_key}")


class Points:
    """The data points of one scrape (or one process), kept per metric in table order.

    Only enabled metrics record; values are converted to the metric's value type here, once."""

    __slots__ = ("_defs", "_points", "start_ns", "time_ns")

    def __init__(self, defs: Mapping, enabled: frozenset, start_ns: int, time_ns: int):
        self._defs = defs
        self._points = {name: [] for name in defs if name in enabled}
        self.start_ns = start_ns
        self.time_ns = time_ns

    def wants(self, *names: str) -> bool:
        return any(name in self._points for name in names)

    def add(self, name: str, value, attributes: tuple = (), start_ns: Optional[int] = None) -> None:
        """`start_ns`: a cumulative point's own start (a workload's cgroup), else the scrape's."""
        points = self._points.get(name)
        if points is not None:
            points.append(NumberPoint(attributes, self._defs[name].value_type(value),
                                      self.start_ns if start_ns is None else start_ns, self.time_ns))

    def metrics(self) -> list:
        out = []
        for name, points in self._points.items():
            if points:
                d = self._defs[name]
                out.append(Metric(d.name, d.description, d.unit, d.kind, points, d.monotonic))
        return out


# --- small readers ------------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _read_int(path: str) -> int:
    return int(_read(path).strip())


def _boot_time_s() -> int:
    """Boot time in whole seconds since the epoch, as the kernel states it (btime in /proc/stat)."""
    try:
        for line in _read("/proc/stat").splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
    except HOST_ERRORS:
        pass
    try:
        return int(psutil.boot_time())
    except HOST_ERRORS:
        return int(time.time())


def _key_values(text: str) -> dict:
    """`name value` lines (/proc/stat, /proc/vmstat) -> {name: int of the first value}."""
    out = {}
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def read_meminfo(text: Optional[str] = None) -> dict:
    """/proc/meminfo -> {field: value}; kB values in bytes, page counts (HugePages_*) as they are."""
    out = {}
    for line in (text if text is not None else _read("/proc/meminfo")).splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            value = int(parts[0])
            out[name] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


# --- the scraper base ---------------------------------------------------------------------------

class HostScraper(Source):
    """A pull source for one Collector scraper. Subclasses implement scrape(points)."""

    name = ""

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        """`telemetry`: the agent's own metrics (SelfMetrics); `enrichment` (EnrichmentConfig): how
        scrapers that read command lines (process) redact and cache them; the others ignore it."""
        self.resource = resource
        self.scope = Scope(SCOPE_PREFIX + self.name, __version__)
        self.definitions = {d.name: d for d in TABLE[self.name]}
        self.enabled = enabled_metrics(self.name, cfg.metrics)
        # include/exclude exist on the filtered scrapers only (disk, network, filesystem, process); RE2:
        # a name on the host (a process's) cannot make a pattern backtrack
        self._include = tuple(compile_pattern(p) for p in getattr(cfg, "include", ()))
        self._exclude = tuple(compile_pattern(p) for p in getattr(cfg, "exclude", ()))
        self.start_ns = _boot_time_s() * 1_000_000_000
        self._errors = telemetry.counter("hostagent.scraper.errors", "{error}",
                                         "Host read failures in scrapers; the affected part of the scrape "
                                         "was skipped.")
        self._reported: set = set()

    def selected(self, subject: str) -> bool:
        """The include/exclude filters: regular expressions matched against the whole subject."""
        if self._include and not any(p.fullmatch(subject) for p in self._include):
            return False
        return not any(p.fullmatch(subject) for p in self._exclude)

    def collect(self) -> list:
        groups = []
        with self.guard("scrape"):
            groups = self.groups(now_ns())
        return groups

    def groups(self, time_ns: int) -> list:
        points = Points(self.definitions, self.enabled, self.start_ns, time_ns)
        self.scrape(points)
        metrics = points.metrics()
        return [MetricGroup(self.resource, self.scope, metrics)] if metrics else []

    def scrape(self, points: Points) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def guard(self, what: str, errors: tuple = HOST_ERRORS):
        """Run one part of a scrape; a host error skips that part, is counted and logged once."""
        try:
            yield
        except errors as e:
            self.host_error(what, e)

    def host_error(self, what: str, error: BaseException) -> None:
        self._errors.add(1, (("scraper", self.name),))
        key = (what, type(error).__name__)
        if key in self._reported:
            log.debug("scrape part skipped scraper=%s part=%s error=%r", self.name, what, error)
            return
        self._reported.add(key)
        log.warning("scrape part skipped scraper=%s part=%s error=%r (further errors of this kind "
                    "are logged at debug level)", self.name, what, error)


# --- cpu ---------------------------------------------------------------------------------------

# /proc/stat cpuN columns (0-based after the name) in the Collector's order of states
CPU_STATES = (("user", 0), ("system", 2), ("idle", 3), ("interrupt", 5), ("nice", 1),
              ("softirq", 6), ("steal", 7), ("wait", 4))


def _per_cpu_ticks(stat: str) -> list:
    """[(cpu name, [user, nice, system, idle, iowait, irq, softirq, steal] in ticks)] per logical CPU."""
    rows = []
    for line in stat.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            parts = line.split()
            ticks = [int(v) for v in parts[1:9]]
            ticks += [0] * (8 - len(ticks))  # very old kernels lack steal
            rows.append((parts[0], ticks))
    return rows


class CpuScraper(HostScraper):
    name = "cpu"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self._hz = os.sysconf("SC_CLK_TCK")
        self._previous: dict = {}  # cpu -> ticks of the last scrape, for utilization

    def scrape(self, p: Points) -> None:
        if p.wants("system.cpu.time", "system.cpu.utilization"):
            with self.guard("/proc/stat"):
                self._times(p, _per_cpu_ticks(_read("/proc/stat")))
        if p.wants("system.cpu.logical.count"):
            with self.guard("logical cpu count"):
                logical = psutil.cpu_count(logical=True)
                if logical:
                    p.add("system.cpu.logical.count", logical)
        if p.wants("system.cpu.physical.count"):
            with self.guard("physical cpu count"):
                physical = psutil.cpu_count(logical=False)
                if physical:
                    p.add("system.cpu.physical.count", physical)
        if p.wants("system.cpu.frequency"):
            with self.guard("/proc/cpuinfo"):
                processor = None
                for line in _read("/proc/cpuinfo").splitlines():
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key == "processor":
                        processor = int(value)
                    elif key == "cpu MHz" and processor is not None:
                        p.add("system.cpu.frequency", float(value) * 1e6, (("cpu", f"cpu{processor}"),))

    def _times(self, p: Points, rows: list) -> None:
        hz = self._hz
        for cpu, ticks in rows:
            for state, i in CPU_STATES:
                p.add("system.cpu.time", ticks[i] / hz, (("cpu", cpu), ("state", state)))
            previous = self._previous.get(cpu)
            self._previous[cpu] = ticks
            if previous is None:
                continue
            elapsed = sum(ticks) - sum(previous)
            if elapsed <= 0:
                continue
            for state, i in CPU_STATES:
                p.add("system.cpu.utilization", (ticks[i] - previous[i]) / elapsed,
                      (("cpu", cpu), ("state", state)))


# --- disk --------------------------------------------------------------------------------------

SECTOR_SIZE = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size


class DiskScraper(HostScraper):
    name = "disk"

    def scrape(self, p: Points) -> None:
        with self.guard("/proc/diskstats"):
            for line in _read("/proc/diskstats").splitlines():
                f = line.split()
                if len(f) < 14 or not self.selected(f[2]):
                    continue
                device = f[2]
                (reads, reads_merged, sectors_read, ms_reading, writes, writes_merged,
                 sectors_written, ms_writing, in_flight, ms_io, ms_weighted) = map(int, f[3:14])
                read = (("device", device), ("direction", "read"))
                write = (("device", device), ("direction", "write"))
                dev = (("device", device),)
                p.add("system.disk.io", sectors_read * SECTOR_SIZE, read)
                p.add("system.disk.io", sectors_written * SECTOR_SIZE, write)
                p.add("system.disk.operations", reads, read)
                p.add("system.disk.operations", writes, write)
                p.add("system.disk.io_time", ms_io / 1000, dev)
                p.add("system.disk.operation_time", ms_reading / 1000, read)
                p.add("system.disk.operation_time", ms_writing / 1000, write)
                p.add("system.disk.weighted_io_time", ms_weighted / 1000, dev)
                p.add("system.disk.pending_operations", in_flight, dev)
                p.add("system.disk.merged", reads_merged, read)
                p.add("system.disk.merged", writes_merged, write)


# --- filesystem --------------------------------------------------------------------------------

# statvfs on these can block for as long as the server is gone; they are stat'ed with a timeout
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                                 "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "9p", "afs", "lustre",
                                 "gpfs", "ocfs2", "davfs", "fuse.rclone"})
STAT_TIMEOUT_S = 1.0


HOST_PID = 1  # a process in the host's mount namespace


def host_mount_view() -> tuple:
    """(mounts file, path prefix for statvfs) of the host's mount namespace. A sandboxed service
    (ProtectSystem=, PrivateTmp=) has a namespace of its own in which every filesystem looks
    read-only and private mounts appear; PID 1's namespace is the host's, so read that one when
    it differs from ours and we may look into it (CAP_SYS_PTRACE)."""
    host = f"/proc/{HOST_PID}"
    try:
        if os.readlink(f"{host}/ns/mnt") != os.readlink("/proc/self/ns/mnt") and os.access(f"{host}/root/", os.R_OK):
            return f"{host}/mounts", f"{host}/root"
    except OSError:
        pass
    return "/proc/self/mounts", ""


def _unescape_mount_field(text: str) -> str:
    """Undo the kernel's octal escapes (a space in a mount point is written \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(path: str) -> list:
    """(device, mountpoint, fstype, options) per line of a mounts file."""
    out = []
    for line in _read(path).splitlines():
        fields = line.split()
        if len(fields) >= 4:
            out.append((_unescape_mount_field(fields[0]), _unescape_mount_field(fields[1]), fields[2], fields[3]))
    return out


def mount_mode(opts: str) -> str:
    options = opts.split(",")
    return "rw" if "rw" in options else "ro" if "ro" in options else "unknown"


class FilesystemScraper(HostScraper):
    name = "filesystem"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self._exclude_types = frozenset(cfg.exclude_fs_types)
        self._blocked: dict = {}  # mount point -> thread still stuck in statvfs

    def scrape(self, p: Points) -> None:
        mounts = []
        mounts_file, prefix = host_mount_view()
        with self.guard("mounts"):
            mounts = read_mounts(mounts_file)
        visible = {m[1]: m for m in mounts}  # a later mount hides an earlier one
        for device, mountpoint, fstype, opts in visible.values():
            if fstype in self._exclude_types or not self.selected(mountpoint):
                continue
            with self.guard(f"statvfs {mountpoint}"):
                st = self._statvfs(prefix + mountpoint, fstype)
                attrs = (("device", device), ("mode", mount_mode(opts)),
                         ("mountpoint", mountpoint), ("type", fstype))
                used = (st.f_blocks - st.f_bfree) * st.f_frsize
                free = st.f_bavail * st.f_frsize
                reserved = (st.f_bfree - st.f_bavail) * st.f_frsize
                p.add("system.filesystem.usage", used, attrs + (("state", "used"),))
                p.add("system.filesystem.usage", free, attrs + (("state", "free"),))
                p.add("system.filesystem.usage", reserved, attrs + (("state", "reserved"),))
                p.add("system.filesystem.inodes.usage", st.f_files - st.f_ffree, attrs + (("state", "used"),))
                p.add("system.filesystem.inodes.usage", st.f_ffree, attrs + (("state", "free"),))
                p.add("system.filesystem.utilization", used / (used + free) if used + free else 0.0, attrs)

    def _statvfs(self, mountpoint: str, fstype: str) -> os.statvfs_result:
        if fstype not in NETWORK_FILESYSTEMS:
            return os.statvfs(mountpoint)
        stuck = self._blocked.get(mountpoint)
        if stuck is not None and stuck.is_alive():
            raise TimeoutError(f"statvfs({mountpoint!r}) has been blocked since an earlier scrape")
        result: dict = {}

        def stat() -> None:
            try:
                result["value"] = os.statvfs(mountpoint)
            except OSError as e:
                result["error"] = e

        worker = threading.Thread(target=stat, name=f"statvfs {mountpoint}", daemon=True)
        worker.start()
        worker.join(STAT_TIMEOUT_S)
        if worker.is_alive():
            self._blocked[mountpoint] = worker
            raise TimeoutError(f"statvfs({mountpoint!r}) did not return within {STAT_TIMEOUT_S:g}s")
        self._blocked.pop(mountpoint, None)
        if "error" in result:
            raise result["error"]
        return result["value"]


# --- load --------------------------------------------------------------------------------------

class LoadScraper(HostScraper):
    name = "load"

    def scrape(self, p: Points) -> None:
        with self.guard("load average"):
            one, five, fifteen = os.getloadavg()
            p.add("system.cpu.load_average.1m", one)
            p.add("system.cpu.load_average.5m", five)
            p.add("system.cpu.load_average.15m", fifteen)


# --- memory ------------------------------------------------------------------------------------

MEMORY_STATES = ("used", "free", "buffered", "cached", "slab_reclaimable", "slab_unreclaimable")
STATE_ATTRS = {s: (("state", s),) for s in MEMORY_STATES}
HUGEPAGES_STATE = "system.memory.linux.hugepages.state"


def memory_states(m: Mapping) -> dict:
    """system.memory.usage by state from /proc/meminfo, the Collector's (gopsutil's) way on Linux:
    cached includes SReclaimable, and used is what the other states leave of MemTotal."""
    cached = m["Cached"] + m.get("SReclaimable", 0)
    return {
        "used": max(0, m["MemTotal"] - m["MemFree"] - m["Buffers"] - cached),
        "free": m["MemFree"],
        "buffered": m["Buffers"],
        "cached": cached,
        "slab_reclaimable": m.get("SReclaimable", 0),
        "slab_unreclaimable": m.get("SUnreclaim", 0),
    }


class MemoryScraper(HostScraper):
    name = "memory"

    def scrape(self, p: Points) -> None:
        with self.guard("/proc/meminfo"):
            m = read_meminfo()
            total = m["MemTotal"]
            for state, value in memory_states(m).items():
                p.add("system.memory.usage", value, STATE_ATTRS[state])
                if total:
                    p.add("system.memory.utilization", value / total, STATE_ATTRS[state])
            p.add("system.memory.limit", total)
            p.add("system.memory.page_size", os.sysconf("SC_PAGE_SIZE"))
            for name, field in (("system.linux.memory.available", "MemAvailable"),
                                ("system.linux.memory.dirty", "Dirty"),
                                ("system.memory.linux.shared", "Shmem")):
                if field in m:
                    p.add(name, m[field])
            if "HugePages_Total" in m:
                pages, free = m["HugePages_Total"], m["HugePages_Free"]
                p.add("system.memory.linux.hugepages.limit", pages)
                p.add("system.memory.linux.hugepages.page_size", m.get("Hugepagesize", 0))
                p.add("system.memory.linux.hugepages.reserved", m.get("HugePages_Rsvd", 0))
                p.add("system.memory.linux.hugepages.surplus", m.get("HugePages_Surp", 0))
                for state, value in (("used", pages - free), ("free", free)):
                    p.add("system.memory.linux.hugepages.usage", value, ((HUGEPAGES_STATE, state),))
                    if pages:
                        p.add("system.memory.linux.hugepages.utilization", value / pages,
                              ((HUGEPAGES_STATE, state),))


# --- network -----------------------------------------------------------------------------------

# Kernel TCP state numbers -> the names the Collector reports on Linux. It reports every name,
# with 0 when no socket is in that state (DELETE is a Windows state and stays 0 here). 12 is a
# request socket (TCP_NEW_SYN_RECV), which /proc/net/tcp also shows as SYN_RECV.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT_1", 5: "FIN_WAIT_2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
              12: "SYN_RECV"}
TCP_STATE_NAMES = ("CLOSE_WAIT", "CLOSE", "CLOSING", "DELETE", "ESTABLISHED", "FIN_WAIT_1",
                   "FIN_WAIT_2", "LAST_ACK", "LISTEN", "SYN_SENT", "SYN_RECV", "TIME_WAIT")
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
CONNTRACK = "/proc/sys/net/netfilter/nf_conntrack_"

# sock_diag netlink (what `ss` uses): the kernel sends one small record per socket, which is an
# order of magnitude cheaper than formatting /proc/net/tcp{,6} as text (~0.4 ms against ~10 ms on
# a host with a 256K-bucket established hash) and needs no scan of /proc/<pid>/fd either.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST_DUMP = 0x1 | 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states bitmap, then a zeroed 48-byte inet_diag_sockid
_INET_DIAG_REQ = struct.Struct("=BBBBI48x")
_IDIAG_STATE_OFFSET = _NLMSG_HEADER.size + 1  # inet_diag_msg: idiag_family, idiag_state, ...


def tcp_states_netlink() -> dict:
    """Sockets per kernel TCP state number, IPv4 and IPv6, through sock_diag."""
    counts: dict = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            request = _INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                         NLM_F_REQUEST_DUMP, seq, 0) + request)
            done = False
            while not done:
                data = sock.recv(1 << 16)
                if not data:
                    raise OSError("sock_diag: connection closed")
                offset = 0
                while offset + _NLMSG_HEADER.size <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == NLMSG_DONE:
                        done = True
                        break
                    if kind == NLMSG_ERROR:
                        errno = -struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)[0]
                        raise OSError(errno, f"sock_diag: {os.strerror(errno)}")
                    if length < _IDIAG_STATE_OFFSET + 1:
                        raise ValueError(f"sock_diag: malformed message of {length} bytes")
                    state = data[offset + _IDIAG_STATE_OFFSET]
                    counts[state] = counts.get(state, 0) + 1
                    offset += (length + 3) & ~3
    return counts


def tcp_states_proc(texts: Iterable) -> dict:
    """Sockets per kernel TCP state number, from the text of /proc/net/tcp and /proc/net/tcp6."""
    counts: dict = {}
    for text in texts:
        for line in text.splitlines()[1:]:
            fields = line.split(None, 4)
            if len(fields) > 3:
                state = int(fields[3], 16)
                counts[state] = counts.get(state, 0) + 1
    return counts


def tcp_state_counts(by_number: Mapping) -> dict:
    """Kernel state numbers -> {Collector state name: count} over all of TCP_STATE_NAMES."""
    counts = dict.fromkeys(TCP_STATE_NAMES, 0)
    for number, count in by_number.items():
        name = TCP_STATES.get(number)
        if name is not None:
            counts[name] += count
    return counts


class NetworkScraper(HostScraper):
    name = "network"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self._netlink = True  # until the kernel or a seccomp policy says otherwise

    def scrape(self, p: Points) -> None:
        if p.wants("system.network.io", "system.network.packets", "system.network.errors",
                   "system.network.dropped"):
            with self.guard("/proc/net/dev"):
                for device, c in psutil.net_io_counters(pernic=True, nowrap=False).items():
                    if not self.selected(device):
                        continue
                    rx = (("device", device), ("direction", "receive"))
                    tx = (("device", device), ("direction", "transmit"))
                    p.add("system.network.io", c.bytes_recv, rx)
                    p.add("system.network.io", c.bytes_sent, tx)
                    p.add("system.network.packets", c.packets_recv, rx)
                    p.add("system.network.packets", c.packets_sent, tx)
                    p.add("system.network.errors", c.errin, rx)
                    p.add("system.network.errors", c.errout, tx)
                    p.add("system.network.dropped", c.dropin, rx)
                    p.add("system.network.dropped", c.dropout, tx)
        if p.wants("system.network.connections"):
            by_number = self._tcp_states()
            if by_number is not None:
                for state, count in tcp_state_counts(by_number).items():
                    p.add("system.network.connections", count, (("protocol", "tcp"), ("state", state)))
        for metric, name in (("system.network.conntrack.count", "count"),
                             ("system.network.conntrack.max", "max")):
            if p.wants(metric):
                with self.guard(CONNTRACK + name):
                    p.add(metric, _read_int(CONNTRACK + name))

    def _tcp_states(self) -> Optional[dict]:
        if self._netlink:
            try:
                return tcp_states_netlink()
            except HOST_ERRORS as e:
                self._netlink = False
                log.info("sock_diag netlink unavailable (%r); counting TCP connections from %s",
                         e, " and ".join(TCP_TABLES))
        texts = []
        for path in TCP_TABLES:
            with self.guard(path):
                texts.append(_read(path))
        if not texts:
            return None
        result = None
        with self.guard("tcp states"):
            result = tcp_states_proc(texts)
        return result


# --- paging ------------------------------------------------------------------------------------

def read_swaps(text: str) -> list:
    """/proc/swaps -> [(device, size bytes, used bytes)]."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 4:
            out.append((f[0], int(f[2]) * 1024, int(f[3]) * 1024))
    return out


class PagingScraper(HostScraper):
    name = "paging"

    def scrape(self, p: Points) -> None:
        if p.wants("system.paging.usage", "system.paging.utilization"):
            with self.guard("/proc/swaps"):
                for device, size, used in read_swaps(_read("/proc/swaps")):
                    for state, value in (("used", used), ("free", size - used)):
                        attrs = (("device", device), ("state", state))
                        p.add("system.paging.usage", value, attrs)
                        if size:
                            p.add("system.paging.utilization", value / size, attrs)
        if p.wants("system.paging.operations", "system.paging.faults"):
            with self.guard("/proc/vmstat"):
                v = _key_values(_read("/proc/vmstat"))
                # major: pages swapped in/out; minor: pages paged in/out (the Collector's pairing)
                for value, direction, kind in ((v["pswpin"], "page_in", "major"),
                                               (v["pswpout"], "page_out", "major"),
                                               (v["pgpgin"], "page_in", "minor"),
                                               (v["pgpgout"], "page_out", "minor")):
                    p.add("system.paging.operations", value, (("direction", direction), ("type", kind)))
                p.add("system.paging.faults", v["pgmajfault"], (("type", "major"),))
                p.add("system.paging.faults", v["pgfault"] - v["pgmajfault"], (("type", "minor"),))


# --- processes ---------------------------------------------------------------------------------

# /proc/<pid>/stat state letter -> status (gopsutil's mapping, which the Collector uses)
PROCESS_STATUS = {"R": "running", "S": "sleeping", "D": "blocked", "U": "blocked", "I": "idle",
                  "T": "stopped", "t": "stopped", "Z": "zombies", "W": "paging", "L": "locked"}


class ProcessesScraper(HostScraper):
    name = "processes"

    def scrape(self, p: Points) -> None:
        counts: dict = {}
        if p.wants("system.processes.count"):
            with self.guard("/proc/<pid>/stat"):
                for entry in os.scandir("/proc"):
                    if not entry.name.isdigit():
                        continue
                    try:
                        with open(f"/proc/{entry.name}/stat", "rb") as f:
                            data = f.read()
                        letter = chr(data[data.rindex(b")") + 2])
                    except (OSError, ValueError, IndexError):  # exited since the listing
                        continue
                    status = PROCESS_STATUS.get(letter, "unknown")
                    counts[status] = counts.get(status, 0) + 1
        with self.guard("/proc/stat"):
            stat = _key_values(_read("/proc/stat"))
            if p.wants("system.processes.count"):
                # as the Collector does: running and blocked come from the kernel's own counters,
                # read in one go, rather than from the racy walk over /proc
                counts["running"] = stat["procs_running"]
                counts["blocked"] = stat["procs_blocked"]
                for status, count in sorted(counts.items()):
                    p.add("system.processes.count", count, (("status", status),))
            p.add("system.processes.created", stat["processes"])


# --- system ------------------------------------------------------------------------------------

class SystemScraper(HostScraper):
    name = "system"

    def scrape(self, p: Points) -> None:
        with self.guard("/proc/uptime"):
            p.add("system.uptime", float(_read("/proc/uptime").split()[0]))
