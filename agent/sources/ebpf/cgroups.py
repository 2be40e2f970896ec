"""cgroups: every cgroup created on the cgroup v2 hierarchy, with its id and path
(bpf/cgroups.bpf.c), fed to the workload resolver (agent/procfs/workload.py).

Other probes capture cgroup ids in the kernel (bpf_get_current_cgroup_id()); by the time the
agent reads them the cgroup may be gone, and the kernel can no longer say what it was. This probe
records each cgroup as it is created, so such ids still name their workload: its reader learns
(id, path) into the resolver, and the resolver, on an id it does not know, has the probe read its
pending records first (set_sync), before asking the kernel. At setup the cgroups that exist
already are learned from the v2 mount (at most the resolver's bound of them), so only cgroups
created and removed while the agent was not running stay unknown.

A path longer than the record holds (PATH_LEN - 1 bytes; cgroup paths are rarely a fifth of
that) is not learned from the record: the cgroup is looked up in the kernel at once, which works
while it exists, and counted in hostagent.ebpf.workload.truncated_paths.

Without a resolver (ebpf.attribution: host) the probe only counts: system.linux.cgroups.created.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Optional

import numpy as np

from agent.procfs.identity import cgroup2_mount
from agent.sources.ebpf.ringbuf import Ring, RingProbe, cstr

PATH_LEN = 512                          # HA_CGROUP_PATH_LEN

# struct cgroup_event
CGROUP_EVENT = np.dtype([("id", "<u8"), ("level", "<u4"), ("path_size", "<u4"), ("path", f"S{PATH_LEN}")])

CREATED = "system.linux.cgroups.created"
TRUNCATED = "hostagent.ebpf.workload.truncated_paths"


class CgroupsProbe(RingProbe):
    name = "cgroups"
    description = "cgroups created (v2), so that cgroup ids name their workload after the cgroup is gone"
    tracepoints = ("cgroup:cgroup_mkdir",)
    default_enabled = True
    structs = {"cgroup_event": CGROUP_EVENT}
    metrics = (CREATED,)
    counters = {CREATED: ("{cgroup}", "cgroups created on the cgroup v2 hierarchy.", [()])}

    def __init__(self, ring_pages: int = 256, workloads=None, telemetry=None):
        self.rings = (Ring("cgroup_events", CGROUP_EVENT, ring_pages, "CGROUP"),)   # 1 MiB: 1956 records
        self.workloads = workloads
        self.truncated = 0
        self._truncated = None if telemetry is None else telemetry.counter(
            TRUNCATED, "{cgroup}", "cgroups created with a path longer than the cgroups probe's record "
            "holds: looked up in the kernel instead (unresolved if already gone).")
        self._lock = threading.RLock()   # the reader thread and the resolver's sync (any thread)

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "CgroupsProbe":
        return cls(workloads=workloads, telemetry=telemetry)

    def setup(self, obj) -> None:
        super().setup(obj)
        if self.workloads is not None:
            self.learn_existing()
            self.workloads.set_sync(self.sync)

    def learn_existing(self, mount: Optional[str] = None) -> int:
        """Learn the cgroups that exist now (ids: their directories' inode numbers), breadth
        first, at most the resolver's bound of them; how many."""
        mount = mount or cgroup2_mount()
        if mount is None:
            return 0
        limit = self.workloads.cache_size
        self.workloads.learn(os.stat(mount).st_ino, "/")
        seen = 1
        pending = collections.deque([b""])
        while pending and seen < limit:
            relative = pending.popleft()
            try:
                entries = list(os.scandir(os.fsencode(mount) + relative))
            except OSError:                      # removed meanwhile
                continue
            for entry in entries:
                if seen >= limit:
                    break
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    inode = entry.inode()
                except OSError:
                    continue
                path = relative + b"/" + entry.name
                self.workloads.learn(inode, path)
                pending.append(path)
                seen += 1
        return seen

    def sync(self) -> None:
        """Read the pending records now (the resolver's hook)."""
        self.poll()

    def poll(self):
        with self._lock:
            if not getattr(self, "ring_buffers", None):
                return []                        # closed
            return super().poll()

    def decode(self, ring: str, batch: np.ndarray, boot_to_wall: int) -> list:
        self.count(CREATED, (), len(batch))
        if self.workloads is None:
            return []
        truncated = 0
        for cgroup_id, _level, size, path in batch.tolist():
            if size > PATH_LEN:
                truncated += 1
                self.workloads.learn(cgroup_id, None)
            else:
                self.workloads.learn(cgroup_id, cstr(path))
        if truncated:
            self.truncated += truncated
            if self._truncated is not None:
                self._truncated.add(truncated)
        return []

    def close(self) -> None:
        if self.workloads is not None:
            self.workloads.set_sync(None)
        with self._lock:
            super().close()
