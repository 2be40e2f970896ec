"""Who a process is: its executable, command line (secrets hidden), owner, parent, cgroup,
container and systemd unit -- as OpenTelemetry attributes.

- `EnrichmentConfig` (the `enrichment` section: the process probe, the process scraper and the
  pipeline's enrichment read it) and `RedactionConfig`.
- `Redactor`: a command line as one string with secret values replaced by ***
  (enrichment.redaction in the config).
- `cgroup_attributes(path)`: process.linux.cgroup, container.id (docker, containerd, cri-o,
  podman, nerdctl; cgroup v1 and v2 layouts) and linux.systemd.unit from a cgroup path.
- `CgroupPaths`: cgroup v2 id (what bpf_get_current_cgroup_id() returns) -> path, through
  open_by_handle_at() on the cgroup2 mount: exact, even after the process is gone (not after its
  cgroup is: agent/procfs/workload.py remembers the paths of cgroups that may go).
- `read_process(pid)`: the same attributes from /proc, with the process's start time, so a caller
  can tell the process it asked about from a later one that got the same pid.

Names on a Linux host are bytes, not text: a cgroup, a file or a command line may hold bytes that
are not UTF-8. They are decoded where they are read, each invalid byte becoming U+FFFD
(`decoded()`), so no lone surrogate (Python's stand-in for an undecodable byte) leaves this module.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import os
import pwd
import re
import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

from agent.config import ConfigError, check_patterns, check_ranges, compile_pattern, frozen_dict

REDACTED = "***"
CLOCK_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def decoded(raw) -> str:
    """Bytes from the kernel (or a str that os/psutil decoded with surrogateescape) as text, each
    byte that is not UTF-8 replaced by U+FFFD."""
    if isinstance(raw, str):
        try:
            raw.encode()
            return raw
        except UnicodeEncodeError:
            raw = raw.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace")


# Command lines are read whole up to this many bytes (the process probe reads 1 KiB in the kernel):
# enough for nearly every command, and a bound on what one process can make the agent read and hold.
CMDLINE_MAX = 4096
TRUNCATED_MARK = "..."                     # stands for the part of a command line that did not fit

# inside one word, name=value pairs are separated by these (URL queries, JDBC, mount -o)
_PAIRS = re.compile(r"([;&?,])")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")       # what an option, variable or header name is made of
# what may come before a name in a word: option dashes, quotes (sh -c "... '--password=x' ...")
_NAME_PREFIX = "-\"'"
# the first word of an Authorization header's value, kept: it says what kind of credential follows
_AUTH_SCHEMES = frozenset(("basic", "bearer", "digest", "token", "negotiate", "ntlm", "bot", "apikey"))


def split_argv(raw: bytes, cut: bool) -> list:
    """NUL-separated arguments as text. `cut`: the bytes end inside an argument, which is replaced
    by TRUNCATED_MARK (half a secret is still a secret, and the rules need whole words)."""
    parts = raw.split(b"\0")
    parts.pop()                            # "" after the last NUL, or the argument cut short
    argv = [decoded(a) for a in parts]
    if cut:
        argv.append(TRUNCATED_MARK)
    return argv


@dataclass(frozen=True)
class RedactionConfig:
    # an option, variable, key or header whose name contains one of these (case-insensitive) has a secret
    # value: --password x, --db-pass=x, AWS_SECRET_ACCESS_KEY=x, ?token=x, ;password=x, Authorization: x
    secret_names: tuple = ("pass", "pwd", "secret", "token", "auth", "cred", "cookie")
    # ... or has one of these at the end of one of its words: API_KEY=x, --secretKey=x, X-Api-Key: x
    # (not --keyboard)
    secret_suffixes: tuple = ("key", "keys")
    # a command (glob on a word's base name, wherever it appears: `timeout 5 mysql -px`) -> options whose
    # value is a password, glued (-psecret, --user=x) or next; several separated by spaces
    password_options: Mapping[str, str] = frozen_dict(**{
        "mysql*": "-p", "mariadb*": "-p", "mongo*": "-p", "sshpass": "-p", "redis-cli": "-a",
        "valkey-cli": "-a", "curl": "-u --user --proxy-user", "login": "-p", "ssh-keygen": "-N -P",
        "sqlcmd": "-P", "ldap*": "-w", "zip": "-P", "unzip": "-P", "7z*": "-p", "smbclient": "-U"})
    # regular expressions (RE2 syntax) searched in the redacted command line; the group named `secret`
    # (else the match) is hidden
    patterns: tuple = ()

    def validate(self, key: str) -> None:
        check_patterns(self.patterns, f"{key}.patterns")
        for name in ("secret_names", "secret_suffixes"):
            for i, word in enumerate(getattr(self, name)):
                if not isinstance(word, str) or not word.strip():
                    raise ConfigError(f"{key}.{name}[{i}]", f"expected a non-empty name part, got {word!r}")
        for command, options in self.password_options.items():
            if not isinstance(options, str) or not options.split() or not all(
                    o.startswith("-") and len(o) >= 2 for o in options.split()):
                raise ConfigError(f"{key}.password_options.{command}",
                                  f"expected options like -p or \"-u --user\", got {options!r}")


@dataclass(frozen=True)
class EnrichmentConfig:
    # add who a process is (executable, command line, owner, container, unit) to records with process.pid
    enabled: bool = True
    # read and export command lines at all (false: process.command_line is never produced)
    command_line: bool = True
    redaction: RedactionConfig = RedactionConfig()
    # process metadata cache: hot entries (L1) and the rest (L2), each bounded by entry count
    cache_l1_size: int = 256
    cache_l2_size: int = 4096

    # an L2 entry takes up to 2 KiB: at most 512 MiB
    RANGES: ClassVar[dict] = {"cache_l1_size": (1, 65536), "cache_l2_size": (1, 262144)}

    def validate(self, key: str) -> None:
        check_ranges(self, key)


class Redactor:
    """`redactor(argv)` -> the command line as one string, secret values replaced by ***.

    Linear in the length of the command line, whatever it holds: the built-in rules are scans of
    each word (no regular expression that can backtrack), and the configured patterns run on RE2.
    An argument holding spaces (`sh -c "mysql -px"`, `-H "Authorization: Basic x"`) is read as a
    command line of its own, so a wrapper hides nothing. Hidden:
    - the value of an option, variable or key whose name has a secret part (`secret_names`
      anywhere in it, `secret_suffixes` at the end of one of its words: --password x,
      --db-password=x, --secretKey:x, API_KEY=x, ?token=x, ;password=x, pass:x), glued with = or
      :, or the next word unless that is a --long-option (`--password -x` hides -x);
    - a header-like `Name: value` with such a name: the rest of that argument;
    - the userinfo of any URL (scheme://user:***@host, scheme://***@host);
    - a command's password options (`password_options`; `mysql -px`, `timeout 5 mysql -p x`,
      `curl -u user:x`, `docker login -p x`), from the word naming that command on;
    - what the patterns mark (the group named `secret`, else the whole match)."""

    def __init__(self, cfg):
        self.names = tuple(n.lower() for n in cfg.secret_names)
        self.suffixes = tuple(n.lower() for n in cfg.secret_suffixes)
        self.options = tuple((glob, tuple(options.split())) for glob, options in cfg.password_options.items())
        self.patterns = tuple(compile_pattern(p) for p in cfg.patterns)
        self._options_of: dict = {}           # a word -> the password options it brings, or ()

    def secret_name(self, name: str) -> bool:
        """Has `name` (an option, variable or header name: _NAME's characters) a secret part?"""
        lower = name.lower()
        if any(n in lower for n in self.names):
            return True
        for suffix in self.suffixes:          # at the end of a word of the name: API_KEY, secretKey, x-api-key
            at = lower.find(suffix)
            while at != -1:
                end = at + len(suffix)
                if end == len(name) or not name[end].isalnum() or (name[end].isupper() and name[end - 1].islower()):
                    return True
                at = lower.find(suffix, at + 1)
        return False

    def _password_options(self, word: str) -> tuple:
        if len(word) > 255:                   # longer than any file name: names no command
            return ()
        if word not in self._options_of:
            if len(self._options_of) >= 1024:
                self._options_of.clear()
            base = word.rpartition("/")[2]
            self._options_of[word] = next(
                (options for glob, options in self.options if fnmatch.fnmatchcase(base, glob)), ())
        return self._options_of[word]

    def __call__(self, argv) -> str:
        out = " ".join(self._line(argv, nested=False))
        for pattern in self.patterns:
            out = _hide_matches(pattern, out)
        return out

    def _line(self, words, nested: bool) -> list:
        """The words of one command line, redacted. `nested`: the words of one argument (its rest
        is a header's value)."""
        out = []
        options: tuple = ()
        pending = None                        # "next": the next word is a value; "rest": all that follows
        for word in words:
            options = self._password_options(word) or options
            if pending == "rest":
                if word.lower() in _AUTH_SCHEMES:
                    out.append(word)          # Authorization: Bearer ***
                    continue
                out.append(REDACTED)
                break
            if pending == "next":
                pending = None
                if not word.startswith("--"):
                    out.append(REDACTED)
                    continue
            if not nested and any(c.isspace() for c in word):
                out.append(" ".join(self._line(word.split(), nested=True)))
                continue
            hidden = _option_value(word, options)
            if hidden is not None:
                out.append(hidden)
                pending = "next" if hidden == word else None
                continue
            word, pending = self._word(word, nested)
            out.append(word)
        return out

    def _word(self, word: str, nested: bool) -> tuple:
        """(the word with its secret parts hidden, what it makes of the words after it)."""
        bare = word.lstrip(_NAME_PREFIX)
        cut = min((i for i in (bare.find("="), bare.find(":")) if i != -1), default=-1)
        name = bare if cut == -1 else bare[:cut]
        if name and _NAME.fullmatch(name) and self.secret_name(name):
            if cut == -1:                     # --password x
                return word, ("next" if word.startswith("-") else None)
            value = bare[cut + 1:]
            if not value:                     # Authorization: x, --password= x
                return word, ("rest" if nested and bare[cut] == ":" else "next")
            if not value.startswith("//"):    # not a URL: --password=x, API_KEY=x, pass:x
                return word[:len(word) - len(value)] + REDACTED, None
        header = word[:-1].rpartition("=")[2].lstrip(_NAME_PREFIX) if nested and word.endswith(":") else ""
        if header and _NAME.fullmatch(header) and self.secret_name(header):
            return word, "rest"               # --header=Authorization: x
        if "=" in word:
            word = "".join(self._pair(piece) for piece in _PAIRS.split(word))
        if "://" in word:
            word = _hide_userinfo(word)
        return word, None

    def _pair(self, piece: str) -> str:
        name, eq, value = piece.partition("=")
        name = name.lstrip(_NAME_PREFIX)
        if eq and value and _NAME.fullmatch(name) and self.secret_name(name):
            return piece[:len(piece) - len(value)] + REDACTED
        return piece


def _option_value(word: str, options: tuple):
    """`word` with the value of one of a command's password `options` hidden (-px, --user=x);
    `word` itself when it is such an option and its value is the next word; else None."""
    for option in options:
        if word == option:
            return word
        if word.startswith(option) and len(word) > len(option):
            if option.startswith("--"):
                if word[len(option)] == "=":
                    return option + "=" + REDACTED
            else:
                return option + REDACTED
    return None


def _hide_userinfo(word: str) -> str:
    """`word` with the userinfo of each URL in it hidden: scheme://user:***@host (the password may
    hold a /), scheme://***@host (a token given as the user name; not when it holds a /: that is a
    path with an @ in it)."""
    out = []
    done = 0
    at_scheme = word.find("://")
    while at_scheme != -1:
        start = at_scheme + 3
        following = word.find("://", start)
        end = len(word) if following == -1 else following
        at = word.rfind("@", start, end)
        if at != -1:
            colon = word.find(":", start, at)
            if colon != -1:
                out += [word[done:colon + 1], REDACTED]
                done = at
            elif word.find("/", start, at) == -1:
                out += [word[done:start], REDACTED]
                done = at
        at_scheme = following
    out.append(word[done:])
    return "".join(out)


def _hide_matches(pattern, text: str) -> str:
    """`text` with what `pattern` matches hidden: its group named `secret` if it has one and it
    took part in the match, else the whole match."""
    group = pattern.groupindex.get("secret")

    def hide(m) -> str:
        g = group if group is not None and m.start(group) != -1 else 0
        whole = m.group(0)
        return whole[:m.start(g) - m.start()] + REDACTED + whole[m.end(g) - m.start():]
    return pattern.sub(hide, text)


# --- cgroups -------------------------------------------------------------------------------------

# a container's cgroup directory: <64 hex>, or <runtime>-<64 hex>[.scope]; conmon's is not one
_CONTAINER_DIR = re.compile(
    r"(?:(?:docker|cri-containerd|crio|libpod|containerd|nerdctl|cri-o)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?")
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")   # systemd units that hold processes


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
        if part.endswith(UNIT_SUFFIXES):
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


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list:
    """(filesystem type, super options, mount point) of each mount in `mountinfo`; [] when it
    cannot be read."""
    out = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, point = right.split(), left.split()[4:5]
                if len(fields) >= 3 and point:
                    out.append((fields[0], fields[2], point[0]))
    except OSError:
        pass
    return out


def cgroup2_mount() -> Optional[str]:
    return next((point for fstype, _, point in mounts() if fstype == "cgroup2"), None)


class CgroupPaths:
    """cgroup v2 id -> path relative to the cgroup2 root ("/system.slice/x.service"), asked of
    the kernel each time (open_by_handle_at; callers keep the answers: workload.WorkloadResolver).
    Needs CAP_DAC_READ_SEARCH. Thread-safe: close() waits for a lookup using the mount's fd."""

    def __init__(self, mount: Optional[str] = None):
        self.mount = mount if mount is not None else cgroup2_mount()
        self._mount_fd = -1
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._lock = threading.Lock()
        if self.mount:
            try:
                self._mount_fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                self.mount = None

    def find(self, cgroup_id: int) -> tuple[Optional[str], bool]:
        """(the path or None, whether the kernel says there is no such cgroup any more). None and
        False: no cgroup2 mount, no permission, or another error (the cgroup may exist)."""
        if not cgroup_id:
            return None, True
        handle = _FileHandle(8, FILEID_KERNFS, cgroup_id)
        with self._lock:
            if self._mount_fd < 0:
                return None, False
            fd = self._libc.open_by_handle_at(self._mount_fd, ctypes.byref(handle), O_PATH)
            err = ctypes.get_errno()
        if fd < 0:
            return None, err in (errno.ESTALE, errno.ENOENT)
        try:
            full = decoded(os.readlink(f"/proc/self/fd/{fd}".encode()))
        except OSError:
            return None, False
        finally:
            os.close(fd)
        relative = os.path.relpath(full, self.mount)
        return ("/" if relative == "." else "/" + relative), False

    def path(self, cgroup_id: int) -> Optional[str]:
        """The path, or None: no such cgroup (any more), no cgroup2 mount, or no permission."""
        return self.find(cgroup_id)[0]

    def close(self) -> None:
        with self._lock:
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


def _read(path: str, mode: str = "r", limit: int = -1):
    """A /proc file: bytes in mode "rb", else text with invalid bytes replaced by U+FFFD."""
    with open(path, mode) if mode == "rb" else open(path, encoding="utf-8", errors="replace") as f:
        return f.read(limit)


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


def proc_cmdline(pid: int) -> list:
    """The arguments of the process at `pid` (the first CMDLINE_MAX bytes of them; [] if it is gone,
    hidden from us, or a kernel thread)."""
    try:
        return cmdline_argv(_read(f"/proc/{pid}/cmdline", "rb", CMDLINE_MAX + 1))
    except OSError:
        return []


def cmdline_argv(raw: bytes) -> list:
    """The arguments in a /proc/<pid>/cmdline's bytes, the first CMDLINE_MAX bytes of them."""
    if len(raw) > CMDLINE_MAX:
        return split_argv(raw[:CMDLINE_MAX], cut=True)
    # a process that rewrote its arguments (setproctitle) may leave no NUL at the end
    return split_argv(raw if raw.endswith(b"\0") or not raw else raw + b"\0", cut=False)


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
        attrs.append(("process.executable.path", decoded(os.readlink(f"{base}/exe".encode()))))
    except OSError:
        pass
    if redactor is not None:
        argv = proc_cmdline(pid)
        if argv:
            attrs.append(("process.command_line", redactor(argv)))
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
