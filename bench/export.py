"""Export cost: hostagent against the official opentelemetry-python OTLP/gRPC exporter.

The same data, real host metrics (every default hostmetrics scraper of this host, collected
repeatedly), goes to the same local OTLP/gRPC receiver (a separate process, so its CPU is not
counted) through:

  hostagent         agent.export.encoding.encode (the wire encoder) + GrpcExporter, gzip
  hostagent+queue   the same through the persistent queue as the agent runs it (append: lz4, CRC32C,
                    write; read back: CRC32C, lz4; acknowledge: read-pointer rename), in a temp dir
  hostagent-pb      the same exporter fed by a protobuf-object encoder (how hostagent encoded before)
  opentelemetry     opentelemetry-exporter-otlp-proto-grpc's OTLPMetricExporter.export(MetricsData), gzip

Each request carries one batch of about 8192 data points (hostagent's default batch.max_size).
Measured per variant: CPU seconds of this process (encode + compress + send, all threads) per
million data points, and data points per second; rounds alternate between variants and the
medians are printed, with each variant's ratio to opentelemetry.

    python bench/export.py [--quick] [--json FILE] [--rounds N] [--batches N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import parser, write_json  # noqa: E402

BATCH_POINTS = 8192


def serve(port_file: str) -> None:
    """A minimal OTLP metrics receiver: accepts every request, parses nothing."""
    from concurrent import futures
    import grpc
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        {"Export": grpc.unary_unary_rpc_method_handler(lambda body, ctx: b"", request_deserializer=None,
                                                       response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler],
                         options=[("grpc.max_receive_message_length", -1)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    server.wait_for_termination()


def host_batches(n_batches: int) -> list:
    """Batches of about BATCH_POINTS points from repeated real scrapes of this host."""
    from agent.components import ScrapersConfig, build_scrapers
    from agent.resource import ResourceConfig, detect
    from agent.selfmetrics import SelfMetrics
    resource = detect(ResourceConfig())
    sources = build_scrapers(ScrapersConfig(), SelfMetrics(), resource)
    batches, groups, points = [], [], 0
    while len(batches) < n_batches:
        for s in sources:
            for g in s.collect():
                groups.append(g)
                points += sum(len(m.points) for m in g.metrics)
        if points >= BATCH_POINTS:
            batches.append(groups)
            groups, points = [], 0
        time.sleep(0.01)
    return batches


def to_sdk(groups):
    """The same data as opentelemetry-sdk MetricsData, what OTLPMetricExporter.export() takes."""
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Metric, MetricsData,
                                                  NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from agent.model import MetricKind
    by_resource: dict = {}
    for g in groups:
        by_resource.setdefault(g.resource, {}).setdefault(g.scope, []).extend(g.metrics)
    out = []
    for resource, scopes in by_resource.items():
        scope_metrics = []
        for scope, metrics in scopes.items():
            sdk_metrics = []
            for m in metrics:
                points = [NumberDataPoint(attributes=dict(p.attributes), start_time_unix_nano=p.start_time_ns,
                                          time_unix_nano=p.time_ns, value=p.value) for p in m.points]
                if m.kind is MetricKind.SUM:
                    data = Sum(data_points=points, aggregation_temporality=AggregationTemporality(int(m.temporality)),
                               is_monotonic=m.monotonic)
                else:
                    data = Gauge(data_points=points)
                sdk_metrics.append(Metric(name=m.name, description=m.description, unit=m.unit, data=data))
            scope_metrics.append(ScopeMetrics(scope=InstrumentationScope(scope.name, scope.version),
                                              metrics=sdk_metrics, schema_url=""))
        out.append(ResourceMetrics(resource=Resource(dict(resource.attributes)), scope_metrics=scope_metrics,
                                   schema_url=""))
    return MetricsData(resource_metrics=out)


def pb_encoder():
    """The protobuf-object encoder hostagent used before the wire encoder (kept in its tests)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_delivery_encoding import reference_metrics
    return reference_metrics


CATEGORY = "network"


def measure(rounds: int, n_batches: int, log=print) -> dict:
    """Runs every variant against one local receiver; medians per variant and the batch sizes."""
    import tempfile
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult
    from agent.config import Duration
    from agent.export.encoding import Payload, encode_metrics
    from agent.export.otlp import OtlpExporterConfig
    from agent.export.otlp_grpc import GrpcExporter
    from agent.export.queue import QueueSettings
    from agent.export.wal import PersistentQueue
    from agent.selfmetrics import SelfMetrics

    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        receiver = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", port_file])
        try:
            while not os.path.exists(port_file):
                if receiver.poll() is not None:
                    raise RuntimeError("the receiver did not start")
                time.sleep(0.05)
            endpoint = "127.0.0.1:" + open(port_file).read()
            log(f"collecting {n_batches} batches of ~{BATCH_POINTS} points from this host's scrapers ...")
            batches = host_batches(n_batches)
            points = sum(sum(len(m.points) for g in b for m in g.metrics) for b in batches)
            sdk_batches = [to_sdk(b) for b in batches]
            reference = pb_encoder()

            telemetry = SelfMetrics()
            ours = GrpcExporter(OtlpExporterConfig(endpoint=endpoint, compression="gzip", timeout=Duration(30),
                                                   connections=1), telemetry)
            theirs = OTLPMetricExporter(endpoint=endpoint, insecure=True, compression=grpc.Compression.Gzip,
                                        timeout=30)
            queue = PersistentQueue(QueueSettings("persistent", os.path.join(tmp, "queue"), max_bytes=2**30),
                                    telemetry)
            try:
                def run_hostagent():
                    for groups in batches:
                        ours.send(Payload("metrics", encode_metrics(groups), 0))

                def run_hostagent_queue():
                    for groups in batches:
                        queue.put(Payload("metrics", encode_metrics(groups), 0))
                        entry = queue.get(0)
                        ours.send(entry.payload)
                        queue.ack(entry)

                def run_hostagent_pb():
                    for groups in batches:
                        ours.send(Payload("metrics", reference(groups), 0))

                def run_otel():
                    for data in sdk_batches:
                        if theirs.export(data) is not MetricExportResult.SUCCESS:
                            raise RuntimeError("opentelemetry exporter failed")

                variants = {"hostagent": run_hostagent, "hostagent+queue": run_hostagent_queue,
                            "hostagent-pb": run_hostagent_pb, "opentelemetry": run_otel}
                for run_variant in variants.values():  # warm up: connections, caches
                    run_variant()
                samples = {name: [] for name in variants}
                for _ in range(rounds):
                    for name, run_variant in variants.items():
                        cpu0, wall0 = time.process_time(), time.perf_counter()
                        run_variant()
                        samples[name].append((time.process_time() - cpu0, time.perf_counter() - wall0))
            finally:
                ours.close()
                queue.close()
                theirs.shutdown()
        finally:
            receiver.kill()
            receiver.wait()

    results = {}
    for name, s in samples.items():
        cpu = statistics.median(c for c, _ in s)
        wall = statistics.median(w for _, w in s)
        results[name] = {"cpu_s_per_million_points": cpu / points * 1e6, "points_per_s": points / wall,
                         "cpu_s_per_round": cpu, "wall_s_per_round": wall}
    return {"points_per_round": points, "requests_per_round": len(batches), "rounds": rounds,
            "results": results}


def run(quick: bool = False) -> list[dict]:
    """hostagent's exporter, alone and through the persistent queue, against opentelemetry-python's."""
    m = measure(3 if quick else 7, 3 if quick else 6, log=lambda *a: None)
    res = m["results"]
    theirs = res["opentelemetry"]["cpu_s_per_million_points"]
    rows = []
    for case, variant in (("grpc-gzip", "hostagent"), ("grpc-gzip-queue", "hostagent+queue")):
        ours = res[variant]["cpu_s_per_million_points"]
        rows.append({"case": case, "baseline": "opentelemetry-python OTLP/gRPC exporter, gzip",
                     "metric": "CPU-s per M data points sent",
                     "ours": ours, "theirs": theirs, "ratio": theirs / ours,
                     "details": {"points_per_s": res[variant]["points_per_s"],
                                 "theirs_points_per_s": res["opentelemetry"]["points_per_s"],
                                 "protobuf_object_encoder_cpu_s_per_m": res["hostagent-pb"]["cpu_s_per_million_points"],
                                 "points_per_round": m["points_per_round"], "rounds": m["rounds"]}})
    return rows


def main(argv=None) -> int:
    ap = parser(__doc__, "fewer rounds (a few seconds)")
    ap.add_argument("--rounds", type=int, help="timed rounds per variant (default 7, quick 3)")
    ap.add_argument("--batches", type=int, help="batches per round (default 6, quick 3)")
    ap.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    rounds = args.rounds or (3 if args.quick else 7)
    n_batches = args.batches or (3 if args.quick else 6)
    m = measure(rounds, n_batches)
    results, points = m["results"], m["points_per_round"]
    base = results["opentelemetry"]["cpu_s_per_million_points"]
    print(f"\n{points} data points per round in {m['requests_per_round']} requests, {rounds} rounds, gzip, "
          f"one local receiver process; medians")
    print(f"{'exporter':<16}{'CPU-s per M points':>20}{'points/s':>14}{'CPU vs opentelemetry':>24}")
    for name, r in results.items():
        print(f"{name:<16}{r['cpu_s_per_million_points']:>20.2f}{r['points_per_s']:>14,.0f}"
              f"{base / r['cpu_s_per_million_points']:>23.1f}x")
    if args.json:
        write_json(args.json, {"points_per_round": points, "requests_per_round": m["requests_per_round"],
                               "rounds": rounds, "compression": "gzip", "results": results,
                               "cpu_ratio_vs_opentelemetry": {n: base / r["cpu_s_per_million_points"]
                                                              for n, r in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
