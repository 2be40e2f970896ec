"""tcp: retransmits, resets, connection opens and lifetimes (bpf/tcp.bpf.c), host-wide or per
workload.

Per workload (`workloads`, a WorkloadResolver): the kernel keys every count by the cgroup of the
socket's owner (the cgroup the kernel keeps in the socket, bpf/tcp.bpf.c says why), and each
cgroup's counts are exported with its workload's attributes, the cgroups of one workload summed.
When a cgroup is gone its kernel entries are read a last time, added to its workload's running
totals and deleted, so the maps hold live cgroups only and every series stays cumulative and
exact. Keys that did not fit a full map count under CGROUP_OVERFLOW and are exported as the
otel.metric.overflow=true series.
"""
from __future__ import annotations

import ctypes as ct
import errno
import logging
from typing import Optional

import numpy as np

from agent.model import Metric, MetricKind, NumberPoint
from agent.procfs.workload import CGROUP_OVERFLOW, HOST, WorkloadResolver
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts, tracepoint_fields
from agent.sources.ebpf.probe import Probe

log = logging.getLogger("hostagent.ebpf")

# the events of tcp_counts in bpf/tcp.bpf.c
RETRANSMITS, RESETS_SENT, RESETS_RECEIVED, OPENS_ACTIVE, OPENS_PASSIVE = EVENTS = range(5)
# indexes of tcp_misses
UNTRACKED, UNSIZED, UNOWNED = range(3)
# the errors __tcp_retransmit_skb() returns before it adds to TcpRetransSegs
EARLY_EXITS = ("EBUSY", "EINVAL", "ENOMEM", "EHOSTUNREACH", "EAGAIN")
# the series of keys that did not fit (as the pipeline's cardinality limit marks its own)
OVERFLOW_ATTRIBUTES = (("otel.metric.overflow", True),)
# where the socket's cgroup id is: sk->sk_cgrp_data.cgroup->kn->id (bcc; CO-RE relocates its own)
CGROUP_MEMBERS = {"TCP_SK_CGROUP_OFFSET": (("sock", "sk_cgrp_data"), ("sock_cgroup_data", "cgroup")),
                  "TCP_CGROUP_KN_OFFSET": (("cgroup", "kn"),),
                  "TCP_KN_ID_OFFSET": (("kernfs_node", "id"),)}


def cgroup_offsets() -> Optional[dict]:
    """{TCP_SK_CGROUP_OFFSET: n, ...} in the running kernel, from BTF; None without BTF or
    where a socket does not hold a cgroup pointer (before 5.15)."""
    members = [m for path in CGROUP_MEMBERS.values() for m in path]
    facts = btf_facts(members)
    if facts is None or any(facts[m] is None for m in members):
        return None
    return {name: sum(facts[m] for m in path) for name, path in CGROUP_MEMBERS.items()}


def gso_segs_offset() -> Optional[int]:
    """Where tcp_skb_pcount(skb) lives in an sk_buff of the running kernel (skb->cb holds the
    struct tcp_skb_cb), from BTF; None without BTF."""
    cb, segs = ("sk_buff", "cb"), ("tcp_skb_cb", "tcp_gso_segs")
    facts = btf_facts([cb, segs])
    if facts is None or facts[cb] is None or facts[segs] is None:
        return None
    return facts[cb] + facts[segs]
DIRECTIONS = {0: "active", 1: "passive"}    # DIRECTION_* in bpf/tcp.bpf.c


class TcpEventKey(ct.Structure):
    """struct tcp_event_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("event", ct.c_uint32), ("pad", ct.c_uint32)]


class TcpKey(ct.Structure):
    """struct tcp_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("direction", ct.c_uint32), ("slot", ct.c_uint32)]


class TcpProbe(Probe):
    name = "tcp"
    description = ("TCP retransmitted segments, resets sent/received, connections opened "
                   "(active/passive) and connection lifetime (exponential histogram, ns), per workload")
    tracepoints = ("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "tcp:tcp_send_reset",
                   "tcp:tcp_receive_reset", "sock:inet_sock_set_state")
    default_enabled = True
    structs = {"tcp_event_key": TcpEventKey, "tcp_key": TcpKey, "exp2_bucket": histogram.Exp2Bucket}

    RETRANSMITS = "system.linux.tcp.retransmits"
    RESETS = "system.linux.tcp.resets"
    OPENED = "system.linux.tcp.connections.opened"
    DURATION = "system.linux.tcp.connection.duration"
    metrics = (RETRANSMITS, RESETS, OPENED, DURATION)

    def __init__(self, target_port: Optional[int] = None, telemetry: Optional[SelfMetrics] = None,
                 workloads: Optional[WorkloadResolver] = None):
        """`telemetry`: where the probe counts what it could not measure; unset (a probe built only
        to be described, by `hostagent probes`), counted apart. `workloads`: series per workload
        through this resolver; None: host-wide series."""
        self.target_port = target_port
        self.workloads = workloads
        self._seen = {UNTRACKED: 0, UNSIZED: 0, UNOWNED: 0, "tcp_counts": 0, "tcp_lifetime": 0}
        # what the cgroups already gone counted, by their workload's attributes
        self._folded_counts: dict = {}          # (attributes, event) -> count
        self._folded_lifetimes: dict = {}       # (attributes, direction) -> {slot: [count, sum]}
        telemetry = telemetry if telemetry is not None else SelfMetrics()
        self._self_metrics = {
            UNTRACKED: telemetry.counter(
                "hostagent.ebpf.tcp.untracked_connections", "{connection}",
                "TCP connections whose lifetime was not measured because the probe's table was full."),
            UNSIZED: telemetry.counter(
                "hostagent.ebpf.tcp.unsized_retransmits", "{skb}",
                "Retransmitted TCP skbs whose segment count could not be read (no BTF), "
                "each counted as one segment."),
            UNOWNED: telemetry.counter(
                "hostagent.ebpf.tcp.unowned_events", "{event}",
                "TCP events on no socket of a known cgroup (a reset answering a segment no socket "
                "matches), counted under the host."),
        }
        self._overflow = telemetry.counter(
            "hostagent.ebpf.map.overflow", "{event}",
            "Events counted in the otel.metric.overflow=true series of a probe because its map was full.")

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "TcpProbe":
        return cls(telemetry=telemetry, target_port=(options.port or None) if options else None,
                   workloads=workloads)

    def params(self, tracepoints: tuple) -> dict:
        params = {"TCP_RETRANSMIT_HAS_ERR": "err" in tracepoint_fields("tcp:tcp_retransmit_skb"),
                  "TCP_SEND_RESET_SOCKADDR": "sport" not in tracepoint_fields("tcp:tcp_send_reset"),
                  "BY_CGROUP": self.workloads is not None}
        if self.target_port is not None:
            params["TARGET_PORT"] = int(self.target_port)
        offset = gso_segs_offset()
        if offset is not None:
            params["TCP_SKB_GSO_SEGS_OFFSET"] = offset
        else:
            log.warning("tcp_retransmits_count_skbs reason=\"no BTF at /sys/kernel/btf/vmlinux\"")
        if self.workloads is not None:
            offsets = cgroup_offsets()
            if offsets is not None:
                params.update(offsets)
            else:
                log.warning("tcp_owner_unknown reason=\"no socket cgroup in BTF\": events count under the host")
        params.update({f"ERR_{name}": getattr(errno, name) for name in EARLY_EXITS})
        return params

    def setup(self, obj) -> None:
        super().setup(obj)
        self.counts = obj.map("tcp_counts")
        self.misses = obj.map("tcp_misses")
        self.lifetime = obj.map("tcp_lifetime")
        if self.workloads is None:
            return
        # the overflow keys, so that an event always has a key when the map is full
        for event in EVENTS:
            self.counts.update(TcpEventKey(CGROUP_OVERFLOW, event), bytes(self.counts.buffer_size))
        for direction in DIRECTIONS:
            for slot in range(histogram.MAX_SLOT + 1):
                self.lifetime.update(TcpKey(CGROUP_OVERFLOW, direction, slot), bytes(self.lifetime.buffer_size))

    def event_counts(self) -> list:
        """tcp_misses: [untracked, unsized, unowned]."""
        keys, values = self.misses.read(ct.c_uint32)
        counts = [0] * (UNOWNED + 1)
        for k, v in zip(keys.tolist(), values[:, 0].tolist()):
            if k < len(counts):
                counts[k] = v
        return counts

    def _attributes(self, cgroup: int) -> tuple:
        if cgroup == CGROUP_OVERFLOW:
            return OVERFLOW_ATTRIBUTES
        if not cgroup or self.workloads is None:
            return HOST.attributes
        return self.workloads.resolve(cgroup).attributes

    def _fold_gone(self, counts: dict, groups: dict) -> None:
        """Move the entries of cgroups that are gone from the kernel maps (and from this read) to
        their workloads' running totals. Each entry is read again just before it is deleted, so
        only an event landing between those two system calls could be missed."""
        gone: dict = {}
        for cgroup, event in counts:
            gone.setdefault(cgroup, ([], []))[0].append(event)
        for cgroup, direction in groups:
            gone.setdefault(cgroup, ([], []))[1].append(direction)
        for cgroup, (events, directions) in gone.items():
            if cgroup in (0, CGROUP_OVERFLOW) or self.workloads.alive(cgroup):
                continue
            attributes = self.workloads.resolve(cgroup).attributes
            for event in events:
                key = TcpEventKey(cgroup, event)
                value = self.counts.sum(key)
                self.counts.delete(key)
                self._folded_counts[(attributes, event)] = self._folded_counts.get((attributes, event), 0) + value
                del counts[(cgroup, event)]
            for direction in directions:
                into = self._folded_lifetimes.setdefault((attributes, direction), {})
                for slot in groups.pop((cgroup, direction)):
                    key = TcpKey(cgroup, direction, slot)
                    raw = self.lifetime.lookup(key)
                    self.lifetime.delete(key)
                    if raw is None:
                        continue
                    words = np.frombuffer(raw, dtype=np.uint64).reshape(self.lifetime.cpus, -1)[:, :2]
                    count, total = (int(x) for x in words.sum(axis=0, dtype=np.uint64))
                    bucket = into.setdefault(slot, [0, 0])
                    bucket[0] += count
                    bucket[1] += total

    def _count_self(self, misses: list, counts: dict, groups: dict) -> None:
        now = {UNTRACKED: misses[UNTRACKED], UNSIZED: misses[UNSIZED], UNOWNED: misses[UNOWNED],
               "tcp_counts": sum(v for (c, _), v in counts.items() if c == CGROUP_OVERFLOW),
               "tcp_lifetime": sum(b[0] for (c, _), slots in groups.items() if c == CGROUP_OVERFLOW
                                   for b in slots.values())}
        for what, value in now.items():
            if value > self._seen[what]:
                if what in self._self_metrics:
                    self._self_metrics[what].add(value - self._seen[what])
                else:
                    self._overflow.add(value - self._seen[what], (("probe", self.name), ("map", what)))
                self._seen[what] = value

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        keys, values = self.counts.read(TcpEventKey)
        counts = dict(zip(zip(keys["cgroup"].tolist(), keys["event"].tolist()), values[:, 0].tolist()))
        groups = histogram.read_exp2(self.lifetime, TcpKey)       # {(cgroup, direction): {slot: [count, sum]}}
        self._count_self(self.event_counts(), counts, groups)
        if self.workloads is not None:
            self._fold_gone(counts, groups)

        # {(attributes, event): count}: the host always, every workload seen, the overflow once used
        totals = {(HOST.attributes, event): 0 for event in EVENTS}
        totals.update(self._folded_counts)
        for (cgroup, event), value in counts.items():
            if cgroup != CGROUP_OVERFLOW or value:
                key = (self._attributes(cgroup), event)
                totals[key] = totals.get(key, 0) + value

        def points(*events):
            return [NumberPoint(attributes + extra, value, start_ns, now_ns)
                    for (attributes, event), value in totals.items()
                    for e, extra in events if e == event]

        metrics = [
            Metric(self.RETRANSMITS, "TCP segments retransmitted (SYN-ACKs included).",
                   "{segment}", MetricKind.SUM, points((RETRANSMITS, ())), monotonic=True),
            Metric(self.RESETS, "TCP resets sent and received.", "{segment}", MetricKind.SUM,
                   points((RESETS_SENT, (("network.io.direction", "transmit"),)),
                          (RESETS_RECEIVED, (("network.io.direction", "receive"),))), monotonic=True),
            Metric(self.OPENED, "TCP connections established, by who opened them.",
                   "{connection}", MetricKind.SUM,
                   points((OPENS_ACTIVE, (("direction", "active"),)),
                          (OPENS_PASSIVE, (("direction", "passive"),))), monotonic=True),
        ]

        lifetimes = {key: {slot: list(b) for slot, b in slots.items()}
                     for key, slots in self._folded_lifetimes.items()}
        for (cgroup, direction), slots in groups.items():
            into = lifetimes.setdefault((self._attributes(cgroup), direction), {})
            for slot, (count, total) in slots.items():
                bucket = into.setdefault(slot, [0, 0])
                bucket[0] += count
                bucket[1] += total
        hist = [histogram.exp2_point(slots, attributes + (("direction", DIRECTIONS.get(direction, "unknown")),),
                                     start_ns, now_ns)
                for (attributes, direction), slots in lifetimes.items()]
        if hist:
            metrics.append(Metric(self.DURATION, "Lifetime of TCP connections, from established to closed.",
                                  "ns", MetricKind.EXPONENTIAL_HISTOGRAM, hist))
        return metrics
