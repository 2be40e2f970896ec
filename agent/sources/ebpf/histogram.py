"""In-kernel aggregates read from BPF maps: log2 histograms as exact OTLP exponential histograms.

The BPF side is bpf/include/maps.h: a histogram is a per-CPU hash keyed by {attributes..., slot}
whose value is {count, sum}. Slot 0 holds the value 0; slot s >= 1 holds 2^(s-2) < v <= 2^(s-1),
which is exactly OTLP's scale-0 bucket index s - 2 (buckets are upper-inclusive), so the point is
built without re-bucketing and its sum is the exact sum of the recorded values.

Maps are read whole with BPF_MAP_LOOKUP_BATCH where the kernel has it (one syscall per chunk
instead of two per key), per-CPU values summed over CPUs, and never cleared: points are
cumulative from the probe's load time.
"""
from __future__ import annotations

import ctypes as ct
import errno
import functools
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from agent.model import Attributes, ExponentialHistogramPoint

# mirrors of bpf/include/maps.h
MAX_SLOT = 65          # EXP2_MAX_SLOT: (2^63, 2^64), the whole u64 range
ZERO_SLOT = 0          # the value 0, OTLP zero_count
SLOT_TO_INDEX = -2     # OTLP bucket index = slot + SLOT_TO_INDEX, for slot >= 1
SCALE = 0


class Exp2Bucket(ct.Structure):
    """struct exp2_bucket: one histogram bucket per key."""
    _fields_ = [("count", ct.c_uint64), ("sum", ct.c_uint64)]


def value_slot(value: int) -> int:
    """The slot exp2_slot() in maps.h gives `value` (a u64)."""
    if value <= 1:
        return value
    return min((value - 1).bit_length() + 1, MAX_SLOT)


def slot_bounds(slot: int) -> tuple[int, int]:
    """(exclusive lower, inclusive upper) bound of the values a slot holds; (0, 0) for slot 0."""
    if slot == ZERO_SLOT:
        return 0, 0
    index = slot + SLOT_TO_INDEX
    return 2 ** index, 2 ** (index + 1)      # slot 1: (0.5, 1]


# --- reading maps ----------------------------------------------------------------------------

_PERCPU_TYPES = frozenset({5, 6, 10})   # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_NO_BATCH = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP


@functools.lru_cache(maxsize=1)
def _possible_cpus() -> int:
    from bcc.utils import get_possible_cpus
    return len(get_possible_cpus())


def _value_words(table) -> tuple[int, int]:
    """(u64 words per value per CPU, number of CPU copies) of a bcc table."""
    percpu = table.ttype in _PERCPU_TYPES
    leaf = table.sLeaf if percpu else table.Leaf
    size = ct.sizeof(leaf)
    if percpu:
        size = (size + 7) & ~7      # the kernel rounds per-CPU values up to 8 bytes
    if size % 8:
        raise ValueError(f"map {table._name!r}: value size {size} is not a whole number of u64")
    return size // 8, (_possible_cpus() if percpu else 1)


def read_map(table, key_type, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of a bcc hash or array map: (keys as a structured array of `key_type`,
    values as uint64 words of shape (n, words), per-CPU copies summed).

    `key_type` is the ctypes mirror of the C key; its size must equal the map's key size."""
    if ct.sizeof(key_type) != ct.sizeof(table.Key):
        raise ValueError(f"map {table._name!r}: key is {ct.sizeof(table.Key)} bytes, "
                         f"{key_type.__name__} is {ct.sizeof(key_type)}")
    key_dtype = np.dtype(key_type)
    words, ncpu = _value_words(table)
    try:
        return _read_batch(table, key_dtype, words, ncpu, chunk)
    except _BatchUnsupported:
        return _read_iter(table, key_dtype, words, ncpu)


class _BatchUnsupported(Exception):
    pass


def _read_batch(table, key_dtype, words, ncpu, chunk):
    # Not bcc's items_lookup_batch(): it allocates max_entries keys and values on every read and
    # passes one u32 as both the batch token and the count, which breaks reads needing two calls.
    from bcc.libbcc import lib
    in_token, out_token, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
    key_parts, value_parts = [], []
    first = True
    while True:
        keys = np.zeros(chunk, dtype=key_dtype)
        values = np.zeros((chunk, ncpu, words), dtype=np.uint64)
        count.value = chunk
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(in_token),
                                   ct.byref(out_token), keys.ctypes.data, values.ctypes.data,
                                   ct.byref(count))
        err = (ct.get_errno() or -res) if res != 0 else 0
        n = count.value
        if n:
            key_parts.append(keys[:n])
            value_parts.append(values[:n].sum(axis=1, dtype=np.uint64))
        if res != 0:
            if err == errno.ENOENT:
                break                           # the end of the map
            if err == errno.ENOSPC and n == 0:
                chunk *= 2                      # one hash bucket holds more than a chunk
                continue
            if first and n == 0 and err in _NO_BATCH:
                raise _BatchUnsupported()
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on {table._name!r}: {errno.errorcode.get(err, err)}")
        in_token.value = out_token.value
        first = False
    if not key_parts:
        return np.zeros(0, dtype=key_dtype), np.zeros((0, words), dtype=np.uint64)
    return np.concatenate(key_parts), np.concatenate(value_parts)


def _read_iter(table, key_dtype, words, ncpu):
    keys, values = [], []
    for k, v in table.items():      # kernels without batch ops: two syscalls per key
        keys.append(bytes(k))
        values.append(np.frombuffer(bytes(v), dtype=np.uint64).reshape(ncpu, words).sum(axis=0))
    if not keys:
        return np.zeros(0, dtype=key_dtype), np.zeros((0, words), dtype=np.uint64)
    return np.frombuffer(b"".join(keys), dtype=key_dtype), np.array(values, dtype=np.uint64)


# --- histograms ------------------------------------------------------------------------------

# {raw attribute key (the key's fields except slot, as ints): {slot: [count, sum]}}
Exp2Buckets = dict


def read_exp2(table, key_type) -> Exp2Buckets:
    """A histogram map grouped by attribute set: {(key fields except slot): {slot: [count, sum]}}."""
    keys, values = read_map(table, key_type)
    if values.shape[1] != 2:
        raise ValueError(f"map {table._name!r}: values are not struct exp2_bucket {{count, sum}}")
    fields = [name for name, *_ in key_type._fields_ if name != "slot"]
    groups: dict = {}
    if not len(keys):
        return groups
    attr_columns = [keys[f].tolist() for f in fields]
    for i, slot in enumerate(keys["slot"].tolist()):
        count, total = int(values[i, 0]), int(values[i, 1])
        if not count:
            continue
        raw = tuple(col[i] for col in attr_columns)
        bucket = groups.setdefault(raw, {}).setdefault(slot, [0, 0])
        bucket[0] += count
        bucket[1] += total
    return groups


def exp2_point(buckets: Mapping[int, Iterable[int]], attributes: Attributes,
               start_ns: int, now_ns: int) -> ExponentialHistogramPoint:
    """One OTLP exponential histogram point (scale 0) from {slot: (count, sum)}."""
    zero_count = 0
    positive: dict = {}
    count = total = 0
    for slot, (c, s) in buckets.items():
        if not c:
            continue
        count += c
        total += s
        if slot == ZERO_SLOT:
            zero_count += c
        else:
            positive[slot] = positive.get(slot, 0) + c
    if positive:
        lo, hi = min(positive), max(positive)
        offset = lo + SLOT_TO_INDEX
        counts = [positive.get(s, 0) for s in range(lo, hi + 1)]
    else:
        offset, counts = 0, []
    return ExponentialHistogramPoint(
        attributes=attributes, start_time_ns=start_ns, time_ns=now_ns, count=count,
        sum=float(total), scale=SCALE, zero_count=zero_count, positive_offset=offset,
        positive_counts=counts)


def exp2_points(groups: Exp2Buckets, decode: Callable[[tuple], Optional[Attributes]],
                start_ns: int, now_ns: int) -> list:
    """Points for every attribute set; `decode` turns a raw key tuple into attributes (None
    skips it). Raw keys that decode to the same attributes are merged."""
    merged: dict = {}
    for raw, buckets in groups.items():
        attributes = decode(raw)
        if attributes is None:
            continue
        into = merged.setdefault(attributes, {})
        for slot, (c, s) in buckets.items():
            b = into.setdefault(slot, [0, 0])
            b[0] += c
            b[1] += s
    return [exp2_point(b, a, start_ns, now_ns) for a, b in merged.items()]


def counts_of(groups: Exp2Buckets) -> dict:
    """{raw attribute key: total count} of a grouped histogram."""
    return {raw: sum(c for c, _ in buckets.values()) for raw, buckets in groups.items()}
