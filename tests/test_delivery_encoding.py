"""The hand-written OTLP wire encoder against the official protobuf classes: for every shape the
model has, the bytes equal those of the same request built field by field with opentelemetry-proto
(and decode to an equal message); splitting keeps every item exactly once."""
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

from agent.export import encoding
from agent.export.encoding import Payload, encode, encode_logs, encode_metrics, split
from agent.model import (Batch, ExponentialHistogramPoint, HistogramPoint, LogGroup, LogRecord, Metric,
                         MetricGroup, MetricKind, NumberPoint, Resource, Scope, Severity, Temporality)


# --- the reference: the same requests built with the official message classes -------------------

def _any(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, tuple):
        return AnyValue(array_value=ArrayValue(values=[_any(v) for v in value]))
    return AnyValue(string_value=str(value))


def _kvs(attributes) -> list:
    return [KeyValue(key=k, value=_any(v)) for k, v in attributes]


def _number_point(p, out) -> None:
    out.attributes.extend(_kvs(p.attributes))
    out.start_time_unix_nano = p.start_time_ns
    out.time_unix_nano = p.time_ns
    if isinstance(p.value, int):
        out.as_int = p.value
    else:
        out.as_double = p.value


def _fill_metric(m, out) -> None:
    if not out.name:
        out.name, out.description, out.unit = m.name, m.description, m.unit
    if m.kind is MetricKind.GAUGE:
        for p in m.points:
            _number_point(p, out.gauge.data_points.add())
    elif m.kind is MetricKind.SUM:
        out.sum.aggregation_temporality = int(m.temporality)
        out.sum.is_monotonic = m.monotonic
        for p in m.points:
            _number_point(p, out.sum.data_points.add())
    elif m.kind is MetricKind.HISTOGRAM:
        out.histogram.aggregation_temporality = int(m.temporality)
        for p in m.points:
            o = out.histogram.data_points.add()
            o.attributes.extend(_kvs(p.attributes))
            o.start_time_unix_nano, o.time_unix_nano = p.start_time_ns, p.time_ns
            o.count, o.sum = p.count, p.sum
            o.explicit_bounds.extend(p.bounds)
            o.bucket_counts.extend(p.counts)
    else:
        out.exponential_histogram.aggregation_temporality = int(m.temporality)
        for p in m.points:
            o = out.exponential_histogram.data_points.add()
            o.attributes.extend(_kvs(p.attributes))
            o.start_time_unix_nano, o.time_unix_nano = p.start_time_ns, p.time_ns
            o.count, o.sum, o.scale, o.zero_count = p.count, p.sum, p.scale, p.zero_count
            o.positive.offset = p.positive_offset
            o.positive.bucket_counts.extend(p.positive_counts)
            if p.min is not None:
                o.min = p.min
            if p.max is not None:
                o.max = p.max


def reference_metrics(groups) -> bytes:
    req = ExportMetricsServiceRequest()
    for resource, scopes in encoding._by_resource_and_scope(groups).items():
        rm = req.resource_metrics.add()
        rm.resource.CopyFrom(PbResource(attributes=_kvs(resource.attributes)))
        for scope, parts in scopes.items():
            sm = rm.scope_metrics.add()
            sm.scope.CopyFrom(InstrumentationScope(name=scope.name, version=scope.version))
            by_name: dict = {}
            for g in parts:
                for m in g.metrics:
                    if m.points:
                        out = by_name.get(m.name)
                        if out is None:
                            out = by_name[m.name] = sm.metrics.add()
                        _fill_metric(m, out)
    return req.SerializeToString()


def reference_logs(groups) -> bytes:
    req = ExportLogsServiceRequest()
    for resource, scopes in encoding._by_resource_and_scope(groups).items():
        rl = req.resource_logs.add()
        rl.resource.CopyFrom(PbResource(attributes=_kvs(resource.attributes)))
        for scope, parts in scopes.items():
            sl = rl.scope_logs.add()
            sl.scope.CopyFrom(InstrumentationScope(name=scope.name, version=scope.version))
            for g in parts:
                for r in g.records:
                    out = sl.log_records.add()
                    out.time_unix_nano = r.time_ns
                    out.observed_time_unix_nano = r.observed_time_ns or r.time_ns
                    out.severity_number = int(r.severity)
                    out.severity_text = r.severity.name
                    out.body.string_value = r.body
                    out.attributes.extend(_kvs(r.attributes))
                    if r.event_name:
                        out.event_name = r.event_name
    return req.SerializeToString()


# --- shapes -----------------------------------------------------------------------------------------

HOST = Resource((("host.name", "h1"), ("service.name", "hostagent"), ("pid", 42), ("ratio", 0.5),
                 ("on", True), ("neg", -7), ("big", 2**62), ("unicode", "zürich ✓")))
T0, T1 = 1_700_000_000_000_000_000, 1_700_000_010_123_456_789


def shapes() -> list:
    cpu = Metric("system.cpu.time", "CPU seconds.", "s", MetricKind.SUM,
                 [NumberPoint((("cpu", f"cpu{i}"), ("state", s)), 12.5 * i, T0, T1)
                  for i in range(3) for s in ("user", "idle")], monotonic=True)
    mem = Metric("system.memory.usage", "", "By", MetricKind.SUM,
                 [NumberPoint((("state", "used"),), 2**40, T0, T1), NumberPoint((), 0, T0, T1)])
    gauge = Metric("system.cpu.load_average.1m", "Load.", "{thread}", MetricKind.GAUGE,
                   [NumberPoint((), 0.0, 0, T1), NumberPoint((), -1.5, T0, 0), NumberPoint((("b", False),), 1, T0, T1),
                    NumberPoint((("long", "x" * 300),), -3, T0, T1)])
    delta = Metric("d", "", "", MetricKind.SUM, [NumberPoint((), 5, T0, T1)], temporality=Temporality.DELTA)
    hist = Metric("bio.latency", "Block I/O latency.", "s", MetricKind.HISTOGRAM,
                  [HistogramPoint((("disk", "sda"),), T0, T1, 10, 0.25, (0.001, 0.01, 0.1), [1, 2, 3, 4]),
                   HistogramPoint((), T0, T1, 0, 0.0, (), [0])], temporality=Temporality.DELTA)
    exp = Metric("runq.latency", "", "s", MetricKind.EXPONENTIAL_HISTOGRAM,
                 [ExponentialHistogramPoint((("cpu", "cpu0"),), T0, T1, 7, 3.5, 0, 1, -3, [1, 0, 200, 3], 1e-6, 2.0),
                  ExponentialHistogramPoint((), T0, T1, 0, 0.0, -2, 0, 0, []),
                  ExponentialHistogramPoint((), T0, T1, 2, 1.0, 3, 0, 5, [2**40, 1])])
    # enough bucket counts (> 256) in one metric for the vectorized varint path, every varint width
    widths = [0, 1, 127, 128, 16383, 16384, 2**21, 2**28, 2**35, 2**42, 2**49, 2**56, 2**63 - 1]
    many = Metric("syscall.latency", "", "ns", MetricKind.EXPONENTIAL_HISTOGRAM,
                  [ExponentialHistogramPoint((("syscall", f"s{i}"),), T0, T1, 3 + i, 9.0 * i, 0, i % 3, i % 7,
                                             [widths[(i + k) % len(widths)] for k in range(i % 23)])
                   for i in range(60)])
    other = Resource((("host.name", "h2"),))
    return [
        [MetricGroup(HOST, Scope("hostagent/scrapers/cpu", "0.1.0"), [cpu, gauge])],
        [MetricGroup(HOST, Scope("s"), [mem, delta, Metric("empty", "", "", MetricKind.GAUGE, [])])],
        [MetricGroup(HOST, Scope("probes"), [hist, exp])],
        [MetricGroup(HOST, Scope("probes"), [many])],
        # merged: two collections of the same metric under one resource and scope, a second resource,
        # an empty resource and an empty scope
        [MetricGroup(HOST, Scope("s"), [cpu]), MetricGroup(other, Scope("s"), [mem]),
         MetricGroup(HOST, Scope("s"), [cpu, mem]), MetricGroup(Resource(()), Scope(""), [delta])],
    ]


@pytest.mark.parametrize("groups", shapes(), ids=["sum-gauge", "ints-delta", "histograms", "many-buckets", "merged"])
def test_metrics_bytes_equal_the_official_serializer(groups):
    body = encode_metrics(groups)
    assert body == reference_metrics(groups)
    decode = ExportMetricsServiceRequest.FromString
    assert decode(body) == decode(reference_metrics(groups))


def test_logs_bytes_equal_the_official_serializer():
    scope = Scope("hostagent/probes/oom")
    oom = LogRecord(T1, "oom kill", (("pid", 1), ("comm", "java")), Severity.WARN, "oom_kill", T1 + 5)
    groups = [LogGroup(HOST, scope, [oom,
                                     LogRecord(T1, "", (), Severity.INFO),
                                     LogRecord(0, "ünïcode " * 40, (("x", 1.5),), Severity.FATAL)]),
              LogGroup(Resource(()), Scope(""), [LogRecord(T0, "b")]),
              LogGroup(HOST, scope, [LogRecord(T0, "later")])]
    assert encode_logs(groups) == reference_logs(groups)


def test_real_host_scrapes_encode_identically():
    from agent.components import ScrapersConfig, build_scrapers
    from agent.resource import ResourceConfig, detect
    from agent.selfmetrics import SelfMetrics
    resource = detect(ResourceConfig())
    sources = build_scrapers(ScrapersConfig(), SelfMetrics(), resource)
    groups = []
    for _ in range(2):
        for s in sources:
            groups.extend(s.collect())
        time.sleep(0.05)
    assert groups
    assert encode_metrics(groups) == reference_metrics(groups)
    # and a second time, from the caches
    assert encode_metrics(groups) == reference_metrics(groups)


def test_attribute_cache_stays_bounded():
    cache = encoding._Cache(lambda k: b"x", limit=10)
    for i in range(25):
        cache[(("i", i),)]
    assert len(cache) <= 10
    typed = encoding._AttributesCache(lambda k: b"x", limit=10)
    for i in range(25):
        for v in (i, float(i), str(i)):
            assert typed.of((("i", v),)) == b"x"
    assert len(typed) <= 10 and len(typed.numbers) <= 10


@pytest.mark.parametrize("values", [(0, 0.0, False), (False, 0.0, 0), (1, True, 1.0), (-0.0, 0.0, 0),
                                    ((1, 2), (True, 2.0), (1.0, 2))])
def test_values_python_finds_equal_keep_their_own_type(values):
    """0, 0.0, -0.0 and False are equal (and hash alike) in Python, but are different AnyValues: each
    point and record is sent with the type it has, whichever came first and was cached."""
    points = [NumberPoint((("v", v), ("host", "h")), 1.0, T0, T1) for v in values]
    groups = [MetricGroup(HOST, Scope("s"), [Metric("m", "", "", MetricKind.GAUGE, points)])]
    records = [LogRecord(T1, "r", (("v", v),)) for v in values]
    logs = [LogGroup(HOST, Scope("s"), records)]
    for _ in range(2):  # the second time from the caches
        assert encode_metrics(groups) == reference_metrics(groups)
        assert encode_logs(logs) == reference_logs(logs)


_EQUALS = st.sampled_from([0, 0.0, False, 1, 1.0, True, -0.0, 2, 2.0, "0", ""])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(_EQUALS, st.tuples(_EQUALS, _EQUALS)), min_size=1, max_size=3),
                min_size=1, max_size=8))
def test_any_mix_of_equal_values_encodes_as_the_official_serializer(sets):
    """Attribute sets drawn from values Python finds equal across types, in any order and repeated:
    every encoding, first or from the caches, is the official one."""
    points = [NumberPoint(tuple((f"k{i}", v) for i, v in enumerate(values)), 1, T0, T1) for values in sets]
    groups = [MetricGroup(HOST, Scope("s"), [Metric("m", "", "", MetricKind.SUM, points)])]
    logs = [LogGroup(HOST, Scope("s"), [LogRecord(T1, "r", p.attributes) for p in points])]
    for _ in range(2):
        assert encode_metrics(groups) == reference_metrics(groups)
        assert encode_logs(logs) == reference_logs(logs)


def test_every_field_tag_is_the_one_the_official_serializer_writes():
    """The encoder's tags come from the generated descriptors: for each field of every message it
    writes, the official serializer starts a message holding only that field with that tag."""
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    messages = [m for module in (common_pb2, logs_pb2, metrics_pb2, resource_pb2)
                for m in vars(module).values() if isinstance(m, type) and hasattr(m, "DESCRIPTOR")]
    messages += [metrics_pb2.ExponentialHistogramDataPoint.Buckets, ExportMetricsServiceRequest,
                 ExportLogsServiceRequest]
    checked = 0
    for cls in messages:
        for field in cls.DESCRIPTOR.fields:
            msg = cls()
            kind = field.cpp_type
            value = {field.CPPTYPE_STRING: b"x" if field.type == field.TYPE_BYTES else "x",
                     field.CPPTYPE_BOOL: True, field.CPPTYPE_DOUBLE: 1.5, field.CPPTYPE_FLOAT: 1.5,
                     field.CPPTYPE_ENUM: 1}.get(kind, 1)
            target = getattr(msg, field.name)
            if kind == field.CPPTYPE_MESSAGE:
                (target.add() if field.is_repeated else target).SetInParent()
            elif field.is_repeated:
                target.append(value)
            else:
                setattr(msg, field.name, value)
            assert msg.SerializeToString().startswith(encoding._field_tag(field)), (cls.__name__, field.name)
            checked += 1
    assert checked > 80


def _points(req):
    return [(rm.resource.SerializeToString(), sm.scope.name, m.name, p.SerializeToString())
            for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in getattr(m, m.WhichOneof("data")).data_points]


def count_points(body: bytes) -> int:
    return len(_points(ExportMetricsServiceRequest.FromString(body)))


def test_split_halves_keep_every_point_once_with_its_resource_and_scope():
    groups = shapes()[3] + shapes()[2]
    payload = encode(Batch(metrics=groups))[0]
    halves = split(payload)
    assert len(halves) == 2
    assert sum(h.items for h in halves) == payload.items == count_points(payload.body)
    assert abs(halves[0].items - halves[1].items) <= 1
    whole = _points(ExportMetricsServiceRequest.FromString(payload.body))
    parts = [p for h in halves for p in _points(ExportMetricsServiceRequest.FromString(h.body))]
    assert sorted(parts) == sorted(whole)
    for h in halves:
        assert count_points(h.body) == h.items
    # down to single points, then no further
    one = payload
    while one.items > 1:
        one = split(one)[0]
    assert split(one) == []


def test_split_logs():
    groups = [LogGroup(HOST, Scope("a"), [LogRecord(T0 + i, f"r{i}") for i in range(5)]),
              LogGroup(Resource(()), Scope("b"), [LogRecord(T0, "x")])]
    payload = Payload("logs", encode_logs(groups), 6)
    halves = split(payload)
    assert [h.items for h in halves] == [3, 3]
    bodies = [r.body.string_value for h in halves
              for rl in ExportLogsServiceRequest.FromString(h.body).resource_logs
              for sl in rl.scope_logs for r in sl.log_records]
    assert bodies == ["r0", "r1", "r2", "r3", "r4", "x"]
