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

The CI subset is checked against its own entries (each CI case's "ci": {"ratio", "tolerance"}),
measured in CI mode next to a CPU hog (bench/ci_noise.py), and a case below its floor is measured
again, its best of --attempts runs (3 in CI mode) counting: noise makes a run slower, never faster,
so a real regression stays below the floor in every attempt. Other modes check each case once,
against the full suite's entries.
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
    "loaders",
    "attribution",
    "agent",
]

# The CI subset (--ci): fast cases whose ratio stays far from 1x on a busy machine, their modules in
# quick mode (about 10 s together on a 2-core machine). tests/test_bench.py runs them with --check,
# so CI runs them on every change. Cases that a busy machine moves too far (aggregation/* sits
# within noise of 1x; batching/* lost 45% next to a CPU hog) stay in the full suite.
CI_CASES = [
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
# A CI entry's tolerance stays below a third, so a case that really halved (a baseline raised 2x)
# stays under its floor, 2 * (1 - 0.35) = 1.3x its median, even at its best of three noisy runs.
CI_MAX_TOLERANCE = 0.35
# Runs of a case below its floor before it fails, in CI mode (--attempts overrides).
CI_ATTEMPTS = 3

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


def module_paths(args) -> dict:
    """{module name: path}: the suite's, then those of --module-dir."""
    paths = {name: os.path.join(BENCH_DIR, name + ".py") for name in SUITE}
    for directory in args.module_dir or []:
        paths.update({n: p for n, p in modules_in(os.path.abspath(directory)).items() if n not in paths})
    return paths


def run_suite(args) -> dict:
    paths = module_paths(args)
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


def remeasure(report: dict, baseline: dict, args) -> None:
    """Run the modules of cases below their floor again, up to args.attempts runs in all, keeping
    each case's best ratio; every attempt's ratio is kept in the row's "attempts"."""
    quick = report["quick"]
    timeout = args.timeout or TIMEOUT["quick" if quick else "full"]
    paths = module_paths(args)
    modules = {m["module"]: m for m in report["modules"]}
    for attempt in range(2, args.attempts + 1):
        regressed: dict = {}
        for key, v in check(report, baseline)[2].items():
            if v == "REGRESSED":
                module, case = key.split("/", 1)
                regressed.setdefault(module, []).append(case)
        if not regressed:
            return
        for name, cases in regressed.items():
            print(f"== {name} again (attempt {attempt}): {', '.join(cases)}", file=sys.stderr, flush=True)
            again = run_module(name, paths[name], quick, timeout, args.verbose)
            fresh = {r["case"]: r for r in again["rows"] if "ratio" in r}
            for row in modules[name]["rows"]:
                if row["case"] not in cases:
                    continue
                attempts = row.pop("attempts", [row["ratio"]])
                new = fresh.get(row["case"])
                attempts.append(new["ratio"] if new else None)
                if new and new["ratio"] > row["ratio"]:
                    row.update({k: v for k, v in new.items() if k != "attempts"})
                row["attempts"] = attempts


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# --- checking against the baseline ---------------------------------------------------------------

def check(report: dict, baseline: dict) -> tuple[list[str], list[str], dict]:
    """(failures, notes, verdict per "module/case"). Failures: module errors, regressions, and
    baseline cases missing from a module that ran. A CI-mode report is held to the CI entries."""
    failures, notes, verdict = [], [], {}
    ci = report.get("mode") == "ci"
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
        if ci:
            entry = entry.get("ci", entry)
        floor = entry["ratio"] * (1 - entry["tolerance"])
        if row["ratio"] < floor:
            tried = (f", best of {', '.join(number(a) for a in row['attempts'])}" if "attempts" in row else "")
            failures.append(f"{key}: ratio {row['ratio']:.3g} < {floor:.3g} (baseline {entry['ratio']:g}, "
                            f"tolerance {entry['tolerance']:.0%}{tried})")
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
    MIN_TOLERANCE..MAX_TOLERANCE). Entries for cases not in the reports are kept. CI-mode reports
    update the cases' "ci" entries (tolerance at most CI_MAX_TOLERANCE)."""
    ci = reports[0].get("mode") == "ci"
    if any((r.get("mode") == "ci") != ci for r in reports):
        raise ValueError("CI-mode reports and other reports cannot update the baseline together")
    ratios: dict = {}
    for report in reports:
        for m in report["modules"]:
            for r in m["rows"]:
                if m["status"] == "ok" and "ratio" in r:
                    ratios.setdefault(f"{m['module']}/{r['case']}", []).append(r["ratio"])
    out = dict(baseline)
    for key, values in ratios.items():
        entry = dict(out.get(key, {}))
        target = dict(entry.get("ci", {})) if ci else entry
        median = statistics.median(values)
        target["ratio"] = float(f"{median:.3g}")
        if len(values) >= 2:
            drop = (median - min(values)) / median
            target["tolerance"] = min(CI_MAX_TOLERANCE if ci else MAX_TOLERANCE, max(MIN_TOLERANCE, round_up(2 * drop)))
        target.setdefault("tolerance", DEFAULT_TOLERANCE)
        if ci:
            entry["ci"] = {"ratio": target["ratio"], "tolerance": target["tolerance"]}
            entry.setdefault("ratio", target["ratio"])
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
    ap.add_argument("--attempts", type=int, metavar="N",
                    help=f"with --check, run a case below its floor up to N times in all and keep its best "
                         f"ratio (default {CI_ATTEMPTS} with --ci, else 1)")
    ap.add_argument("--verbose", action="store_true", help="show the modules' own output")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.attempts is None:
        args.attempts = CI_ATTEMPTS if args.ci else 1
    if args.attempts < 1:
        print("run.py: --attempts takes a whole number from 1", file=sys.stderr)
        return 2
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
        if args.check and args.attempts > 1:
            remeasure(report, read_json(args.check), args)
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
        try:
            write_json(args.update_baseline, updated_baseline(reports, baseline))
        except ValueError as e:
            print(f"run.py: {e}", file=sys.stderr)
            return 2
        print(f"baseline written: {os.path.relpath(args.update_baseline)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
