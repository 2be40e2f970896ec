"""Real OTLP receivers for tests: gRPC with the official opentelemetry-proto servicers, and
OTLP/HTTP on the standard library's HTTP server. Both record every request they accept."""
from __future__ import annotations

import gzip
import http.server
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc


class _Recorder:
    def __init__(self):
        self.metrics: list = []  # ExportMetricsServiceRequest
        self.logs: list = []  # ExportLogsServiceRequest
        self.headers: list = []  # metadata / headers of each request, as dicts
        self.bodies: list = []  # OTLP/HTTP: each accepted request's protobuf bytes, decompressed
        self._cond = threading.Condition()

    def _record(self, bucket: list, request, headers: dict) -> None:
        with self._cond:
            bucket.append(request)
            self.headers.append(headers)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def metric_names(self) -> set:
        return {m.name for req in self.metrics for rm in req.resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics}

    def all_metrics(self):
        """(resource attributes dict, scope name, Metric) for everything received."""
        for req in self.metrics:
            for rm in req.resource_metrics:
                res = {kv.key: _value(kv.value) for kv in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        yield res, sm.scope.name, m

    def all_logs(self):
        for req in self.logs:
            for rl in req.resource_logs:
                res = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        yield res, sl.scope.name, r


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def attributes(point) -> dict:
    return {kv.key: _value(kv.value) for kv in point.attributes}


class GrpcReceiver(_Recorder):
    def __init__(self, port: int = 0):
        super().__init__()
        rec = self

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                rec._record(rec.metrics, request, dict(context.invocation_metadata()))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):
                rec._record(rec.logs, request, dict(context.invocation_metadata()))
                return logs_service_pb2.ExportLogsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "GrpcReceiver":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)


class HttpReceiver(_Recorder):
    """OTLP/HTTP protobuf at /v1/metrics and /v1/logs. `respond` may be set to a function
    (path) -> (status, headers, body) to answer differently; None gives 200 with an empty body."""

    def __init__(self, port: int = 0):
        super().__init__()
        rec = self
        self.respond = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                status, headers, reply = rec.respond(self.path) if rec.respond else (200, {}, b"")
                if status == 200:
                    rec.bodies.append(body)
                    if self.path.endswith("/v1/metrics"):
                        rec._record(rec.metrics, metrics_service_pb2.ExportMetricsServiceRequest.FromString(body),
                                    dict(self.headers))
                    elif self.path.endswith("/v1/logs"):
                        rec._record(rec.logs, logs_service_pb2.ExportLogsServiceRequest.FromString(body),
                                    dict(self.headers))
                    else:
                        status = 404
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "HttpReceiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
