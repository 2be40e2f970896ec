"""tcp: retransmits, resets, connection opens and lifetimes (bpf/tcp.bpf.c), host-wide or per
workload.

Per workload (`workloads`, a WorkloadResolver): the kernel keys every count by the cgroup of the
socket's owner (the cgroup the kernel keeps in the socket, bpf/tcp.bpf.c says why); the maps are
read by workload, gone cgroups folded and overflow exported as histogram.Attribution does for
every cgroup-keyed probe.
"""
from __future__ import annotations

import ctypes as ct
import errno
import logging
from typing import Optional

from agent.model import Metric, MetricKind, NumberPoint
from agent.procfs.workload import HOST, WorkloadResolver
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts, tracepoint_fields

log = logging.getLogger("hostagent.ebpf")

# the events of tcp_counts in bpf/tcp.bpf.c
RETRANSMITS, RESETS_SENT, RESETS_RECEIVED, OPENS_ACTIVE, OPENS_PASSIVE = EVENTS = range(5)
DIRECTIONS = {0: "active", 1: "passive"}    # DIRECTION_* in bpf/tcp.bpf.c
# indexes of tcp_misses
UNTRACKED, UNSIZED, UNOWNED = range(3)
# the errors __tcp_retransmit_skb() returns before it adds to TcpRetransSegs
EARLY_EXITS = ("EBUSY", "EINVAL", "ENOMEM", "EHOSTUNREACH", "EAGAIN")
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


class TcpEventKey(ct.Structure):
    """struct tcp_event_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("event", ct.c_uint32), ("pad", ct.c_uint32)]


class TcpKey(ct.Structure):
    """struct tcp_key"""
    _fields_ = [("cgroup", ct.c_uint64), ("direction", ct.c_uint32), ("slot", ct.c_uint32)]


class TcpProbe(histogram.KeyedProbe):
    name = "tcp"
    description = ("TCP retransmitted segments, resets sent/received, connections opened "
                   "(active/passive) and connection lifetime (exponential histogram, ns), per workload")
    tracepoints = ("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "tcp:tcp_send_reset",
                   "tcp:tcp_receive_reset", "sock:inet_sock_set_state")
    default_enabled = True
    structs = {"tcp_event_key": TcpEventKey, "tcp_key": TcpKey, "exp2_bucket": histogram.Exp2Bucket}
    MAX_KEYS = "TCP_MAX_KEYS"
    keyed_maps = ("tcp_counts",)
    unowned = HOST.attributes       # events of no known socket owner (TCP_UNOWNED): the host's

    RETRANSMITS = "system.linux.tcp.retransmits"
    RESETS = "system.linux.tcp.resets"
    OPENED = "system.linux.tcp.connections.opened"
    DURATION = "system.linux.tcp.connection.duration"
    metrics = (RETRANSMITS, RESETS, OPENED, DURATION)

    def __init__(self, target_port: Optional[int] = None, telemetry: Optional[SelfMetrics] = None,
                 workloads: Optional[WorkloadResolver] = None, **keyed):
        """`telemetry`: where the probe counts what it could not measure; unset (a probe built only
        to be described, by `hostagent probes`), counted apart. `workloads`: series per workload
        through this resolver; None: host-wide series."""
        super().__init__(workloads=workloads, **keyed)
        self.target_port = target_port
        self._seen = {UNTRACKED: 0, UNSIZED: 0, UNOWNED: 0}
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

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "TcpProbe":
        return cls(telemetry=telemetry, target_port=(options.port or None) if options else None,
                   workloads=workloads)

    def params(self, tracepoints: tuple) -> dict:
        params = {**super().params(tracepoints),
                  "TCP_RETRANSMIT_HAS_ERR": "err" in tracepoint_fields("tcp:tcp_retransmit_skb"),
                  "TCP_SEND_RESET_SOCKADDR": "sport" not in tracepoint_fields("tcp:tcp_send_reset")}
        if self.target_port is not None:
            params["TARGET_PORT"] = int(self.target_port)
        offset = gso_segs_offset()
        if offset is not None:
            params["TCP_SKB_GSO_SEGS_OFFSET"] = offset
        else:
            log.warning("tcp_retransmits_count_skbs reason=\"no BTF at /sys/kernel/btf/vmlinux\"")
        if self.attribution.by_cgroup:
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
        self.counts_overflow = obj.map("tcp_counts_overflow")
        self.misses = obj.map("tcp_misses")
        self.lifetime = obj.map("tcp_lifetime")
        self.lifetime_overflow = obj.map("tcp_lifetime_overflow")

    def event_counts(self) -> list:
        """tcp_misses: [untracked, unsized, unowned]."""
        keys, values = self.misses.read(ct.c_uint32)
        counts = [0] * (UNOWNED + 1)
        for k, v in zip(keys.tolist(), values[:, 0].tolist()):
            if k < len(counts):
                counts[k] = v
        return counts

    def _count_self(self, misses: list) -> None:
        for what, value in enumerate(misses):
            if value > self._seen[what]:
                self._self_metrics[what].add(value - self._seen[what])
                self._seen[what] = value

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        self._count_self(self.event_counts())
        # {(attributes, event): count}: the host always, every workload seen, the overflow once used
        totals = {(HOST.attributes, event): 0 for event in EVENTS}
        for (attributes, (event,)), (value,) in self.attribution.read(
                self.counts, TcpEventKey, self.counts_overflow).items():
            totals[(attributes, event)] = totals.get((attributes, event), 0) + value

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
        groups = self.attribution.histogram(self.lifetime, self.lifetime_overflow, TcpKey)
        hist = histogram.exp2_points(groups, histogram.by_workload(
            lambda f: (("direction", DIRECTIONS.get(f[0], "unknown")),)), start_ns, now_ns)
        if hist:
            metrics.append(Metric(self.DURATION, "Lifetime of TCP connections, from established to closed.",
                                  "ns", MetricKind.EXPONENTIAL_HISTOGRAM, hist))
        return metrics
