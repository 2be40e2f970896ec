"""Pure OTLP encoding: model -> ExportMetricsServiceRequest / ExportLogsServiceRequest bytes.

Shared by every exporter (gRPC, HTTP, file), so what is queued is always the wire payload.
Groups with the same resource and scope are merged, and each resource is encoded once.

The protobuf wire format is written directly (fields in field-number order, proto3 defaults left
out, exactly as the official serializer writes the same message), because building one protobuf
object per data point and attribute costs several times more CPU than the bytes themselves.
What repeats from one collection to the next is encoded once and cached: resources, scopes,
attribute sets, histogram bounds. tests/test_delivery_encoding.py decodes every shape with the
official classes and checks the bytes against a message built field by field.

Encoding never raises over one value, whatever the host put in a name: text that is not valid
Unicode (lone surrogates, from file names and /proc) is sent with U+FFFD in place of each bad code
point; an integer outside int64 is sent as a double; a value of another type as its text (bytes as
bytes, lists and dicts as OTLP arrays and key-value lists, at most MAX_DEPTH levels deep). Each
replacement is counted in hostagent.export.replaced_values; as with everything cached here, a value
that repeats is encoded, and counted, once per cache lifetime.
"""
from __future__ import annotations

import codecs
import contextvars
import itertools
import logging
import operator
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (ExportLogsServiceRequest,
                                                                    ExportLogsServiceResponse)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest, ExportMetricsServiceResponse)

from agent.model import Batch, ExponentialHistogramPoint, HistogramPoint, LogGroup, MetricGroup, MetricKind

log = logging.getLogger("hostagent.export")
REQUEST_TYPES = {"metrics": ExportMetricsServiceRequest, "logs": ExportLogsServiceRequest}


@dataclass(frozen=True, slots=True)
class Payload:
    """One encoded export request, ready for any transport."""
    signal: str  # "metrics" | "logs"
    body: bytes
    items: int  # data points or log records inside


# --- wire primitives -----------------------------------------------------------------------------

_BYTE = [bytes((i,)) for i in range(256)]
_F64 = struct.Struct("<Q")
_D = struct.Struct("<d")
_Q = struct.Struct("<q")


def _varint(n: int) -> bytes:
    if n < 0x80:
        if n < 0:
            n &= 0xFFFFFFFFFFFFFFFF  # int64: ten bytes of two's complement
        else:
            return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _packed_varints(values) -> bytes:
    """A packed repeated uint64 field's body: the values as varints, back to back (one loop, no
    bytes object per value: histogram buckets are most of a histogram point's encoding)."""
    out = bytearray()
    append = out.append
    for v in values:
        v = int(v)
        while v >= 0x80:
            append((v & 0x7F) | 0x80)
            v >>= 7
        append(v)
    return bytes(out)


# From this many bucket counts in one metric on, one numpy pass over all of them beats the loop.
_VECTOR_FROM = 256


def _packed_varints_of(count_lists: list) -> list:
    """_packed_varints() of each list of `count_lists`: one loop each when there are few counts,
    else one vectorized pass over all of them (an eBPF histogram metric carries hundreds)."""
    total = sum(map(len, count_lists))
    if total < _VECTOR_FROM:
        return [_packed_varints(c) for c in count_lists]
    import numpy as np       # only eBPF histograms get here, and the eBPF source has numpy loaded
    values = np.fromiter(itertools.chain.from_iterable(count_lists), dtype=np.uint64, count=total)
    width = max(1, (int(values.max()).bit_length() + 6) // 7)           # bytes of the largest
    shifts = np.arange(0, 7 * width, 7, dtype=np.uint64)
    shifted = values[:, None] >> shifts
    nbytes = 1 + np.count_nonzero(shifted[:, 1:], axis=1)              # bytes of each value
    column = np.arange(width)
    groups = (shifted & np.uint64(0x7F)) | np.where(column < (nbytes - 1)[:, None], np.uint64(0x80),
                                                    np.uint64(0))
    data = groups[column < nbytes[:, None]].astype(np.uint8).tobytes()  # row by row: value order
    offsets = np.concatenate(([0], np.cumsum(nbytes)))
    bounds = offsets[np.concatenate(([0], np.cumsum([len(c) for c in count_lists])))].tolist()
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _ld(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    return tag + _varint(len(body)) + body


class EncodingCounters:
    """What the encoder counts, in the telemetry of the stage that encodes (encode(batch, counters))."""

    def __init__(self, telemetry):
        self.replaced = telemetry.counter(
            "hostagent.export.replaced_values", "{value}",
            "Values the OTLP encoder could not send as they were and replaced, by reason: text that is not valid "
            "Unicode (sent with U+FFFD), an integer outside int64 (sent as a double), a value nested deeper than "
            "the limit or of no OTLP type (sent as text).")
        self.dropped = telemetry.counter(
            "hostagent.export.encoding_dropped", "{items}",
            "Data points and log records left out of a request because their group could not be encoded even "
            "with replacements (the rest of the batch is sent).")


# the counters of the encode() call under way in this thread: replacements happen deep in the
# value encoders, which a parameter would have to pass through every cached encoder
_COUNTERS: contextvars.ContextVar[Optional[EncodingCounters]] = contextvars.ContextVar("encoding_counters",
                                                                                       default=None)


def _replaced(reason: str) -> None:
    counters = _COUNTERS.get()
    if counters is not None:
        counters.replaced.add(1, (("reason", reason),))


MAX_DEPTH = 16                  # nesting of lists/dicts in one attribute value
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _one_replacement_char_each(error: UnicodeError) -> tuple:
    return "\ufffd".encode() * (error.end - error.start), error.end   # bytes: the UTF-8 codec takes no str here


codecs.register_error("hostagent.ufffd", _one_replacement_char_each)


def _utf8(text) -> bytes:
    """`text` as UTF-8; a code point UTF-8 cannot hold (a lone surrogate) becomes U+FFFD."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        _replaced("invalid_unicode")
        return text.encode("utf-8", "hostagent.ufffd")
    except AttributeError:                              # not a str at all
        return _utf8(_text_of(text))


def _text_of(value) -> str:
    """str(value), or a placeholder when even that fails (a broken __str__, a 5000-digit int)."""
    _replaced("type")
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _double_of(big: int) -> float:
    """An integer outside int64 as the nearest double (an infinity past its range)."""
    _replaced("int_range")
    try:
        return float(big)
    except OverflowError:
        return float("inf") if big > 0 else float("-inf")


def _str(tag: bytes, text: str) -> bytes:
    """A string field, left out when empty (proto3 default)."""
    return _ld(tag, _utf8(text)) if text else b""


def _any_value(value, depth: int = 0) -> bytes:
    """An AnyValue's body (string 1, bool 2, int 3, double 4, array 5, kvlist 6, bytes 7)."""
    if isinstance(value, str):
        return _ld(b"\x0a", _utf8(value))
    if isinstance(value, bool):
        return b"\x10" + _BYTE[int(value)]
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return b"\x18" + _varint(value)
        return b"\x21" + _D.pack(_double_of(value))
    if isinstance(value, float):
        return b"\x21" + _D.pack(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _ld(b"\x3a", bytes(value))
    if isinstance(value, (list, tuple, dict)) and depth < MAX_DEPTH:
        if isinstance(value, dict):   # KeyValueList.values = 1
            body = b"".join(_ld(b"\x0a", _str(b"\x0a", k if isinstance(k, str) else _text_of(k))
                                + _ld(b"\x12", _any_value(v, depth + 1))) for k, v in value.items())
            return _ld(b"\x32", body)
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_value(v, depth + 1)) for v in value))  # ArrayValue.values = 1
    if value is None:
        return b""
    return _ld(b"\x0a", _utf8(_text_of(value)))


def _key_values(tag: bytes, attributes) -> bytes:
    """Repeated KeyValue under field `tag`, one entry per (key, value) pair."""
    return b"".join(_ld(tag, _str(b"\x0a", k) + _ld(b"\x12", _any_value(v))) for k, v in attributes)


class _Cache(dict):
    """Encoded bytes of values that repeat between collections, keyed by the (hashable) value.
    Cleared when it grows past `limit`, so memory stays bounded whatever the cardinality.
    Keys are compared as Python does: attribute sets that differ only in 0 / 0.0 / False share
    the encoding of the first one seen (no source gives one attribute values of several types)."""

    def __init__(self, encode, limit: int = 65536):
        super().__init__()
        self.encode, self.limit = encode, limit

    def __missing__(self, key):
        if len(self) >= self.limit:
            self.clear()
        value = self[key] = self.encode(key)
        return value

    def of(self, key):
        """self[key]; encoded each time when the key cannot be hashed (a list in an attribute value)."""
        try:
            return self[key]
        except TypeError:
            return self.encode(key)


# attribute sets, per the field number attributes have in each message
_ATTRS_NUMBER = _Cache(lambda a: _key_values(b"\x3a", a))  # NumberDataPoint.attributes = 7
_ATTRS_HISTOGRAM = _Cache(lambda a: _key_values(b"\x4a", a))  # HistogramDataPoint.attributes = 9
_ATTRS_EXP = _Cache(lambda a: _key_values(b"\x0a", a))  # ExponentialHistogramDataPoint.attributes = 1
_ATTRS_LOG = _Cache(lambda a: _key_values(b"\x32", a))  # LogRecord.attributes = 6
# Resource and InstrumentationScope, as field 1 of ResourceMetrics/ResourceLogs and ScopeMetrics/ScopeLogs
_RESOURCE = _Cache(lambda r: _ld(b"\x0a", _key_values(b"\x0a", r.attributes)), limit=4096)
_SCOPE = _Cache(lambda s: _ld(b"\x0a", _str(b"\x0a", s.name) + _str(b"\x12", s.version)), limit=4096)
_BOUNDS = _Cache(lambda b: _ld(b"\x3a", struct.pack(f"<{len(b)}d", *b)) if b else b"", limit=4096)

# NumberDataPoint with both timestamps set: start (2, fixed64), time (3, fixed64), value (4 or 6)
_NUMBER_DOUBLE = struct.Struct("<BQBQBd")
_NUMBER_INT = struct.Struct("<BQBQBq")
_DP_PREFIX = [b"\x0a" + _BYTE[n] for n in range(128)]  # data_points (field 1) with a one-byte length


def _number_point_slow(p, attrs: bytes) -> bytes:
    v = p.value
    body = ((b"\x11" + _F64.pack(p.start_time_ns) if p.start_time_ns else b"")
            + (b"\x19" + _F64.pack(p.time_ns) if p.time_ns else b"")
            + (b"\x21" + _D.pack(v) if isinstance(v, float) else _int_value(operator.index(v)))
            + attrs)
    return _ld(b"\x0a", body)


def _int_value(v: int) -> bytes:
    """NumberDataPoint.as_int (6), or as_double (4) for an integer outside int64."""
    return b"\x31" + _Q.pack(v) if INT64_MIN <= v <= INT64_MAX else b"\x21" + _D.pack(_double_of(v))


def _number_points(points, out: list) -> None:
    """Append each NumberDataPoint as field 1 of Gauge/Sum; the hot loop of the encoder."""
    attrs_of, prefix, pack_d, pack_i = _ATTRS_NUMBER, _DP_PREFIX, _NUMBER_DOUBLE.pack, _NUMBER_INT.pack
    append = out.append
    for p in points:
        try:
            a = attrs_of[p.attributes]
        except TypeError:
            a = attrs_of.of(p.attributes)
        start, t, v = p.start_time_ns, p.time_ns, p.value
        tv = type(v)
        if tv is float and start and t:
            body = pack_d(0x11, start, 0x19, t, 0x21, v)
        elif tv is int and start and t:
            try:
                body = pack_i(0x11, start, 0x19, t, 0x31, v)
            except struct.error:  # an integer outside int64 (or a timestamp outside uint64)
                append(_number_point_slow(p, a))
                continue
        else:  # a timestamp left at 0, a bool or a numpy number
            append(_number_point_slow(p, a))
            continue
        n = 27 + len(a)
        append(prefix[n] if n < 128 else b"\x0a" + _varint(n))
        append(body)
        append(a)


def _histogram_point(p: HistogramPoint) -> bytes:
    body = [b"\x11" + _F64.pack(p.start_time_ns) if p.start_time_ns else b"",
            b"\x19" + _F64.pack(p.time_ns) if p.time_ns else b"",
            b"\x21" + _F64.pack(p.count) if p.count else b"",
            b"\x29" + _D.pack(p.sum),
            _ld(b"\x32", struct.pack(f"<{len(p.counts)}Q", *p.counts)) if p.counts else b"",
            _BOUNDS[tuple(p.bounds)],
            _ATTRS_HISTOGRAM.of(p.attributes)]
    return _ld(b"\x0a", b"".join(body))


# fields 2-5 of an ExponentialHistogramDataPoint (start, time, count, sum), packed at once when
# none of them is a proto3 default that must be left out
_EXP_HEAD = struct.Struct("<BQBQBQBd")


def _exp_histogram_point(p: ExponentialHistogramPoint, counts: bytes) -> bytes:
    """`counts`: the packed varints of p.positive_counts."""
    if p.start_time_ns and p.time_ns and p.count:
        head = _EXP_HEAD.pack(0x11, p.start_time_ns, 0x19, p.time_ns, 0x21, p.count, 0x29, p.sum)
    else:
        head = b"".join((b"\x11" + _F64.pack(p.start_time_ns) if p.start_time_ns else b"",
                         b"\x19" + _F64.pack(p.time_ns) if p.time_ns else b"",
                         b"\x21" + _F64.pack(p.count) if p.count else b"",
                         b"\x29" + _D.pack(p.sum)))
    positive = ((b"\x08" + _varint(_zigzag(p.positive_offset)) if p.positive_offset else b"")
                + (b"\x12" + _varint(len(counts)) + counts if counts else b""))
    body = (_ATTRS_EXP.of(p.attributes) + head
            + (b"\x30" + _varint(_zigzag(p.scale)) if p.scale else b"")
            + (b"\x39" + _F64.pack(p.zero_count) if p.zero_count else b"")
            + b"\x42" + _varint(len(positive)) + positive
            + (b"\x61" + _D.pack(p.min) if p.min is not None else b"")
            + (b"\x69" + _D.pack(p.max) if p.max is not None else b""))
    return b"\x0a" + _varint(len(body)) + body


# Metric fields holding each kind of data: gauge = 5, sum = 7, histogram = 9, exponential_histogram = 10
_DATA_TAG = {MetricKind.GAUGE: b"\x2a", MetricKind.SUM: b"\x3a", MetricKind.HISTOGRAM: b"\x4a",
             MetricKind.EXPONENTIAL_HISTOGRAM: b"\x52"}
_IDENTITY = _Cache(lambda k: _str(b"\x0a", k[0]) + _str(b"\x12", k[1]) + _str(b"\x1a", k[2]), limit=4096)


def _metric(first, metrics: list) -> bytes:
    """One Metric with the identity of `first` and the points of every metric in `metrics`."""
    kind = first.kind
    points: list = []
    if kind is MetricKind.GAUGE or kind is MetricKind.SUM:
        for m in metrics:
            _number_points(m.points, points)
    elif kind is MetricKind.HISTOGRAM:
        points = [_histogram_point(p) for m in metrics for p in m.points]
    else:
        all_points = [p for m in metrics for p in m.points]
        counts = _packed_varints_of([p.positive_counts for p in all_points])
        points = [_exp_histogram_point(p, c) for p, c in zip(all_points, counts)]
    if kind is MetricKind.SUM:
        points.append(b"\x10" + _varint(int(first.temporality)))
        if first.monotonic:
            points.append(b"\x18\x01")
    elif kind is not MetricKind.GAUGE:
        points.append(b"\x10" + _varint(int(first.temporality)))
    data = b"".join(points)
    return _ld(b"\x12", _IDENTITY[(first.name, first.description, first.unit)] + _ld(_DATA_TAG[kind], data))


def _by_resource_and_scope(groups: Iterable) -> dict:
    """{resource: {scope: [groups]}} preserving first-seen order."""
    out: dict = {}
    for g in groups:
        out.setdefault(g.resource, {}).setdefault(g.scope, []).append(g)
    return out


def encode_metrics(groups: list[MetricGroup]) -> bytes:
    resources = []
    for resource, scopes in _by_resource_and_scope(groups).items():
        parts = [_RESOURCE.of(resource)]
        for scope, scope_groups in scopes.items():
            by_name: dict = {}  # collections of the same metric batched together share one entry
            for g in scope_groups:
                for m in g.metrics:
                    if m.points:
                        by_name.setdefault(m.name, []).append(m)
            metrics = [_metric(ms[0], ms) for ms in by_name.values()]
            parts.append(_ld(b"\x12", _SCOPE[scope] + b"".join(metrics)))
        resources.append(_ld(b"\x0a", b"".join(parts)))
    return b"".join(resources)


def _log_record(r) -> bytes:
    body = [b"\x09" + _F64.pack(r.time_ns) if r.time_ns else b"",
            b"\x10" + _varint(int(r.severity)) if int(r.severity) else b"",
            _str(b"\x1a", r.severity.name),
            _ld(b"\x2a", _ld(b"\x0a", _utf8(r.body))),
            _ATTRS_LOG.of(r.attributes),
            b"\x59" + _F64.pack(r.observed_time_ns or r.time_ns) if (r.observed_time_ns or r.time_ns) else b"",
            _str(b"\x62", r.event_name)]
    return _ld(b"\x12", b"".join(body))


def encode_logs(groups: list[LogGroup]) -> bytes:
    resources = []
    for resource, scopes in _by_resource_and_scope(groups).items():
        parts = [_RESOURCE.of(resource)]
        for scope, scope_groups in scopes.items():
            records = [_log_record(r) for g in scope_groups for r in g.records]
            parts.append(_ld(b"\x12", _SCOPE[scope] + b"".join(records)))
        resources.append(_ld(b"\x0a", b"".join(parts)))
    return b"".join(resources)


def _encode_signal(signal: str, encoder, groups: list, count) -> list:
    """[encoder(groups) as a Payload]. Should that raise (a value no replacement covers), each group
    is encoded alone and the ones that still raise are left out and counted: one bad group never
    costs the batch ([] when no group is left)."""
    try:
        return [Payload(signal, encoder(groups), count(groups))]
    except Exception as e:
        log.warning("encode_failed signal=%s error=%s", signal, type(e).__name__)
    kept = []
    for g in groups:
        try:
            encoder([g])
        except Exception:
            counters = _COUNTERS.get()
            if counters is not None:
                counters.dropped.add(count([g]), (("signal", signal),))
        else:
            kept.append(g)
    return [Payload(signal, encoder(kept), count(kept))] if kept else []


def encode(batch: Batch, counters: Optional[EncodingCounters] = None) -> list[Payload]:
    """The batch as at most one payload per signal; replacements and drops are counted in `counters`."""
    token = _COUNTERS.set(counters)
    try:
        out = []
        if batch.metrics:
            out += _encode_signal("metrics", encode_metrics, batch.metrics,
                                  lambda gs: sum(len(m.points) for g in gs for m in g.metrics))
        if batch.logs:
            out += _encode_signal("logs", encode_logs, batch.logs, lambda gs: sum(len(g.records) for g in gs))
        return out
    finally:
        _COUNTERS.reset(token)


# --- splitting a request that is too large for the server ------------------------------------------

_POINT_FIELDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


def _metric_points(metric):
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind else None


def count_items(signal: str, body: bytes) -> int:
    req = REQUEST_TYPES[signal].FromString(body)
    if signal == "metrics":
        return sum(len(_metric_points(m) or ()) for rm in req.resource_metrics
                   for sm in rm.scope_metrics for m in sm.metrics)
    return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)


def split(payload: Payload) -> list[Payload]:
    """The payload as two requests with about half of its data points (log records) each, resource
    and scope kept with each half; [] when it holds fewer than two items and cannot be split."""
    req = REQUEST_TYPES[payload.signal].FromString(payload.body)
    if payload.signal == "metrics":
        places = [(i, j, k, n) for i, rm in enumerate(req.resource_metrics)
                  for j, sm in enumerate(rm.scope_metrics) for k, m in enumerate(sm.metrics)
                  for n in range(len(_metric_points(m) or ()))]
    else:
        places = [(i, j, n) for i, rl in enumerate(req.resource_logs)
                  for j, sl in enumerate(rl.scope_logs) for n in range(len(sl.log_records))]
    if len(places) < 2:
        return []
    half = len(places) // 2
    return [_subset(payload.signal, req, set(part)) for part in (places[:half], places[half:])]


def _subset(signal: str, req, keep: set) -> Payload:
    """A copy of `req` with only the items at the positions in `keep`; empty containers dropped."""
    out = REQUEST_TYPES[signal]()
    if signal == "metrics":
        for i, rm in enumerate(req.resource_metrics):
            new_rm = None
            for j, sm in enumerate(rm.scope_metrics):
                new_sm = None
                for k, m in enumerate(sm.metrics):
                    points = _metric_points(m) or ()
                    chosen = [p for n, p in enumerate(points) if (i, j, k, n) in keep]
                    if not chosen:
                        continue
                    if new_rm is None:
                        new_rm = out.resource_metrics.add(resource=rm.resource, schema_url=rm.schema_url)
                    if new_sm is None:
                        new_sm = new_rm.scope_metrics.add(scope=sm.scope, schema_url=sm.schema_url)
                    new_m = new_sm.metrics.add()
                    new_m.CopyFrom(m)
                    target = _metric_points(new_m)
                    del target[:]
                    target.extend(chosen)
        items = len(keep)
    else:
        for i, rl in enumerate(req.resource_logs):
            new_rl = None
            for j, sl in enumerate(rl.scope_logs):
                chosen = [r for n, r in enumerate(sl.log_records) if (i, j, n) in keep]
                if not chosen:
                    continue
                if new_rl is None:
                    new_rl = out.resource_logs.add(resource=rl.resource, schema_url=rl.schema_url)
                new_rl.scope_logs.add(scope=sl.scope, schema_url=sl.schema_url).log_records.extend(chosen)
        items = len(keep)
    return Payload(signal, out.SerializeToString(), items)


# --- other views of a payload ---------------------------------------------------------------------

def to_json_line(payload: Payload) -> bytes:
    """OTLP/JSON as the Collector's file exporter writes it: one request per line, camelCase
    field names, enums as integers, 64-bit integers as strings."""
    msg = REQUEST_TYPES[payload.signal].FromString(payload.body)
    text = json_format.MessageToJson(msg, indent=None, use_integers_for_enums=True)
    return text.encode() + b"\n"


RESPONSE_TYPES = {"metrics": ExportMetricsServiceResponse, "logs": ExportLogsServiceResponse}


def rejected_items(signal: str, body: bytes) -> tuple[int, str]:
    """(rejected items, server message) from an Export*ServiceResponse; an empty body is success."""
    if not body:
        return 0, ""
    resp = RESPONSE_TYPES[signal].FromString(body)
    ps = resp.partial_success
    rejected = ps.rejected_data_points if signal == "metrics" else ps.rejected_log_records
    return rejected, ps.error_message

