"""tcp: retransmits, resets, connection opens and lifetimes (bpf/tcp.bpf.c)."""
from __future__ import annotations

import ctypes as ct
import errno
import logging
from typing import Optional

from agent.model import Metric, MetricKind, NumberPoint
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf import histogram
from agent.sources.ebpf.loader import btf_facts, tracepoint_fields
from agent.sources.ebpf.probe import Probe

log = logging.getLogger("hostagent.ebpf")

# indexes of tcp_events in bpf/tcp.bpf.c
RETRANSMITS, RESETS_SENT, RESETS_RECEIVED, OPENS_ACTIVE, OPENS_PASSIVE, UNTRACKED, UNSIZED = range(7)
# the errors __tcp_retransmit_skb() returns before it adds to TcpRetransSegs
EARLY_EXITS = ("EBUSY", "EINVAL", "ENOMEM", "EHOSTUNREACH", "EAGAIN")


def gso_segs_offset() -> Optional[int]:
    """Where tcp_skb_pcount(skb) lives in an sk_buff of the running kernel (skb->cb holds the
    struct tcp_skb_cb), from BTF; None without BTF."""
    cb, segs = ("sk_buff", "cb"), ("tcp_skb_cb", "tcp_gso_segs")
    facts = btf_facts([cb, segs])
    if facts is None or facts[cb] is None or facts[segs] is None:
        return None
    return facts[cb] + facts[segs]
DIRECTIONS = {0: "active", 1: "passive"}    # DIRECTION_* in bpf/tcp.bpf.c


class TcpKey(ct.Structure):
    """struct tcp_key"""
    _fields_ = [("direction", ct.c_uint32), ("slot", ct.c_uint32)]


class TcpProbe(Probe):
    name = "tcp"
    description = ("TCP retransmitted segments, resets sent/received, connections opened "
                   "(active/passive) and connection lifetime (exponential histogram, ns)")
    tracepoints = ("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "tcp:tcp_send_reset",
                   "tcp:tcp_receive_reset", "sock:inet_sock_set_state")
    default_enabled = True
    structs = {"tcp_key": TcpKey, "exp2_bucket": histogram.Exp2Bucket}

    RETRANSMITS = "system.linux.tcp.retransmits"
    RESETS = "system.linux.tcp.resets"
    OPENED = "system.linux.tcp.connections.opened"
    DURATION = "system.linux.tcp.connection.duration"
    metrics = (RETRANSMITS, RESETS, OPENED, DURATION)

    def __init__(self, target_port: Optional[int] = None, telemetry: Optional[SelfMetrics] = None):
        """`telemetry`: where the probe counts what it could not measure; unset (a probe built only
        to be described, by `hostagent probes`), counted apart."""
        self.target_port = target_port
        self._seen = {UNTRACKED: 0, UNSIZED: 0}
        telemetry = telemetry if telemetry is not None else SelfMetrics()
        self._self_metrics = {
            UNTRACKED: telemetry.counter(
                "hostagent.ebpf.tcp.untracked_connections", "{connection}",
                "TCP connections whose lifetime was not measured because the probe's table was full."),
            UNSIZED: telemetry.counter(
                "hostagent.ebpf.tcp.unsized_retransmits", "{skb}",
                "Retransmitted TCP skbs whose segment count could not be read (no BTF), "
                "each counted as one segment."),
        }

    @classmethod
    def create(cls, options, telemetry=None, enrichment=None, workloads=None) -> "TcpProbe":
        return cls(telemetry=telemetry, target_port=(options.port or None) if options else None)

    def params(self, tracepoints: tuple) -> dict:
        params = {"TCP_RETRANSMIT_HAS_ERR": "err" in tracepoint_fields("tcp:tcp_retransmit_skb"),
                  "TCP_SEND_RESET_SOCKADDR": "sport" not in tracepoint_fields("tcp:tcp_send_reset")}
        if self.target_port is not None:
            params["TARGET_PORT"] = int(self.target_port)
        offset = gso_segs_offset()
        if offset is not None:
            params["TCP_SKB_GSO_SEGS_OFFSET"] = offset
        else:
            log.warning("tcp_retransmits_count_skbs reason=\"no BTF at /sys/kernel/btf/vmlinux\"")
        params.update({f"ERR_{name}": getattr(errno, name) for name in EARLY_EXITS})
        return params

    def setup(self, obj) -> None:
        super().setup(obj)
        self.events = obj.map("tcp_events")
        self.lifetime = obj.map("tcp_lifetime")

    def event_counts(self) -> list:
        keys, values = self.events.read(ct.c_uint32)
        counts = [0] * (UNSIZED + 1)
        for k, v in zip(keys.tolist(), values[:, 0].tolist()):
            if k < len(counts):
                counts[k] = v
        return counts

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        c = self.event_counts()
        for event, counter in self._self_metrics.items():
            if c[event] > self._seen[event]:
                counter.add(c[event] - self._seen[event])
                self._seen[event] = c[event]

        def point(value, attributes=()):
            return NumberPoint(attributes, value, start_ns, now_ns)

        metrics = [
            Metric(self.RETRANSMITS, "TCP segments retransmitted (SYN-ACKs included).",
                   "{segment}", MetricKind.SUM, [point(c[RETRANSMITS])], monotonic=True),
            Metric(self.RESETS, "TCP resets sent and received.", "{segment}", MetricKind.SUM,
                   [point(c[RESETS_SENT], (("network.io.direction", "transmit"),)),
                    point(c[RESETS_RECEIVED], (("network.io.direction", "receive"),))],
                   monotonic=True),
            Metric(self.OPENED, "TCP connections established, by who opened them.",
                   "{connection}", MetricKind.SUM,
                   [point(c[OPENS_ACTIVE], (("direction", "active"),)),
                    point(c[OPENS_PASSIVE], (("direction", "passive"),))], monotonic=True),
        ]
        groups = histogram.read_exp2(self.lifetime, TcpKey)
        points = histogram.exp2_points(
            groups, lambda raw: (("direction", DIRECTIONS.get(raw[0], "unknown")),), start_ns, now_ns)
        if points:
            metrics.append(Metric(self.DURATION, "Lifetime of TCP connections, from established to closed.",
                                  "ns", MetricKind.EXPONENTIAL_HISTOGRAM, points))
        return metrics
