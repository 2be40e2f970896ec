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
import math
import operator
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor as _F
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (ExportLogsServiceRequest,
                                                                    ExportLogsServiceResponse)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest, ExportMetricsServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import (AnyValue, ArrayValue, InstrumentationScope, KeyValue,
                                                      KeyValueList)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (ExponentialHistogram, ExponentialHistogramDataPoint, Gauge,
                                                        Histogram, HistogramDataPoint, Metric, NumberDataPoint,
                                                        ResourceMetrics, ScopeMetrics, Sum)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

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


# --- field tags, read from the generated classes of opentelemetry-proto ------------------------------

_WIRE_TYPES = {**dict.fromkeys((_F.TYPE_DOUBLE, _F.TYPE_FIXED64, _F.TYPE_SFIXED64), 1),
               **dict.fromkeys((_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE), 2),
               **dict.fromkeys((_F.TYPE_FLOAT, _F.TYPE_FIXED32, _F.TYPE_SFIXED32), 5)}  # the rest: varint, 0


def _field_tag(field) -> bytes:
    """A field's tag as it starts the field on the wire: (number << 3 | wire type) as a varint."""
    if hasattr(field, "is_packed"):
        packed = field.is_packed
    else:  # protobuf < 5: proto3 packs every repeated number
        packed = field.label == field.LABEL_REPEATED and _WIRE_TYPES.get(field.type) != 2
    return _varint(field.number << 3 | (2 if packed else _WIRE_TYPES.get(field.type, 0)))


def _tags(message, *names: str) -> tuple:
    """The tags of these fields of `message`, a generated class."""
    return tuple(_field_tag(message.DESCRIPTOR.fields_by_name[n]) for n in names)


def _tag(name: str, *messages) -> bytes:
    """The tag of field `name`, which the encoder writes alike for each of these messages."""
    tags = {_tags(m, name)[0] for m in messages}
    if len(tags) != 1:
        raise ImportError(f"field {name} has different tags in {[m.__name__ for m in messages]}")
    return tags.pop()


_ANY_STRING, _ANY_BOOL, _ANY_INT, _ANY_DOUBLE, _ANY_ARRAY, _ANY_KVLIST, _ANY_BYTES = _tags(
    AnyValue, "string_value", "bool_value", "int_value", "double_value", "array_value", "kvlist_value",
    "bytes_value")
_KV_KEY, _KV_VALUE = _tags(KeyValue, "key", "value")
(_ARRAY_VALUES,), (_KVLIST_VALUES,), (_RESOURCE_ATTRS,) = (_tags(ArrayValue, "values"),
                                                           _tags(KeyValueList, "values"),
                                                           _tags(Resource, "attributes"))
_SCOPE_NAME, _SCOPE_VERSION = _tags(InstrumentationScope, "name", "version")
_RESOURCE_FIELD = _tag("resource", ResourceMetrics, ResourceLogs)
_SCOPE_FIELD = _tag("scope", ScopeMetrics, ScopeLogs)
_RESOURCE_METRICS, = _tags(ExportMetricsServiceRequest, "resource_metrics")
_SCOPE_METRICS, = _tags(ResourceMetrics, "scope_metrics")
_METRICS, = _tags(ScopeMetrics, "metrics")
_NAME, _DESCRIPTION, _UNIT = _tags(Metric, "name", "description", "unit")
_DATA_TAG = dict(zip((MetricKind.GAUGE, MetricKind.SUM, MetricKind.HISTOGRAM, MetricKind.EXPONENTIAL_HISTOGRAM),
                     _tags(Metric, "gauge", "sum", "histogram", "exponential_histogram")))
_DATA_POINTS = _tag("data_points", Gauge, Sum, Histogram, ExponentialHistogram)
_TEMPORALITY = _tag("aggregation_temporality", Sum, Histogram, ExponentialHistogram)
_MONOTONIC, = _tags(Sum, "is_monotonic")
_NP_START, _NP_TIME, _NP_DOUBLE, _NP_INT, _NP_ATTRS = _tags(
    NumberDataPoint, "start_time_unix_nano", "time_unix_nano", "as_double", "as_int", "attributes")
_HP_START, _HP_TIME, _HP_COUNT, _HP_SUM, _HP_BUCKETS, _HP_BOUNDS, _HP_ATTRS = _tags(
    HistogramDataPoint, "start_time_unix_nano", "time_unix_nano", "count", "sum", "bucket_counts",
    "explicit_bounds", "attributes")
(_EP_ATTRS, _EP_START, _EP_TIME, _EP_COUNT, _EP_SUM, _EP_SCALE, _EP_ZERO, _EP_POSITIVE, _EP_MIN,
 _EP_MAX) = _tags(ExponentialHistogramDataPoint, "attributes", "start_time_unix_nano", "time_unix_nano", "count",
                  "sum", "scale", "zero_count", "positive", "min", "max")
_BUCKETS_OFFSET, _BUCKETS_COUNTS = _tags(ExponentialHistogramDataPoint.Buckets, "offset", "bucket_counts")
_RESOURCE_LOGS, = _tags(ExportLogsServiceRequest, "resource_logs")
_SCOPE_LOGS, = _tags(ResourceLogs, "scope_logs")
_LOG_RECORDS, = _tags(ScopeLogs, "log_records")
(_LOG_TIME, _LOG_SEVERITY, _LOG_SEVERITY_TEXT, _LOG_BODY, _LOG_ATTRS, _LOG_OBSERVED,
 _LOG_EVENT_NAME) = _tags(LogRecord, "time_unix_nano", "severity_number", "severity_text", "body", "attributes",
                          "observed_time_unix_nano", "event_name")


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
    """An AnyValue's body."""
    if isinstance(value, str):
        return _ld(_ANY_STRING, _utf8(value))
    if isinstance(value, bool):
        return _ANY_BOOL + _BYTE[int(value)]
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return _ANY_INT + _varint(value)
        return _ANY_DOUBLE + _D.pack(_double_of(value))
    if isinstance(value, float):
        return _ANY_DOUBLE + _D.pack(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _ld(_ANY_BYTES, bytes(value))
    if isinstance(value, (list, tuple, dict)) and depth < MAX_DEPTH:
        if isinstance(value, dict):
            body = b"".join(_ld(_KVLIST_VALUES, _str(_KV_KEY, k if isinstance(k, str) else _text_of(k))
                                + _ld(_KV_VALUE, _any_value(v, depth + 1))) for k, v in value.items())
            return _ld(_ANY_KVLIST, body)
        return _ld(_ANY_ARRAY, b"".join(_ld(_ARRAY_VALUES, _any_value(v, depth + 1)) for v in value))
    if value is None:
        return b""
    return _ld(_ANY_STRING, _utf8(_text_of(value)))


def _key_values(tag: bytes, attributes) -> bytes:
    """Repeated KeyValue under field `tag`, one entry per (key, value) pair."""
    return b"".join(_ld(tag, _str(_KV_KEY, k) + _ld(_KV_VALUE, _any_value(v))) for k, v in attributes)


class _Cache(dict):
    """Encoded bytes of values that repeat between collections, keyed by the (hashable) value.
    Cleared when it grows past `limit`, so memory stays bounded whatever the cardinality."""

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


def _kinds(values) -> tuple:
    """What tells apart values that Python finds equal: the type of each, the sign of a float zero,
    the same for the items of a tuple."""
    kinds = tuple([v.__class__ for v in values])
    if tuple in kinds or float in kinds:
        return tuple([_kinds(v) if v.__class__ is tuple
                      else (float, math.copysign(1.0, v)) if v.__class__ is float and not v
                      else v.__class__ for v in values])
    return kinds


class _AttributesCache(_Cache):
    """A _Cache of attribute sets. Python finds 0, 0.0, -0.0 and False equal as dict keys (1, 1.0 and
    True too), but they are different AnyValues. Sets of text only, the common case, are the dict's
    keys: one lookup. A set holding anything else never is, so each of its lookups comes here, to
    `numbers`, which keeps it with the set it was encoded from: the same tuple again, or one of the
    same _kinds, takes that encoding; a set equal to it but of other kinds is encoded anew."""

    def __init__(self, encode, limit: int = 65536):
        super().__init__(encode, limit)
        self.numbers: dict = {}

    def __missing__(self, key):
        entry = self.numbers.get(key)
        if entry is not None:
            first, value = entry
            if first is key or _kinds([v for _, v in first]) == _kinds([v for _, v in key]):
                return value
        value = self.encode(key)
        kinds = [v.__class__ for _, v in key]
        if kinds.count(str) == len(kinds):
            if len(self) >= self.limit:
                self.clear()
            self[key] = value
        elif entry is None:
            if len(self.numbers) >= self.limit:
                self.numbers.clear()
            self.numbers[key] = (key, value)
        return value


# attribute sets, under the field attributes have in each message
_ATTRS_NUMBER = _AttributesCache(lambda a: _key_values(_NP_ATTRS, a))
_ATTRS_HISTOGRAM = _AttributesCache(lambda a: _key_values(_HP_ATTRS, a))
_ATTRS_EXP = _AttributesCache(lambda a: _key_values(_EP_ATTRS, a))
_ATTRS_LOG = _AttributesCache(lambda a: _key_values(_LOG_ATTRS, a))
# Resource and InstrumentationScope, as fields of ResourceMetrics/ResourceLogs and ScopeMetrics/ScopeLogs
_RESOURCE = _Cache(lambda r: _ld(_RESOURCE_FIELD, _key_values(_RESOURCE_ATTRS, r.attributes)), limit=4096)
_SCOPE = _Cache(lambda s: _ld(_SCOPE_FIELD, _str(_SCOPE_NAME, s.name) + _str(_SCOPE_VERSION, s.version)),
                limit=4096)
_BOUNDS = _Cache(lambda b: _ld(_HP_BOUNDS, struct.pack(f"<{len(b)}d", *b)) if b else b"", limit=4096)

# NumberDataPoint with both timestamps set: start (fixed64), time (fixed64), value (double or sfixed64),
# each after its one-byte tag
_NUMBER_DOUBLE = struct.Struct("<BQBQBd")
_NUMBER_INT = struct.Struct("<BQBQBq")
_NUMBER_TAGS = tuple(map(ord, (_NP_START, _NP_TIME, _NP_DOUBLE, _NP_INT)))
_DP_PREFIX = [_DATA_POINTS + _BYTE[n] for n in range(128)]  # data_points with a one-byte length


def _number_point_slow(p, attrs: bytes) -> bytes:
    v = p.value
    body = ((_NP_START + _F64.pack(p.start_time_ns) if p.start_time_ns else b"")
            + (_NP_TIME + _F64.pack(p.time_ns) if p.time_ns else b"")
            + (_NP_DOUBLE + _D.pack(v) if isinstance(v, float) else _int_value(operator.index(v)))
            + attrs)
    return _ld(_DATA_POINTS, body)


def _int_value(v: int) -> bytes:
    """NumberDataPoint.as_int, or as_double for an integer outside int64."""
    return _NP_INT + _Q.pack(v) if INT64_MIN <= v <= INT64_MAX else _NP_DOUBLE + _D.pack(_double_of(v))


def _number_points(points, out: list) -> None:
    """Append each NumberDataPoint as data_points of Gauge/Sum; the hot loop of the encoder."""
    attrs_of, prefix, pack_d, pack_i = _ATTRS_NUMBER, _DP_PREFIX, _NUMBER_DOUBLE.pack, _NUMBER_INT.pack
    start_tag, time_tag, double_tag, int_tag = _NUMBER_TAGS
    fixed = _NUMBER_DOUBLE.size
    append = out.append
    for p in points:
        try:
            a = attrs_of[p.attributes]
        except TypeError:
            a = attrs_of.of(p.attributes)
        start, t, v = p.start_time_ns, p.time_ns, p.value
        tv = type(v)
        if tv is float and start and t:
            body = pack_d(start_tag, start, time_tag, t, double_tag, v)
        elif tv is int and start and t:
            try:
                body = pack_i(start_tag, start, time_tag, t, int_tag, v)
            except struct.error:  # an integer outside int64 (or a timestamp outside uint64)
                append(_number_point_slow(p, a))
                continue
        else:  # a timestamp left at 0, a bool or a numpy number
            append(_number_point_slow(p, a))
            continue
        n = fixed + len(a)
        append(prefix[n] if n < 128 else _DATA_POINTS + _varint(n))
        append(body)
        append(a)


def _histogram_point(p: HistogramPoint) -> bytes:
    body = [_HP_START + _F64.pack(p.start_time_ns) if p.start_time_ns else b"",
            _HP_TIME + _F64.pack(p.time_ns) if p.time_ns else b"",
            _HP_COUNT + _F64.pack(p.count) if p.count else b"",
            _HP_SUM + _D.pack(p.sum),
            _ld(_HP_BUCKETS, struct.pack(f"<{len(p.counts)}Q", *p.counts)) if p.counts else b"",
            _BOUNDS[tuple(p.bounds)],
            _ATTRS_HISTOGRAM.of(p.attributes)]
    return _ld(_DATA_POINTS, b"".join(body))


# start, time, count and sum of an ExponentialHistogramDataPoint (each after its one-byte tag), packed
# at once when none of them is a proto3 default that must be left out
_EXP_HEAD = struct.Struct("<BQBQBQBd")
_EXP_HEAD_TAGS = tuple(map(ord, (_EP_START, _EP_TIME, _EP_COUNT, _EP_SUM)))


def _exp_histogram_point(p: ExponentialHistogramPoint, counts: bytes) -> bytes:
    """`counts`: the packed varints of p.positive_counts."""
    if p.start_time_ns and p.time_ns and p.count:
        start, time_, count, sum_ = _EXP_HEAD_TAGS
        head = _EXP_HEAD.pack(start, p.start_time_ns, time_, p.time_ns, count, p.count, sum_, p.sum)
    else:
        head = b"".join((_EP_START + _F64.pack(p.start_time_ns) if p.start_time_ns else b"",
                         _EP_TIME + _F64.pack(p.time_ns) if p.time_ns else b"",
                         _EP_COUNT + _F64.pack(p.count) if p.count else b"",
                         _EP_SUM + _D.pack(p.sum)))
    positive = ((_BUCKETS_OFFSET + _varint(_zigzag(p.positive_offset)) if p.positive_offset else b"")
                + (_BUCKETS_COUNTS + _varint(len(counts)) + counts if counts else b""))
    body = (_ATTRS_EXP.of(p.attributes) + head
            + (_EP_SCALE + _varint(_zigzag(p.scale)) if p.scale else b"")
            + (_EP_ZERO + _F64.pack(p.zero_count) if p.zero_count else b"")
            + _EP_POSITIVE + _varint(len(positive)) + positive
            + (_EP_MIN + _D.pack(p.min) if p.min is not None else b"")
            + (_EP_MAX + _D.pack(p.max) if p.max is not None else b""))
    return _DATA_POINTS + _varint(len(body)) + body


_IDENTITY = _Cache(lambda k: _str(_NAME, k[0]) + _str(_DESCRIPTION, k[1]) + _str(_UNIT, k[2]), limit=4096)


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
    if kind is not MetricKind.GAUGE:
        points.append(_TEMPORALITY + _varint(int(first.temporality)))
        if kind is MetricKind.SUM and first.monotonic:
            points.append(_MONOTONIC + _BYTE[1])
    data = b"".join(points)
    return _ld(_METRICS, _IDENTITY[(first.name, first.description, first.unit)] + _ld(_DATA_TAG[kind], data))


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
            parts.append(_ld(_SCOPE_METRICS, _SCOPE[scope] + b"".join(metrics)))
        resources.append(_ld(_RESOURCE_METRICS, b"".join(parts)))
    return b"".join(resources)


def _log_record(r) -> bytes:
    body = [_LOG_TIME + _F64.pack(r.time_ns) if r.time_ns else b"",
            _LOG_SEVERITY + _varint(int(r.severity)) if int(r.severity) else b"",
            _str(_LOG_SEVERITY_TEXT, r.severity.name),
            _ld(_LOG_BODY, _ld(_ANY_STRING, _utf8(r.body))),
            _ATTRS_LOG.of(r.attributes),
            _LOG_OBSERVED + _F64.pack(r.observed_time_ns or r.time_ns) if (r.observed_time_ns or r.time_ns) else b"",
            _str(_LOG_EVENT_NAME, r.event_name)]
    return _ld(_LOG_RECORDS, b"".join(body))


def encode_logs(groups: list[LogGroup]) -> bytes:
    resources = []
    for resource, scopes in _by_resource_and_scope(groups).items():
        parts = [_RESOURCE.of(resource)]
        for scope, scope_groups in scopes.items():
            records = [_log_record(r) for g in scope_groups for r in g.records]
            parts.append(_ld(_SCOPE_LOGS, _SCOPE[scope] + b"".join(records)))
        resources.append(_ld(_RESOURCE_LOGS, b"".join(parts)))
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

def _metric_points(metric):
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind else None


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

