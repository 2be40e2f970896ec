"""Who a process is: its executable, command line (secrets hidden), owner, parent, cgroup,
container and systemd unit -- as OpenTelemetry attributes.

- `Redactor`: a command line as one string with secret values replaced by ***
  (enrichment.redaction in the config).
- `cgroup_attributes(path)`: process.linux.cgroup, container.id (docker, containerd, cri-o,
  podman, nerdctl; cgroup v1 and v2 layouts) and linux.systemd.unit from a cgroup path.
- `CgroupPaths`: cgroup v2 id (what bpf_get_current_cgroup_id() returns) -> path and those
  attributes, through open_by_handle_at() on the cgroup2 mount: exact, even after the process is
  gone (not after its cgroup is).
- `read_process(pid)`: the same attributes from /proc, with the process's start time, so a caller
  can tell the process it asked about from a later one that got the same pid.
"""
from __future__ import annotations

import ctypes
import fnmatch
import functools
import os
import pwd
import re
import time
from typing import Optional

REDACTED = "***"
CLOCK_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# name=value inside an argument (--password=x, token=x in a URL query, AWS_SECRET_ACCESS_KEY=x)
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^\s&]+)")


class Redactor:
    """`redactor(argv)` -> the command line as one string, secret values replaced by ***.

    Hidden: the value of an option or variable whose name ends in a secret name (`--password x`,
    `--password=x`, `API_KEY=x`, `?token=x`), a client's password option (`mysql -px`,
    `redis-cli -a x`), and what the patterns mark (by default `user:password@` in URLs and
    Authorization headers). A bare password option followed by another word hides that word:
    `mysql -p db` may be prompting, but a hidden database name is the safe mistake."""

    def __init__(self, cfg):
        self.names = tuple(n.lower() for n in cfg.secret_names)
        self.options = tuple((glob, option) for glob, option in cfg.password_options.items())
        self.patterns = tuple(re.compile(p) for p in cfg.patterns)
        self._option_of: dict = {}            # argv[0] -> its password option or None

    def _secret_name(self, name: str) -> bool:
        bare = name.lstrip("-")
        return bool(bare) and bare.lower().endswith(self.names)

    def _assignment(self, m: re.Match) -> str:
        return f"{m['name']}={REDACTED}" if self._secret_name(m["name"]) else m.group(0)

    def _pattern(self, pattern: re.Pattern, arg: str) -> str:
        def hide(m: re.Match) -> str:
            group = "secret" if "secret" in pattern.groupindex and m.group("secret") is not None else 0
            start, end = m.start(group) - m.start(), m.end(group) - m.start()
            return m.group(0)[:start] + REDACTED + m.group(0)[end:]
        return pattern.sub(hide, arg)

    def _password_option(self, command: str) -> Optional[str]:
        if command not in self._option_of:
            if len(self._option_of) >= 1024:
                self._option_of.clear()
            base = os.path.basename(command)
            self._option_of[command] = next(
                (option for glob, option in self.options if fnmatch.fnmatchcase(base, glob)), None)
        return self._option_of[command]

    def __call__(self, argv) -> str:
        option = self._password_option(argv[0]) if argv else None
        out = []
        value_is_secret = False
        for arg in argv:
            if value_is_secret and not arg.startswith("-"):
                out.append(REDACTED)
                value_is_secret = False
                continue
            value_is_secret = False
            if arg.startswith("-") and "=" not in arg and (arg == option or self._secret_name(arg)):
                value_is_secret = True        # `--password secret`: the next argument is the value
                out.append(arg)
                continue
            if option and len(arg) > len(option) and arg.startswith(option) and not arg.startswith("--"):
                out.append(option + REDACTED)
                continue
            arg = _ASSIGNMENT.sub(self._assignment, arg)
            for pattern in self.patterns:
                arg = self._pattern(pattern, arg)
            out.append(arg)
        return " ".join(out)


# --- cgroups -------------------------------------------------------------------------------------

# a container's cgroup directory: <64 hex>, or <runtime>-<64 hex>[.scope]; conmon's is not one
_CONTAINER_DIR = re.compile(
    r"(?:(?:docker|cri-containerd|crio|libpod|containerd|nerdctl|cri-o)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?")
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")


def container_id(path: str) -> Optional[str]:
    """The id of the container whose cgroup `path` is in (or under), e.g.
    /system.slice/docker-<id>.scope, /kubepods/burstable/pod<uid>/<id>,
    /kubepods.slice/.../cri-containerd-<id>.scope, /machine.slice/libpod-<id>.scope/container."""
    for part in reversed(path.split("/")):
        m = _CONTAINER_DIR.fullmatch(part)
        if m:
            return m["id"]
    return None


def systemd_unit(path: str) -> Optional[str]:
    """The innermost systemd unit in a cgroup path (nginx.service, session-3.scope)."""
    for part in reversed(path.split("/")):
        if part.endswith(_UNIT_SUFFIXES):
            return part
    return None


def cgroup_attributes(path: str, hierarchy: str = "0::") -> tuple:
    """process.linux.cgroup (as in /proc/<pid>/cgroup), container.id and linux.systemd.unit."""
    attrs = [("process.linux.cgroup", hierarchy + path)]
    cid = container_id(path)
    if cid:
        attrs.append(("container.id", cid))
    unit = systemd_unit(path)
    if unit:
        attrs.append(("linux.systemd.unit", unit))
    return tuple(attrs)


def proc_cgroup(text: str) -> tuple:
    """The one line of /proc/<pid>/cgroup to report, as (hierarchy prefix, path): the first line
    whose path names a container, else the cgroup v2 line unless it is the root, else the
    name=systemd line (cgroup v1), else the first."""
    lines = []
    for line in text.splitlines():
        hid, controllers, path = line.split(":", 2)
        lines.append((f"{hid}:{controllers}:", path))
    if not lines:
        return ("0::", "/")
    for prefix, path in lines:
        if container_id(path):
            return prefix, path
    for prefix, path in lines:
        if prefix == "0::" and path != "/":
            return prefix, path
    for prefix, path in lines:
        if "name=systemd" in prefix:
            return prefix, path
    return lines[0]


class _FileHandle(ctypes.Structure):
    # struct file_handle as kernfs fills it: 8 bytes, the cgroup id
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("cgroup_id", ctypes.c_uint64)]


FILEID_KERNFS = 0xFE
O_PATH = 0o10000000


def cgroup2_mount() -> Optional[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


class CgroupPaths:
    """cgroup v2 id -> path relative to the cgroup2 root ("/system.slice/x.service").
    Needs CAP_DAC_READ_SEARCH (open_by_handle_at); ids are never reused, so answers are kept
    (the `cache_size` most recent)."""

    def __init__(self, mount: Optional[str] = None, cache_size: int = 4096):
        self.mount = mount if mount is not None else cgroup2_mount()
        self._mount_fd = -1
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._attributes: dict = {}           # id -> cgroup_attributes() of its path
        self.cache_size = cache_size
        if self.mount:
            try:
                self._mount_fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                self.mount = None

    def path(self, cgroup_id: int) -> Optional[str]:
        """The path, or None: no such cgroup (any more), no cgroup2 mount, or no permission."""
        if self._mount_fd < 0 or not cgroup_id:
            return None
        handle = _FileHandle(8, FILEID_KERNFS, cgroup_id)
        fd = self._libc.open_by_handle_at(self._mount_fd, ctypes.byref(handle), O_PATH)
        if fd < 0:
            return None
        try:
            full = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        relative = os.path.relpath(full, self.mount)
        return "/" if relative == "." else "/" + relative

    def attributes(self, cgroup_id: int) -> tuple:
        """cgroup_attributes() of the cgroup's path; () when path() has none (not kept: the
        answer may come later)."""
        attrs = self._attributes.get(cgroup_id)
        if attrs is None:
            path = self.path(cgroup_id)
            if path is None:
                return ()
            if len(self._attributes) >= self.cache_size:
                self._attributes.pop(next(iter(self._attributes)))
            attrs = self._attributes[cgroup_id] = cgroup_attributes(path)
        return attrs

    def close(self) -> None:
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1


# --- /proc ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> Optional[str]:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def _read(path: str, mode: str = "r"):
    with open(path, mode) as f:
        return f.read()


def boot_to_wall_ns() -> int:
    """What to add to a boot-clock time (bpf_ktime_get_boot_ns(), /proc start times) to get Unix
    time in ns."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def proc_stat(pid: int) -> Optional[tuple]:
    """(command name, parent pid, start time in boot-clock ticks) from /proc/<pid>/stat, or None
    if there is no such process."""
    try:
        head, _, tail = _read(f"/proc/{pid}/stat", "rb").rpartition(b")")
        fields = tail.split()
        return head.partition(b"(")[2].decode(errors="replace"), int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_cgroup_attributes(pid: int) -> tuple:
    """cgroup_attributes() of the line of /proc/<pid>/cgroup that proc_cgroup() picks; () if the
    process is gone or hidden from us."""
    try:
        prefix, path = proc_cgroup(_read(f"/proc/{pid}/cgroup"))
    except (OSError, ValueError):
        return ()
    return cgroup_attributes(path, prefix)


def read_process(pid: int, redactor: Optional[Redactor]) -> Optional[tuple]:
    """(start time in boot-clock ticks, attributes) of the process now at `pid`, from /proc; None
    if there is none. `redactor` None: no command line. Fields the kernel will not show are left out."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    comm, ppid, start_ticks = stat
    base = f"/proc/{pid}"
    attrs = [("process.parent_pid", ppid), ("process.executable.name", comm)]
    try:
        attrs.append(("process.executable.path", os.readlink(f"{base}/exe")))
    except OSError:
        pass
    if redactor is not None:
        try:
            argv = _read(f"{base}/cmdline", "rb").split(b"\0")
            if argv and argv[-1] == b"":
                argv.pop()
            if argv:
                attrs.append(("process.command_line", redactor([a.decode(errors="replace") for a in argv])))
        except OSError:
            pass
    try:
        for line in _read(f"{base}/status").splitlines():
            if line.startswith("Uid:"):
                owner = user_name(int(line.split()[1]))
                if owner is not None:
                    attrs.append(("process.owner", owner))
                break
    except (OSError, ValueError, IndexError):
        pass
    attrs.extend(proc_cgroup_attributes(pid))
    return start_ticks, tuple(attrs)
