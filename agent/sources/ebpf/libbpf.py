"""CO-RE objects through the system libbpf (libbpf.so.1), with ctypes.

Why ctypes and not a binding: the few calls a loader needs (open, set .rodata, autoload, load,
attach, map fds, close) are a stable C ABI in libbpf 1.x, and the system library is already on
every host that had bcc (libbpf1 is a dependency of libbpfcc) -- so the agent needs no compiled
extension, no PyPI wheel pinned to a libbpf version, and no compiler. The maintained Python
bindings either wrap bcc (not libbpf) or build libbpf from source into a wheel. Reading maps does
not go through libbpf at all (maps.py uses bpf(2) on the fds), so both loaders share it.

    obj = BpfObject.open(path)            parse the ELF, nothing in the kernel yet
    obj.set_rodata({"name": value})       `const volatile` globals, by name (the object's BTF)
    obj.set_max_entries(map, n)           size a map before load
    obj.set_autocreate(map, False)        leave out a map no loaded program uses
    obj.programs()                        {program name: section}
    obj.set_autoload(name, False)         leave a program out of the load
    obj.load()                            relocate against the running kernel's BTF, verify;
                                          LibbpfError carries libbpf's log (the verifier's) on failure
    obj.attach()                          attach every loaded program by its section
    obj.map_fd(name) / obj.program_fds() / obj.btf_data()
    obj.close()                           detach, unload, close every fd

    KernelBtf.open(path)                  the running kernel's BTF, parsed by libbpf (~7 ms in C,
                                          against ~40 ms for btf.py): member offsets, enum values

libbpf prints only for an object opened with `messages=True` (the loader asks for them when it
loads again an object that failed): to the `hostagent.ebpf.libbpf` logger (debug; warnings and
errors at their level), the last LOG_BYTES of them kept per call so the failure can say why.
Otherwise libbpf prints nothing: a Python print function costs each of its messages the GIL,
and a load then waits for it while another thread runs Python (2-10x slower loads measured).
"""
from __future__ import annotations

import ctypes as ct
import logging
import os
import platform
import threading
from typing import Mapping, Optional

from agent.sources.ebpf import btf as btf_

log = logging.getLogger("hostagent.ebpf.libbpf")

LIBRARY = "libbpf.so.1"
LOG_BYTES = 64 * 1024           # libbpf output kept (and logged per message): verifier logs can be MBs
MAX_MESSAGE = 16 << 20          # the most one message can be: libbpf's verifier log buffer is at most 16 MiB
# va_copy of a va_list argument, by architecture: on x86-64 it is a copy of the 24-byte struct the
# argument points to; elsewhere a message longer than the first buffer keeps its beginning only
_VA_LIST_BYTES = {"x86_64": 24}.get(platform.machine())
_PRINT_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}   # LIBBPF_WARN, INFO, DEBUG


class LibbpfError(Exception):
    """A libbpf call failed; `log` holds what libbpf printed meanwhile (bounded)."""

    def __init__(self, message: str, log_text: str = ""):
        super().__init__(message)
        self.log = log_text


class _OpenOpts(ct.Structure):
    """struct bpf_object_open_opts of libbpf 1.x (newer versions take this size as is)."""
    _fields_ = [("sz", ct.c_size_t), ("object_name", ct.c_char_p), ("relaxed_maps", ct.c_bool),
                ("pin_root_path", ct.c_char_p), ("_stub", ct.c_uint32), ("kconfig", ct.c_char_p),
                ("btf_custom_path", ct.c_char_p), ("kernel_log_buf", ct.c_char_p),
                ("kernel_log_size", ct.c_size_t), ("kernel_log_level", ct.c_uint32)]


class _BtfType(ct.Structure):
    _fields_ = [("name_off", ct.c_uint32), ("info", ct.c_uint32), ("size", ct.c_uint32)]


class _VarSecinfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("offset", ct.c_uint32), ("size", ct.c_uint32)]


class _BtfMember(ct.Structure):
    _fields_ = [("name_off", ct.c_uint32), ("type", ct.c_uint32), ("offset", ct.c_uint32)]


class _BtfEnum(ct.Structure):
    _fields_ = [("name_off", ct.c_uint32), ("val", ct.c_int32)]


class _BtfEnum64(ct.Structure):
    _fields_ = [("name_off", ct.c_uint32), ("val_lo32", ct.c_uint32), ("val_hi32", ct.c_uint32)]


_lib = None
_lib_lock = threading.Lock()
_capture = threading.local()
_PRINT_FN = ct.CFUNCTYPE(ct.c_int, ct.c_int, ct.c_char_p, ct.c_void_p)
_NO_PRINT = ct.cast(None, _PRINT_FN)
_printing = 0                   # calls in a _Captured block: libbpf prints while there is one
_libc = ct.CDLL(None)
_libc.vsnprintf.argtypes = [ct.c_char_p, ct.c_size_t, ct.c_char_p, ct.c_void_p]


def _format(fmt: bytes, args: int) -> str:
    """printf(fmt, args...) of a libbpf message, whole up to MAX_MESSAGE bytes."""
    buf = ct.create_string_buffer(4096)
    saved = ct.create_string_buffer(ct.string_at(args, _VA_LIST_BYTES), _VA_LIST_BYTES) if _VA_LIST_BYTES else None
    n = _libc.vsnprintf(buf, len(buf), fmt, args)
    if n >= len(buf) and saved is not None:
        buf = ct.create_string_buffer(min(n, MAX_MESSAGE) + 1)
        _libc.vsnprintf(buf, len(buf), fmt, ct.addressof(saved))
    return buf.value.decode("utf-8", "replace")


def _tail(text: str) -> str:
    """`text` cut to about LOG_BYTES: its first line and its end, where the verifier's error is."""
    if len(text) <= LOG_BYTES:
        return text
    head = text[:text.find("\n") + 1 or 200][:200]
    return f"{head}... {len(text) - len(head) - LOG_BYTES} bytes left out ...\n{text[-LOG_BYTES:]}"


@_PRINT_FN
def _print(level, fmt, args):
    text = _tail(_format(fmt, args))
    log.log(_PRINT_LEVELS.get(level, logging.DEBUG), "%s", text.rstrip("\n"))
    kept = getattr(_capture, "text", None)
    if kept is not None:                # keep the last 2 * LOG_BYTES: the error is at the end
        _capture.text = (kept + text)[-2 * LOG_BYTES:]
    return 0


def problem() -> Optional[str]:
    """Why libbpf cannot be used here, or None."""
    try:
        library()
    except OSError as e:
        return f"{LIBRARY} is not loadable ({e}); install libbpf1"
    return None


def library():
    """The system libbpf, its prototypes declared, its messages routed to our logger (once)."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        lib = ct.CDLL(LIBRARY, use_errno=True)
        p, i, s, b = ct.c_void_p, ct.c_int, ct.c_char_p, ct.c_bool
        for name, restype, argtypes in (
                ("bpf_object__open_file", p, [s, ct.POINTER(_OpenOpts)]),
                ("bpf_object__load", i, [p]),
                ("bpf_object__close", None, [p]),
                ("bpf_object__btf", p, [p]),
                ("bpf_object__next_program", p, [p, p]),
                ("bpf_object__find_program_by_name", p, [p, s]),
                ("bpf_object__find_map_by_name", p, [p, s]),
                ("bpf_object__find_map_fd_by_name", i, [p, s]),
                ("bpf_program__name", s, [p]),
                ("bpf_program__section_name", s, [p]),
                ("bpf_program__set_autoload", i, [p, b]),
                ("bpf_program__autoload", b, [p]),
                ("bpf_program__fd", i, [p]),
                ("bpf_program__attach", p, [p]),
                ("bpf_link__destroy", i, [p]),
                ("bpf_map__initial_value", p, [p, ct.POINTER(ct.c_size_t)]),
                ("bpf_map__set_max_entries", i, [p, ct.c_uint32]),
                ("bpf_map__set_autocreate", i, [p, b]),
                ("btf__find_by_name_kind", i, [p, s, ct.c_uint32]),
                ("btf__type_by_id", ct.POINTER(_BtfType), [p, ct.c_uint32]),
                ("btf__name_by_offset", s, [p, ct.c_uint32]),
                ("btf__raw_data", p, [p, ct.POINTER(ct.c_uint32)]),
                ("btf__parse", p, [s, p]),
                ("btf__resolve_type", i, [p, ct.c_uint32]),
                ("btf__free", None, [p]),
                ("libbpf_strerror", i, [i, ct.c_char_p, ct.c_size_t]),
                ("libbpf_set_print", p, [_PRINT_FN])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        lib.libbpf_set_print(_NO_PRINT)
        _lib = lib
        return lib


class _Captured:
    """libbpf's messages printed by this thread during a call, for the error: with `messages`,
    libbpf prints (to _print) while any thread is in such a block; without, this thread adds
    no printing and keeps nothing."""

    def __init__(self, messages: bool = True):
        self.messages, self.text = messages, ""

    def __enter__(self):
        global _printing
        if self.messages:
            lib = library()
            with _lib_lock:     # bcc uses the same system libbpf and sets its own print function
                _printing += 1
                lib.libbpf_set_print(_print)
            _capture.text = ""
        return self

    def __exit__(self, *exc):
        global _printing
        if self.messages:
            self.text = _capture.text
            _capture.text = None
            with _lib_lock:
                _printing -= 1
                if not _printing:
                    _lib.libbpf_set_print(_NO_PRINT)
        return False


def strerror(err: int) -> str:
    """An errno, or one of libbpf's own (4000 and up, e.g. a file that is no BPF object), in words."""
    buf = ct.create_string_buffer(128)
    library().libbpf_strerror(abs(err), buf, len(buf))
    return buf.value.decode(errors="replace") or os.strerror(abs(err))


def _errno_error(what: str, captured: _Captured, err: int) -> LibbpfError:
    detail = strerror(err) if err else "failed"
    return LibbpfError(f"{what}: {detail}", captured.text)


class BpfObject:
    """One BPF object file: opened, then loaded and attached as a whole (see module doc)."""

    def __init__(self, lib, handle: int, path: str, messages: bool = False):
        self._lib, self._obj, self.path, self.messages = lib, handle, path, messages
        self._links: list = []

    @classmethod
    def open(cls, path: str, kernel_btf: Optional[str] = None, messages: bool = False) -> "BpfObject":
        """`kernel_btf`: relocate against this BTF file (the running kernel's) and never look in
        kernel modules' BTF, which libbpf 1.1 cannot list without CAP_SYS_ADMIN: a relocation
        with no candidate in vmlinux (a struct flavour for other kernels) then fails the load
        under the packaged unit's CAP_BPF + CAP_PERFMON. `messages`: libbpf's messages while
        this object is opened, loaded and attached are logged and kept for its errors."""
        lib = library()
        opts = _OpenOpts(sz=ct.sizeof(_OpenOpts))
        if kernel_btf:
            opts.btf_custom_path = kernel_btf.encode()
        with _Captured(messages) as c:
            ct.set_errno(0)
            handle = lib.bpf_object__open_file(path.encode(), ct.byref(opts))
        if not handle:
            raise _errno_error(f"open {path}", c, ct.get_errno())
        return cls(lib, handle, path, messages)

    def _programs(self):
        prog = self._lib.bpf_object__next_program(self._obj, None)
        while prog:
            yield prog
            prog = self._lib.bpf_object__next_program(self._obj, prog)

    def programs(self) -> dict:
        """{program name: ELF section}, e.g. {"sched__sched_switch": "tp/sched/sched_switch"}."""
        return {self._lib.bpf_program__name(p).decode(): self._lib.bpf_program__section_name(p).decode()
                for p in self._programs()}

    def set_autoload(self, name: str, autoload: bool) -> None:
        prog = self._lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise LibbpfError(f"{self.path}: no program {name!r}")
        err = self._lib.bpf_program__set_autoload(prog, autoload)
        if err:
            raise LibbpfError(f"{self.path}: autoload {name}: {strerror(err)}")

    def rodata_layout(self) -> dict:
        """{variable name: (offset, size)} of the object's .rodata section, from its BTF DATASEC."""
        lib = self._lib
        btf = lib.bpf_object__btf(self._obj)
        if not btf:
            return {}
        sec_id = lib.btf__find_by_name_kind(btf, b".rodata", btf_.DATASEC)
        if sec_id <= 0:
            return {}
        sec = lib.btf__type_by_id(btf, sec_id)
        vlen = sec.contents.info & 0xFFFF
        infos = ct.cast(ct.addressof(sec.contents) + ct.sizeof(_BtfType), ct.POINTER(_VarSecinfo))
        layout = {}
        for i in range(vlen):
            var = lib.btf__type_by_id(btf, infos[i].type)
            if (var.contents.info >> 24) & 0x1F != btf_.VAR:
                continue
            name = lib.btf__name_by_offset(btf, var.contents.name_off).decode()
            layout[name] = (infos[i].offset, infos[i].size)
        return layout

    def btf_data(self) -> Optional[bytes]:
        """The object's own BTF, as raw bytes (None if it has none). Read from libbpf's memory:
        asking the kernel for a loaded object's BTF by id needs CAP_SYS_ADMIN."""
        btf = self._lib.bpf_object__btf(self._obj)
        if not btf:
            return None
        size = ct.c_uint32(0)
        data = self._lib.btf__raw_data(btf, ct.byref(size))
        return ct.string_at(data, size.value) if data else None

    def set_rodata(self, values: Mapping[str, int]) -> None:
        """Set `const volatile` globals before load. Every name must be a .rodata variable of the
        object; integers are stored little-endian in the variable's size (range-checked)."""
        if not values:
            return
        layout = self.rodata_layout()
        missing = sorted(set(values) - set(layout))
        if missing:
            raise LibbpfError(f"{self.path}: no .rodata variable {', '.join(missing)}")
        rodata = self._lib.bpf_object__find_map_by_name(self._obj, b".rodata")
        size = ct.c_size_t(0)
        base = self._lib.bpf_map__initial_value(rodata, ct.byref(size)) if rodata else None
        if not base:
            raise LibbpfError(f"{self.path}: .rodata is not writable")
        for name, value in values.items():
            offset, width = layout[name]
            if offset + width > size.value:
                raise LibbpfError(f"{self.path}: .rodata variable {name} lies outside the section")
            try:
                raw = int(value).to_bytes(width, "little", signed=int(value) < 0)
            except OverflowError:
                raise LibbpfError(f"{self.path}: {name}={value} does not fit its {width} bytes") from None
            ct.memmove(base + offset, raw, width)

    def set_max_entries(self, name: str, entries: int) -> None:
        """Size the map `name` before load (a ring buffer's bytes: a power-of-two number of pages)."""
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise LibbpfError(f"{self.path}: no map {name!r}")
        err = self._lib.bpf_map__set_max_entries(m, entries)
        if err:
            raise LibbpfError(f"{self.path}: max_entries of {name}: {strerror(err)}")

    def set_autocreate(self, name: str, create: bool) -> None:
        """Whether the map `name` is created at load (its fd is then -1: map_fd raises KeyError)."""
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise LibbpfError(f"{self.path}: no map {name!r}")
        err = self._lib.bpf_map__set_autocreate(m, create)
        if err:
            raise LibbpfError(f"{self.path}: autocreate of {name}: {strerror(err)}")

    def load(self) -> None:
        with _Captured(self.messages) as c:
            err = self._lib.bpf_object__load(self._obj)
        if err:
            raise _errno_error(f"load {os.path.basename(self.path)}", c, -err)

    def attach(self) -> None:
        """Attach every loaded program (by its section name); all or nothing."""
        for prog in self._programs():
            if not self._lib.bpf_program__autoload(prog):
                continue
            with _Captured(self.messages) as c:
                ct.set_errno(0)
                link = self._lib.bpf_program__attach(prog)
            if not link:
                name = self._lib.bpf_program__name(prog).decode()
                raise _errno_error(f"attach {name}", c, ct.get_errno())
            self._links.append(link)

    def map_fd(self, name: str) -> int:
        fd = self._lib.bpf_object__find_map_fd_by_name(self._obj, name.encode())
        if fd < 0:
            raise KeyError(name)
        return fd

    def program_fds(self) -> dict:
        """{program name: fd} of the loaded programs."""
        fds = {}
        for prog in self._programs():
            fd = self._lib.bpf_program__fd(prog)
            if fd >= 0:
                fds[self._lib.bpf_program__name(prog).decode()] = fd
        return fds

    def close(self) -> None:
        for link in self._links:
            self._lib.bpf_link__destroy(link)
        self._links = []
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = None


class KernelBtf:
    """The running kernel's BTF as libbpf parses it, for the few kernel facts a probe asks before
    load (which variant this kernel supports; struct offsets for bcc). Same answers as btf.Btf."""

    def __init__(self, lib, handle: int):
        self._lib, self._btf = lib, handle

    @classmethod
    def open(cls, path: str) -> "KernelBtf":
        lib = library()
        with _Captured() as c:
            ct.set_errno(0)
            handle = lib.btf__parse(path.encode(), None)
        if not handle:
            raise _errno_error(f"BTF {path}", c, ct.get_errno())
        return cls(lib, handle)

    def _type(self, tid: int):
        t = self._lib.btf__type_by_id(self._btf, tid)
        if not t:
            raise LibbpfError(f"no BTF type {tid}")
        return t.contents

    def member_offset(self, struct_name: str, member: str) -> Optional[int]:
        """Byte offset of `member` in `struct struct_name`, through anonymous structs and
        unions; None when there is no such struct or member."""
        tid = self._lib.btf__find_by_name_kind(self._btf, struct_name.encode(), btf_.STRUCT)
        return None if tid <= 0 else self._find_member(tid, member.encode(), 0, 0)

    def _find_member(self, tid: int, member: bytes, base: int, depth: int) -> Optional[int]:
        if depth > 32:                      # anonymous members nest a few levels; a cycle is broken BTF
            raise LibbpfError("anonymous members nest too deep")
        t = self._type(tid)
        members = ct.cast(ct.addressof(t) + ct.sizeof(_BtfType), ct.POINTER(_BtfMember))
        for i in range(t.info & 0xFFFF):
            m = members[i]
            off = base + (m.offset & 0xFFFFFF if t.info >> 31 else m.offset) // 8   # kind_flag: bitfields
            if m.name_off:
                if self._lib.btf__name_by_offset(self._btf, m.name_off) == member:
                    return off
                continue
            inner = self._lib.btf__resolve_type(self._btf, m.type)
            if inner > 0 and (self._type(inner).info >> 24) & 0x1F in (btf_.STRUCT, btf_.UNION):
                found = self._find_member(inner, member, off, depth + 1)
                if found is not None:
                    return found
        return None

    def enumerator(self, name: str, enum: str) -> Optional[int]:
        """Value of the constant `name` of `enum enum`, or None."""
        for kind, entry in ((btf_.ENUM, _BtfEnum), (btf_.ENUM64, _BtfEnum64)):
            tid = self._lib.btf__find_by_name_kind(self._btf, enum.encode(), kind)
            if tid <= 0:
                continue
            t = self._type(tid)
            values = ct.cast(ct.addressof(t) + ct.sizeof(_BtfType), ct.POINTER(entry))
            for i in range(t.info & 0xFFFF):
                v = values[i]
                if self._lib.btf__name_by_offset(self._btf, v.name_off) == name.encode():
                    return v.val if kind == btf_.ENUM else v.val_hi32 << 32 | v.val_lo32
        return None

    def close(self) -> None:
        if self._btf:
            self._lib.btf__free(self._btf)
            self._btf = None
