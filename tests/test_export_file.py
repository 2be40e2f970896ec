"""The embedded default: OTLP-JSON lines that the official protobuf JSON parser reads back."""
import json
import os
import signal
import time

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.config import Size
from agent.export.encoding import Payload, encode_metrics
from agent.export.file import FileExporter, FileExporterConfig
from agent.model import Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from tests.helpers import agent_log, base_config


def wait_for_lines(path, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            lines = open(path).read().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout}s")


def test_agent_file_output_parses_as_export_metrics_requests(tmp_path, start_agent):
    proc = start_agent(base_config(tmp_path))
    path = tmp_path / "out" / "metrics.jsonl"
    lines = wait_for_lines(path, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)
    names = set()
    for line in open(path).read().splitlines():
        req = json_format.Parse(line, ExportMetricsServiceRequest())
        assert req.resource_metrics
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                names.update(m.name for m in sm.metrics)
        # OTLP/JSON: camelCase keys, integer enums, 64-bit integers as strings
        raw = json.loads(line)
        metric = raw["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]
        data = metric.get("sum") or metric.get("gauge")
        assert isinstance(data["dataPoints"][0]["timeUnixNano"], str)
        if "sum" in metric:
            assert metric["sum"]["aggregationTemporality"] == 2
    assert {"system.cpu.time", "system.memory.usage", "system.network.io"} <= names
    assert len(lines) >= 2


def _payload(i: int) -> Payload:
    m = Metric("test.counter", "", "1", MetricKind.SUM, [NumberPoint((("i", i),), i, 1, 2)], monotonic=True)
    return Payload("metrics", encode_metrics([MetricGroup(Resource((("host.name", "h"),)), Scope("t"), [m])]), 1)


def test_file_rotation_keeps_max_backups_and_whole_lines(tmp_path):
    cfg = FileExporterConfig(path=str(tmp_path / "m.jsonl"), logs_path=str(tmp_path / "l.jsonl"),
                             max_size=Size(4096), max_backups=2)
    exporter = FileExporter(cfg)
    for i in range(200):
        exporter.send(_payload(i))
    exporter.close()
    files = sorted(os.listdir(tmp_path))
    assert files == ["l.jsonl", "m.jsonl", "m.jsonl.1", "m.jsonl.2"]
    seen = []
    for name in ("m.jsonl.2", "m.jsonl.1", "m.jsonl"):
        assert os.path.getsize(tmp_path / name) <= 4096
        for line in open(tmp_path / name).read().splitlines():
            req = json_format.Parse(line, ExportMetricsServiceRequest())
            seen.append(int(req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].as_int))
    assert seen == list(range(200 - len(seen), 200))  # the newest lines, in order, none torn
