"""The process metadata cache (agent/procfs/cache.py, a two-level segmented LRU) against what one
would otherwise use: a plain dict and functools.lru_cache.

Lookup cost, one thread, ns per lookup (best of several runs over 200k lookups of 512 keys):
  hit    ours: TwoLevelCache.get of an L1 entry, and of an L2 entry (which also moves it)
         dict: dict.get; lru_cache: a hit of an lru_cache(maxsize=...)-wrapped function (C)
  miss   ours: get() -> None, then put() (the entry lands in L2, the least recent one is evicted)
         lru_cache: a call that misses (the wrapped function runs and its result is stored)

Hit rate on a replayed event mix, the same trace for every cache, same total capacity (L1 + L2):
  a host with 2,000 long-lived processes whose kernel events follow a Zipf law (s = 1.1: a few
  busy services, a long tail), interleaved with builds (bursts of 100 short-lived processes, 2-8
  events each, then their exit; their pids come round again after 120 starts, as on a host near
  its pid_max), and a sweep over every long-lived process every 20k events (as a `ps` or the process
  scraper makes). Exits invalidate their pid (ours, dict: one key); lru_cache cannot forget one
  key, so a recycled pid can hit a dead process's entry: those answers are counted as wrong.
  ratio = our hit rate / lru_cache's; the dict's (unbounded) is the ceiling, at the cost of holding
  every live process.

    python bench/cache.py [--quick] [--json FILE]
"""
from __future__ import annotations

import functools
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import finish, parser  # noqa: E402

CATEGORY = "cache"
L1, L2 = 64, 448


def _best_ns_per_op(fn, ops: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - t0) / ops)
    return best


def lookup_costs(quick: bool) -> dict:
    from agent.procfs.cache import TwoLevelCache
    from agent.selfmetrics import SelfMetrics
    n, keys = (50_000, 512) if quick else (200_000, 512)
    repeats = 3 if quick else 7
    seq = [random.Random(1).randrange(keys) for _ in range(n)]

    ours = TwoLevelCache("bench", l1_size=keys, l2_size=keys, telemetry=SelfMetrics())
    for k in range(keys):
        ours.put(k, k)
        ours.get(k)                              # promote_hits=2: two hits put it in L1
        ours.get(k)
    plain = {k: k for k in range(keys)}
    lru = functools.lru_cache(maxsize=2 * keys)(lambda k: k)
    for k in range(keys):
        lru(k)
    l2_only = TwoLevelCache("bench", l1_size=1, l2_size=keys, telemetry=SelfMetrics(),
                            promote_hits=n + 1)   # never promotes
    for k in range(keys):
        l2_only.put(k, k)

    def run_ours():
        get = ours.get
        for k in seq:
            get(k)

    def run_l2():
        get = l2_only.get
        for k in seq:
            get(k)

    def run_dict():
        get = plain.get
        for k in seq:
            get(k)

    def run_lru():
        for k in seq:
            lru(k)

    def run_loop():                              # the loop itself, subtracted from every figure
        for k in seq:
            pass

    loop = _best_ns_per_op(run_loop, n, repeats)
    hit = {name: _best_ns_per_op(fn, n, repeats) - loop for name, fn in
           (("ours_l1", run_ours), ("ours_l2", run_l2), ("dict", run_dict), ("lru_cache", run_lru))}

    fresh = list(range(10**6, 10**6 + n))        # every lookup a miss
    small = TwoLevelCache("bench", l1_size=L1, l2_size=L2, telemetry=SelfMetrics())
    lru_small = functools.lru_cache(maxsize=L1 + L2)(lambda k: k)

    def miss_ours():
        get, put = small.get, small.put
        for k in fresh:
            if get(k) is None:
                put(k, k)

    def miss_lru():
        for k in fresh:
            lru_small(k)

    miss = {"ours": _best_ns_per_op(miss_ours, n, repeats) - loop,
            "lru_cache": _best_ns_per_op(miss_lru, n, repeats) - loop}
    return {"hit": hit, "miss": miss}


RECYCLED = 120                                    # short-lived pids come round again after this many


def trace(quick: bool, seed: int = 7) -> list:
    """[(op, pid, generation)], op 'get' or 'exit'; (pid, generation) is one process."""
    rng = random.Random(seed)
    services = list(range(1000, 3000))            # 2,000 long-lived processes
    weights = [1 / (i + 1) ** 1.1 for i in range(len(services))]
    events = 150_000 if quick else 600_000
    out: list = []
    generation: dict = {}
    started = 0
    since_sweep = 0
    while len(out) < events:
        if rng.random() < 0.0045:                 # a build: 100 short-lived processes
            live = {}
            for _ in range(100):
                pid = 100_000 + started % RECYCLED
                started += 1
                generation[pid] = generation.get(pid, 0) + 1
                live[pid] = rng.randint(2, 8)
            while live:
                pid = rng.choice(list(live))
                out.append(("get", pid, generation[pid]))
                live[pid] -= 1
                if not live[pid]:
                    del live[pid]
                    out.append(("exit", pid, generation[pid]))
                if rng.random() < 0.5:            # the services keep going meanwhile
                    out.append(("get", rng.choices(services, weights)[0], 0))
        else:
            out.extend(("get", pid, 0) for pid in rng.choices(services, weights, k=64))
        since_sweep += 64
        if since_sweep >= 20_000:
            out.extend(("get", pid, 0) for pid in services)
            since_sweep = 0
    return out


def hit_rates(events: list) -> dict:
    from agent.procfs.cache import TwoLevelCache
    from agent.selfmetrics import SelfMetrics
    ours = TwoLevelCache("bench", l1_size=L1, l2_size=L2, telemetry=SelfMetrics())
    current: dict = {}                            # pid -> generation: what a lookup should answer
    lru = functools.lru_cache(maxsize=L1 + L2)(lambda pid: (pid, current[pid]))
    plain: dict = {}
    lookups = 0
    hits = {"ours": 0, "lru_cache": 0, "dict": 0}
    wrong = {"ours": 0, "lru_cache": 0, "dict": 0}
    peak_dict = 0
    for op, pid, gen in events:
        if op == "exit":
            ours.invalidate(pid)
            plain.pop(pid, None)
            continue
        current[pid] = gen
        lookups += 1
        answers = {}
        answers["ours"] = ours.get(pid)
        if answers["ours"] is None:
            ours.put(pid, (pid, gen))
        else:
            hits["ours"] += 1
        before = lru.cache_info().hits
        answers["lru_cache"] = lru(pid)
        if lru.cache_info().hits > before:
            hits["lru_cache"] += 1
        else:
            answers["lru_cache"] = None
        answers["dict"] = plain.get(pid)
        if answers["dict"] is None:
            plain[pid] = (pid, gen)
            peak_dict = max(peak_dict, len(plain))
        else:
            hits["dict"] += 1
        for name, answer in answers.items():
            if answer is not None and answer != (pid, gen):
                wrong[name] += 1
    rates = {k: (v - wrong[k]) / lookups for k, v in hits.items()}   # a wrong answer is no hit
    return {"lookups": lookups, "rates": rates, "wrong": wrong, "dict_peak_entries": peak_dict,
            "ours_promotions": ours.promotions, "ours_demotions": ours.demotions, "ours_evictions": ours.evictions}


def run(quick: bool = False) -> list:
    costs = lookup_costs(quick)
    events = trace(quick)
    rates = hit_rates(events)
    hit, miss = costs["hit"], costs["miss"]
    r = rates["rates"]
    return [
        {"case": "hit-vs-dict", "baseline": "dict.get", "metric": "ns per lookup hit (L1)",
         "ours": hit["ours_l1"], "theirs": hit["dict"], "ratio": hit["dict"] / hit["ours_l1"],
         "details": {"ours_l2_hit_ns": hit["ours_l2"]}},
        {"case": "hit-vs-lru_cache", "baseline": "functools.lru_cache hit", "metric": "ns per lookup hit (L1)",
         "ours": hit["ours_l1"], "theirs": hit["lru_cache"], "ratio": hit["lru_cache"] / hit["ours_l1"],
         "details": {"ours_l2_hit_ns": hit["ours_l2"]}},
        {"case": "miss-vs-lru_cache", "baseline": "functools.lru_cache miss + store",
         "metric": "ns per miss and insert", "ours": miss["ours"], "theirs": miss["lru_cache"],
         "ratio": miss["lru_cache"] / miss["ours"], "details": {}},
        {"case": "hit-rate", "baseline": f"functools.lru_cache(maxsize={L1 + L2})",
         "metric": f"hit rate on a replayed event mix (capacity {L1 + L2})",
         "ours": r["ours"], "theirs": r["lru_cache"], "ratio": r["ours"] / r["lru_cache"],
         "details": {"dict_unbounded_hit_rate": r["dict"], "dict_peak_entries": rates["dict_peak_entries"],
                     "wrong_answers": rates["wrong"],
                     "lookups": rates["lookups"], "ours_promotions": rates["ours_promotions"],
                     "ours_demotions": rates["ours_demotions"], "ours_evictions": rates["ours_evictions"]}},
    ]


def print_table(results: list) -> None:
    print(f"{'case':<20}{'baseline':<38}{'ours':>10}{'theirs':>10}{'ratio':>8}  metric")
    for r in results:
        fmt = "{:>10.3f}" if r["case"] == "hit-rate" else "{:>10.0f}"
        print(f"{r['case']:<20}{r['baseline']:<38}{fmt.format(r['ours'])}{fmt.format(r['theirs'])}"
              f"{r['ratio']:>7.2f}x  {r['metric']}")
    d = results[-1]["details"]
    print(f"L2 hit: {results[0]['details']['ours_l2_hit_ns']:.0f} ns; unbounded dict: hit rate "
          f"{d['dict_unbounded_hit_rate']:.3f} holding up to {d['dict_peak_entries']} entries; "
          f"wrong answers (a recycled pid given a dead process's entry): {d['wrong_answers']}")


def main(argv=None) -> int:
    args = parser(__doc__, "fewer lookups and a shorter trace").parse_args(argv)
    return finish(args, CATEGORY, run(args.quick), print_table)


if __name__ == "__main__":
    sys.exit(main())
