"""The benchmark suite: runs every module in bench/, writes one JSON report, prints one table, and
checks the ratios against the committed baseline (bench/baseline.json).

Each module runs in its own subprocess with a timeout, so a crash, a hang or a leaked thread in one
cannot disturb the others. A module that is missing, raises, times out or returns malformed rows
is an error row in the table and the report, and the run exits 1.

    .venv/bin/python bench/run.py                      the whole suite (full mode)
    .venv/bin/python bench/run.py --quick              each module's quick mode
    .venv/bin/python bench/run.py --only encoding,cache
    .venv/bin/python bench/run.py --ci --check         the CI subset, checked against the baseline
    .venv/bin/python bench/run.py --check --from-report bench/report.json
    .venv/bin/python bench/run.py --update-baseline    rewrite the baseline's ratios from this run

A case regresses when its ratio < baseline ratio * (1 - tolerance). A baseline case that a module
which ran did not return fails the check (unless the entry says "full_only" and the run was quick);
skipped cases are listed, not failed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
from bench.common import write_json  # noqa: E402

DEFAULT_REPORT = os.path.join(BENCH_DIR, "report.json")
DEFAULT_BASELINE = os.path.join(BENCH_DIR, "baseline.json")

# The suite, in report order: one module bench/<name>.py each.
SUITE = [
    "ringbuf",
    "syscall_cost",
    "aggregation",
    "batching",
    "cache",
    "encoding",
    "redaction",
    "compression",
    "export",
    "network",
    "memory",
    "agent",
]

# The CI subset (--ci): fast, steady cases, their modules in quick mode (about 15 s together on a
# 2-core machine). tests/test_bench.py runs them with --check, so CI runs them on every change.
CI_CASES = [
    "aggregation/per-event",
    "batching/metrics: a scrape per batch",
    "encoding/metrics",
    "encoding/logs",
    "compression/metrics-gzip",
    "compression/logs-zstd",
    "export/grpc-gzip",
]

# Seconds a module may take before it is killed and reported as an error.
TIMEOUT = {"full": 300, "quick": 90}

# When --update-baseline adds a case the baseline does not have yet, and no spread is known.
DEFAULT_TOLERANCE = 0.3
# Tolerance from a spread of runs: twice the largest drop below the median, within these bounds.
MIN_TOLERANCE, MAX_TOLERANCE = 0.2, 0.7

# Exit statuses
OK, FAILED = 0, 1


# --- running one module (in a subprocess) ---------------------------------------------------------

def worker(path: str, quick: bool, out: str) -> None:
    """Imports the module at `path`, calls run(quick) and writes {"category", "rows"} to `out`.
    Exits without waiting for threads the module may have left running."""
    # Under a name of its own: bench/agent.py must not stand in for the agent package.
    name = "hostagent_bench_" + os.path.splitext(os.path.basename(path))[0]
    sys.path[:] = [ROOT, os.path.dirname(path)] + [p for p in sys.path if os.path.abspath(p or ".") != BENCH_DIR]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for attr in ("CATEGORY", "run"):
        if not hasattr(module, attr):
            raise AttributeError(f"{os.path.basename(path)} has no {attr} (see the module interface in bench/run.py)")
    rows = module.run(quick=quick)
    with open(out, "w") as f:
        json.dump({"category": module.CATEGORY, "rows": rows}, f, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def validate(rows) -> list[str]:
    """What is wrong with a module's rows (an empty list when nothing is)."""
    if not isinstance(rows, list) or not rows:
        return ["run() returned no cases"]
    problems, seen = [], set()
    for i, row in enumerate(rows):
        case = row.get("case") if isinstance(row, dict) else None
        if not isinstance(case, str) or not case:
            problems.append(f"row {i} has no case id")
            continue
        if case in seen:
            problems.append(f"case {case} appears twice")
        seen.add(case)
        if "skipped" in row:
            continue
        for key in ("baseline", "metric"):
            if not isinstance(row.get(key), str) or not row.get(key):
                problems.append(f"case {case}: no {key}")
        for key in ("ours", "theirs", "ratio"):
            v = row.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"case {case}: {key} is not a number ({v!r})")
        if isinstance(row.get("ratio"), (int, float)) and not row["ratio"] > 0:
            problems.append(f"case {case}: ratio {row['ratio']!r} is not positive")
    return problems


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_module(name: str, path: str, quick: bool, timeout: float, verbose: bool) -> dict:
    """One module in a subprocess: {"module", "category", "status": ok|error, "seconds", "rows", "error"}."""
    result = {"module": name, "category": None, "status": "error", "seconds": 0.0, "rows": [], "error": None}
    if not os.path.exists(path):
        result["error"] = f"module {os.path.relpath(path, ROOT)} does not exist"
        return result
    with tempfile.TemporaryDirectory(prefix="hostagent-bench-") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--worker-out", out]
        if quick:
            cmd.append("--quick")
        output = None if verbose else subprocess.PIPE
        t0 = time.monotonic()
        # A session of its own, so a timeout kills what the module started too (receivers, syscount).
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=output, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            result["seconds"] = round(time.monotonic() - t0, 2)
            result["error"] = f"timed out after {timeout:.0f} s" + (f": {tail(stderr or '', 5)}" if stderr else "")
            return result
        finally:
            try:        # anything the module left behind in its session
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        result["seconds"] = round(time.monotonic() - t0, 2)
        if proc.returncode != 0 or not os.path.exists(out):
            last = tail(stderr or "", 1)
            result["error"] = f"exited with status {proc.returncode}" + (f": {last}\n{tail(stderr)}" if last else "")
            return result
        with open(out) as f:
            data = json.load(f)
    result["category"] = str(data.get("category"))
    problems = validate(data.get("rows"))
    if problems:
        result["error"] = "; ".join(problems)
        return result
    result["rows"] = data["rows"]
    result["status"] = "ok"
    return result


# --- the report -----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "kernel": os.uname().release, "os": platform.platform(terse=True),
            "python": platform.python_version(), "hostname": platform.node()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def modules_in(directory: str) -> dict:
    return {f[:-3]: os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if f.endswith(".py") and not f.startswith("_")}


def run_suite(args) -> dict:
    paths = {name: os.path.join(BENCH_DIR, name + ".py") for name in SUITE}
    for directory in args.module_dir or []:
        paths.update({n: p for n, p in modules_in(os.path.abspath(directory)).items() if n not in paths})
    names = list(paths)
    selected: dict = {n: None for n in names}            # module -> cases kept (None: all)
    if args.ci:
        selected = {}
        for key in CI_CASES:
            module, case = key.split("/", 1)
            selected.setdefault(module, []).append(case)
        names = [n for n in names if n in selected] + [n for n in selected if n not in paths]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in paths]
        if unknown:
            print(f"run.py: unknown module(s) {', '.join(unknown)}; the suite has {', '.join(paths)}",
                  file=sys.stderr)
            sys.exit(2)
        names = [n for n in names if n in wanted]
    quick = args.quick or args.ci
    mode = "ci" if args.ci else "quick" if quick else "full"
    timeout = args.timeout or TIMEOUT["quick" if quick else "full"]

    report = {"suite": "hostagent benchmarks", "mode": mode, "quick": quick,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "machine": machine(), "load_average_before": os.getloadavg(),
              "modules": []}
    t0 = time.monotonic()
    for name in names:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        result = run_module(name, paths.get(name, os.path.join(BENCH_DIR, name + ".py")), quick, timeout,
                            args.verbose)
        if selected.get(name) is not None:
            result["selected_cases"] = selected[name]
            result["rows"] = [r for r in result["rows"] if r["case"] in selected[name]]
            missing = [c for c in selected[name] if result["status"] == "ok"
                       and c not in {r["case"] for r in result["rows"]}]
            if missing:
                result["status"] = "error"
                result["error"] = f"the module returned no case {', '.join(missing)} (listed in CI_CASES)"
        status = "ok" if result["status"] == "ok" else "ERROR: " + result["error"].splitlines()[0]
        print(f"   {name}: {status} ({result['seconds']:.1f} s)", file=sys.stderr, flush=True)
        report["modules"].append(result)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["load_average_after"] = os.getloadavg()
    return report


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# --- checking against the baseline ---------------------------------------------------------------

def check(report: dict, baseline: dict) -> tuple[list[str], list[str], dict]:
    """(failures, notes, verdict per "module/case"). Failures: module errors, regressions, and
    baseline cases missing from a module that ran."""
    failures, notes, verdict = [], [], {}
    modules = {m["module"]: m for m in report["modules"]}
    for m in report["modules"]:
        if m["status"] != "ok":
            failures.append(f"{m['module']}: error: {m['error'].splitlines()[0]}")
    for key, entry in baseline.items():
        module, case = key.split("/", 1)
        m = modules.get(module)
        if m is None or m["status"] != "ok":
            continue
        if m.get("selected_cases") is not None and case not in m["selected_cases"]:
            continue
        row = next((r for r in m["rows"] if r["case"] == case), None)
        if row is None:
            if report.get("quick") and entry.get("full_only"):
                continue
            failures.append(f"{key}: in the baseline (ratio {entry['ratio']:g}) but not in this run")
            verdict[key] = "MISSING"
            continue
        if "skipped" in row:
            notes.append(f"{key}: skipped: {row['skipped']}")
            verdict[key] = "skipped"
            continue
        floor = entry["ratio"] * (1 - entry["tolerance"])
        if row["ratio"] < floor:
            failures.append(f"{key}: ratio {row['ratio']:.3g} < {floor:.3g} (baseline {entry['ratio']:g}, "
                            f"tolerance {entry['tolerance']:.0%})")
            verdict[key] = "REGRESSED"
        else:
            verdict[key] = "ok"
    for m in report["modules"]:
        for r in m["rows"]:
            key = f"{m['module']}/{r['case']}"
            if key not in baseline and "skipped" not in r:
                notes.append(f"{key}: no baseline entry")
                verdict[key] = "new"
    return failures, notes, verdict


def round_up(x: float, step: float = 0.05) -> float:
    return round(math.ceil(round(x / step, 6)) * step, 2)


def updated_baseline(reports: list, baseline: dict) -> dict:
    """The baseline with each case's ratio set to the median over `reports`; with two runs or more,
    its tolerance is recomputed from their spread (twice the largest drop below the median, within
    MIN_TOLERANCE..MAX_TOLERANCE). Entries for cases not in the reports are kept."""
    ratios: dict = {}
    for report in reports:
        for m in report["modules"]:
            for r in m["rows"]:
                if m["status"] == "ok" and "ratio" in r:
                    ratios.setdefault(f"{m['module']}/{r['case']}", []).append(r["ratio"])
    out = dict(baseline)
    for key, values in ratios.items():
        entry = dict(out.get(key, {}))
        median = statistics.median(values)
        entry["ratio"] = float(f"{median:.3g}")
        if len(values) >= 2:
            drop = (median - min(values)) / median
            entry["tolerance"] = min(MAX_TOLERANCE, max(MIN_TOLERANCE, round_up(2 * drop)))
        entry.setdefault("tolerance", DEFAULT_TOLERANCE)
        out[key] = {"ratio": entry.pop("ratio"), "tolerance": entry.pop("tolerance"), **entry}
    order = {name: i for i, name in enumerate(SUITE)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0].split("/")[0], len(order)), kv[0])))


# --- printing -------------------------------------------------------------------------------------

def number(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def print_table(report: dict, verdict: dict) -> None:
    header = ("category", "benchmark/case", "baseline", "metric", "ours", "theirs", "ratio", "check")
    lines = []
    for m in report["modules"]:
        category = m["category"] or "-"
        if m["status"] != "ok":
            lines.append((category, m["module"], "ERROR: " + m["error"].splitlines()[0], "", "", "", "", "error"))
            continue
        for r in m["rows"]:
            key = f"{m['module']}/{r['case']}"
            if "skipped" in r:
                lines.append((category, key, "skipped: " + r["skipped"], "", "", "", "", verdict.get(key, "")))
            else:
                lines.append((category, key, clip(r["baseline"], 44), clip(r["metric"], 36), number(r["ours"]),
                              number(r["theirs"]), number(r["ratio"]) + "x", verdict.get(key, "")))
    if not verdict:
        header, lines = header[:-1], [line[:-1] for line in lines]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    right = {4, 5, 6}
    for line in (header, *lines):
        print("  ".join(str(x).rjust(w) if i in right else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths))).rstrip())
    m = report["machine"]
    print(f"\n{report['mode']} run, {report['date']}, {report.get('seconds', 0):.0f} s; {m['cpu']}, "
          f"{m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; load average "
          f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after")


# --- command line ---------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="modules: " + ", ".join(SUITE))
    ap.add_argument("--quick", action="store_true", help="run each module in its quick mode")
    ap.add_argument("--only", metavar="A,B", help="run only these modules")
    ap.add_argument("--ci", action="store_true", help="run only the CI subset (CI_CASES), in quick mode")
    ap.add_argument("--report", metavar="FILE", default=DEFAULT_REPORT, help="where to write the JSON report "
                    "(default bench/report.json)")
    ap.add_argument("--check", metavar="BASELINE", nargs="?", const=DEFAULT_BASELINE,
                    help="compare with the baseline (default bench/baseline.json); exit 1 on any regression")
    ap.add_argument("--update-baseline", metavar="BASELINE", nargs="?", const=DEFAULT_BASELINE,
                    help="rewrite the baseline's ratios from this run (or from the --from-report files)")
    ap.add_argument("--from-report", metavar="FILE", nargs="+",
                    help="use existing report(s) instead of running benchmarks")
    ap.add_argument("--module-dir", metavar="DIR", action="append",
                    help="also run the modules in DIR (after the suite's)")
    ap.add_argument("--timeout", type=float, help="seconds per module (default 300, quick 90)")
    ap.add_argument("--verbose", action="store_true", help="show the modules' own output")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick, args.worker_out)
        return OK
    for path in [args.check] + (args.from_report or []):
        if path and not os.path.exists(path):
            print(f"run.py: {path} does not exist", file=sys.stderr)
            return 2
    if args.from_report:
        reports = [read_json(p) for p in args.from_report]
    else:
        report = run_suite(args)
        write_json(args.report, report)
        print(f"report: {args.report}", file=sys.stderr)
        reports = [report]

    status = OK
    for report in reports:
        errors = [m for m in report["modules"] if m["status"] != "ok"]
        verdict: dict = {}
        failures, notes = [], []
        if args.check:
            failures, notes, verdict = check(report, read_json(args.check))
        print()
        print_table(report, verdict)
        for m in errors:
            print(f"\nERROR in {m['module']}: {m['error']}")
        if args.check:
            for note in notes:
                print(f"note: {note}")
            if failures:
                print(f"\ncheck against {os.path.relpath(args.check)}: {len(failures)} failed")
                for f in failures:
                    print(f"  FAILED {f}")
            else:
                print(f"\ncheck against {os.path.relpath(args.check)}: every case within tolerance")
        if errors or failures:
            status = FAILED
    if args.update_baseline:
        baseline = read_json(args.update_baseline) if os.path.exists(args.update_baseline) else {}
        write_json(args.update_baseline, updated_baseline(reports, baseline))
        print(f"baseline written: {os.path.relpath(args.update_baseline)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
