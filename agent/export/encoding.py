"""Pure OTLP encoding: model -> ExportMetricsServiceRequest / ExportLogsServiceRequest bytes.

Shared by every exporter (gRPC, HTTP, file), so what is queued is always the wire payload.
Groups with the same resource and scope are merged, and each resource is encoded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (ExportLogsServiceRequest,
                                                                    ExportLogsServiceResponse)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest, ExportMetricsServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

from agent.model import (Attributes, Batch, ExponentialHistogramPoint, HistogramPoint, LogGroup,
                         MetricGroup, MetricKind)

SIGNALS = ("metrics", "logs")
REQUEST_TYPES = {"metrics": ExportMetricsServiceRequest, "logs": ExportLogsServiceRequest}


@dataclass(frozen=True, slots=True)
class Payload:
    """One encoded export request, ready for any transport."""
    signal: str  # "metrics" | "logs"
    body: bytes
    items: int  # data points or log records inside


def _any(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _kvs(attributes: Attributes) -> list:
    return [KeyValue(key=k, value=_any(v)) for k, v in attributes]


def _number_point(p, out) -> None:
    out.attributes.extend(_kvs(p.attributes))
    out.start_time_unix_nano = p.start_time_ns
    out.time_unix_nano = p.time_ns
    if isinstance(p.value, int):
        out.as_int = p.value
    else:
        out.as_double = p.value


def _histogram_point(p: HistogramPoint, out) -> None:
    out.attributes.extend(_kvs(p.attributes))
    out.start_time_unix_nano, out.time_unix_nano = p.start_time_ns, p.time_ns
    out.count, out.sum = p.count, p.sum
    out.explicit_bounds.extend(p.bounds)
    out.bucket_counts.extend(p.counts)


def _exp_histogram_point(p: ExponentialHistogramPoint, out) -> None:
    out.attributes.extend(_kvs(p.attributes))
    out.start_time_unix_nano, out.time_unix_nano = p.start_time_ns, p.time_ns
    out.count, out.sum, out.scale, out.zero_count = p.count, p.sum, p.scale, p.zero_count
    out.positive.offset = p.positive_offset
    out.positive.bucket_counts.extend(p.positive_counts)
    if p.min is not None:
        out.min = p.min
    if p.max is not None:
        out.max = p.max


def _fill_metric(m, out: metrics_pb2.Metric) -> None:
    """Add m's points to `out`; the first call for a metric also sets its identity."""
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
            _histogram_point(p, out.histogram.data_points.add())
    else:
        out.exponential_histogram.aggregation_temporality = int(m.temporality)
        for p in m.points:
            _exp_histogram_point(p, out.exponential_histogram.data_points.add())


def _by_resource_and_scope(groups: Iterable) -> dict:
    """{resource: {scope: [groups]}} preserving first-seen order."""
    out: dict = {}
    for g in groups:
        out.setdefault(g.resource, {}).setdefault(g.scope, []).append(g)
    return out


def encode_metrics(groups: list[MetricGroup]) -> bytes:
    req = ExportMetricsServiceRequest()
    for resource, scopes in _by_resource_and_scope(groups).items():
        rm = req.resource_metrics.add()
        rm.resource.CopyFrom(PbResource(attributes=_kvs(resource.attributes)))
        for scope, parts in scopes.items():
            sm = rm.scope_metrics.add()
            sm.scope.CopyFrom(InstrumentationScope(name=scope.name, version=scope.version))
            by_name: dict = {}  # collections of the same metric batched together share one entry
            for g in parts:
                for m in g.metrics:
                    if m.points:
                        out = by_name.get(m.name)
                        if out is None:
                            out = by_name[m.name] = sm.metrics.add()
                        _fill_metric(m, out)
    return req.SerializeToString()


def encode_logs(groups: list[LogGroup]) -> bytes:
    req = ExportLogsServiceRequest()
    for resource, scopes in _by_resource_and_scope(groups).items():
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


def encode(batch: Batch) -> list[Payload]:
    """The batch as at most one payload per signal."""
    out = []
    if batch.metrics:
        out.append(Payload("metrics", encode_metrics(batch.metrics), batch.point_count()))
    if batch.logs:
        out.append(Payload("logs", encode_logs(batch.logs), batch.log_count()))
    return out


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
