"""Batching: points/s through hostagent's Batcher against sending every small batch on its own.

Sources hand the pipeline many small batches: a host scrape's groups once per collection interval,
a probe's log records once per ring-buffer drain. The agent's pipeline (agent/pipeline: input
queue, Batcher, memory export queue, one sender thread, GrpcExporter over one connection, gzip)
merges them until batch.max_size (8192) items and encodes and sends each merged batch as one
request. The baseline is the same pipeline with batch.max_size 1: every small batch is encoded and
sent as its own request, as an exporter called once per collection or drain would.

Inputs, built as the sources build them:
  metrics  one real scrape of this host's default hostmetrics scrapers per batch (some 200 points),
           distinct scrapes cycled
  logs     process.exec / process.exit log records with the process probe's attributes, 16 per batch
           (a ring-buffer drain on a host starting some 80 processes a second; bench/compression.py's
           log_batches)

The receiver is bench/network.py's, in another process (its CPU is not counted), answering at once
after parsing each request; it checks every item arrived. Measured per variant: items per second
from the first batch handed over to the last answer, and CPU seconds of this process per million
items; rounds alternate, medians. ratio = hostagent's points/s / the baseline's.

    python bench/batching.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

CATEGORY = "batching"
BASELINE = "unbatched: each small batch encoded and sent as its own request (same pipeline, batch.max_size 1)"
MAX_SIZE = 8192
LOG_RECORDS_PER_DRAIN = 16


def scrape_batches(n: int) -> list:
    """`n` real scrapes of this host's default hostmetrics scrapers, each a list of MetricGroups."""
    from agent.components import ScrapersConfig, build_scrapers
    from agent.resource import ResourceConfig, detect
    from agent.selfmetrics import SelfMetrics
    sources = build_scrapers(ScrapersConfig(), SelfMetrics(), detect(ResourceConfig()))
    out = []
    for _ in range(n):
        out.append([g for s in sources for g in s.collect()])
        time.sleep(0.01)   # rates and deltas need time between two scrapes
    return out


def measure(case: str, signal_name: str, batches: list, rounds: int, endpoint: str) -> tuple:
    from bench.network import through_pipeline
    samples: dict = {"ours": [], "theirs": []}
    sent = 0
    for _ in range(rounds):
        for side, max_size in (("ours", MAX_SIZE), ("theirs", 1)):
            r = through_pipeline(endpoint, batches, 1, signal_name, max_size=max_size)
            samples[side].append(r)
            sent += r["items"] + r["warmup_items"]
    rates = {side: [s["items"] / s["wall_s"] for s in samples[side]] for side in samples}
    cpu = {side: statistics.median(s["cpu_s"] / s["items"] * 1e6 for s in samples[side]) for side in samples}
    ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["theirs"])
    items = samples["ours"][0]["items"]
    unit = "points" if signal_name == "metrics" else "records"
    result = {"case": case, "baseline": BASELINE, "metric": f"{unit}/s", "ours": ours, "theirs": theirs,
              "ratio": ours / theirs,
              "details": {"items_per_round": items, "batches_per_round": len(batches),
                          "items_per_batch": items / len(batches), "rounds": rounds,
                          "ours_requests_per_round": -(-items // MAX_SIZE), "theirs_requests_per_round": len(batches),
                          "ours_range": [min(rates["ours"]), max(rates["ours"])],
                          "theirs_range": [min(rates["theirs"]), max(rates["theirs"])],
                          "ours_cpu_s_per_m_items": cpu["ours"], "theirs_cpu_s_per_m_items": cpu["theirs"],
                          "cpu_ratio": cpu["theirs"] / cpu["ours"]}}
    return result, sent


def run(quick: bool = False) -> list[dict]:
    from bench.compression import log_batches
    from bench.network import Receiver
    rounds = 3 if quick else 5
    scrapes = scrape_batches(10 if quick else 40)
    metric_inputs = [scrapes[i % len(scrapes)] for i in range(60 if quick else 200)]
    log_inputs = [groups for groups, _ in log_batches(150 if quick else 500, LOG_RECORDS_PER_DRAIN)]
    results, sent = [], {"metrics": 0, "logs": 0}
    with Receiver(0.0) as rx:
        for case, signal_name, inputs in (("metrics: a scrape per batch", "metrics", metric_inputs),
                                          (f"logs: {LOG_RECORDS_PER_DRAIN} records per batch", "logs", log_inputs)):
            result, n = measure(case, signal_name, inputs, rounds, rx.endpoint)
            results.append(result)
            sent[signal_name] += n
    for signal_name, n in sent.items():
        if rx.counts.get(signal_name) != n:
            raise RuntimeError(f"the receiver got {rx.counts.get(signal_name)} {signal_name} items, {n} were sent")
    return results


def print_table(results: list) -> None:
    print(f"baseline: {BASELINE}")
    print(f"{'case':<30}{'items/batch':>12}{'requests':>14}{'items/s':>12}{'baseline':>12}{'ratio':>8}"
          f"{'CPU-s/M items':>18}")
    for r in results:
        d = r["details"]
        requests = f"{d['ours_requests_per_round']} vs {d['theirs_requests_per_round']}"
        print(f"{r['case']:<30}{d['items_per_batch']:>12.0f}{requests:>14}"
              f"{r['ours']:>12,.0f}{r['theirs']:>12,.0f}{r['ratio']:>7.1f}x"
              f"{d['ours_cpu_s_per_m_items']:>9.2f} vs {d['theirs_cpu_s_per_m_items']:.2f}")


def main(argv=None) -> int:
    args = parser(__doc__, "fewer batches and rounds (a few seconds)").parse_args(argv)
    return finish(args, CATEGORY, run(args.quick), print_table)


if __name__ == "__main__":
    sys.exit(main())
