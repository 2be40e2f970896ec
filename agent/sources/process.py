"""The `process` scraper: per-process metrics, like the Collector's hostmetrics process scraper.

Opt-in (ProcessScraperConfig is disabled by default) and filtered by executable name. Each process is
its own Resource: the host resource plus process.pid, process.parent_pid, process.executable.name,
process.executable.path, process.command, process.command_line (secrets redacted, unless
enrichment.command_line is off), process.owner, and from its cgroup process.linux.cgroup,
container.id and linux.systemd.unit. Cumulative points start at the process's create time. What does
not change while a process lives (executable, command line, owner) is read once and kept in a
two-level cache keyed by (pid, create time), so a recycled pid is a new key.

Processes come and go while a scrape runs: one that vanishes is skipped and counted
(hostagent.scraper.process.vanished); a field the kernel will not show us (AccessDenied) drops that
attribute or metric, not the process. Kernel threads (no executable, no command line) are skipped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

from agent.model import MetricGroup, Resource
from agent.procfs.cache import TwoLevelCache
from agent.procfs.identity import EnrichmentConfig, Redactor, cmdline_argv, decoded, proc_cgroup_attributes
from agent.sources.host import FilteredScraperConfig, HostScraper, Points

# psutil's errors are handled by kind (vanished, zombie, access denied); the rest is logged once
FILE_ERRORS = (OSError, ValueError, IndexError, KeyError)
KTHREADD = 2  # the kernel's thread daemon: parent of every kernel thread


@dataclass(frozen=True)
class ProcessScraperConfig(FilteredScraperConfig):
    enabled: bool = False


class ProcessScraper(HostScraper):
    name = "process"

    def __init__(self, cfg, telemetry, resource: Resource, enrichment: EnrichmentConfig = EnrichmentConfig()):
        super().__init__(cfg, telemetry, resource)
        self.redact = Redactor(enrichment.redaction) if enrichment.command_line else None
        self._static = TwoLevelCache("process_scraper", enrichment.cache_l1_size, enrichment.cache_l2_size,
                                     telemetry)
        self._vanished = telemetry.counter("hostagent.scraper.process.vanished", "{process}",
                                           "Processes that exited while being scraped and were skipped.")
        self._cpus = psutil.cpu_count() or 1
        self._previous: dict = {}  # (pid, create time) -> (monotonic s, cpu times), for utilization
        self._now_s = 0.0  # monotonic time of the current scrape
        self._total_memory = 0  # MemTotal for process.memory.utilization, read per scrape

    def processes(self):
        return psutil.process_iter()

    def groups(self, time_ns: int) -> list:
        self._now_s = time.monotonic()
        self._total_memory = 0
        if "process.memory.utilization" in self.enabled:
            with self.guard("total memory"):
                self._total_memory = psutil.virtual_memory().total
        groups, seen = [], set()
        for proc in self.processes():
            try:
                group = self._scrape_process(proc, time_ns, seen)
            except psutil.ZombieProcess:
                continue  # exited, not yet reaped: nothing left to measure
            except psutil.NoSuchProcess:
                self._vanished.add(1)
                continue
            except psutil.AccessDenied:
                continue  # not even its name or start time is visible to us
            except FILE_ERRORS as e:
                self.host_error("process", e)
                continue
            if group is not None:
                groups.append(group)
        self._previous = {k: v for k, v in self._previous.items() if k in seen}
        self._static.publish()
        return groups

    @staticmethod
    def _get(method, default=None):
        """One field of a process; AccessDenied costs that field only."""
        try:
            return method()
        except psutil.AccessDenied:
            return default

    def _scrape_process(self, proc: psutil.Process, time_ns: int, seen: set):
        with proc.oneshot():
            name = decoded(proc.name())
            if not self.selected(name):
                return None
            ppid = self._get(proc.ppid)
            if proc.pid == KTHREADD or ppid == KTHREADD:
                return None  # a kernel thread: no executable, no command line, no user memory
            create_time = proc.create_time()
            static = self._static.get((proc.pid, create_time))
            if static is None:
                static = self._static_attributes(proc, name)
                if static is None:
                    return None  # a kernel thread all the same
                self._static.put((proc.pid, create_time), static)
            attrs = [("process.pid", proc.pid)]
            if ppid is not None:
                attrs.append(("process.parent_pid", ppid))
            attrs += static
            # read each time: systemd and container runtimes move processes between cgroups
            attrs += proc_cgroup_attributes(proc.pid)

            p = Points(self.definitions, self.enabled, int(create_time * 1e9), time_ns)
            self._metrics(proc, p, (proc.pid, create_time), create_time, time_ns, seen)
        metrics = p.metrics()
        if not metrics:
            return None
        return MetricGroup(self.resource.merged(tuple(attrs)), self.scope, metrics)

    def _static_attributes(self, proc: psutil.Process, name: str):
        """What stays the same while the process lives; None for a kernel thread."""
        # as /proc holds them (psutil decoded them with surrogateescape), cut to CMDLINE_MAX bytes
        cmdline = cmdline_argv(b"".join(os.fsencode(a) + b"\0" for a in self._get(proc.cmdline, [])))
        exe = decoded(self._get(proc.exe, ""))
        if not cmdline and not exe:
            return None
        attrs = [("process.executable.name", name)]
        if exe:
            attrs.append(("process.executable.path", exe))
        if cmdline and self.redact is not None:
            attrs.append(("process.command", self.redact(cmdline[:1])))
            attrs.append(("process.command_line", self.redact(cmdline)))
        owner = self._get(proc.username)
        if owner is not None:
            attrs.append(("process.owner", decoded(owner)))
        return tuple(attrs)

    def _metrics(self, proc: psutil.Process, p: Points, key: tuple, create_time: float,
                 time_ns: int, seen: set) -> None:
        cpu = self._get(proc.cpu_times)
        if cpu is not None:
            states = (("user", cpu.user), ("system", cpu.system), ("wait", getattr(cpu, "iowait", 0.0)))
            for state, seconds in states:
                p.add("process.cpu.time", seconds, (("state", state),))
            if p.wants("process.cpu.utilization"):
                seen.add(key)
                previous = self._previous.get(key)
                self._previous[key] = (self._now_s, states)
                if previous is not None and self._now_s > previous[0]:
                    capacity = (self._now_s - previous[0]) * self._cpus
                    for (state, now_s), (_, before_s) in zip(states, previous[1]):
                        p.add("process.cpu.utilization", max(0.0, now_s - before_s) / capacity,
                              (("state", state),))
        mem = self._get(proc.memory_info)
        if mem is not None:
            p.add("process.memory.usage", mem.rss)
            p.add("process.memory.virtual", mem.vms)
            if self._total_memory:
                p.add("process.memory.utilization", mem.rss / self._total_memory)
        if p.wants("process.disk.io", "process.disk.operations"):
            io = self._get(proc.io_counters)
            if io is not None:
                p.add("process.disk.io", io.read_bytes, (("direction", "read"),))
                p.add("process.disk.io", io.write_bytes, (("direction", "write"),))
                p.add("process.disk.operations", io.read_count, (("direction", "read"),))
                p.add("process.disk.operations", io.write_count, (("direction", "write"),))
        if p.wants("process.threads"):
            threads = self._get(proc.num_threads)
            if threads is not None:
                p.add("process.threads", threads)
        if p.wants("process.open_file_descriptors"):
            fds = self._get(proc.num_fds)
            if fds is not None:
                p.add("process.open_file_descriptors", fds)
        if p.wants("process.context_switches"):
            switches = self._get(proc.num_ctx_switches)
            if switches is not None:
                p.add("process.context_switches", switches.involuntary, (("type", "involuntary"),))
                p.add("process.context_switches", switches.voluntary, (("type", "voluntary"),))
        if p.wants("process.paging.faults"):
            with self.guard("/proc/<pid>/stat", FILE_ERRORS):
                fields = self._read_proc(proc.pid, "stat").rpartition(")")[2].split()
                # after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt
                p.add("process.paging.faults", int(fields[9]), (("type", "major"),))
                p.add("process.paging.faults", int(fields[7]), (("type", "minor"),))
        if p.wants("process.signals_pending"):
            with self.guard("/proc/<pid>/status", FILE_ERRORS):
                pending = {}
                for line in self._read_proc(proc.pid, "status").splitlines():
                    if line.startswith(("SigPnd:", "ShdPnd:")):
                        key, _, value = line.partition(":")
                        pending[key] = int(value, 16)
                # distinct signals pending for the thread group or its main thread
                signals = pending.get("SigPnd", 0) | pending.get("ShdPnd", 0)
                p.add("process.signals_pending", bin(signals).count("1"))
        if p.wants("process.uptime"):
            p.add("process.uptime", max(0.0, time_ns / 1e9 - create_time))

    @staticmethod
    def _read_proc(pid: int, name: str) -> str:
        try:
            with open(f"/proc/{pid}/{name}", encoding="ascii", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            raise psutil.NoSuchProcess(pid) from None

