"""cgroupfs: the workloads' own cgroups and what the kernel says of each.

walk() goes breadth-first down the cgroup v2 hierarchy to the directories that are a workload's
own cgroup (workload.classify(path).path == path), bounded in depth, in directories listed and in
time; a directory with many children takes at most half of the listing budget left, so thousands
of siblings in one cgroup cannot hide the workloads beside it. Names are bytes: a name that is not
UTF-8 is shown with U+FFFD for each such byte, as everywhere in the agent (so a workload has the
same attributes in every signal), and still read by its real bytes.

The readers parse the kernel's files leniently: a line or value that does not parse (garbage, a
number beyond 64 bits, "nan") is left out, never raised, and a file is read up to FILE_LIMIT bytes.
Usage comes from cgroup v2 files where the controller is on (cpu.stat always is), else from the
v1 hierarchies (cpuacct, memory, blkio) at the same relative path, as on hybrid hosts.
"""
from __future__ import annotations

import collections
import errno
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from agent.procfs.identity import decoded, mounts
from agent.procfs.workload import classify

FILE_LIMIT = 64 * 1024  # io.stat of a host with many devices is a few KiB, memory.stat ~2 KiB
U64_MAX = (1 << 64) - 1
PRESSURE_RESOURCES = ("cpu", "memory", "io", "irq")  # a cgroup's *.pressure files (irq: 6.2+, some kernels)
V1_CONTROLLERS = ("cpuacct", "memory", "blkio")


# --- readers -------------------------------------------------------------------------------------

def read_text(path) -> str:
    """The first FILE_LIMIT bytes of a kernel file as text (non-ASCII bytes replaced). Plain
    os calls: a scrape reads thousands of small files, and a Python file object costs more than
    the read itself."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, FILE_LIMIT)
        while data and len(data) < FILE_LIMIT:
            more = os.read(fd, FILE_LIMIT - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data.decode("ascii", "replace")


def counter(text: str) -> Optional[int]:
    """A kernel counter: ASCII digits that fit in 64 bits, else None."""
    if text.isascii() and text.isdigit() and len(text) <= 20:
        value = int(text)
        if value <= U64_MAX:
            return value
    return None


def parse_pressure(text: str) -> dict:
    """A *.pressure file -> {"some"|"full": total stall time in microseconds}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("some", "full"):
            for item in parts[1:]:
                key, _, value = item.partition("=")
                if key == "total":
                    total = counter(value)
                    if total is not None:
                        out[parts[0]] = total
    return out


def parse_flat(text: str) -> dict:
    """A flat-keyed file (`key value` lines: cpu.stat, memory.stat, cpuacct.stat) -> {key: int}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            value = counter(parts[1])
            if value is not None:
                out[parts[0]] = value
    return out


def _device(text: str) -> Optional[str]:
    major, sep, minor = text.partition(":")
    return text if sep and counter(major) is not None and counter(minor) is not None else None


def parse_io_stat(text: str) -> dict:
    """cgroup v2 io.stat (`8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...`) -> {"8:0": {key: int}}."""
    out: dict = {}
    for line in text.splitlines():
        parts = line.split()
        device = _device(parts[0]) if parts else None
        if device is None:
            continue
        values = out.setdefault(device, {})
        for item in parts[1:]:
            key, _, value = item.partition("=")
            n = counter(value)
            if n is not None:
                values[key] = n
    return out


def parse_blkio(text: str) -> dict:
    """cgroup v1 blkio.*io_service{d,_bytes}* (`8:0 Read 123` lines) -> {"8:0": {"Read": int, ...}}."""
    out: dict = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        device, n = _device(parts[0]), counter(parts[2])
        if device is not None and n is not None:
            out.setdefault(device, {})[parts[1]] = n
    return out


# --- where the hierarchies are ---------------------------------------------------------------------

def v1_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict:
    """{controller: mount point} of the cgroup v1 hierarchies we read (cpuacct, memory, blkio)."""
    out = {}
    for fstype, options, point in mounts(mountinfo):
        if fstype == "cgroup":
            for option in options.split(","):
                if option in V1_CONTROLLERS and option not in out:
                    out[option] = point
    return out


# --- the walk ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_depth: int = 8          # levels below the root that are listed
    max_cgroups: int = 10000    # directories listed per walk
    max_workloads: int = 1000   # workloads returned per walk
    timeout_s: float = 1.0      # time per walk (the scrapers read the workloads within it too)


@dataclass
class Walk:
    workloads: list = field(default_factory=list)       # [(Workload, path relative to the root (bytes), inode)]
    truncated: set = field(default_factory=set)          # limits the walk hit: depth, cgroups, time
    skipped: collections.Counter = field(default_factory=collections.Counter)  # workloads left out, by reason
    listed: int = 0                                       # directories listed


def walk(root: bytes, limits: Limits, clock: Callable[[], float] = time.monotonic) -> Walk:
    """The workloads' own cgroups under `root` (a cgroup v2 mount), breadth first, within `limits`.
    The root itself (the host) is not one of them."""
    out = Walk()
    deadline = clock() + limits.timeout_s
    seen: set = set()
    queue = collections.deque([(b"", 0, 0)])
    while queue:
        if clock() > deadline:
            out.truncated.add("time")
            break
        rel, depth, inode = queue.popleft()
        if rel:
            path = decoded(rel)
            workload = classify(path)
            if workload.path == path:
                if path in seen:
                    out.skipped["duplicate"] += 1
                elif len(out.workloads) >= limits.max_workloads:
                    out.skipped["workloads"] += 1
                else:
                    seen.add(path)
                    out.workloads.append((workload, rel, inode))
        budget = (limits.max_cgroups - out.listed + 1) // 2
        for name, child_inode in _subdirs(root + rel):
            if depth >= limits.max_depth:
                out.truncated.add("depth")
                break
            if budget <= 0:
                out.truncated.add("cgroups")
                break
            budget -= 1
            out.listed += 1
            queue.append((rel + b"/" + name, depth + 1, child_inode))
    return out


def _subdirs(path: bytes):
    """(name, inode) of the subdirectories of `path`; none if it is gone or unreadable. A
    cgroup's inode number is its id: a cgroup made again at the same path has another."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield entry.name, entry.inode()
                except OSError:
                    continue
    except OSError:
        return


# --- one workload's figures --------------------------------------------------------------------------

@dataclass
class Usage:
    cpu: dict = field(default_factory=dict)      # {"user"|"kernel": seconds}
    memory: dict = field(default_factory=dict)   # {"usage"|"working_set": bytes}
    io: dict = field(default_factory=dict)       # {"8:0": (read bytes, write bytes, read ops, write ops)}


class Reader:
    """Reads one workload's files. A missing file (the cgroup is gone, or the controller is not
    on it) is skipped silently; any other failure, or a file with none of the expected values,
    is skipped and reported to `unreadable(path, error)`."""

    def __init__(self, v2_root: Optional[bytes], v1: dict, unreadable: Callable[[bytes, BaseException], None]):
        self.v2_root = v2_root
        self.v1 = {name: os.fsencode(mount) for name, mount in v1.items()}
        self.unreadable = unreadable

    def _text(self, path: bytes) -> Optional[str]:
        try:
            return read_text(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                self.unreadable(path, e)
            return None

    def _parsed(self, path: bytes, parse: Callable, wanted: tuple = ()) -> Optional[dict]:
        text = self._text(path)
        if text is None:
            return None
        values = parse(text)
        if wanted and not all(k in values for k in wanted):
            self.unreadable(path, ValueError(f"no {', '.join(k for k in wanted if k not in values)}"))
            return None
        return values

    def _value(self, path: bytes) -> Optional[int]:
        """A file that holds one counter (memory.current, cpuacct.usage_user)."""
        text = self._text(path)
        if text is None:
            return None
        value = counter(text.strip())
        if value is None:
            self.unreadable(path, ValueError("not a counter"))
        return value

    def pressure(self, rel: bytes, resources: tuple = PRESSURE_RESOURCES) -> dict:
        """{resource: {"some"|"full": microseconds}} of the cgroup at `rel` (v2 only)."""
        out = {}
        if self.v2_root is None:
            return out
        for resource in resources:
            path = b"%s%s/%s.pressure" % (self.v2_root, rel, resource.encode())
            values = self._parsed(path, parse_pressure)
            if values:
                out[resource] = values
            elif values is not None:
                self.unreadable(path, ValueError("no some or full total"))
        return out

    def usage(self, rel: bytes, cpu: bool = True, memory: bool = True, io: bool = True) -> Usage:
        """What the cgroup at `rel` used; only the parts asked for are read."""
        u = Usage()
        for wanted, read in ((cpu, self._cpu), (memory, self._memory), (io, self._io)):
            if wanted:
                read(rel, u)
        return u

    def _v2(self, rel: bytes, name: str) -> Optional[bytes]:
        """The v2 file's path when it exists (the controller is on for this cgroup)."""
        if self.v2_root is None:
            return None
        path = b"%s%s/%s" % (self.v2_root, rel, name.encode())
        return path if os.path.exists(path) else None

    def _v1(self, controller: str, rel: bytes, name: str) -> Optional[bytes]:
        mount = self.v1.get(controller)
        return None if mount is None else b"%s%s/%s" % (mount, rel, name.encode())

    def _cpu(self, rel: bytes, u: Usage) -> None:
        path = self._v2(rel, "cpu.stat")
        if path is not None:
            stat = self._parsed(path, parse_flat, ("user_usec", "system_usec"))
            if stat:
                u.cpu = {"user": stat["user_usec"] / 1e6, "kernel": stat["system_usec"] / 1e6}
            return
        if "cpuacct" in self.v1:
            user = self._value(self._v1("cpuacct", rel, "cpuacct.usage_user"))
            kernel = self._value(self._v1("cpuacct", rel, "cpuacct.usage_sys"))
            if user is not None and kernel is not None:
                u.cpu = {"user": user / 1e9, "kernel": kernel / 1e9}

    def _memory(self, rel: bytes, u: Usage) -> None:
        # as cAdvisor: working set = usage - inactive file pages (never below 0)
        current = self._v2(rel, "memory.current")
        if current is not None:
            usage, stat, inactive = current, b"%s%s/memory.stat" % (self.v2_root, rel), "inactive_file"
        else:
            usage = self._v1("memory", rel, "memory.usage_in_bytes")
            if usage is None:
                return
            stat, inactive = self._v1("memory", rel, "memory.stat"), "total_inactive_file"
        value = self._value(usage)
        if value is None:
            return
        u.memory["usage"] = value
        stats = self._parsed(stat, parse_flat, (inactive,))
        if stats is not None:
            u.memory["working_set"] = max(0, value - stats[inactive])

    def _io(self, rel: bytes, u: Usage) -> None:
        path = self._v2(rel, "io.stat")
        if path is not None:
            for device, v in (self._parsed(path, parse_io_stat) or {}).items():
                u.io[device] = (v.get("rbytes", 0), v.get("wbytes", 0), v.get("rios", 0), v.get("wios", 0))
            return
        # v1 blkio counts a device's I/O in its bfq stats when bfq schedules it, and in its
        # throttle stats only once a throttle limit is set on it (6.x sets throttling up lazily):
        # per device the bfq figures, else the throttle ones (runc's order, less the gone CFQ's)
        if "blkio" not in self.v1:
            return
        for policy in ("throttle", "bfq"):
            by_bytes = self._parsed(self._v1("blkio", rel, f"blkio.{policy}.io_service_bytes_recursive"), parse_blkio) or {}
            by_ops = self._parsed(self._v1("blkio", rel, f"blkio.{policy}.io_serviced_recursive"), parse_blkio) or {}
            for device in by_bytes.keys() | by_ops.keys():
                b, o = by_bytes.get(device, {}), by_ops.get(device, {})
                u.io[device] = (b.get("Read", 0), b.get("Write", 0), o.get("Read", 0), o.get("Write", 0))
