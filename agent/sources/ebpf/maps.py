"""BPF maps and programs by file descriptor, through the bpf(2) system call.

Both loaders (libbpf for CO-RE objects, bcc for the fallback) hand the probes map fds; this module
is the one way the probes read them, so no probe module depends on either loader:

    BpfMap.from_fd(fd, name)      type, key/value sizes and max_entries from the kernel (map info)
      .lookup(key) / .update(key, value, flags) / .delete(key) / .keys()
      .read(key_dtype)            every entry, BPF_MAP_LOOKUP_BATCH where the kernel has it
      .sum(key)                   a per-CPU value summed over the CPUs, as u64
    prog_stats(fd)                a program's run_time_ns, run_cnt, recursion_misses
    program_btf(fd)               the BTF it was loaded with (btf.Btf), read from the kernel
    enable_stats()                BPF_ENABLE_STATS: an fd; run-time stats are on while it is open
    bpf(cmd, attr), obj_info(fd, info)   the system call

Keys and values are bytes, ctypes objects, numpy scalars or ints. Errors are OSError with
the kernel's errno.
"""
from __future__ import annotations

import ctypes as ct
import errno
import functools
import os
import platform
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from agent.sources.ebpf.btf import MAX_BTF, Btf, BtfError

# bpf(2) commands (linux/bpf.h enum bpf_cmd)
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_GET_INFO_BY_FD = 15
BTF_GET_FD_BY_ID = 19
MAP_LOOKUP_BATCH = 24
ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

# map types whose values have one copy per possible CPU
PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH = 5, 6, 10
_PERCPU_TYPES = frozenset({PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH})

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_NO_BATCH = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def bpf(cmd: int, attr: ct.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2): unknown syscall number on {platform.machine()}")
    res = _libc.syscall(ct.c_long(nr), ct.c_int(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr)))
    if res < 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return res


def _raw(x, size: int) -> bytes:
    """Key or value bytes from bytes, a ctypes object, a numpy scalar/array, or an int (stored
    little-endian in `size` bytes: array indexes, u32/u64 keys)."""
    if isinstance(x, int):
        return x.to_bytes(size, "little")
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tobytes()
    return bytes(x)


def _addr(buf) -> int:
    return ct.addressof(buf) if buf is not None else 0


class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("_pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _StatsAttr(ct.Structure):
    _fields_ = [("type", ct.c_uint32)]


class _MapInfo(ct.Structure):
    """struct bpf_map_info, the part we read (the kernel fills what info_len asks for)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


class _ProgInfo(ct.Structure):
    """struct bpf_prog_info up to recursion_misses (offsets checked in tests/test_ebpf_maps.py)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("_a", ct.c_uint8 * 56),
                ("name", ct.c_char * 16), ("_b", ct.c_uint8 * 48), ("btf_id", ct.c_uint32), ("_c", ct.c_uint8 * 60),
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64), ("recursion_misses", ct.c_uint64)]


def obj_info(fd: int, info: ct.Structure) -> ct.Structure:
    attr = _InfoAttr(fd, ct.sizeof(info), ct.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr)
    return info


@functools.lru_cache(maxsize=1)
def possible_cpus() -> int:
    """CPUs the kernel may bring online (per-CPU map values have this many copies)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@dataclass(frozen=True)
class ProgStats:
    run_time_ns: int
    run_cnt: int
    recursion_misses: int


class _BtfInfo(ct.Structure):
    _fields_ = [("btf", ct.c_uint64), ("btf_size", ct.c_uint32), ("id", ct.c_uint32),
                ("name", ct.c_uint64), ("name_len", ct.c_uint32), ("kernel_btf", ct.c_uint32)]


class _IdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


def program_btf(fd: int) -> Optional[Btf]:
    """The BTF the program `fd` (and so its object) was loaded with, or None."""
    btf_id = obj_info(fd, _ProgInfo()).btf_id
    if not btf_id:
        return None
    btf_fd = bpf(BTF_GET_FD_BY_ID, _IdAttr(btf_id, 0, 0))
    try:
        size = obj_info(btf_fd, _BtfInfo()).btf_size
        if size > MAX_BTF:
            raise BtfError(f"object BTF of {size} bytes")
        buf = ct.create_string_buffer(size)
        obj_info(btf_fd, _BtfInfo(ct.addressof(buf), size))
    finally:
        os.close(btf_fd)
    return Btf(buf.raw)


def prog_stats(fd: int) -> ProgStats:
    """Time spent in and runs of the program `fd` (counted while stats are enabled), and the events
    it missed because another BPF program was running on that CPU."""
    info = obj_info(fd, _ProgInfo())
    return ProgStats(info.run_time_ns, info.run_cnt, info.recursion_misses)


def enable_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every BPF program run while the
    returned fd is open (close it to turn stats off again)."""
    return bpf(ENABLE_STATS, _StatsAttr(BPF_STATS_RUN_TIME))


class BpfMap:
    """One BPF map, by fd (the fd stays owned by the loader that opened the map)."""

    def __init__(self, fd: int, name: str, type: int, key_size: int, value_size: int, max_entries: int):
        self.fd, self.name, self.type = fd, name, type
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self.percpu = type in _PERCPU_TYPES
        self.cpus = possible_cpus() if self.percpu else 1
        # the kernel copies per-CPU values rounded up to 8 bytes, one per possible CPU
        self.slot_size = (value_size + 7) & ~7 if self.percpu else value_size
        self.buffer_size = self.slot_size * self.cpus

    @classmethod
    def from_fd(cls, fd: int, name: str = "") -> "BpfMap":
        info = obj_info(fd, _MapInfo())
        return cls(fd, name or info.name.decode(), info.type, info.key_size, info.value_size,
                   info.max_entries)

    def __repr__(self) -> str:
        return f"BpfMap({self.name!r}, fd={self.fd}, type={self.type})"

    def _key(self, key) -> ct.Array:
        raw = _raw(key, self.key_size)
        if len(raw) != self.key_size:
            raise ValueError(f"map {self.name!r}: key is {self.key_size} bytes, got {len(raw)}")
        return ct.create_string_buffer(raw, self.key_size)

    def lookup(self, key) -> Optional[bytes]:
        """The value (all CPUs' copies for a per-CPU map), or None if there is no such key."""
        k, v = self._key(key), ct.create_string_buffer(self.buffer_size)
        try:
            bpf(MAP_LOOKUP_ELEM, _ElemAttr(self.fd, 0, _addr(k), _addr(v), 0))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        raw = _raw(value, self.buffer_size)
        if len(raw) != self.buffer_size:
            raise ValueError(f"map {self.name!r}: value is {self.buffer_size} bytes, got {len(raw)}")
        k, v = self._key(key), ct.create_string_buffer(raw, self.buffer_size)
        bpf(MAP_UPDATE_ELEM, _ElemAttr(self.fd, 0, _addr(k), _addr(v), flags))

    def delete(self, key) -> bool:
        try:
            k = self._key(key)          # kept alive across the call
            bpf(MAP_DELETE_ELEM, _ElemAttr(self.fd, 0, _addr(k), 0, 0))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key (a hash map changing meanwhile may restart the walk: the kernel's rule)."""
        key, nxt = None, ct.create_string_buffer(self.key_size)
        while True:
            try:
                bpf(MAP_GET_NEXT_KEY, _ElemAttr(self.fd, 0, _addr(key), _addr(nxt), 0))
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            yield nxt.raw
            key = ct.create_string_buffer(nxt.raw, self.key_size)

    def sum(self, key) -> int:
        """A u64 value summed over CPUs (0 when the key is absent)."""
        raw = self.lookup(key)
        if raw is None:
            return 0
        return int(np.frombuffer(raw, dtype=np.uint64)[::self.slot_size // 8].sum(dtype=np.uint64))

    def words(self) -> int:
        """u64 words per value (per CPU)."""
        if self.value_size % 8:
            raise ValueError(f"map {self.name!r}: value size {self.value_size} is not a whole number of u64")
        return self.value_size // 8

    def read(self, key_dtype, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Every entry: (keys as an array of `key_dtype`, values as uint64 words of shape
        (n, words), per-CPU copies summed). Batch lookups where the kernel has them (one
        syscall per chunk instead of two per key), else key by key."""
        key_dtype = np.dtype(key_dtype)
        if key_dtype.itemsize != self.key_size:
            raise ValueError(f"map {self.name!r}: key is {self.key_size} bytes, "
                             f"{key_dtype} is {key_dtype.itemsize}")
        words = self.words()
        try:
            return self._read_batch(key_dtype, words, chunk)
        except _BatchUnsupported:
            return self._read_iter(key_dtype, words)

    def _read_batch(self, key_dtype, words, chunk):
        # the batch token of a hash map is a bucket index (u32); a key-sized buffer fits any map type
        token_size = max(self.key_size, 8)
        in_token, out_token = ct.create_string_buffer(token_size), ct.create_string_buffer(token_size)
        slot_words = self.slot_size // 8
        key_parts, value_parts = [], []
        first = True
        while True:
            keys = np.zeros(chunk, dtype=key_dtype)
            values = np.zeros((chunk, self.cpus, slot_words), dtype=np.uint64)
            attr = _BatchAttr(0 if first else _addr(in_token), _addr(out_token), keys.ctypes.data,
                              values.ctypes.data, chunk, self.fd, 0, 0)
            err = 0
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except OSError as e:
                err = e.errno
            n = attr.count
            if n:
                key_parts.append(keys[:n])
                value_parts.append(values[:n, :, :words].sum(axis=1, dtype=np.uint64))
            if err:
                if err == errno.ENOENT:
                    break                           # the end of the map
                if err == errno.ENOSPC and n == 0:
                    chunk *= 2                      # one hash bucket holds more than a chunk
                    continue
                if first and n == 0 and err in _NO_BATCH:
                    raise _BatchUnsupported()
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on {self.name!r}: {errno.errorcode.get(err, err)}")
            ct.memmove(in_token, out_token, token_size)
            first = False
        if not key_parts:
            return np.zeros(0, dtype=key_dtype), np.zeros((0, words), dtype=np.uint64)
        return np.concatenate(key_parts), np.concatenate(value_parts)

    def _read_iter(self, key_dtype, words):
        keys, values = [], []
        slot_words = self.slot_size // 8
        for k in self.keys():
            raw = self.lookup(k)
            if raw is None:                 # deleted meanwhile
                continue
            keys.append(k)
            v = np.frombuffer(raw, dtype=np.uint64).reshape(self.cpus, slot_words)[:, :words]
            values.append(v.sum(axis=0, dtype=np.uint64))
        if not keys:
            return np.zeros(0, dtype=key_dtype), np.zeros((0, words), dtype=np.uint64)
        return np.frombuffer(b"".join(keys), dtype=key_dtype), np.array(values, dtype=np.uint64)


class _BatchUnsupported(Exception):
    pass
