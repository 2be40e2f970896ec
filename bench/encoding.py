"""OTLP protobuf encoding per data point: hostagent's wire encoder against the official one.

The same data, encoded by
  hostagent      agent.export.encoding.encode_metrics / encode_logs (writes the wire format directly,
                 caches what repeats between collections; warmed up as in a running agent)
  opentelemetry  opentelemetry-exporter-otlp-proto-common: encode_metrics(MetricsData) or
                 _log_encoder.encode_logs([ReadableLogRecord]) -> protobuf objects -> SerializeToString()
The official encoder's input (SDK data objects) is built once beforehand and not timed, as hostagent's
input (its model objects) is not.

Cases:
  metrics     real host scrapes (every default hostmetrics scraper of this host, collected repeatedly),
              requests of about 8192 gauge and sum points (bench/export.py's host_batches)
  histograms  exponential histograms (scale 0) as the eBPF probes build them from their log2 maps
              (agent/sources/ebpf/histogram.exp2_point): syscall latency per syscall, block I/O latency
              per device and operation, run-queue latency
  logs        process.exec / process.exit log records with the attributes the process probe sets,
              4096 per request (bench/compression.py's log_batches)

Before timing, each case checks that both encodings parse (opentelemetry.proto classes) to the same
message, and stops with an error if not. One difference is allowed and cleared before comparing: the
official encoder leaves out start_time_unix_nano of gauge points, hostagent writes it.

Metric: CPU ns per data point (log record), median of several rounds that alternate between the
encoders; ratio = opentelemetry / hostagent.

    python bench/encoding.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

CATEGORY = "encoding"
BASELINE = "opentelemetry-python encoder (opentelemetry-exporter-otlp-proto-common 1.45, protobuf objects)"

SYSCALLS = ["read", "write", "openat", "close", "fstat", "lseek", "mmap", "mprotect", "munmap", "brk",
            "rt_sigaction", "rt_sigprocmask", "ioctl", "pread64", "pwrite64", "readv", "writev", "access",
            "pipe2", "select", "sched_yield", "mremap", "madvise", "dup", "dup2", "nanosleep", "getpid",
            "sendfile", "socket", "connect", "accept4", "sendto", "recvfrom", "sendmsg", "recvmsg",
            "shutdown", "bind", "listen", "getsockname", "getpeername", "setsockopt", "getsockopt",
            "clone3", "execve", "exit_group", "wait4", "kill", "uname", "fcntl", "flock", "fsync",
            "fdatasync", "getdents64", "getcwd", "chdir", "rename", "mkdir", "unlink", "readlink",
            "chmod", "fchown", "umask", "gettimeofday", "getrlimit", "getuid", "getgid", "geteuid",
            "futex", "epoll_wait", "epoll_ctl", "epoll_pwait", "timerfd_settime", "eventfd2",
            "clock_gettime", "clock_nanosleep", "newfstatat", "statx", "prlimit64", "getrandom",
            "memfd_create", "bpf", "io_uring_enter", "rseq", "poll", "ppoll", "pselect6", "splice"]
DEVICES = [("vda", "read"), ("vda", "write"), ("vda", "flush"), ("vdb", "read"), ("vdb", "write"),
           ("nvme0n1", "read"), ("nvme0n1", "write"), ("nvme0n1", "discard")]


# --- inputs --------------------------------------------------------------------------------------

def merged(groups: list) -> list:
    """`groups` with the metrics of the same name (collections batched together) merged into one per
    resource and scope: the shape both encoders emit, so the two requests can be compared."""
    from agent.model import Metric, MetricGroup
    out: dict = {}
    for g in groups:
        by_name = out.setdefault((g.resource, g.scope), {})
        for m in g.metrics:
            if m.name in by_name:
                by_name[m.name].points.extend(m.points)
            else:
                by_name[m.name] = Metric(m.name, m.description, m.unit, m.kind, list(m.points), m.monotonic,
                                         m.temporality)
    return [MetricGroup(r, s, list(ms.values())) for (r, s), ms in out.items()]


def histogram_batches(n: int, collections: int = 8, seed: int = 1) -> list:
    """Requests of `collections` collections of the latency histograms the eBPF probes export."""
    from agent.model import Metric, MetricGroup, MetricKind, Scope
    from agent.resource import ResourceConfig, detect
    from agent.sources.ebpf.histogram import exp2_point
    resource = detect(ResourceConfig())
    scope = Scope("hostagent/probes", "0.1.0")
    rng = random.Random(seed)

    def buckets(lo: int, hi: int) -> dict:
        """{slot: (count, sum)}: slot s holds values in (2^(s-2), 2^(s-1)]; some slots stay empty."""
        out = {}
        for slot in range(lo, hi + 1):
            if rng.random() < 0.85:
                count = rng.randint(1, 50_000)
                out[slot] = (count, int(count * 0.75 * 2 ** (slot - 1)))
        if rng.random() < 0.2:
            out[0] = (rng.randint(1, 100), 0)
        return out or {lo: (1, 2 ** (lo - 1))}

    start = time.time_ns() - 3_600 * 10**9
    batches = []
    for _ in range(n):
        groups = []
        for c in range(collections):
            now = start + c * 10 * 10**9
            syscalls = [exp2_point(buckets(rng.randint(8, 12), rng.randint(14, 26)), (("syscall", name),),
                                   start, now) for name in SYSCALLS]
            block = [exp2_point(buckets(rng.randint(12, 16), rng.randint(20, 28)),
                                (("disk.io.direction", op), ("system.device", dev)), start, now)
                     for dev, op in DEVICES]
            runq = [exp2_point(buckets(8, rng.randint(18, 24)), (), start, now)]
            groups.append(MetricGroup(resource, scope, [
                Metric("system.linux.syscall.duration", "Time from entering to leaving a system call.", "ns",
                       MetricKind.EXPONENTIAL_HISTOGRAM, syscalls),
                Metric("system.linux.disk.io.latency", "Block I/O request latency, per device and operation.",
                       "ns", MetricKind.EXPONENTIAL_HISTOGRAM, block),
                Metric("system.linux.cpu.runqueue.latency", "Time runnable threads waited on a CPU run queue.",
                       "ns", MetricKind.EXPONENTIAL_HISTOGRAM, runq)]))
        batches.append(groups)
    return batches


def to_sdk_metrics(groups: list):
    """`groups` as opentelemetry-sdk MetricsData: bench/export.py's to_sdk for gauges and sums, and
    exponential histograms here."""
    from bench.export import to_sdk
    from agent.model import MetricKind
    if not any(m.kind is MetricKind.EXPONENTIAL_HISTOGRAM for g in groups for m in g.metrics):
        return to_sdk(groups)
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Buckets, ExponentialHistogram,
                                                  ExponentialHistogramDataPoint, Metric, MetricsData,
                                                  ResourceMetrics, ScopeMetrics)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    out = []
    for g in groups:
        metrics = []
        for m in g.metrics:
            if m.kind is not MetricKind.EXPONENTIAL_HISTOGRAM:
                raise ValueError(f"{m.name}: a request mixes histograms with other kinds")
            points = [ExponentialHistogramDataPoint(
                attributes=dict(p.attributes), start_time_unix_nano=p.start_time_ns, time_unix_nano=p.time_ns,
                count=p.count, sum=p.sum, scale=p.scale, zero_count=p.zero_count,
                positive=Buckets(p.positive_offset, list(p.positive_counts)), negative=Buckets(0, []), flags=0,
                min=p.min, max=p.max) for p in m.points]
            metrics.append(Metric(name=m.name, description=m.description, unit=m.unit,
                                  data=ExponentialHistogram(points, AggregationTemporality(int(m.temporality)))))
        out.append(ResourceMetrics(Resource(dict(g.resource.attributes)),
                                   [ScopeMetrics(InstrumentationScope(g.scope.name, g.scope.version), metrics, "")],
                                   ""))
    return MetricsData(out)


def to_sdk_logs(groups: list) -> list:
    """`groups` as the ReadableLogRecords the official log encoder takes."""
    from opentelemetry._logs import LogRecord, SeverityNumber
    from opentelemetry.sdk._logs import ReadableLogRecord
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    out = []
    for g in groups:
        resource = Resource(dict(g.resource.attributes))
        scope = InstrumentationScope(g.scope.name, g.scope.version)
        for r in g.records:
            out.append(ReadableLogRecord(LogRecord(
                timestamp=r.time_ns, observed_timestamp=r.observed_time_ns or r.time_ns,
                severity_text=r.severity.name, severity_number=SeverityNumber(int(r.severity)), body=r.body,
                attributes=dict(r.attributes), event_name=r.event_name or None),
                resource=resource, instrumentation_scope=scope))
    return out


# --- the two encoders ----------------------------------------------------------------------------

def official_metrics(data) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    return encode_metrics(data).SerializeToString()


def official_logs(records) -> bytes:
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    return encode_logs(records).SerializeToString()


class EncodingMismatch(AssertionError):
    pass


def check_same(signal: str, ours: bytes, theirs: bytes, case: str) -> None:
    """Both bodies parse to the same request, apart from the gauge start times only hostagent writes."""
    from agent.export.encoding import REQUEST_TYPES
    a, b = REQUEST_TYPES[signal].FromString(ours), REQUEST_TYPES[signal].FromString(theirs)
    if signal == "metrics":
        for rm in a.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.WhichOneof("data") == "gauge":
                        for p in m.gauge.data_points:
                            p.ClearField("start_time_unix_nano")
    if a != b:
        raise EncodingMismatch(f"{case}: hostagent's and the official encoder's requests differ "
                               f"({len(ours)} vs {len(theirs)} bytes)")


def _items(signal: str, groups: list) -> int:
    if signal == "metrics":
        return sum(len(m.points) for g in groups for m in g.metrics)
    return sum(len(g.records) for g in groups)


def measure(case: str, signal: str, batches: list, rounds: int) -> dict:
    """Median CPU ns per item of each encoder over `rounds` alternating rounds."""
    from agent.export.encoding import encode_logs, encode_metrics
    if signal == "metrics":
        batches = [merged(b) for b in batches]
        ours_fn, theirs_fn, sdk = encode_metrics, official_metrics, [to_sdk_metrics(b) for b in batches]
    else:
        ours_fn, theirs_fn, sdk = encode_logs, official_logs, [to_sdk_logs(b) for b in batches]
    items = sum(_items(signal, b) for b in batches)
    ours_bytes = theirs_bytes = 0
    for groups, data in zip(batches, sdk):   # also warms hostagent's caches, as a running agent has them
        ours_body, theirs_body = ours_fn(groups), theirs_fn(data)
        check_same(signal, ours_body, theirs_body, case)
        ours_bytes += len(ours_body)
        theirs_bytes += len(theirs_body)
    samples: dict = {"ours": [], "theirs": []}
    for _ in range(rounds):
        t0 = time.process_time_ns()
        for groups in batches:
            ours_fn(groups)
        t1 = time.process_time_ns()
        for data in sdk:
            theirs_fn(data)
        t2 = time.process_time_ns()
        samples["ours"].append((t1 - t0) / items)
        samples["theirs"].append((t2 - t1) / items)
    ours, theirs = statistics.median(samples["ours"]), statistics.median(samples["theirs"])
    unit = "point" if signal == "metrics" else "record"
    return {"case": case, "baseline": BASELINE, "metric": f"CPU ns per {unit}",
            "ours": ours, "theirs": theirs, "ratio": theirs / ours,
            "details": {"items_per_round": items, "requests_per_round": len(batches), "rounds": rounds,
                        "ours_range": [min(samples["ours"]), max(samples["ours"])],
                        "theirs_range": [min(samples["theirs"]), max(samples["theirs"])],
                        "ours_bytes_per_item": ours_bytes / items, "theirs_bytes_per_item": theirs_bytes / items,
                        "decoded_equal": True}}


def run(quick: bool = False) -> list[dict]:
    from bench.compression import log_batches
    from bench.export import host_batches
    rounds = 5 if quick else 9
    cases = [("metrics", "metrics", lambda: host_batches(1 if quick else 3)),
             ("histograms", "metrics", lambda: histogram_batches(2 if quick else 4)),
             ("logs", "logs", lambda: [g for g, _ in log_batches(1 if quick else 3)])]
    results = []
    for case, signal, build in cases:
        try:
            batches = build()
        except ImportError as e:
            results.append({"case": case, "skipped": f"missing module: {e.name}"})
            continue
        results.append(measure(case, signal, batches, rounds))
    return results


def print_table(results: list) -> None:
    print(f"baseline: {BASELINE}")
    print(f"{'case':<12}{'items/round':>12}{'hostagent ns':>14}{'official ns':>13}{'ratio':>8}"
          f"{'bytes/item (ours, theirs)':>28}")
    for r in results:
        if "skipped" in r:
            print(f"{r['case']:<12} skipped: {r['skipped']}")
            continue
        d = r["details"]
        print(f"{r['case']:<12}{d['items_per_round']:>12}{r['ours']:>14.0f}{r['theirs']:>13.0f}{r['ratio']:>7.1f}x"
              f"{d['ours_bytes_per_item']:>18.1f}, {d['theirs_bytes_per_item']:.1f}")


def main(argv=None) -> int:
    args = parser(__doc__, "less data, fewer rounds (a few seconds)").parse_args(argv)
    return finish(args, CATEGORY, run(args.quick), print_table)


if __name__ == "__main__":
    sys.exit(main())
