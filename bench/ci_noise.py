"""How the CI subset's check behaves on a busy machine: runs `run.py --ci --check` again and again
next to a CPU hog, counts the false failures, measures each case's spread, and checks that a real
regression (the CI entries' ratios raised --raise times) still fails in every run.

    .venv/bin/python bench/ci_noise.py                         20 runs + 20 crafted, hog of 0.5 core
    .venv/bin/python bench/ci_noise.py --runs 20 --update-baseline
                                                               also write the CI entries from the spread

The CI entries' tolerances come from this spread (twice the largest drop below the median, at most
run.CI_MAX_TOLERANCE); docs/performance.md gives the figures of the last calibration.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RUN_PY = os.path.join(BENCH_DIR, "run.py")
sys.path.insert(0, ROOT)
from bench import run  # noqa: E402
from bench.common import write_json  # noqa: E402

# A busy loop that takes `share` of one core: busy for share x 10 ms, then asleep for the rest.
HOG = """
import sys, time
share = float(sys.argv[1])
while True:
    end = time.perf_counter() + share * 0.01
    while time.perf_counter() < end:
        pass
    time.sleep((1 - share) * 0.01)
"""


def ci_run(baseline: str, report: str) -> tuple[int, dict]:
    """(exit status, {case: row}) of one `run.py --ci --check baseline`."""
    proc = subprocess.run([sys.executable, RUN_PY, "--ci", "--check", baseline, "--report", report], cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    with open(report) as f:
        data = json.load(f)
    rows = {f"{m['module']}/{r['case']}": r for m in data["modules"] for r in m["rows"]}
    return proc.returncode, rows


def raised(baseline: dict, factor: float) -> dict:
    """The baseline with every CI case's CI ratio multiplied by `factor`: a crafted regression."""
    out = json.loads(json.dumps(baseline))
    for key in run.CI_CASES:
        out[key]["ci"]["ratio"] = out[key]["ci"]["ratio"] * factor
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="checked runs against the baseline (default 20)")
    ap.add_argument("--crafted", type=int, default=20, help="runs against the raised baseline (default 20)")
    ap.add_argument("--raise", dest="factor", type=float, default=2.0, help="crafted regression factor (default 2)")
    ap.add_argument("--hog", type=float, default=0.5, help="the hog's share of one core (default 0.5)")
    ap.add_argument("--baseline", default=run.DEFAULT_BASELINE)
    ap.add_argument("--update-baseline", action="store_true",
                    help="write the CI entries from the runs' first-attempt ratios")
    args = ap.parse_args(argv)
    with open(args.baseline) as f:
        baseline = json.load(f)
    missing = [k for k in run.CI_CASES if "ci" not in baseline.get(k, {})]
    if missing and not args.update_baseline:
        print(f"ci_noise.py: no CI entry for {', '.join(missing)}; run with --update-baseline", file=sys.stderr)
        return 2

    hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.hog)])
    first: dict = {k: [] for k in run.CI_CASES}
    false_failures, caught = [], 0
    try:
        with tempfile.TemporaryDirectory(prefix="hostagent-ci-noise-") as tmp:
            report = os.path.join(tmp, "report.json")
            for i in range(args.runs):
                status, rows = ci_run(args.baseline, report)
                for key, row in rows.items():
                    first[key].append(row.get("attempts", [row["ratio"]])[0])
                if status != 0:
                    false_failures.append(i)
                tried = {k: r["attempts"] for k, r in rows.items() if "attempts" in r}
                print(f"run {i + 1}/{args.runs}: exit {status}" + (f", measured again: {tried}" if tried else ""),
                      file=sys.stderr, flush=True)
            if args.update_baseline:
                reports = [{"mode": "ci", "modules": [{"module": k.split("/", 1)[0], "status": "ok",
                                                       "rows": [{"case": k.split("/", 1)[1], "ratio": r}]}]}
                           for k, ratios in first.items() for r in ratios]
                baseline = run.updated_baseline(reports, baseline)
                write_json(args.baseline, baseline)
                print(f"baseline written: {os.path.relpath(args.baseline)}", file=sys.stderr)
            crafted = os.path.join(tmp, "crafted.json")
            write_json(crafted, raised(baseline, args.factor))
            for i in range(args.crafted):
                status, rows = ci_run(crafted, report)
                passed = [k for k, r in rows.items()
                          if r["ratio"] >= baseline[k]["ci"]["ratio"] * args.factor * (1 - baseline[k]["ci"]["tolerance"])]
                caught += status != 0 and not passed
                print(f"crafted {i + 1}/{args.crafted}: exit {status}" + (f", passed: {passed}" if passed else ""),
                      file=sys.stderr, flush=True)
    finally:
        hog.kill()
        hog.wait()

    print(f"\n{'case':40} {'median':>8} {'min':>8} {'max':>8} {'drop':>6}  ci entry")
    for key, ratios in first.items():
        med = statistics.median(ratios)
        entry = baseline[key].get("ci", {})
        print(f"{key:40} {med:8.3g} {min(ratios):8.3g} {max(ratios):8.3g} {(med - min(ratios)) / med:6.0%}  "
              f"{entry.get('ratio', '-')} ± {entry.get('tolerance', 0):.0%}")
    print(f"\nnext to a hog of {args.hog:g} core: {len(false_failures)} false failures in {args.runs} checked runs; "
          f"the baseline raised {args.factor:g}x failed {caught} of {args.crafted} runs in every case")
    return 0 if not false_failures and caught == args.crafted else 1


if __name__ == "__main__":
    sys.exit(main())
