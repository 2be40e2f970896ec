"""Which workload a cgroup belongs to: the unit an operator names.

A workload is, from the most specific down:
- a container (a directory of its cgroup path names one: docker, containerd, cri-o, podman,
  nerdctl; identity.container_id()): the outermost directory naming that container, so its own
  sub-cgroups (podman's `libpod-<id>.scope/container`) collapse into it. Kubernetes' pod-level
  cgroups name no container and collapse, like the QoS levels above them, into the top-level
  cgroup (`kubepods`, `kubepods.slice`); the pause container is a container of its own;
- else a systemd unit that holds processes (`*.service`, `*.scope`, `*.socket`, `*.mount`,
  `*.swap`): the outermost one in the path, so a service's own sub-cgroups and a user manager's
  units (`user@1000.service/app.slice/...`) collapse into it;
- else the top-level cgroup (systemd's `user.slice`, `system.slice`, ...);
- else the host (the root cgroup: kernel threads, processes never moved).

Paths are relative to the cgroup v2 root ("/system.slice/nginx.service/workers"), as the
kernel's cgroup ids (bpf_get_current_cgroup_id(), the cgroup v2 directory's inode) name them.

WorkloadResolver maps the ids the kernel captured to workloads, also for cgroups already removed
when their events are read: the cgroups probe (agent/sources/ebpf/cgroups.py) reports every
cgroup created with its id and path (learn()), and on a miss resolve() first has that probe read
what is pending (the `sync` hook), then asks the kernel (open_by_handle_at, exact while the
cgroup lives). Bounded: at most `cache_size` ids are kept, least recently used first out.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from agent.procfs.identity import UNIT_SUFFIXES, CgroupPaths, cgroup_attributes, container_id, decoded

log = logging.getLogger("hostagent.workload")


@dataclass(frozen=True, slots=True)
class Workload:
    kind: str            # "container" | "service" | "slice" | "host" | "unresolved"
    path: str            # the workload's own cgroup: every cgroup under it collapses into it
    attributes: tuple    # ((key, value), ...) exported on its data points; () for the host


HOST = Workload("host", "/", ())
# an id whose cgroup is gone and was never seen alive (kept apart from the host, never dropped)
UNRESOLVED = Workload("unresolved", "", (("process.linux.cgroup", "unresolved"),))
# the key kernel maps use for what did not fit (bpf/include/maps.h HA_CGROUP_OVERFLOW)
CGROUP_OVERFLOW = 0xFFFFFFFFFFFFFFFF

# ids remembered: a busy Kubernetes node has a few thousand cgroups; an entry takes 0.6-1 KiB
CACHE_SIZE = 8192

UNRESOLVED_METRIC = "hostagent.ebpf.workload.unresolved"
EVICTED_METRIC = "hostagent.ebpf.workload.evicted"
CACHED_METRIC = "hostagent.ebpf.workload.cached"


def classify(path: str) -> Workload:
    """The workload of the cgroup at `path` (relative to the cgroup v2 root). Linear in the
    length of the path."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return HOST
    cid = container_id(path)                  # the innermost directory naming a container
    if cid:
        i = next(i for i, part in enumerate(parts) if container_id(part) == cid)
        root = "/" + "/".join(parts[:i + 1])
        return Workload("container", root, (("container.id", cid), ("process.linux.cgroup", "0::" + root)))
    for i, part in enumerate(parts):
        if part.endswith(UNIT_SUFFIXES):
            root = "/" + "/".join(parts[:i + 1])
            return Workload("service", root, (("linux.systemd.unit", part), ("process.linux.cgroup", "0::" + root)))
    root = "/" + parts[0]
    return Workload("slice", root, (("process.linux.cgroup", "0::" + root),))


class WorkloadResolver:
    """cgroup v2 id -> Workload, for the ids kernel probes capture. Thread-safe (the ring reader
    and the collection thread both ask). Ids are never reused, so an answer is final and kept,
    the `cache_size` most recently used; the answer for an id whose cgroup is gone and was never
    learned (UNRESOLVED) is kept too, so it is asked of the kernel and counted once.

    `telemetry` (the agent's SelfMetrics, optional) gets hostagent.ebpf.workload.unresolved (ids
    that could not be resolved), .evicted (ids pushed out of the cache) and .cached (ids held)."""

    def __init__(self, telemetry=None, cache_size: int = CACHE_SIZE, paths: Optional[CgroupPaths] = None):
        self.paths = paths if paths is not None else CgroupPaths()
        self.cache_size = max(1, cache_size)
        # id -> (its path, None when it is the workload's own; Workload), or None: unresolved
        self._known: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._sync: Optional[Callable[[], object]] = None
        self._sync_failed = False              # said once
        self.unresolved = self.evicted = 0
        self._unresolved = self._evicted = None
        if telemetry is not None:
            self._unresolved = telemetry.counter(
                UNRESOLVED_METRIC, "{cgroup}", "cgroup ids captured in the kernel whose cgroup was gone before "
                "its path was known (their data carries process.linux.cgroup=unresolved).")
            self._evicted = telemetry.counter(
                EVICTED_METRIC, "{cgroup}", "cgroup ids the workload resolver forgot to stay within its bound "
                "(an id asked again is resolved again while its cgroup lives).")
            telemetry.gauge(CACHED_METRIC, "{cgroup}", "cgroup ids the workload resolver holds.").observe(
                (), self.__len__)

    def __len__(self) -> int:
        return len(self._known)

    def set_sync(self, sync: Optional[Callable[[], object]]) -> None:
        """What to call before asking the kernel about an unknown id: the cgroups probe reads its
        pending records (a cgroup's creation is recorded before anything can run in it, so its
        record is there before any event that names its id). None: no such probe."""
        self._sync = sync

    def learn(self, cgroup_id: int, path: Optional[str]) -> Optional[Workload]:
        """Remember that `cgroup_id` is the cgroup at `path`; path None: not known (cut short),
        ask the kernel now, while the cgroup may still exist. The workload, or None."""
        entry = self._ask_kernel(cgroup_id) if path is None else self._learn(cgroup_id, path)
        return None if entry is None else entry[1]

    def _learn(self, cgroup_id: int, path) -> tuple:
        path = decoded(path)
        workload = classify(path)
        # most cgroups are their workload's own: keep the path once
        entry = (None if path == workload.path else path, workload)
        self._remember(cgroup_id, entry)
        return entry

    def workload(self, cgroup_id: int) -> Optional[Workload]:
        """The cgroup's workload; None when the id is unknown and its cgroup is gone."""
        entry = self._entry(cgroup_id)
        return None if entry is None else entry[1]

    def resolve(self, cgroup_id: int) -> Workload:
        """workload(), with UNRESOLVED for an id that cannot be resolved."""
        return self.workload(cgroup_id) or UNRESOLVED

    def path(self, cgroup_id: int) -> Optional[str]:
        """The cgroup's own path (not its workload's); None when it cannot be resolved."""
        entry = self._entry(cgroup_id)
        return None if entry is None else entry[0] or entry[1].path

    def attributes(self, cgroup_id: int) -> tuple:
        """identity.cgroup_attributes() of the cgroup's own path (what a process's records carry:
        its exact cgroup, container and innermost unit); () when it cannot be resolved."""
        path = self.path(cgroup_id)
        return () if path is None else cgroup_attributes(path)

    def alive(self, cgroup_id: int) -> bool:
        """Whether the cgroup may still exist (its kernel map entries may then still grow): False
        only once the kernel says the id is gone."""
        return not self.paths.find(cgroup_id)[1]

    # --- the cache ---------------------------------------------------------------------------

    _MISS = object()

    def _lookup(self, cgroup_id: int):
        with self._lock:
            entry = self._known.get(cgroup_id, self._MISS)
            if entry is not self._MISS:
                self._known.move_to_end(cgroup_id)
            return entry

    def _entry(self, cgroup_id: int):
        """(path, Workload) or None, from the cache, the cgroups probe, or the kernel."""
        if cgroup_id == CGROUP_OVERFLOW:
            return None                        # not a cgroup: the kernel maps' overflow key
        entry = self._lookup(cgroup_id)
        if entry is self._MISS:
            sync = self._sync
            if sync is not None:
                try:
                    sync()                     # takes the probe's lock, then ours: never the other way
                except Exception:              # the caller's own data must not be lost to it
                    if not self._sync_failed:
                        self._sync_failed = True
                        log.exception("workload_sync_failed")
                entry = self._lookup(cgroup_id)
        if entry is self._MISS:
            return self._ask_kernel(cgroup_id)
        return entry

    def _ask_kernel(self, cgroup_id: int):
        """(path, Workload) from the kernel, or None, then remembered as unresolved (final: the
        cgroup is gone, or hidden from us) and counted once."""
        path = self.paths.path(cgroup_id)
        if path is not None:
            return self._learn(cgroup_id, path)
        with self._lock:
            new = cgroup_id not in self._known
            if new:
                self.unresolved += 1
                evicted = self._insert(cgroup_id, None)
        if new:
            self._count_evicted(evicted)
            if self._unresolved is not None:
                self._unresolved.add(1)
        return None

    def _remember(self, cgroup_id: int, entry) -> None:
        with self._lock:
            evicted = self._insert(cgroup_id, entry)
        self._count_evicted(evicted)

    def _insert(self, cgroup_id: int, entry) -> int:
        """Put an entry (the lock held); how many were evicted to make room."""
        evicted = 0
        if cgroup_id in self._known:
            self._known.move_to_end(cgroup_id)
        else:                                  # make room first: never more than cache_size, even briefly
            while len(self._known) >= self.cache_size:
                self._known.popitem(last=False)
                evicted += 1
        self._known[cgroup_id] = entry
        self.evicted += evicted
        return evicted

    def _count_evicted(self, evicted: int) -> None:
        if evicted and self._evicted is not None:
            self._evicted.add(evicted)

    def close(self) -> None:
        self._sync = None
        self.paths.close()
