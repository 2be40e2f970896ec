"""In-kernel aggregates read from BPF maps: log2 histograms as exact OTLP exponential histograms.

The BPF side is bpf/include/maps.h: a histogram is a per-CPU hash keyed by {attributes..., slot}
whose value is {count, sum}. Slot 0 holds the value 0; slot s >= 1 holds 2^(s-2) < v <= 2^(s-1),
which is exactly OTLP's scale-0 bucket index s - 2 (buckets are upper-inclusive), so the point is
built without re-bucketing and its sum is the exact sum of the recorded values.

Maps are read whole through the map layer (maps.BpfMap.read: BPF_MAP_LOOKUP_BATCH where the
kernel has it), per-CPU values summed over CPUs, and never cleared: points are cumulative from
the probe's load time.

Maps keyed by cgroup (maps.h: the key's first field is the u64 `cgroup`) are read by workload
through an Attribution: each cgroup id resolves to its workload (agent/procfs/workload.py), whose
attributes go on the points; entries under HA_CGROUP_OVERFLOW (and the map's `<name>_overflow`
companion) become their own series with otel.metric.overflow=true. The kernel entries of a cgroup
that is gone are folded into its workload's running totals and then deleted, so the maps stay
small while every cumulative series stays exact: a workload's value is its live cgroups' entries
plus everything folded. (An event that lands on a gone cgroup's entry between the read and the
delete is lost; no task is left in a removed cgroup, so only an I/O still in flight can.)
"""
from __future__ import annotations

import ctypes as ct
from typing import Callable, Iterable, Mapping, Optional

from agent.model import Attributes, ExponentialHistogramPoint
from agent.procfs.workload import CGROUP_OVERFLOW
from agent.sources.ebpf.probe import Probe

# mirrors of bpf/include/maps.h
MAX_SLOT = 65          # EXP2_MAX_SLOT: (2^63, 2^64), the whole u64 range
ZERO_SLOT = 0          # the value 0, OTLP zero_count
SLOT_TO_INDEX = -2     # OTLP bucket index = slot + SLOT_TO_INDEX, for slot >= 1
SCALE = 0

# the attribute of a series that stands for what did not fit (as the pipeline's cardinality limit)
OVERFLOW_ATTRIBUTES = (("otel.metric.overflow", True),)
KEY_CGROUP, KEY_PAD = "cgroup", "pad"      # key fields that are not attributes
NO_CGROUP = 0      # an event whose owner the program did not see (unresolved); never "gone"


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


# --- by workload -----------------------------------------------------------------------------

# {(workload attributes, (key fields except cgroup and pad)): [u64 word, ...]}
Keyed = dict


# Keys of gone cgroups' totals kept per map (a histogram key is {workload, fields, slot}: about
# 250 workloads of 66 slots); beyond, a gone cgroup's values are folded into the overflow series.
FOLD_LIMIT = 16384


class Attribution:
    """A probe's cgroup-keyed maps read by workload. `workloads` (a WorkloadResolver) None: the
    program runs without BY_CGROUP, every key's cgroup is 0 and points carry no workload.
    `unowned`: the attributes of cgroup NO_CGROUP; None resolves it as any other id."""

    def __init__(self, workloads=None, fold_limit: int = FOLD_LIMIT, unowned: Optional[Attributes] = None):
        self.workloads = workloads
        self.unowned = unowned
        self.fold_limit = fold_limit
        self._folded: dict = {}          # map name -> Keyed: the final values of gone cgroups
        self._folded_over: dict = {}     # map name -> events folded into the overflow series
        self.overflowed: dict = {}       # map name -> events in the overflow series

    @property
    def by_cgroup(self) -> bool:
        return self.workloads is not None

    def read(self, m, key_type, overflow=None) -> Keyed:
        """Map `m` (and its overflow companion `overflow`) by workload; fields keep the key's
        order, `slot` included. Entries whose words are all 0 are left out."""
        keys, values = m.read(key_type)
        fields = attributed_fields(key_type)
        out: dict = {}
        gone: list = []
        folded = self._folded.setdefault(m.name, {})
        if len(keys):
            columns = [keys[f].tolist() for f in fields]
            alive: dict = {}
            for i, (cgroup, words) in enumerate(zip(keys[KEY_CGROUP].tolist(), values.tolist())):
                if not any(words):
                    continue
                key = (self._attributes(cgroup), tuple(c[i] for c in columns))
                if self.workloads is not None and cgroup not in (NO_CGROUP, CGROUP_OVERFLOW):
                    if cgroup not in alive:
                        alive[cgroup] = self.workloads.alive(cgroup)
                    if not alive[cgroup]:
                        if key not in folded and len(folded) >= self.fold_limit:
                            key = (OVERFLOW_ATTRIBUTES, key[1])
                            self._folded_over[m.name] = self._folded_over.get(m.name, 0) + words[0]
                        _add(folded, key, words)
                        gone.append(keys[i].tobytes())
                        continue
                _add(out, key, words)
        for raw in gone:
            m.delete(raw)
        for key, words in folded.items():
            _add(out, key, words)
        if overflow is not None:
            extra = self.read(overflow, key_type)
            self.overflowed[m.name] = (sum(words[0] for words in extra.values())
                                       + self._folded_over.get(m.name, 0))
            for (_, f), words in extra.items():
                _add(out, (OVERFLOW_ATTRIBUTES, f), words)
        return out

    def _attributes(self, cgroup: int) -> Attributes:
        if self.workloads is None:
            return ()
        if cgroup == CGROUP_OVERFLOW:
            return OVERFLOW_ATTRIBUTES
        if cgroup == NO_CGROUP and self.unowned is not None:
            return self.unowned
        return self.workloads.resolve(cgroup).attributes

    def histogram(self, hist, overflow, key_type) -> Exp2Buckets:
        """A keyed histogram and its overflow companion as read_exp2 groups them, the raw key
        being (workload attributes, (key fields except cgroup, pad and slot))."""
        keyed = self.read(hist, key_type, overflow)
        slot = attributed_fields(key_type).index("slot")
        groups: dict = {}
        for (attributes, f), (count, total) in keyed.items():
            raw = (attributes, f[:slot] + f[slot + 1:])
            bucket = groups.setdefault(raw, {}).setdefault(f[slot], [0, 0])
            bucket[0] += count
            bucket[1] += total
        return groups


def attributed_fields(key_type) -> list:
    """The fields of a keyed map's key that Attribution.read() keeps, in order: all but cgroup
    and pad."""
    return [n for n, *_ in key_type._fields_ if n not in (KEY_CGROUP, KEY_PAD)]


def _add(into: dict, key, words) -> None:
    have = into.get(key)
    into[key] = list(words) if have is None else [a + b for a, b in zip(have, words)]


def by_workload(decode: Callable[[tuple], Optional[Attributes]]) -> Callable[[tuple], Optional[Attributes]]:
    """`decode` for the raw keys of Attribution.histogram: the key fields' attributes, then the
    workload's."""
    def decode_keyed(raw):
        attributes = decode(raw[1])
        return None if attributes is None else attributes + raw[0]
    return decode_keyed


class KeyedProbe(Probe):
    """A probe whose maps are keyed by cgroup (bpf/include/maps.h): BY_CGROUP when it has a
    WorkloadResolver. `max_keys` sizes its keyed maps (`keyed_maps`, -D `MAX_KEYS` under bcc);
    `count_events` turns COUNT_EVENTS on (tests: events() is then the host-wide count).
    `unowned`: see Attribution."""
    MAX_KEYS = ""
    keyed_maps: tuple = ()
    unowned: Optional[Attributes] = None

    def __init__(self, workloads=None, max_keys: Optional[int] = None, count_events: bool = False):
        self.attribution = Attribution(workloads, unowned=self.unowned)
        self.max_keys = max_keys
        self.count_events = count_events

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "KeyedProbe":
        return cls(workloads=workloads)

    def params(self, tracepoints: tuple) -> dict:
        params = {"BY_CGROUP": self.attribution.by_cgroup, "COUNT_EVENTS": self.count_events}
        if self.max_keys:
            params[self.MAX_KEYS] = int(self.max_keys)
        return params

    def map_sizes(self) -> dict:
        return {name: int(self.max_keys) for name in self.keyed_maps} if self.max_keys else {}

    def map_overflows(self) -> dict:
        return dict(self.attribution.overflowed)

    def events(self) -> int:
        """Events the program recorded, counted host-wide (with count_events)."""
        return self.obj.map("ha_events").sum(ct.c_uint32(0))
