"""Which workload a cgroup belongs to: the unit an operator names.

A workload is, from the most specific down:
- a container (its cgroup directory names one: docker, containerd, cri-o, podman, nerdctl);
- else a systemd service or scope: the outermost `*.service` / `*.scope` in the path, so a
  service's own sub-cgroups (and a user manager's units) collapse into it;
- else the top-level cgroup (systemd's `user.slice`, `system.slice`, ...);
- else the host (the root cgroup: kernel threads, processes never moved).

Paths are relative to the cgroup v2 root ("/system.slice/nginx.service/workers"), as the
kernel's cgroup ids (bpf_get_current_cgroup_id(), the cgroup v2 directory's inode) name them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.procfs.identity import CgroupPaths, container_id

_SERVICE_SUFFIXES = (".service", ".scope")


@dataclass(frozen=True)
class Workload:
    kind: str            # "container" | "service" | "slice" | "host"
    path: str            # the workload's own cgroup: every cgroup under it collapses into it
    attributes: tuple    # ((key, value), ...) exported on its data points; () for the host


HOST = Workload("host", "/", ())
# an id whose cgroup is gone and was never seen alive (kept apart from the host, never dropped)
UNRESOLVED = Workload("unresolved", "", (("process.linux.cgroup", "unresolved"),))
# the key kernel maps use for what did not fit (bpf/include/maps.h HA_CGROUP_OVERFLOW)
CGROUP_OVERFLOW = 0xFFFFFFFFFFFFFFFF


def classify(path: str) -> Workload:
    """The workload of the cgroup at `path` (relative to the cgroup v2 root)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return HOST
    cid = container_id(path)
    if cid:
        # the container's own directory: the outermost one naming it
        for i, part in enumerate(parts):
            if cid in part:
                root = "/" + "/".join(parts[:i + 1])
                return Workload("container", root, (("container.id", cid), ("process.linux.cgroup", "0::" + root)))
    for i, part in enumerate(parts):
        if part.endswith(_SERVICE_SUFFIXES):
            root = "/" + "/".join(parts[:i + 1])
            return Workload("service", root, (("linux.systemd.unit", part), ("process.linux.cgroup", "0::" + root)))
    root = "/" + parts[0]
    return Workload("slice", root, (("process.linux.cgroup", "0::" + root),))


class WorkloadResolver:
    """cgroup v2 id -> Workload. Ids are never reused, so an answer is kept (the `cache_size`
    most recent). An id the kernel captured may belong to a cgroup already removed; learn()
    records ids and paths seen while they lived, so such ids still resolve."""

    def __init__(self, cache_size: int = 16384, paths: Optional[CgroupPaths] = None):
        self.paths = paths if paths is not None else CgroupPaths(cache_size=0)
        self.cache_size = cache_size
        self._known: dict = {}          # id -> Workload

    def learn(self, cgroup_id: int, path: str) -> Workload:
        workload = classify(path)
        self._remember(cgroup_id, workload)
        return workload

    def workload(self, cgroup_id: int) -> Optional[Workload]:
        """The cgroup's workload; None when the id is unknown and its cgroup is gone."""
        workload = self._known.get(cgroup_id)
        if workload is None:
            path = self.paths.path(cgroup_id)
            if path is None:
                return None
            workload = self.learn(cgroup_id, path)
        return workload

    def resolve(self, cgroup_id: int) -> Workload:
        """workload(), with UNRESOLVED for an id that cannot be resolved."""
        return self.workload(cgroup_id) or UNRESOLVED

    def alive(self, cgroup_id: int) -> bool:
        """Whether the cgroup still exists (its kernel map entries may then still grow)."""
        return self.paths.path(cgroup_id) is not None

    def _remember(self, cgroup_id: int, workload: Workload) -> None:
        if cgroup_id not in self._known and len(self._known) >= self.cache_size:
            self._known.pop(next(iter(self._known)))
        self._known[cgroup_id] = workload

    def close(self) -> None:
        self.paths.close()
