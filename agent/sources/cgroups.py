"""Pressure stall information and per-workload resource usage, read from procfs and cgroupfs.

- `pressure`: the host's /proc/pressure/{cpu,memory,io,irq} and each workload's cgroup v2
  {cpu,memory,io}.pressure, as cumulative stall time in seconds. Names follow the OpenTelemetry
  semantic-conventions proposal for Linux PSI (open-telemetry/semantic-conventions#3528, for issue
  #2995): `system.<resource>.linux.pressure.total` with `system.linux.pressure.stall_type`.
- `cgroups`: each workload's CPU time, memory usage and working set, block I/O bytes and operations
  per device, as cAdvisor reads them: the semantic conventions' `container.*` metrics for
  containers, the same names under `cgroup.*` for services, scopes and slices (docs/metrics.md).

A workload is found by walking the cgroup v2 hierarchy (agent/procfs/cgroupfs.py), bounded in
depth, directories and time; what a bound leaves out is counted in the agent's own metrics.
Values are the kernel's hierarchical totals of the workload's own cgroup.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

from agent.config import Duration, check_ranges
from agent.model import Resource
from agent.procfs import cgroupfs
from agent.procfs.devices import DeviceNames
from agent.procfs.identity import cgroup2_mount
from agent.sources.host import HostScraper, Points, ScraperConfig, log

STALL_TYPE = "system.linux.pressure.stall_type"
HOST_PRESSURE = "/proc/pressure/"
HOST_RESOURCES = ("cpu", "memory", "io", "irq")  # irq: kernels with CONFIG_IRQ_TIME_ACCOUNTING, 6.1+


@dataclass(frozen=True)
class CgroupScraperConfig(ScraperConfig):
    # bounds of one walk over the cgroup v2 hierarchy (per scrape)
    max_depth: int = 8
    max_cgroups: int = 10000
    max_workloads: int = 1000
    # time the walk and the reads of the workloads' files may take
    timeout: Duration = Duration(1.0)

    RANGES: ClassVar[dict] = {"max_depth": (1, 64), "max_cgroups": (1, 1_000_000),
                              "max_workloads": (1, 100_000),
                              "timeout": (Duration(0.01), Duration(60.0))}

    def validate(self, key: str) -> None:
        check_ranges(self, key)


@dataclass(frozen=True)
class PressureScraperConfig(CgroupScraperConfig):
    # per-workload pressure besides the host's
    workloads: bool = True


class WorkloadScraper(HostScraper):
    """A scraper over the workloads' own cgroups."""

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self.limits = cgroupfs.Limits(cfg.max_depth, cfg.max_cgroups, cfg.max_workloads, float(cfg.timeout))
        mount = cgroup2_mount()
        v1 = cgroupfs.v1_mounts()
        self.reader = cgroupfs.Reader(os.fsencode(mount) if mount else None, v1, self._unreadable)
        # without cgroup v2 (a v1-only host) the workloads are the same paths in a v1 hierarchy
        walk_root = mount or v1.get("cpuacct") or v1.get("memory")
        self.walk_root = os.fsencode(walk_root) if walk_root else None
        self._starts: dict = {}  # workload path -> (cgroup inode, start of its points)
        self._last_ns = None     # time of the previous scrape
        self._skipped = telemetry.counter(
            "hostagent.scraper.cgroup.skipped", "{item}",
            "Workloads and cgroup files left out of a scrape: reason=workloads (over max_workloads), "
            "time (not read within the timeout), duplicate (a name that reads the same as another's), "
            "unreadable (a file that could not be read or held none of the expected values).")
        self._truncated = telemetry.counter(
            "hostagent.scraper.cgroup.walk.truncated", "{walk}",
            "Walks over the cgroup hierarchy that stopped at a limit (limit=depth, cgroups or time); "
            "workloads beyond it were not reported.")

    def _unreadable(self, path: bytes, error: BaseException) -> None:
        self._skipped.add(1, (("scraper", self.name), ("reason", "unreadable")))
        kind = ("cgroup file", type(error).__name__, getattr(error, "errno", None))
        if kind in self._reported:
            log.debug("cgroup file skipped scraper=%s path=%r error=%r", self.name, path, error)
            return
        self._reported.add(kind)
        log.warning("cgroup file skipped scraper=%s path=%r error=%r (further errors of this kind are "
                    "logged at debug level)", self.name, path, error)

    def workloads(self, p: Points):
        """(Workload, relative path bytes, start time of its cumulative points) of this scrape,
        until the timeout (the walk's and the caller's reads together): the rest are counted.

        A workload's counters start at 0 when its cgroup is made. Its points start at boot when
        it was there at the first scrape, else at the scrape before the one that first saw its
        cgroup (made since then; a cgroup made again at the same path is a new one: its id, the
        directory's inode, differs), so a backend sees the reset."""
        if self.walk_root is None:
            return
        deadline = time.monotonic() + self.limits.timeout_s
        walk = cgroupfs.walk(self.walk_root, self.limits)
        for limit in sorted(walk.truncated):
            self._truncated.add(1, (("scraper", self.name), ("limit", limit)))
            if ("walk", limit) not in self._reported:
                self._reported.add(("walk", limit))
                log.warning("cgroup walk stopped at a limit scraper=%s limit=%s (%d workloads found; "
                            "see scrapers.%s in docs/configuration.md; logged once)",
                            self.name, limit, len(walk.workloads), self.name)
        for reason, count in walk.skipped.items():
            self._skipped.add(count, (("scraper", self.name), ("reason", reason)))
        first_start = self.start_ns if self._last_ns is None else self._last_ns
        starts, out = {}, []
        for workload, rel, inode in walk.workloads:
            known = self._starts.get(workload.path)
            start = known[1] if known is not None and known[0] == inode else first_start
            starts[workload.path] = (inode, start)
            out.append((workload, rel, start))
        if walk.truncated or walk.skipped:
            # workloads a limit hid this time keep their start for when they are seen again
            for path, known in self._starts.items():
                if len(starts) >= 2 * self.limits.max_workloads:
                    break
                starts.setdefault(path, known)
        self._starts, self._last_ns = starts, p.time_ns
        for i, item in enumerate(out):
            if time.monotonic() > deadline:
                self._skipped.add(len(out) - i, (("scraper", self.name), ("reason", "time")))
                return
            yield item


def _add_pressure(p: Points, resource: str, totals: dict, attributes: tuple, start_ns=None) -> None:
    for stall_type, microseconds in totals.items():
        p.add(f"system.{resource}.linux.pressure.total", microseconds / 1e6,
              attributes + ((STALL_TYPE, stall_type),), start_ns)


class PressureScraper(WorkloadScraper):
    name = "pressure"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self.per_workload = cfg.workloads

    def scrape(self, p: Points) -> None:
        resources = tuple(r for r in HOST_RESOURCES if p.wants(f"system.{r}.linux.pressure.total"))
        for resource in resources:
            path = HOST_PRESSURE + resource
            if resource == "irq" and not os.path.exists(path):
                continue
            with self.guard(path):
                _add_pressure(p, resource, cgroupfs.parse_pressure(cgroupfs.read_text(path)), ())
        if self.per_workload and self.reader.v2_root is not None and resources:  # PSI of cgroups is v2's
            for workload, rel, start in self.workloads(p):
                for resource, totals in self.reader.pressure(rel, resources).items():
                    _add_pressure(p, resource, totals, workload.attributes, start)


class CgroupUsageScraper(WorkloadScraper):
    name = "cgroups"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment=None):
        super().__init__(cfg, telemetry, resource)
        self.devices = DeviceNames()

    def scrape(self, p: Points) -> None:
        parts = {part: p.wants(*(f"{prefix}.{m}" for prefix in ("container", "cgroup") for m in metrics))
                 for part, metrics in (("cpu", ("cpu.time",)),
                                       ("memory", ("memory.usage", "memory.working_set")),
                                       ("io", ("disk.io", "disk.operations")))}
        for workload, rel, start in self.workloads(p):
            prefix = "container." if workload.kind == "container" else "cgroup."
            attrs = workload.attributes
            u = self.reader.usage(rel, **parts)
            for mode, seconds in u.cpu.items():
                p.add(prefix + "cpu.time", seconds, attrs + (("cpu.mode", mode),), start)
            for what, value in u.memory.items():
                p.add(f"{prefix}memory.{what}", value, attrs, start)
            for number, (rbytes, wbytes, rios, wios) in sorted(u.io.items()):
                device = (("system.device", self.devices.number(number)),)
                read, write = (("disk.io.direction", "read"),), (("disk.io.direction", "write"),)
                p.add(prefix + "disk.io", rbytes, attrs + device + read, start)
                p.add(prefix + "disk.io", wbytes, attrs + device + write, start)
                p.add(prefix + "disk.operations", rios, attrs + device + read, start)
                p.add(prefix + "disk.operations", wios, attrs + device + write, start)
