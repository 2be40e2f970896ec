"""Endpoints, connections and compression. A second endpoint takes the traffic while the first is
down, with no loss, and the first gets traffic again once a health check finds it back; requests
spread over `connections` concurrent connections; each compression arrives with the Content-Encoding
the Collector accepts and decodes to the same request; per-endpoint statistics are recorded."""
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.config import Duration, build
from agent.export.compression import decompress
from agent.export.encoding import Payload, encode_metrics
from agent.export.factory import ExporterConfig, build_exporter
from agent.export.otlp import OtlpExporterConfig
from agent.export.otlp_grpc import GrpcExporter
from agent.export.otlp_http import HttpExporter
from agent.export.retry import SENT, RetryingSender
from agent.model import Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.selfmetrics import SelfMetrics
from tests.helpers import ROOT, agent_log, check_complete, cpu_points, delivery_config, free_port, wait_until
from tests.otlp_receiver import GrpcReceiver


def payload(tag: str, n: int = 50) -> Payload:
    points = [NumberPoint((("i", i), ("tag", tag)), i, 1, 2) for i in range(n)]
    metric = Metric("t.n", "", "1", MetricKind.SUM, points)
    groups = [MetricGroup(Resource((("host.name", "ep"),)), Scope("t"), [metric])]
    return Payload("metrics", encode_metrics(groups), n)


def test_second_endpoint_takes_the_traffic_without_loss(tmp_path, start_agent):
    port_a = free_port()  # down at first
    b = GrpcReceiver().start()
    a = None
    cfg = delivery_config(tmp_path, None, collection_interval="500ms", shutdown_timeout="10s",
                          exporter={"otlp": {"endpoint": "", "endpoints": [f"127.0.0.1:{port_a}", b.endpoint]}})
    del cfg["exporter"]["otlp"]["endpoint"]
    proc = start_agent(cfg)
    try:
        assert wait_until(lambda: len({t for _, t in cpu_points([b])}) >= 6, 30, proc), agent_log(proc)
        assert "endpoint_down exporter=otlp_grpc endpoint=http://127.0.0.1:%d" % port_a in agent_log(proc)
        a = GrpcReceiver(port_a).start()  # the first comes back: the health check lets it take turns again
        assert wait_until(lambda: a.metrics, 40, proc), agent_log(proc)
        assert "endpoint_up" in agent_log(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent_log(proc)
        figures = check_complete([a, b])  # nothing lost, exactly
        assert "export_dropped" not in agent_log(proc)
        print(f"failover: {figures['collections']} collections, {len(a.metrics)} requests to the first "
              f"endpoint after it came back, {len(b.metrics)} to the second")
    finally:
        b.stop()
        if a is not None:
            a.stop()


class CountingGrpcServer:
    """Records each request's peer and how many were in flight at once; answers after `delay`."""

    def __init__(self, delay: float):
        self.peers, self.inflight, self.max_inflight = [], 0, 0
        self.lock = threading.Lock()

        def export(body, context):
            with self.lock:
                self.peers.append(context.peer())
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
            time.sleep(delay)
            with self.lock:
                self.inflight -= 1
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService",
            {"Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                           response_serializer=None)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_grpc_connections_are_concurrent_and_pooled():
    server = CountingGrpcServer(delay=0.2)
    telemetry = SelfMetrics()
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=f"127.0.0.1:{server.port}", connections=3,
                                               timeout=Duration(5)), telemetry)
    try:
        threads = [threading.Thread(target=lambda i=i: [exporter.send(payload(f"{i}-{k}")) for k in range(4)])
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(server.peers) == 12
        assert server.max_inflight == 3
        assert len(set(server.peers)) == 3  # three connections, each used again (keep-alive)
        ep = exporter.pool.endpoints["metrics"][0]
        stats = exporter.pool.stats
        assert stats.requests.value(ep.attrs + (("outcome", "success"),)) == 12
        assert stats.bytes.value(ep.attrs) == 12 * len(payload("0-0").body)
        assert stats.duration.count(ep.attrs) == 12
        # exported like any other metric: the duration as a histogram per endpoint
        req = ExportMetricsServiceRequest.FromString(encode_metrics(telemetry.collect()))
        durations = [p for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                     if m.name == "hostagent.exporter.request.duration" for p in m.histogram.data_points
                     if {kv.key: kv.value.string_value for kv in p.attributes}.get("endpoint") == ep.url]
        assert len(durations) == 1 and durations[0].count == 12 and sum(durations[0].bucket_counts) == 12
    finally:
        exporter.close()
        server.server.stop(None)


class DecodingHttpServer:
    """OTLP/HTTP that decodes every Content-Encoding the Collector accepts; records (encoding,
    request, client port) and how many requests were in flight at once."""

    def __init__(self, delay: float = 0.0):
        self.requests, self.inflight, self.max_inflight = [], 0, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                time.sleep(delay)
                encoding = self.headers.get("Content-Encoding")
                req = ExportMetricsServiceRequest.FromString(decompress(encoding, body))
                with outer.lock:
                    outer.inflight -= 1
                    outer.requests.append((encoding, req, self.client_address[1], len(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def http_server():
    server = DecodingHttpServer()
    yield server
    server.stop()


@pytest.mark.parametrize("codec,header", [("gzip", "gzip"), ("zstd", "zstd"), ("lz4", "lz4"), ("zlib", "zlib"),
                                          ("deflate", "deflate"), ("none", None)])
def test_http_compression_codecs(http_server, codec, header):
    http_server.requests.clear()
    exporter = HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=http_server.endpoint,
                                               compression=codec, connections=1), SelfMetrics())
    try:
        p = payload(codec, 500)
        ep, stats = exporter.pool.endpoints["metrics"][0], exporter.pool.stats
        wire, raw = stats.wire_bytes.value(ep.attrs), stats.bytes.value(ep.attrs)
        exporter.send(p)
        (encoding, req, _, size), = http_server.requests
        assert encoding == header
        assert req.SerializeToString() == p.body
        if codec != "none":
            assert size < len(p.body) / 3
        assert stats.wire_bytes.value(ep.attrs) - wire == size  # before and after compression
        assert stats.bytes.value(ep.attrs) - raw == len(p.body)
    finally:
        exporter.close()


def test_compression_level_changes_the_output(http_server):
    sizes = {}
    for level in (1, 19):
        http_server.requests.clear()
        exporter = HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=http_server.endpoint,
                                                   compression="zstd", compression_level=level), SelfMetrics())
        exporter.send(payload("level", 2000))
        exporter.close()
        sizes[level] = http_server.requests[0][3]
    assert sizes[19] < sizes[1]


def test_grpc_deflate_and_gzip(grpc_receiver):
    for codec in ("gzip", "deflate", "none"):
        exporter = GrpcExporter(OtlpExporterConfig(endpoint=grpc_receiver.endpoint, compression=codec), SelfMetrics())
        exporter.send(payload(codec, 5))
        exporter.close()
    assert len(grpc_receiver.metrics) == 3


def test_http_keep_alive_connections_are_concurrent_and_reused():
    server = DecodingHttpServer(delay=0.2)
    exporter = HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=server.endpoint, connections=3),
                            SelfMetrics())
    try:
        threads = [threading.Thread(target=lambda i=i: [exporter.send(payload(f"{i}-{k}")) for k in range(4)])
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(server.requests) == 12 and server.max_inflight == 3
        assert len({port for _, _, port, _ in server.requests}) == 3
        ep = exporter.pool.endpoints["metrics"][0]
        assert exporter.pool.stats.reconnects.value(ep.attrs) == 0
    finally:
        exporter.close()
        server.stop()


def test_down_endpoint_is_skipped_then_checked_back(monkeypatch):
    import agent.export.pool as pool
    monkeypatch.setattr(pool, "HEALTH_BACKOFF_INITIAL", 0.2)
    up = GrpcReceiver().start()
    port = free_port()
    exporter = GrpcExporter(OtlpExporterConfig(endpoints=(f"127.0.0.1:{port}", up.endpoint), timeout=Duration(3)),
                            SelfMetrics())
    down_ep, up_ep = exporter.pool.endpoints["metrics"]
    back = None
    try:
        for i in range(6):
            exporter.send(payload(str(i), 3))
        assert len(up.metrics) == 6 and not down_ep.up
        stats = exporter.pool.stats
        # the failed endpoint was tried once, then skipped
        assert stats.requests.value(down_ep.attrs + (("outcome", "retryable"),)) == 1
        assert stats.up._reads[down_ep.attrs]() == 0
        back = GrpcReceiver(port).start()
        assert wait_until(lambda: down_ep.up, 10)
        for i in range(6):
            exporter.send(payload(str(i), 3))
        assert len(back.metrics) == 3 and len(up.metrics) == 9  # round robin again
    finally:
        exporter.close()
        up.stop()
        if back is not None:
            back.stop()


def test_grpc_reconnect_after_the_receiver_comes_back_is_counted_once():
    from agent.export import ExportError
    port = free_port()
    receiver = GrpcReceiver(port).start()
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=f"http://127.0.0.1:{port}", connections=1,
                                               timeout=Duration(2)), SelfMetrics())
    ep = exporter.pool.endpoints["metrics"][0]
    try:
        exporter.send(payload("before"))
        receiver.stop()
        with pytest.raises(ExportError):
            exporter.send(payload("down"))
        receiver = GrpcReceiver(port).start()
        wait_until(lambda: _sends(exporter, payload("after")), 20)
        exporter.send(payload("again"))
        assert exporter.pool.stats.reconnects.value(ep.attrs) == 1
    finally:
        exporter.close()
        receiver.stop()


def _sends(exporter, p) -> bool:
    from agent.export import ExportError
    try:
        exporter.send(p)
        return True
    except ExportError:
        return False


# --- built from the exporter table, recording into the telemetry they are given -------------------

def test_each_exporter_records_into_the_telemetry_it_is_given(grpc_receiver):
    """Two agents' worth of parts in one process: what one sends is counted in its own metrics
    only (no process-wide registry mixes them)."""
    cfg = build(ExporterConfig, {"type": "otlp", "otlp": {"endpoint": grpc_receiver.endpoint}}, "exporter")
    mine, other = SelfMetrics(), SelfMetrics()
    exporter, idle = build_exporter(cfg, mine), build_exporter(cfg, other)
    try:
        assert isinstance(exporter, GrpcExporter)
        assert RetryingSender(exporter, cfg.retry, mine, threading.Event()).send(payload("t")) == SENT
        ep = exporter.pool.all()[0]
        assert mine.counter("hostagent.exporter.sent", "", "").value(
            (("exporter", "otlp_grpc"), ("signal", "metrics"))) == 50
        assert mine.counter("hostagent.exporter.requests", "", "").value(ep.attrs + (("outcome", "success"),)) == 1
        assert other.counter("hostagent.exporter.requests", "", "").total() == 0
        assert other.counter("hostagent.exporter.sent", "", "").total() == 0
    finally:
        exporter.close()
        idle.close()


@pytest.mark.parametrize("exporter, loaded, not_loaded", [
    ({"type": "file"}, ("agent.export.file",), ("grpc", "urllib3", "agent.export.wal")),
    ({"type": "otlp", "otlp": {"protocol": "http/protobuf"}}, ("urllib3", "agent.export.wal"), ("grpc",)),
    ({"type": "otlp", "queue": {"type": "memory"}}, ("grpc",), ("agent.export.wal",)),
])
def test_an_exporter_and_its_queue_load_only_their_own_libraries(tmp_path, exporter, loaded, not_loaded):
    """grpcio costs an agent about 16 MB of RSS, the persistent queue's checksum and compression
    libraries about 5 MB: an agent exporting to a file or over HTTP never loads grpcio, one with a
    memory queue never loads the persistent queue."""
    exporter.setdefault("file", {"path": str(tmp_path / "m.jsonl"), "logs_path": str(tmp_path / "l.jsonl")})
    raw = {"state_dir": str(tmp_path / "state"), "exporter": exporter}
    code = ("import json, sys\n"
            "from agent import components, config, runtime\n"
            "from agent.export.factory import build_exporter, open_queue\n"
            "from agent.selfmetrics import SelfMetrics\n"
            f"cfg = config.build(components.Config, json.loads({json.dumps(json.dumps(raw))}))\n"
            "build_exporter(cfg.exporter, SelfMetrics()).close()\n"
            "open_queue(cfg.exporter, cfg.state_dir, SelfMetrics()).close()\n"
            "print(json.dumps(sorted(m for m in sys.modules if '.' not in m or m.startswith('agent.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    modules = set(json.loads(out.stdout))
    assert set(loaded) <= modules and not modules & set(not_loaded), sorted(modules)
