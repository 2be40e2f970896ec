"""Request compression: size and time per codec and level on realistic hostagent batches.

Two kinds of request, built as the agent builds them:
  metrics  every default hostmetrics scraper of this host, collected repeatedly, in batches of
           about 8192 data points (batch.max_size)
  logs     eBPF-like process.exec / process.exit log records (the attributes the process probe
           sets), 4096 per request, pids, paths and exit codes varying as on a busy host

For each codec the agent offers for OTLP/HTTP (gzip, zstd, lz4, zlib/deflate, none; the
Content-Encoding names the Collector accepts) at a few levels: compressed size as a ratio of the
encoded request, and the time to encode + compress one request, per thousand items. Best of
several runs, one thread.

    python bench/compression.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import parser, write_json  # noqa: E402

CODECS = [("none", None), ("gzip", 1), ("gzip", 6), ("gzip", 9), ("zlib", 6), ("zstd", 1), ("zstd", 3),
          ("zstd", 9), ("lz4", 0), ("lz4", 9)]
COMMANDS = ["/usr/bin/bash", "/usr/bin/python3.11", "/usr/sbin/sshd", "/usr/bin/git", "/usr/bin/cc1",
            "/usr/bin/ld", "/usr/bin/ls", "/usr/lib/postgresql/15/bin/postgres", "/usr/sbin/nginx"]


def metric_batches(n: int) -> list:
    from agent.components import ScrapersConfig, build_scrapers
    from agent.resource import ResourceConfig, detect
    from agent.selfmetrics import SelfMetrics
    sources = build_scrapers(ScrapersConfig(), SelfMetrics(), detect(ResourceConfig()))
    out, groups, points = [], [], 0
    while len(out) < n:
        for s in sources:
            for g in s.collect():
                groups.append(g)
                points += sum(len(m.points) for m in g.metrics)
        if points >= 8192:
            out.append((groups, points))
            groups, points = [], 0
        time.sleep(0.01)
    return out


def log_batches(n: int, per: int = 4096) -> list:
    from agent.model import LogGroup, LogRecord, Scope, Severity
    from agent.resource import ResourceConfig, detect
    resource = detect(ResourceConfig())
    scope = Scope("hostagent/probes/process", "0.1.0")
    rng = random.Random(1)
    out = []
    t = time.time_ns()
    for _ in range(n):
        records = []
        for i in range(per):
            pid, ppid = rng.randint(1000, 4_000_000), rng.randint(1, 40000)
            path = rng.choice(COMMANDS)
            name = os.path.basename(path)[:15]
            t += rng.randint(10_000, 5_000_000)
            if i % 2 == 0:
                attrs = (("process.pid", pid), ("process.parent_pid", ppid), ("process.executable.name", name),
                         ("process.executable.path", path), ("process.real_user.id", 0), ("process.owner", "root"))
                records.append(LogRecord(t, f"process {pid} executed {path}", attrs, Severity.INFO,
                                         "process.exec", t + 40_000))
            else:
                code = rng.choice([0, 0, 0, 1, 2, 127])
                attrs = (("process.pid", pid), ("process.parent_pid", ppid), ("process.executable.name", name),
                         ("process.exit.code", code), ("process.creation.time", "2025-01-01T12:00:00.000000Z"),
                         ("linux.process.lifetime", rng.random() * 10),
                         ("process.exit.time", "2025-01-01T12:00:03.000000Z"))
                records.append(LogRecord(t, f"process {pid} ({name}) exited with status {code}", attrs,
                                         Severity.INFO, "process.exit", t + 40_000))
        out.append(([LogGroup(resource, scope, records)], per))
    return out


def measure(batches, encode, codec: str, level, repeats: int) -> dict:
    from agent.export.compression import Compressor
    c = Compressor(codec, level)
    raw = sum(len(encode(g)) for g, _ in batches)
    wire = sum(len(c.compress(encode(g))) for g, _ in batches)
    items = sum(n for _, n in batches)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for groups, _ in batches:
            c.compress(encode(groups))
        times.append(time.process_time() - t0)
    return {"codec": codec, "level": c.level if codec != "none" else None, "encoding": c.encoding,
            "ratio": raw / wire, "bytes_per_item": wire / items, "raw_bytes_per_item": raw / items,
            "us_per_1k_items": min(times) / items * 1e9}


CATEGORY = "compression"
# The suite's cases: each codec the agent offers at its default level (DEFAULT_LEVELS), per kind.
SUITE_CODECS = [("gzip", 6), ("zstd", 3), ("lz4", 0)]


def measure_all(quick: bool) -> tuple[dict, dict]:
    """Every codec and level of CODECS on both kinds of request: ({kind: rows}, {kind: info})."""
    from agent.export.encoding import encode_logs, encode_metrics
    n, repeats = (2, 3) if quick else (4, 7)
    kinds = {"metrics": (metric_batches(n), encode_metrics), "logs": (log_batches(n), encode_logs)}
    results, info = {}, {}
    for kind, (batches, encode) in kinds.items():
        encode(batches[0][0])  # warm the encoder's caches, as in a running agent
        results[kind] = [measure(batches, encode, codec, level, repeats) for codec, level in CODECS]
        info[kind] = {"requests": len(batches), "items_per_request": sum(k for _, k in batches) // len(batches),
                      "repeats": repeats}
    return results, info


def run(quick: bool = False) -> list[dict]:
    """One case per kind and codec at its default level. The ratio is the size reduction against the
    same request uncompressed (encoded bytes / compressed bytes); the time to encode + compress one
    request, and what compression adds to encoding, are in the details."""
    results, info = measure_all(quick)
    rows = []
    for kind, kind_rows in results.items():
        none = next(r for r in kind_rows if r["codec"] == "none")
        per_request = info[kind]["items_per_request"] / 1000
        for codec, level in SUITE_CODECS:
            r = next(r for r in kind_rows if r["codec"] == codec and r["level"] == level)
            rows.append({
                "case": f"{kind}-{codec}",
                "baseline": "no compression",
                "metric": f"bytes per {'data point' if kind == 'metrics' else 'log record'} on the wire",
                "ours": r["bytes_per_item"], "theirs": r["raw_bytes_per_item"],
                "ratio": r["raw_bytes_per_item"] / r["bytes_per_item"],
                "details": {"level": level, "items_per_request": info[kind]["items_per_request"],
                            "ms_per_request_encode_compress": r["us_per_1k_items"] * per_request / 1000,
                            "ms_per_request_encode_only": none["us_per_1k_items"] * per_request / 1000,
                            "time_vs_no_compression": r["us_per_1k_items"] / none["us_per_1k_items"]},
            })
    return rows


def main(argv=None) -> int:
    ap = parser(__doc__, "fewer batches and repeats")
    args = ap.parse_args(argv)
    results, info = measure_all(args.quick)
    for kind, rows in results.items():
        base = rows[0]["us_per_1k_items"]
        print(f"\n{kind}: {info[kind]['requests']} requests of ~{info[kind]['items_per_request']} items, "
              f"{rows[0]['raw_bytes_per_item']:.0f} encoded bytes per item; best of {info[kind]['repeats']} runs")
        print(f"{'codec':<10}{'level':>6}{'size ratio':>12}{'bytes/item':>12}{'µs per 1k items':>17}{'vs none':>9}")
        for r in rows:
            level = "" if r["level"] is None else str(r["level"])
            print(f"{r['codec']:<10}{level:>6}{r['ratio']:>11.1f}x{r['bytes_per_item']:>12.1f}"
                  f"{r['us_per_1k_items']:>17.0f}{r['us_per_1k_items'] / base:>8.1f}x")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
