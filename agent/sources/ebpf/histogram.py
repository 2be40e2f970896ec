"""In-kernel aggregates read from BPF maps: log2 histograms as exact OTLP exponential histograms.

The BPF side is bpf/include/maps.h: a histogram is a per-CPU hash keyed by {attributes..., slot}
whose value is {count, sum}. Slot 0 holds the value 0; slot s >= 1 holds 2^(s-2) < v <= 2^(s-1),
which is exactly OTLP's scale-0 bucket index s - 2 (buckets are upper-inclusive), so the point is
built without re-bucketing and its sum is the exact sum of the recorded values.

Maps are read whole through the map layer (maps.BpfMap.read: BPF_MAP_LOOKUP_BATCH where the
kernel has it), per-CPU values summed over CPUs, and never cleared: points are cumulative from
the probe's load time.
"""
from __future__ import annotations

import ctypes as ct
from typing import Callable, Iterable, Mapping, Optional

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


# --- histograms ------------------------------------------------------------------------------

# {raw attribute key (the key's fields except slot, as ints): {slot: [count, sum]}}
Exp2Buckets = dict


def read_exp2(hist, key_type) -> Exp2Buckets:
    """A histogram map (maps.BpfMap) grouped by attribute set:
    {(key fields except slot): {slot: [count, sum]}}."""
    keys, values = hist.read(key_type)
    if values.shape[1] != 2:
        raise ValueError(f"map {hist.name!r}: values are not struct exp2_bucket {{count, sum}}")
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
