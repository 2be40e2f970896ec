"""Event-derived counters: hostagent's single-writer snapshot against a dict behind a lock.

The eBPF probes that send records (agent/sources/ebpf/ringbuf.py RingProbe) count events as they
decode them: one reader thread is the only writer of a plain dict (count()) and publishes an
immutable MappingProxyType snapshot once per poll that changed it (poll()); the collection thread
builds its metrics from whichever snapshot is current (counter_metrics()), and neither takes a lock.
The baseline is the way one would write it otherwise: a dict behind a threading.Lock, taken for
every increment by the writer and for every read by the collector (which copies the dict under it).

Both get the same event stream in the same two threads:
  writer  batches of (metric, attributes) events as ring-buffer drains deliver them (1 to 512
          records, skewed small), drawn from the process and OOM probes' counters and TCP state
          changes; after each batch, poll() (hostagent: publish the snapshot; baseline: nothing)
  reader  every 10 ms, the counters as metrics (counter_metrics()), until the writer is done

Cases:
  per-event  one increment per event (count(metric, attributes) per record)
  per-batch  one increment per distinct key per batch, as the process probe's decode() counts
             (a Counter over the batch, then count(metric, attributes, n))

Metric: writer thread CPU ns per event (CLOCK_THREAD_CPUTIME_ID), median of rounds that alternate
between the two; ratio = baseline / hostagent. The reader's CPU µs per read is in the details.

    python bench/aggregation.py [--quick] [--json FILE] [--events N]
"""
from __future__ import annotations

import collections
import os
import random
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

from agent.sources.ebpf.ringbuf import counter_metrics  # noqa: E402

CATEGORY = "aggregation"
BASELINE = "dict behind threading.Lock, taken per increment and per read"
READ_INTERVAL = 0.010

TCP_STATES = ["SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
              "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
# metric -> (unit, description, attribute sets reported as 0 before the first event)
COUNTERS = {
    "system.linux.process.execs": ("{process}", "Successful execve calls.", [()]),
    "system.linux.process.exits": ("{process}", "Processes that ended, by how.",
                                   [(("exit.class", c),) for c in ("success", "failure", "signal")]),
    "system.linux.memory.oom_kills": ("{process}", "Processes the OOM killer chose as victims.", [()]),
    "system.linux.tcp.state_changes": ("{change}", "TCP state transitions.", []),
}


def event_stream(events: int, seed: int = 1) -> list:
    """Batches of (metric, attributes) keys, the sizes ring-buffer drains have (mostly small)."""
    rng = random.Random(seed)
    keys = ([("system.linux.process.execs", ())] * 8
            + [("system.linux.process.exits", (("exit.class", c),)) for c in
               ("success",) * 6 + ("failure", "signal")]
            + [("system.linux.memory.oom_kills", ())]
            + [("system.linux.tcp.state_changes", (("tcp.state.old", a), ("tcp.state.new", b)))
               for a, b in zip(TCP_STATES, TCP_STATES[1:] + TCP_STATES[:1])])
    batches, left = [], events
    while left:
        n = min(left, max(1, min(512, int(rng.expovariate(1 / 48)))))
        batches.append([rng.choice(keys) for _ in range(n)])
        left -= n
    return batches


def hostagent_counters():
    """A RingProbe without rings: its count(), poll() and counter_metrics() as the probes run them."""
    from agent.sources.ebpf.ringbuf import RingProbe

    class Counting(RingProbe):
        name = "bench"
        counters = COUNTERS
    probe = Counting()
    probe.setup(None)
    return probe


class LockedCounters:
    """The baseline: the same interface over one dict guarded by a lock."""

    counters = COUNTERS

    def __init__(self):
        self._counts: dict = {}
        self._lock = threading.Lock()

    def count(self, metric: str, attributes: tuple = (), amount: int = 1) -> None:
        with self._lock:
            key = (metric, attributes)
            self._counts[key] = self._counts.get(key, 0) + amount

    def poll(self) -> list:
        return []

    def counter_metrics(self, now_ns: int, start_ns: int) -> list:
        with self._lock:
            counts = dict(self._counts)
        return counter_metrics(self.counters, counts, now_ns, start_ns)


def write_per_event(counters, batches) -> None:
    count, poll = counters.count, counters.poll
    for batch in batches:
        for metric, attributes in batch:
            count(metric, attributes)
        poll()


def write_per_batch(counters, batches) -> None:
    count, poll = counters.count, counters.poll
    for batch in batches:
        for (metric, attributes), n in collections.Counter(batch).items():
            count(metric, attributes, n)
        poll()


def one_round(counters, write, batches, events: int) -> dict:
    """Writer and reader threads over one stream; CPU of each, reads made, final totals."""
    done = threading.Event()
    out: dict = {}
    start_ns = time.time_ns()

    def reader():
        cpu0, reads = time.thread_time_ns(), 0
        while not done.wait(READ_INTERVAL):
            counters.counter_metrics(time.time_ns(), start_ns)
            reads += 1
        out["reader_cpu_ns"], out["reads"] = time.thread_time_ns() - cpu0, reads

    def writer():
        cpu0, wall0 = time.thread_time_ns(), time.perf_counter()
        write(counters, batches)
        out["writer_cpu_ns"], out["writer_wall_s"] = time.thread_time_ns() - cpu0, time.perf_counter() - wall0
        done.set()

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(p.value for m in counters.counter_metrics(time.time_ns(), start_ns) for p in m.points)
    if total != events:
        raise AssertionError(f"{type(counters).__name__}: counted {total} of {events} events")
    return out


def measure(case: str, write, batches, events: int, rounds: int) -> dict:
    samples: dict = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for side, make in (("ours", hostagent_counters), ("theirs", LockedCounters)):
            samples[side].append(one_round(make(), write, batches, events))

    def med(side, f):
        return statistics.median(f(s) for s in samples[side])

    ours = med("ours", lambda s: s["writer_cpu_ns"] / events)
    theirs = med("theirs", lambda s: s["writer_cpu_ns"] / events)
    details = {"events": events, "batches": len(batches), "rounds": rounds, "read_interval_ms": READ_INTERVAL * 1e3}
    for side in ("ours", "theirs"):
        per_event = [s["writer_cpu_ns"] / events for s in samples[side]]
        details[f"{side}_writer_ns_range"] = [min(per_event), max(per_event)]
        details[f"{side}_reader_us_per_read"] = med(side, lambda s: s["reader_cpu_ns"] / max(1, s["reads"]) / 1e3)
        details[f"{side}_reads"] = med(side, lambda s: s["reads"])
        details[f"{side}_writer_wall_s"] = med(side, lambda s: s["writer_wall_s"])
    return {"case": case, "baseline": BASELINE, "metric": "writer CPU ns per event", "ours": ours,
            "theirs": theirs, "ratio": theirs / ours, "details": details}


def run(quick: bool = False, events: int = 0) -> list[dict]:
    events = events or (200_000 if quick else 1_000_000)
    rounds = 3 if quick else 5
    batches = event_stream(events)
    return [measure("per-event", write_per_event, batches, events, rounds),
            measure("per-batch", write_per_batch, batches, events, rounds)]


def print_table(results: list) -> None:
    print(f"baseline: {BASELINE}")
    print(f"{'case':<11}{'events':>10}{'writer ns/event':>17}{'baseline':>10}{'ratio':>8}"
          f"{'reader µs/read':>16}{'baseline':>10}")
    for r in results:
        d = r["details"]
        print(f"{r['case']:<11}{d['events']:>10}{r['ours']:>17.0f}{r['theirs']:>10.0f}{r['ratio']:>7.2f}x"
              f"{d['ours_reader_us_per_read']:>16.1f}{d['theirs_reader_us_per_read']:>10.1f}")


def main(argv=None) -> int:
    ap = parser(__doc__, "200k events, 3 rounds")
    ap.add_argument("--events", type=int, help="events per round (default 1M, quick 200k)")
    args = ap.parse_args(argv)
    return finish(args, CATEGORY, run(args.quick, args.events or 0), print_table)


if __name__ == "__main__":
    sys.exit(main())
