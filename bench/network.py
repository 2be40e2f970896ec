"""Export over several connections: points/s with 1, 2 and 4 connections to one OTLP/gRPC receiver.

Real host metrics (every default hostmetrics scraper of this host; bench/export.py's host_batches,
batches of about 8192 points, cycled) go through hostagent's Pipeline as the agent runs it: input
queue, Batcher (encodes), memory export queue, `senders` threads, GrpcExporter with
exporter.otlp.connections channels (each its own HTTP/2 connection, used in turn), gzip. The
pipeline has as many senders as connections (build_pipeline does the same). The time from the
first batch handed over to the last request answered gives points/s.

The receiver runs in another process (its CPU is not counted) and does what a receiver in front of
a backend does per request: it parses the request with the opentelemetry.proto classes, counts its
data points, and answers after a fixed delay (default 5 ms: a nearby collector's network round trip
and write), with a thread per request in flight. Every point sent is checked to have arrived.

Cases: hostagent with 2 and 4 connections against 1 connection (the baseline: ratio = points/s
with N / with 1), and hostagent with 1 connection against the opentelemetry-python exporter
(OTLPMetricExporter.export(MetricsData), one channel, gzip; the SDK's periodic reader exports one
request at a time), fed the same data as SDK objects built beforehand. Rounds alternate between the
variants; medians.

    python bench/network.py [--quick] [--json FILE] [--delay-ms 5] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser, stop  # noqa: E402

CATEGORY = "network"
DELAY_MS = 5.0
CONNECTIONS = (1, 2, 4)


# --- the receiver (a separate process) -------------------------------------------------------------

def serve(port_file: str, delay_s: float) -> None:
    """OTLP/gRPC metrics and logs: parse each request, count its items, answer after `delay_s`.
    On SIGTERM, write {"metrics": points, "logs": records, "requests": n} to port_file + ".count"."""
    import threading
    from concurrent import futures
    import grpc
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    counts = {"metrics": 0, "logs": 0, "requests": 0}
    lock = threading.Lock()

    def metrics(body: bytes, ctx) -> bytes:
        req = ExportMetricsServiceRequest.FromString(body)
        n = sum(len(getattr(m, m.WhichOneof("data")).data_points) for rm in req.resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics)
        return done("metrics", n)

    def logs(body: bytes, ctx) -> bytes:
        req = ExportLogsServiceRequest.FromString(body)
        return done("logs", sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs))

    def done(signal_name: str, n: int) -> bytes:
        if delay_s:
            time.sleep(delay_s)
        with lock:
            counts[signal_name] += n
            counts["requests"] += 1
        return b""   # an empty Export*ServiceResponse: full success

    def handler(service: str, fn):
        return grpc.method_handlers_generic_handler(service, {"Export": grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=None, response_serializer=None)})

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         handlers=[handler("opentelemetry.proto.collector.metrics.v1.MetricsService", metrics),
                                   handler("opentelemetry.proto.collector.logs.v1.LogsService", logs)],
                         options=[("grpc.max_receive_message_length", -1)])
    port = server.add_insecure_port("127.0.0.1:0")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    stop.wait()
    server.stop(grace=1).wait()
    with lock, open(port_file + ".count.tmp", "w") as f:
        json.dump(counts, f)
    os.replace(port_file + ".count.tmp", port_file + ".count")


class Receiver:
    """serve() in a child process: `with Receiver(delay_ms) as rx: ... rx.endpoint ...`; rx.counts
    holds what it received once the block has ended."""

    def __init__(self, delay_ms: float = 0.0):
        self.delay_ms = delay_ms
        self.counts: dict = {}

    def __enter__(self) -> "Receiver":
        self._dir = tempfile.TemporaryDirectory(prefix="hostagent-bench-")
        self._port_file = os.path.join(self._dir.name, "port")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", self._port_file,
                                      "--delay-ms", str(self.delay_ms)])
        deadline = time.monotonic() + 30
        while not os.path.exists(self._port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the benchmark receiver did not start")
            time.sleep(0.02)
        self.endpoint = "127.0.0.1:" + open(self._port_file).read()
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc, 10)
        try:
            with open(self._port_file + ".count") as f:
                self.counts = json.load(f)
        except OSError:
            self.counts = {}
        self._dir.cleanup()


# --- the senders -----------------------------------------------------------------------------------

def exporter_config(endpoint: str, connections: int):
    from agent.config import Duration
    from agent.export.otlp import OtlpExporterConfig
    return OtlpExporterConfig(endpoint=endpoint, compression="gzip", timeout=Duration(60), connections=connections)


class CountingExporter:
    """Wraps an exporter: counts the items of every payload the receiver accepted, so the time to
    the last answer can be taken without waiting for the pipeline's shutdown."""

    def __init__(self, inner, expect: int):
        import threading
        self.inner, self.name, self.expect = inner, inner.name, expect
        self.sent = 0
        self.all_sent = threading.Event()
        self._lock = threading.Lock()

    def send(self, payload) -> None:
        self.inner.send(payload)
        with self._lock:
            self.sent += payload.items
            if self.sent >= self.expect:
                self.all_sent.set()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


def through_pipeline(endpoint: str, batches: list, connections: int, signal_name: str = "metrics",
                     max_size: int = 8192) -> dict:
    """Hand every batch (a list of groups) to a Pipeline with `connections` senders and channels;
    wall and CPU seconds from the first batch handed over until the receiver has answered for the
    last item, and the items sent."""
    from agent.config import Duration
    from agent.export.encoding import encode
    from agent.export.otlp_grpc import GrpcExporter
    from agent.export.retry import RetryConfig
    from agent.model import Batch
    from agent.pipeline import Pipeline
    from agent.pipeline.batcher import BatchConfig
    from agent.selfmetrics import SelfMetrics
    make = (lambda g: Batch(metrics=g)) if signal_name == "metrics" else (lambda g: Batch(logs=g))
    telemetry = SelfMetrics()
    grpc_exporter = GrpcExporter(exporter_config(endpoint, connections), telemetry)
    warm = 0
    for _ in range(connections):   # connect every channel before timing (calls go round robin)
        for payload in encode(make(batches[0])):
            grpc_exporter.send(payload)
            warm += payload.items
    inputs = [make(g) for g in batches]
    items = sum(len(b) for b in inputs)
    exporter = CountingExporter(grpc_exporter, items)
    pipe = Pipeline(BatchConfig(max_size=max_size, timeout=Duration(1.0), queue_size=len(batches) + 1),
                    RetryConfig(), exporter, telemetry, senders=connections)
    pipe.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for b in inputs:
        pipe.emit(b)
    pipe.batcher.stop()   # flush the last partial batch now rather than after batch.timeout
    delivered = exporter.all_sent.wait(120)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    pipe.shutdown(10)
    if not delivered or exporter.sent != items:
        raise RuntimeError(f"pipeline with {connections} connections delivered {exporter.sent} of {items} items")
    return {"wall_s": wall, "cpu_s": cpu, "items": items, "warmup_items": warm}


def through_opentelemetry(endpoint: str, sdk_batches: list, items: int) -> dict:
    """opentelemetry-python's OTLPMetricExporter, one export per batch, as its periodic reader runs it."""
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult
    exporter = OTLPMetricExporter(endpoint=endpoint, insecure=True, compression=grpc.Compression.Gzip, timeout=60)
    if exporter.export(sdk_batches[0]) is not MetricExportResult.SUCCESS:   # connect before timing
        raise RuntimeError("opentelemetry exporter failed")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for data in sdk_batches:
        if exporter.export(data) is not MetricExportResult.SUCCESS:
            raise RuntimeError("opentelemetry exporter failed")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    exporter.shutdown()
    return {"wall_s": wall, "cpu_s": cpu, "items": items}


def _points(groups) -> int:
    return sum(len(m.points) for g in groups for m in g.metrics)


def run(quick: bool = False, delay_ms: float = DELAY_MS, rounds: int = 0) -> list[dict]:
    from bench.export import host_batches, to_sdk
    rounds = rounds or (3 if quick else 5)
    distinct = host_batches(2 if quick else 4)
    requests = 8 if quick else 24
    batches = [distinct[i % len(distinct)] for i in range(requests)]
    sdk_distinct = [to_sdk(b) for b in distinct]
    sdk_batches = [sdk_distinct[i % len(distinct)] for i in range(requests)]
    points = sum(_points(b) for b in batches)
    variants = [f"hostagent-{n}" for n in CONNECTIONS] + ["opentelemetry"]
    samples: dict = {v: [] for v in variants}
    expected = 0
    with Receiver(delay_ms) as rx:
        for _ in range(rounds):
            for n in CONNECTIONS:
                r = through_pipeline(rx.endpoint, batches, n)
                expected += r["items"] + r["warmup_items"]
                samples[f"hostagent-{n}"].append(r)
            r = through_opentelemetry(rx.endpoint, sdk_batches, points)
            expected += r["items"] + _points(distinct[0])
            samples["opentelemetry"].append(r)
    if rx.counts.get("metrics") != expected:
        raise RuntimeError(f"the receiver got {rx.counts.get('metrics')} points, {expected} were sent")

    def rate(v):
        return statistics.median(s["items"] / s["wall_s"] for s in samples[v])

    def cpu(v):
        return statistics.median(s["cpu_s"] / s["items"] * 1e6 for s in samples[v])

    def spread(v):
        rates = [s["items"] / s["wall_s"] for s in samples[v]]
        return [min(rates), max(rates)]

    common = {"points_per_round": points, "requests_per_round": requests, "rounds": rounds,
              "receiver": f"separate process; parses each request, counts its points, answers after {delay_ms:g} ms",
              "receiver_delay_ms": delay_ms, "compression": "gzip"}
    results = []
    base = rate("hostagent-1")
    otel = rate("opentelemetry")
    results.append({"case": "1 connection vs opentelemetry",
                    "baseline": "opentelemetry-python OTLPMetricExporter (1 channel, one export at a time)",
                    "metric": "points/s", "ours": base, "theirs": otel, "ratio": base / otel,
                    "details": dict(common, ours_range=spread("hostagent-1"), theirs_range=spread("opentelemetry"),
                                    ours_cpu_s_per_m_points=cpu("hostagent-1"),
                                    theirs_cpu_s_per_m_points=cpu("opentelemetry"))})
    for n in CONNECTIONS[1:]:
        ours = rate(f"hostagent-{n}")
        results.append({"case": f"{n} connections", "baseline": "hostagent, 1 connection", "metric": "points/s",
                        "ours": ours, "theirs": base, "ratio": ours / base,
                        "details": dict(common, ours_range=spread(f"hostagent-{n}"),
                                        theirs_range=spread("hostagent-1"),
                                        ours_cpu_s_per_m_points=cpu(f"hostagent-{n}"),
                                        theirs_cpu_s_per_m_points=cpu("hostagent-1"))})
    return results


def print_table(results: list) -> None:
    d = results[0]["details"]
    print(f"{d['points_per_round']} points in {d['requests_per_round']} requests per round, {d['rounds']} rounds; "
          f"receiver: {d['receiver']}")
    print(f"{'case':<32}{'points/s':>12}{'baseline':>12}{'ratio':>8}{'CPU-s/M pts':>13}  baseline")
    for r in results:
        print(f"{r['case']:<32}{r['ours']:>12,.0f}{r['theirs']:>12,.0f}{r['ratio']:>7.2f}x"
              f"{r['details']['ours_cpu_s_per_m_points']:>13.2f}  {r['baseline']}")


def main(argv=None) -> int:
    ap = parser(__doc__, "fewer requests and rounds (a few seconds)")
    ap.add_argument("--delay-ms", type=float, default=DELAY_MS, help="receiver's added delay per request")
    ap.add_argument("--rounds", type=int, help="rounds per variant (default 5, quick 3)")
    ap.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.delay_ms / 1e3)
        return 0
    return finish(args, CATEGORY, run(args.quick, args.delay_ms, args.rounds or 0), print_table)


if __name__ == "__main__":
    sys.exit(main())
