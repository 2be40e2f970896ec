"""process: exec and exit of every process as log records, plus counters (bpf/process.bpf.c).

Log records (event names as OpenTelemetry would spell them):
- process.exec: process.pid, process.parent_pid, process.executable.name (the new comm),
  process.executable.path (the path given to execve, up to 255 bytes; may be relative),
  process.command_line (the argv given to execve, read by the kernel side before the call, up to
  1024 bytes, secrets hidden; see enrichment.command_line), process.real_user.id, process.owner
  (when the uid has a passwd entry), process.creation.time, and from its cgroup
  process.linux.cgroup, container.id and linux.systemd.unit;
- process.exit, once per process (when its last thread exits): process.pid, process.parent_pid,
  process.executable.name (the last thread's comm), process.exit.code, process.creation.time,
  process.exit.time, linux.process.lifetime (s), the cgroup attributes, and for a process a signal
  ended, linux.process.exit.signal and linux.process.exit.core_dumped. The pipeline adds what
  the exec record knew (agent/pipeline/enrich.py).
process.exit.code is the status the process passed to exit(); for a process a signal ended it is
128 + the signal number, as shells report it.

Counters: system.linux.process.forks (processes created, counted in the kernel),
system.linux.process.execs and system.linux.process.exits {exit.class: success | failure |
signal} (counted by the reader from the records).

The parent and start time of a process come from the kernel's record of its creation
(task:task_newtask); processes that existed before the probe loaded are read from /proc once at
setup.
"""
from __future__ import annotations

import collections
import ctypes
import datetime
import logging
import os
from typing import Optional

import numpy as np

from agent.model import LogRecord, Metric, MetricKind, NumberPoint, Severity, now_ns
from agent.procfs.identity import CLOCK_TICK_NS, EnrichmentConfig, Redactor, proc_stat, split_argv, user_name
from agent.procfs.workload import WorkloadResolver
from agent.sources.ebpf.loader import btf_member_offset, tracepoint_fields
from agent.sources.ebpf.maps import BPF_NOEXIST
from agent.sources.ebpf.ringbuf import Ring, RingProbe, cstr
from agent.sources.ebpf.signals import signal_name

log = logging.getLogger("hostagent.ebpf")

FILENAME_LEN = 256                       # HA_FILENAME_LEN
ARGS_LEN = 1024                          # HA_ARGS_LEN

# struct exec_event
EXEC_EVENT = np.dtype([
    ("time_ns", "<u8"), ("start_ns", "<u8"), ("cgroup_id", "<u8"), ("pid", "<u4"), ("old_pid", "<u4"),
    ("ppid", "<u4"), ("uid", "<u4"), ("flags", "<u4"), ("args_size", "<u4"), ("comm", "S16"),
    ("filename", f"S{FILENAME_LEN}"), ("args", f"V{ARGS_LEN}"),
])
ARGS_KNOWN, ARGS_TRUNCATED = 1, 2        # HA_EXEC_ARGS_*

# struct exit_event
EXIT_EVENT = np.dtype([
    ("time_ns", "<u8"), ("start_ns", "<u8"), ("cgroup_id", "<u8"), ("pid", "<u4"), ("tid", "<u4"),
    ("ppid", "<u4"), ("exit_code", "<i4"), ("flags", "<u4"), ("_pad", "<u4"), ("comm", "S16"),
])
EXIT_CODE_KNOWN = 1                      # HA_EXIT_CODE_KNOWN
EXIT_START_KNOWN = 2                     # HA_EXIT_START_KNOWN


class ProcInfo(ctypes.Structure):
    """struct proc_info: the value of the `procs` map, keyed by pid (u32)."""
    _fields_ = [("start_ns", ctypes.c_uint64), ("ppid", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


EXECS = "system.linux.process.execs"
EXITS = "system.linux.process.exits"
FORKS = "system.linux.process.forks"
SUCCESS, FAILURE, SIGNAL, UNKNOWN = "success", "failure", "signal", "unknown"   # unknown: no BTF
_CLASS_ATTRS = {c: (("exit.class", c),) for c in (SUCCESS, FAILURE, SIGNAL, UNKNOWN)}



def iso8601(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def argv_of(raw: bytes, size: int, flags: int) -> list:
    """The argument list of an exec record; a last argument cut short is replaced by "..."."""
    args = bytes(raw[:size])
    return split_argv(args, cut=bool(flags & ARGS_TRUNCATED) or not args.endswith(b"\0"))


def exit_status(raw: int) -> tuple:
    """(exit.class, process.exit.code, signal or 0, core dumped) of a wait status."""
    sig = raw & 0x7F
    if sig:
        return SIGNAL, 128 + sig, sig, bool(raw & 0x80)
    status = (raw >> 8) & 0xFF
    return (SUCCESS if status == 0 else FAILURE), status, 0, False


class ProcessProbe(RingProbe):
    name = "process"
    description = "process exec and exit (log records); processes created, execs, exits by class"
    tracepoints = ("task:task_newtask", "sched:sched_process_exec", "sched:sched_process_exit")
    default_enabled = True
    structs = {"exec_event": EXEC_EVENT, "exit_event": EXIT_EVENT, "proc_info": ProcInfo}
    metrics = (FORKS, EXECS, EXITS)
    counters = {
        EXECS: ("{process}", "Successful execve calls.", [()]),
        EXITS: ("{process}", "Processes that ended, by how: exit status 0, another status, or a signal.",
                [_CLASS_ATTRS[c] for c in (SUCCESS, FAILURE, SIGNAL)]),
    }

    argv_tracepoints = ("syscalls:sys_enter_execve", "syscalls:sys_enter_execveat")

    def __init__(self, exec_ring_pages: int = 256, exit_ring_pages: int = 128, procs_max: int = 65536,
                 enrichment: EnrichmentConfig = EnrichmentConfig(), workloads: Optional[WorkloadResolver] = None):
        self.rings = (Ring("exec_events", EXEC_EVENT, exec_ring_pages, "EXEC"),
                      Ring("exit_events", EXIT_EVENT, exit_ring_pages, "EXIT"))
        self.procs_max = procs_max
        self.redact = Redactor(enrichment.redaction) if enrichment.command_line else None
        # cgroup id -> path: the agent's resolver, which the cgroups probe feeds, so records of
        # a cgroup removed before they are read still name it; else one of our own, which
        # knows only cgroups that still exist when their records are read
        self.workloads = workloads
        self._own_workloads = False

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "ProcessProbe":
        return cls(enrichment=enrichment or EnrichmentConfig(), workloads=workloads)

    def select_tracepoints(self, available) -> Optional[tuple]:
        """The argv tracepoints are optional: without them (or with command lines off) exec
        records carry no process.command_line."""
        base = super().select_tracepoints(available)
        if base is None or self.redact is None or not all(map(available, self.argv_tracepoints)):
            return base
        return base + self.argv_tracepoints

    def params(self, tracepoints: tuple) -> dict:
        params = {**super().params(tracepoints),
                  "HA_PROCS_MAX": self.procs_max,
                  "HA_EXIT_HAS_GROUP_DEAD": "group_dead" in tracepoint_fields("sched:sched_process_exit"),
                  "HA_CAPTURE_ARGS": self.argv_tracepoints[0] in tracepoints}
        offset = btf_member_offset("task_struct", "exit_code")
        if offset is not None:
            params["HA_TASK_EXIT_CODE_OFFSET"] = offset
        else:
            log.warning("process_exit_codes_unavailable reason=\"no BTF at /sys/kernel/btf/vmlinux\"")
        return params

    def unused_maps(self, tracepoints: tuple) -> tuple:
        # command lines: argument buffers of 2 KiB, preallocated (the exec program still looks
        # in pending_args, which stays empty without the argv programs)
        return () if self.argv_tracepoints[0] in tracepoints else ("args_scratch",)

    def map_sizes(self) -> dict:
        return {**super().map_sizes(), "procs": self.procs_max}

    def setup(self, obj) -> None:
        super().setup(obj)
        self.forks = obj.map("forks")
        self._seed(obj.map("procs"))
        if self.workloads is None:
            self.workloads, self._own_workloads = WorkloadResolver(), True

    def _seed(self, procs) -> None:
        """Parent and start time of the processes that existed before the probe was attached
        (entries the probe already made are kept: BPF_NOEXIST)."""
        value = ProcInfo()
        for entry in os.scandir("/proc"):
            stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
            if stat is None:
                continue
            value.ppid, value.start_ns = stat[1], stat[2] * CLOCK_TICK_NS
            try:
                procs.update(int(entry.name), value, BPF_NOEXIST)
            except OSError:             # EEXIST: the probe saw it first; E2BIG: the map is full
                pass

    # --- decoding (reader thread) ----------------------------------------------------------

    # Exits are drained before execs and a pass is decoded in time order, so a process's exec
    # record always comes before its exit record (the pipeline's process cache relies on it): an
    # exec and exit both committed between the two drains are read together in the next pass.
    ring_order = ("exit_events", "exec_events")

    def decode_pass(self, batches: dict, boot_to_wall: int) -> list[LogRecord]:
        records = []
        if "exec_events" in batches:
            records += self._execs(batches["exec_events"], boot_to_wall)
        if "exit_events" in batches:
            records += self._exits(batches["exit_events"], boot_to_wall)
        if "exec_events" in batches and "exit_events" in batches:
            records.sort(key=lambda r: r.time_ns)
        return records

    def _execs(self, batch: np.ndarray, boot_to_wall: int) -> list[LogRecord]:
        observed = now_ns()
        out = []
        for (time_ns, start_ns, cgroup_id, pid, _old_pid, ppid, uid, flags, args_size, comm, filename,
             args) in batch.tolist():
            path = cstr(filename)
            attrs = [("process.pid", pid)]
            if ppid:
                attrs.append(("process.parent_pid", ppid))
            attrs += [("process.executable.name", cstr(comm)), ("process.executable.path", path)]
            if self.redact is not None and flags & ARGS_KNOWN:
                attrs.append(("process.command_line", self.redact(argv_of(args, args_size, flags))))
            attrs.append(("process.real_user.id", uid))
            owner = user_name(uid)
            if owner is not None:
                attrs.append(("process.owner", owner))
            if start_ns:
                attrs.append(("process.creation.time", iso8601(start_ns + boot_to_wall)))
            attrs += self.workloads.attributes(cgroup_id)
            out.append(LogRecord(time_ns + boot_to_wall, f"process {pid} executed {path}", tuple(attrs),
                                 Severity.INFO, "process.exec", observed))
        self.count(EXECS, (), len(out))
        return out

    def _exits(self, batch: np.ndarray, boot_to_wall: int) -> list[LogRecord]:
        observed = now_ns()
        classes = collections.Counter()
        out = []
        for time_ns, start_ns, cgroup_id, pid, _tid, ppid, raw, flags, _pad, comm in batch.tolist():
            name = cstr(comm)
            wall = time_ns + boot_to_wall
            attrs = [("process.pid", pid)]
            if ppid:
                attrs.append(("process.parent_pid", ppid))
            attrs.append(("process.executable.name", name))
            severity = Severity.INFO
            if flags & EXIT_CODE_KNOWN:
                cls, code, sig, core = exit_status(raw)
                classes[cls] += 1
                attrs.append(("process.exit.code", code))
                if sig:
                    attrs += [("linux.process.exit.signal", signal_name(sig)),
                              ("linux.process.exit.core_dumped", core)]
                    body = f"process {pid} ({name}) killed by {signal_name(sig)}" + (
                        " (core dumped)" if core else "")
                    severity = Severity.WARN
                else:
                    body = f"process {pid} ({name}) exited with status {code}"
            else:
                classes[UNKNOWN] += 1
                body = f"process {pid} ({name}) exited"
            if flags & EXIT_START_KNOWN and start_ns:
                attrs += [("process.creation.time", iso8601(start_ns + boot_to_wall)),
                          ("linux.process.lifetime", max(time_ns - start_ns, 0) / 1e9)]
            attrs.append(("process.exit.time", iso8601(wall)))
            attrs += self.workloads.attributes(cgroup_id)
            out.append(LogRecord(wall, body, tuple(attrs), severity, "process.exit", observed))
        for cls, n in classes.items():
            self.count(EXITS, _CLASS_ATTRS[cls], n)
        return out

    def close(self) -> None:
        if self._own_workloads:
            self.workloads.close()
            self.workloads, self._own_workloads = None, False
        super().close()

    # --- metrics (collection thread) -------------------------------------------------------

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        metrics = self.counter_metrics(now_ns, start_ns)
        forks = self.forks.sum(0)
        metrics.append(Metric(FORKS, "Processes created (fork, vfork, or clone without CLONE_THREAD).",
                              "{process}", MetricKind.SUM, [NumberPoint((), forks, start_ns, now_ns)],
                              monotonic=True))
        return metrics
