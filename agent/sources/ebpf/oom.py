"""oom: OOM-killer victims as log records and a counter (bpf/oom.bpf.c).

One linux.oom.kill log record (severity WARN) per victim the kernel marks (oom:mark_victim),
whether the OOM was system-wide or inside a memory cgroup, with process.pid and, where the
kernel's tracepoint has them (older kernels have only the pid), process.executable.name, process.real_user.id,
linux.oom.total_vm, linux.oom.rss.anon, linux.oom.rss.file, linux.oom.rss.shmem,
linux.oom.pgtables (bytes) and linux.oom.score_adj; linux.oom.trigger.pid and
linux.oom.trigger.name name the process whose allocation invoked the OOM killer.
Counter: system.linux.oom.kills.
"""
from __future__ import annotations

import numpy as np

from agent.model import LogRecord, Severity, now_ns
from agent.sources.ebpf.loader import tracepoint_fields
from agent.sources.ebpf.ringbuf import Ring, RingProbe, cstr

TRACEPOINT = "oom:mark_victim"

# struct oom_event
OOM_EVENT = np.dtype([
    ("time_ns", "<u8"), ("total_vm_kb", "<u8"), ("anon_rss_kb", "<u8"), ("file_rss_kb", "<u8"),
    ("shmem_rss_kb", "<u8"), ("pgtables_kb", "<u8"), ("pid", "<u4"), ("uid", "<u4"),
    ("trigger_pid", "<u4"), ("oom_score_adj", "<i4"), ("comm", "S16"), ("trigger_comm", "S16"),
])

# tracepoint argument -> (record field, attribute, scale to the attribute's unit)
OPTIONAL_ARGS = {
    "uid": ("uid", "process.real_user.id", 1),
    "total_vm": ("total_vm_kb", "linux.oom.total_vm", 1024),
    "anon_rss": ("anon_rss_kb", "linux.oom.rss.anon", 1024),
    "file_rss": ("file_rss_kb", "linux.oom.rss.file", 1024),
    "shmem_rss": ("shmem_rss_kb", "linux.oom.rss.shmem", 1024),
    "pgtables": ("pgtables_kb", "linux.oom.pgtables", 1024),
    "oom_score_adj": ("oom_score_adj", "linux.oom.score_adj", 1),
}

KILLS = "system.linux.oom.kills"


class OomProbe(RingProbe):
    name = "oom"
    description = "OOM-killer victims (log records) and kills (counter)"
    tracepoints = (TRACEPOINT,)
    default_enabled = True
    structs = {"oom_event": OOM_EVENT}
    metrics = (KILLS,)
    counters = {KILLS: ("{process}", "Processes the OOM killer chose as victims.", [()])}

    def __init__(self, ring_pages: int = 16):
        self.rings = (Ring("oom_events", OOM_EVENT, ring_pages, "OOM"),)     # 64 KiB: 630 records
        self.args: frozenset = frozenset()

    def params(self, tracepoints: tuple) -> dict:
        fields = tracepoint_fields(TRACEPOINT)
        self.args = frozenset(name for name in (*OPTIONAL_ARGS, "comm") if name in fields)
        params = super().params(tracepoints)
        params.update({f"HA_TP_HAS_{name}": True for name in sorted(self.args)})
        params["HA_TP_LOC_comm"] = "comm" in fields and fields["comm"].data_loc
        return params

    def decode(self, ring: str, batch: np.ndarray, boot_to_wall: int) -> list[LogRecord]:
        observed = now_ns()
        optional = [(field, attr, scale) for arg, (field, attr, scale) in OPTIONAL_ARGS.items()
                    if arg in self.args]
        names = batch.dtype.names
        out = []
        for row in batch.tolist():
            rec = dict(zip(names, row))
            pid = rec["pid"]
            attrs = [("process.pid", pid)]
            comm = cstr(rec["comm"]) if "comm" in self.args else ""
            if comm:
                attrs.append(("process.executable.name", comm))
            attrs += [(attr, rec[field] * scale) for field, attr, scale in optional]
            attrs += [("linux.oom.trigger.pid", rec["trigger_pid"]),
                      ("linux.oom.trigger.name", cstr(rec["trigger_comm"]))]
            body = f"OOM killer chose process {pid}" + (f" ({comm})" if comm else "")
            if "anon_rss" in self.args:
                body += (f": anon-rss {rec['anon_rss_kb']}kB, file-rss {rec['file_rss_kb']}kB, "
                         f"shmem-rss {rec['shmem_rss_kb']}kB")
            out.append(LogRecord(rec["time_ns"] + boot_to_wall, body, tuple(attrs), Severity.WARN,
                                 "linux.oom.kill", observed))
        self.count(KILLS, (), len(out))
        return out
