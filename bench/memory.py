"""Memory per 100k data points: hostagent's pipeline against the opentelemetry-python SDK path.

The same points, real host scrapes (bench/export.py's host_batches: batches of about 8192 points from
every default hostmetrics scraper of this host, cycled to about 100k points), go through

  hostagent, memory queue      Pipeline.emit(Batch) -> input queue -> Batcher (merges, encodes) ->
                               MemoryQueue -> sender thread (get, send, ack); the exporter's send()
                               does nothing, so what is measured ends at the queue
  hostagent, persistent queue  the same with the persistent queue (agent/export/wal.py) in a temp dir
  opentelemetry                the official encoder on SDK MetricsData, one request per batch:
                               encode_metrics(data) -> protobuf objects -> SerializeToString()

and, as a separate case, the points held as data objects before export: hostagent's model
(MetricGroup, Metric, NumberPoint) against the SDK's (ResourceMetrics, ScopeMetrics, Metric,
Sum/Gauge, NumberDataPoint), built from the same values, one attribute container per distinct set.

Each variant runs in a fresh process, twice: once under tracemalloc (peak bytes above what was
allocated before it started; for the data objects, the bytes and blocks they hold), once without it
for the peak resident set (VmHWM, reset through /proc/self/clear_refs), which also sees memory
tracemalloc does not: protobuf's upb arenas and grpc/zlib buffers are allocated with malloc, not
Python's allocator. Figures are per 100k points; ratio = opentelemetry / hostagent.

    python bench/memory.py [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

CATEGORY = "memory"
BASELINE_EXPORT = "opentelemetry-python SDK MetricsData + official encoder (protobuf objects, SerializeToString)"
BASELINE_HELD = "opentelemetry-python SDK MetricsData objects"
VARIANTS = ("memory-queue", "persistent-queue", "opentelemetry", "model-objects", "sdk-objects")


# --- variants (run in a child process) -------------------------------------------------------------

def _points(groups) -> int:
    return sum(len(m.points) for g in groups for m in g.metrics)


class NullExporter:
    """Accepts every payload: what is measured ends at the export queue."""
    name = "null"

    def __init__(self, expect: int):
        self.expect, self.sent = expect, 0
        self.all_sent = threading.Event()

    def send(self, payload) -> None:
        self.sent += payload.items
        if self.sent >= self.expect:
            self.all_sent.set()

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def prepare(variant: str, batches: list, tmp: str):
    """What the variant starts from, built before measuring; returns run()."""
    if variant in ("memory-queue", "persistent-queue"):
        from agent.config import Duration
        from agent.export.queue import MemoryQueue, QueueSettings
        from agent.export.retry import RetryConfig
        from agent.model import Batch
        from agent.export.wal import PersistentQueue
        from agent.pipeline import Pipeline
        from agent.pipeline.batcher import BatchConfig
        from agent.selfmetrics import SelfMetrics
        inputs = [Batch(metrics=list(groups)) for groups in batches]
        total = sum(len(b) for b in inputs)

        def run():
            telemetry = SelfMetrics()
            if variant == "persistent-queue":
                queue = PersistentQueue(QueueSettings("persistent", os.path.join(tmp, "queue"), max_bytes=2**30),
                                        telemetry)
            else:
                queue = MemoryQueue(QueueSettings("memory"), telemetry)
            exporter = NullExporter(total)
            pipe = Pipeline(BatchConfig(max_size=8192, timeout=Duration(1.0), queue_size=len(inputs) + 1),
                            RetryConfig(), exporter, telemetry, queue=queue, senders=1)
            pipe.start()
            for b in inputs:
                pipe.emit(b)
            pipe.batcher.stop()
            if not exporter.all_sent.wait(120):
                raise RuntimeError(f"{variant}: {exporter.sent} of {total} points reached the exporter")
            pipe.shutdown(10)
            queue.close()
        return run
    if variant == "opentelemetry":
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        from bench.export import to_sdk
        data = [to_sdk(groups) for groups in batches]

        def run():
            for d in data:   # each body is sent and dropped before the next batch, as the exporter does
                encode_metrics(d).SerializeToString()
        return run
    if variant == "model-objects":
        return lambda: model_objects(batches)
    if variant == "sdk-objects":
        return lambda: sdk_objects(batches)
    raise ValueError(variant)


def model_objects(batches: list) -> list:
    """The points as hostagent's model holds them, new containers throughout."""
    from agent.model import Metric, MetricGroup, NumberPoint
    attrs: dict = {}
    out = []
    for groups in batches:
        for g in groups:
            metrics = []
            for m in g.metrics:
                points = []
                for p in m.points:
                    a = attrs.get(p.attributes)
                    if a is None:
                        a = attrs[p.attributes] = tuple(list(p.attributes))
                    points.append(NumberPoint(a, p.value, p.start_time_ns, p.time_ns))
                metrics.append(Metric(m.name, m.description, m.unit, m.kind, points, m.monotonic, m.temporality))
            out.append(MetricGroup(g.resource, g.scope, metrics))
    return out


def sdk_objects(batches: list) -> list:
    """The same points as the SDK's MetricsData holds them (bench/export.py's to_sdk, with one
    attribute dict per distinct set as the SDK's aggregations keep them)."""
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Metric, MetricsData,
                                                  NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from agent.model import MetricKind
    attrs: dict = {}
    out = []
    for groups in batches:
        by_resource: dict = {}
        for g in groups:
            by_resource.setdefault(g.resource, {}).setdefault(g.scope, []).extend(g.metrics)
        resource_metrics = []
        for resource, scopes in by_resource.items():
            scope_metrics = []
            for scope, metrics in scopes.items():
                sdk_metrics = []
                for m in metrics:
                    points = []
                    for p in m.points:
                        a = attrs.get(p.attributes)
                        if a is None:
                            a = attrs[p.attributes] = dict(p.attributes)
                        points.append(NumberDataPoint(attributes=a, start_time_unix_nano=p.start_time_ns,
                                                      time_unix_nano=p.time_ns, value=p.value))
                    if m.kind is MetricKind.SUM:
                        data = Sum(data_points=points, is_monotonic=m.monotonic,
                                   aggregation_temporality=AggregationTemporality(int(m.temporality)))
                    else:
                        data = Gauge(data_points=points)
                    sdk_metrics.append(Metric(name=m.name, description=m.description, unit=m.unit, data=data))
                scope_metrics.append(ScopeMetrics(scope=InstrumentationScope(scope.name, scope.version),
                                                  metrics=sdk_metrics, schema_url=""))
            resource_metrics.append(ResourceMetrics(resource=Resource(dict(resource.attributes)),
                                                    scope_metrics=scope_metrics, schema_url=""))
        out.append(MetricsData(resource_metrics=resource_metrics))
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, mode: str, input_file: str) -> dict:
    """One measurement of one variant in this (fresh) process."""
    import gc
    with open(input_file, "rb") as f:
        batches = pickle.load(f)
    points = sum(_points(b) for b in batches)
    with tempfile.TemporaryDirectory(prefix="hostagent-bench-") as tmp:
        run = prepare(variant, batches, tmp)
        gc.collect()
        if mode == "tracemalloc":
            import tracemalloc
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            blocks_before = len(tracemalloc.take_snapshot().traces)
            tracemalloc.reset_peak()
            kept = run()
            current, peak = tracemalloc.get_traced_memory()
            blocks = len(tracemalloc.take_snapshot().traces) - blocks_before
            tracemalloc.stop()
            del kept
            return {"points": points, "peak_bytes": peak - before, "held_bytes": current - before,
                    "held_blocks": blocks}
        rss0 = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset VmHWM to the current resident set
        kept = run()
        hwm = _status_kib("VmHWM")
        del kept
        return {"points": points, "peak_rss_bytes": (hwm - rss0) * 1024}


# --- the parent ------------------------------------------------------------------------------------

def measure_all(batches: list, rounds: int) -> dict:
    """{variant: {"tracemalloc": [...], "rss": [...]}}, each run in a fresh process."""
    out = {v: {"tracemalloc": [], "rss": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="hostagent-bench-") as tmp:
        input_file = os.path.join(tmp, "batches.pickle")
        with open(input_file, "wb") as f:
            pickle.dump(batches, f)
        for _ in range(rounds):
            for variant in VARIANTS:
                for mode in ("tracemalloc", "rss"):
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, mode,
                                           input_file], capture_output=True, text=True, timeout=300)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{variant} ({mode}) failed:\n{proc.stderr}")
                    out[variant][mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run(quick: bool = False) -> list[dict]:
    from bench.export import host_batches
    distinct = host_batches(1 if quick else 2)
    n = 12   # about 100k points: peaks do not scale with the points, so measure the amount reported
    batches = [distinct[i % len(distinct)] for i in range(n)]
    samples = measure_all(batches, 1 if quick else 2)
    points = samples["memory-queue"]["tracemalloc"][0]["points"]
    per = 1e5 / points

    def med(variant, mode, key):
        return statistics.median(s[key] for s in samples[variant][mode]) * per

    results = []
    for mode, key, metric in (("tracemalloc", "peak_bytes", "peak tracemalloc bytes per 100k points"),
                              ("rss", "peak_rss_bytes", "peak resident set growth (VmHWM) per 100k points")):
        for variant in ("memory-queue", "persistent-queue"):
            ours, theirs = med(variant, mode, key), med("opentelemetry", mode, key)
            case = f"export path, {variant.replace('-', ' ')}" + (", RSS" if mode == "rss" else "")
            ranges = {side: [min(s[key] for s in samples[v][mode]) * per, max(s[key] for s in samples[v][mode]) * per]
                      for side, v in (("ours", variant), ("theirs", "opentelemetry"))}
            details = {"points": points, "rounds": len(samples[variant][mode]),
                       "ours_range": ranges["ours"], "theirs_range": ranges["theirs"]}
            if mode == "tracemalloc":
                details.update(ours_retained_bytes=med(variant, mode, "held_bytes"),
                               theirs_retained_bytes=med("opentelemetry", mode, "held_bytes"))
            results.append({"case": case, "baseline": BASELINE_EXPORT, "metric": metric, "ours": ours,
                            "theirs": theirs, "ratio": theirs / ours if ours > 0 else None, "details": details})
    ours, theirs = med("model-objects", "tracemalloc", "held_bytes"), med("sdk-objects", "tracemalloc", "held_bytes")
    blocks_ours = med("model-objects", "tracemalloc", "held_blocks")
    blocks_theirs = med("sdk-objects", "tracemalloc", "held_blocks")
    results.append({"case": "points held as objects", "baseline": BASELINE_HELD,
                    "metric": "bytes held per 100k points", "ours": ours, "theirs": theirs, "ratio": theirs / ours,
                    "details": {"points": points, "ours_blocks": blocks_ours, "theirs_blocks": blocks_theirs,
                                "blocks_ratio": blocks_theirs / blocks_ours,
                                "ours_peak_rss_bytes": med("model-objects", "rss", "peak_rss_bytes"),
                                "theirs_peak_rss_bytes": med("sdk-objects", "rss", "peak_rss_bytes")}})
    return results


def print_table(results: list) -> None:
    mib = 2**20
    print(f"per 100k points ({results[0]['details']['points']} measured), each variant in a fresh process")
    print(f"{'case':<36}{'hostagent MiB':>14}{'baseline MiB':>14}{'ratio':>8}  metric")
    for r in results:
        ratio = f"{r['ratio']:>7.1f}x" if r["ratio"] else f"{'-':>8}"
        print(f"{r['case']:<36}{r['ours'] / mib:>14.2f}{r['theirs'] / mib:>14.2f}{ratio}  {r['metric']}")
    held = results[-1]["details"]
    print(f"blocks held per 100k points: hostagent {held['ours_blocks']:,.0f}, SDK {held['theirs_blocks']:,.0f}")


def main(argv=None) -> int:
    ap = parser(__doc__, "one round, one distinct batch (a few seconds)")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "MODE", "INPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    return finish(args, CATEGORY, run(args.quick), print_table)


if __name__ == "__main__":
    sys.exit(main())
