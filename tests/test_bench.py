"""The benchmark suite runner (bench/run.py): the baseline check, the CI subset, and isolation of
modules that fail."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT

RUN_PY = os.path.join(ROOT, "bench", "run.py")
BASELINE = os.path.join(ROOT, "bench", "baseline.json")


def load_runner():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUN_PY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def row(case, ratio):
    return {"case": case, "baseline": "the baseline", "metric": "units", "ours": 1.0, "theirs": ratio,
            "ratio": ratio}


def report(modules: dict, quick=False) -> dict:
    """A report as run.py writes it: {module: [rows]} for modules that ran."""
    return {"suite": "hostagent benchmarks", "mode": "quick" if quick else "full", "quick": quick,
            "date": "2025-01-01T00:00:00+00:00", "seconds": 1.0,
            "machine": {"cpu": "test cpu", "cores": 2, "kernel": "6.0", "python": "3.11"},
            "load_average_before": [0.1, 0.1, 0.1], "load_average_after": [0.1, 0.1, 0.1],
            "modules": [{"module": name, "category": "test", "status": "ok", "seconds": 0.1, "rows": rows,
                         "error": None} for name, rows in modules.items()]}


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# --- (a) the check against a baseline ---------------------------------------------------------------

def test_check_fails_a_ratio_worse_than_the_tolerance_and_names_it(tmp_path):
    baseline = write(tmp_path / "baseline.json", {"encoding/metrics": {"ratio": 6.5, "tolerance": 0.35},
                                                   "encoding/logs": {"ratio": 3.0, "tolerance": 0.3}})
    # floor for encoding/metrics: 6.5 * 0.65 = 4.225
    worse = write(tmp_path / "worse.json", report({"encoding": [row("metrics", 4.1), row("logs", 3.2)]}))
    out = bench("--check", baseline, "--from-report", worse)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = [line for line in out.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "encoding/metrics" in failed[0], out.stdout
    assert "4.1" in failed[0] and "6.5" in failed[0], failed[0]
    assert "REGRESSED" in out.stdout

    within = write(tmp_path / "within.json", report({"encoding": [row("metrics", 4.3), row("logs", 2.2)]}))
    out = bench("--check", baseline, "--from-report", within)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout


def test_check_fails_a_case_missing_from_a_module_that_ran_but_not_a_skipped_one(tmp_path):
    baseline = write(tmp_path / "baseline.json", {"cache/hit": {"ratio": 2.0, "tolerance": 0.3},
                                                   "cache/miss": {"ratio": 2.0, "tolerance": 0.3},
                                                   "memory/rss": {"ratio": 2.0, "tolerance": 0.3}})
    # memory did not run at all (e.g. --only cache): its entry is not checked
    skipped = write(tmp_path / "skipped.json", report({"cache": [row("hit", 2.0),
                                                                 {"case": "miss", "skipped": "needs root"}]}))
    out = bench("--check", baseline, "--from-report", skipped)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cache/miss: skipped: needs root" in out.stdout

    missing = write(tmp_path / "missing.json", report({"cache": [row("hit", 2.0)]}))
    out = bench("--check", baseline, "--from-report", missing)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED cache/miss" in out.stdout


def test_the_committed_baseline_fails_a_ratio_just_under_its_floor(tmp_path):
    with open(BASELINE) as f:
        committed = json.load(f)
    assert committed, "bench/baseline.json is empty"
    for key, entry in committed.items():
        assert set(entry) >= {"ratio", "tolerance"} and entry["ratio"] > 0 and 0 < entry["tolerance"] < 1, key
    modules: dict = {}
    for key, entry in committed.items():
        module, case = key.split("/", 1)
        modules.setdefault(module, []).append(row(case, entry["ratio"] * (1 - entry["tolerance"]) * 1.01))
    at_floor = write(tmp_path / "at_floor.json", report(modules))
    out = bench("--check", "--from-report", at_floor)
    assert out.returncode == 0, out.stdout + out.stderr

    victim = next(iter(committed))
    module, case = victim.split("/", 1)
    entry = committed[victim]
    next(r for r in modules[module] if r["case"] == case)["ratio"] = entry["ratio"] * (1 - entry["tolerance"]) * 0.98
    below = write(tmp_path / "below.json", report(modules))
    out = bench("--check", "--from-report", below)
    assert out.returncode == 1, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if "FAILED" in line] == \
        [line for line in out.stdout.splitlines() if f"FAILED {victim}:" in line], out.stdout


def test_update_baseline_takes_the_median_and_a_tolerance_from_the_spread(tmp_path):
    baseline = tmp_path / "baseline.json"
    write(baseline, {"cache/hit": {"ratio": 9.0, "tolerance": 0.3, "full_only": True}})
    runs = [write(tmp_path / f"r{i}.json", report({"cache": [row("hit", r)]})) for i, r in enumerate((4.0, 5.0, 6.0))]
    out = bench("--update-baseline", str(baseline), "--from-report", *runs)
    assert out.returncode == 0, out.stdout + out.stderr
    entry = json.loads(baseline.read_text())["cache/hit"]
    # median 5.0; largest drop below it 20%, doubled: 40%
    assert entry == {"ratio": 5.0, "tolerance": 0.4, "full_only": True}


# --- (b) the CI subset ------------------------------------------------------------------------------

def test_ci_subset_runs_here_and_passes_the_committed_baseline(tmp_path):
    runner = load_runner()
    ci_cases = runner.CI_CASES
    assert ci_cases
    with open(BASELINE) as f:
        committed = json.load(f)
    for key in ci_cases:
        entry = committed[key]["ci"]
        assert entry["tolerance"] <= runner.CI_MAX_TOLERANCE, key
        # far from 1x: no noise can carry it across
        assert entry["ratio"] * (1 - entry["tolerance"]) > 1.5, f"{key} is too close to 1x for the CI subset"
    path = tmp_path / "report.json"
    started = time.monotonic()
    out = bench("--ci", "--check", "--report", str(path), timeout=600)
    print(f"CI subset with --check: {time.monotonic() - started:.0f} s")
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(path.read_text())
    assert data["mode"] == "ci" and data["machine"]["cores"] == os.cpu_count()
    ratios = {f"{m['module']}/{r['case']}": r.get("ratio") for m in data["modules"] for r in m["rows"]}
    assert sorted(ratios) == sorted(ci_cases)
    for key, ratio in ratios.items():
        assert ratio is not None and ratio > 1, f"{key}: ratio {ratio}"


# --- (b2) a case below its floor is measured again; a real regression still fails ------------------

FLAKY = """
import os
CATEGORY = "test"
def run(quick=False):
    # the ratios this module gives, one per call, from a file; the calls counted in another
    with open({counter!r}, "a") as f:
        f.write("x")
    calls = len(open({counter!r}).read())
    ratios = [float(x) for x in open({ratios!r}).read().split()]
    r = ratios[min(calls, len(ratios)) - 1]
    return [{{"case": "x", "baseline": "b", "metric": "m", "ours": 1.0, "theirs": r, "ratio": r}},
            {{"case": "steady", "baseline": "b", "metric": "m", "ours": 1.0, "theirs": 9.0, "ratio": 9.0}}]
"""


@pytest.fixture
def flaky(tmp_path, module_dir):
    counter, ratios = tmp_path / "calls", tmp_path / "ratios"
    module_dir("flaky", FLAKY.format(counter=str(counter), ratios=str(ratios)))
    baseline = write(tmp_path / "baseline.json", {"flaky/x": {"ratio": 5.0, "tolerance": 0.3},
                                                   "flaky/steady": {"ratio": 9.0, "tolerance": 0.3}})

    def check(*given, extra=()):
        counter.write_text("")
        ratios.write_text(" ".join(map(str, given)))
        path = tmp_path / "report.json"
        out = bench("--module-dir", module_dir.path, "--only", "flaky", "--check", baseline,
                    "--report", str(path), *extra)
        row = next(r for m in json.loads(path.read_text())["modules"] for r in m["rows"] if r["case"] == "x")
        return out, len(counter.read_text()), row
    return check


def test_a_case_below_its_floor_is_measured_again_and_its_best_run_counts(flaky):
    # floor 3.5: a noisy first run (2.0), then 4.8
    out, calls, row = flaky(2.0, 4.8, extra=("--attempts", "3"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert calls == 2 and row["ratio"] == 4.8 and row["attempts"] == [2.0, 4.8]


def test_a_real_regression_fails_every_attempt(flaky):
    out, calls, row = flaky(2.5, 2.4, 2.6, 9.9, extra=("--attempts", "3"))
    assert out.returncode == 1
    assert calls == 3 and row["attempts"] == [2.5, 2.4, 2.6] and row["ratio"] == 2.6
    failed = [line for line in out.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "flaky/x" in failed[0] and "best of 2.5, 2.4, 2.6" in failed[0], out.stdout


def test_the_full_check_measures_once(flaky):
    out, calls, row = flaky(2.0, 4.8)
    assert out.returncode == 1 and calls == 1 and "attempts" not in row, out.stdout


def test_a_ci_report_is_held_to_the_ci_entries(tmp_path):
    baseline = write(tmp_path / "baseline.json", {"encoding/metrics": {"ratio": 14.0, "tolerance": 0.25,
                                                                       "ci": {"ratio": 10.0, "tolerance": 0.3}}})
    ci = report({"encoding": [row("metrics", 8.0)]})
    ci["mode"] = "ci"
    out = bench("--check", baseline, "--from-report", write(tmp_path / "ci.json", ci))
    assert out.returncode == 0, out.stdout                       # 8.0 >= 10 * 0.7
    ci["modules"][0]["rows"][0]["ratio"] = 6.9
    out = bench("--check", baseline, "--from-report", write(tmp_path / "ci.json", ci))
    assert out.returncode == 1 and "FAILED encoding/metrics" in out.stdout
    full = write(tmp_path / "full.json", report({"encoding": [row("metrics", 8.0)]}))
    out = bench("--check", baseline, "--from-report", full)
    assert out.returncode == 1, out.stdout                       # the full entry: 8.0 < 14 * 0.75


def test_update_baseline_from_ci_runs_writes_the_ci_entry_capped(tmp_path):
    baseline = tmp_path / "baseline.json"
    write(baseline, {"cache/hit": {"ratio": 9.0, "tolerance": 0.3}})
    runs = []
    for i, r in enumerate((2.0, 5.0, 6.0)):
        data = report({"cache": [row("hit", r)]})
        data["mode"] = "ci"
        runs.append(write(tmp_path / f"r{i}.json", data))
    out = bench("--update-baseline", str(baseline), "--from-report", *runs)
    assert out.returncode == 0, out.stdout + out.stderr
    # the full entry stays; the CI entry: median 5.0, drop 60% doubled, capped
    assert json.loads(baseline.read_text())["cache/hit"] == {
        "ratio": 9.0, "tolerance": 0.3, "ci": {"ratio": 5.0, "tolerance": load_runner().CI_MAX_TOLERANCE}}


# --- (c) a module that fails is an error, and does not take the run down with it --------------------

@pytest.fixture
def module_dir(tmp_path):
    d = tmp_path / "modules"
    d.mkdir()

    def add(name, body):
        (d / f"{name}.py").write_text(textwrap.dedent(body))
    add.path = str(d)
    return add


def test_a_module_that_raises_is_an_error_row_and_fails_the_run(tmp_path, module_dir):
    module_dir("boom", """
        CATEGORY = "test"
        def run(quick=False):
            raise RuntimeError("broken on purpose")
        """)
    module_dir("fine", """
        import threading, time
        CATEGORY = "test"
        def run(quick=False):
            # a leaked non-daemon thread must not keep the module's process alive
            threading.Thread(target=time.sleep, args=(600,)).start()
            return [{"case": "x", "baseline": "b", "metric": "m", "ours": 1.0, "theirs": 2.0, "ratio": 2.0}]
        """)
    path = tmp_path / "report.json"
    out = bench("--module-dir", module_dir.path, "--only", "boom,fine", "--report", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ERROR" in out.stdout and "broken on purpose" in out.stdout
    modules = {m["module"]: m for m in json.loads(path.read_text())["modules"]}
    assert modules["boom"]["status"] == "error" and "RuntimeError: broken on purpose" in modules["boom"]["error"]
    assert modules["fine"]["status"] == "ok" and modules["fine"]["rows"][0]["ratio"] == 2.0


def test_a_module_that_hangs_is_killed_with_what_it_started(tmp_path, module_dir):
    pid_file = tmp_path / "child.pid"
    module_dir("hang", f"""
        import subprocess, time
        CATEGORY = "test"
        def run(quick=False):
            child = subprocess.Popen(["sleep", "600"])
            open({str(pid_file)!r}, "w").write(str(child.pid))
            time.sleep(600)
        """)
    module_dir("bad_rows", """
        CATEGORY = "test"
        def run(quick=False):
            return [{"case": "x", "baseline": "b", "metric": "m", "ours": 1.0, "theirs": 2.0, "ratio": "fast"}]
        """)
    path = tmp_path / "report.json"
    out = bench("--module-dir", module_dir.path, "--only", "hang,bad_rows", "--timeout", "3",
                "--report", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    modules = {m["module"]: m for m in json.loads(path.read_text())["modules"]}
    assert modules["hang"]["status"] == "error" and "timed out" in modules["hang"]["error"]
    assert modules["bad_rows"]["status"] == "error" and "ratio is not a number" in modules["bad_rows"]["error"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the module's child survived the timeout"


def test_an_unknown_module_name_is_a_usage_error(tmp_path):
    out = bench("--only", "no_such_module", "--report", str(tmp_path / "r.json"))
    assert out.returncode == 2 and "no_such_module" in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_ci_noise_crafts_its_regression_from_the_ci_entries():
    spec = importlib.util.spec_from_file_location("bench_ci_noise", os.path.join(ROOT, "bench", "ci_noise.py"))
    ci_noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ci_noise)
    with open(BASELINE) as f:
        committed = json.load(f)
    crafted = ci_noise.raised(committed, 2.0)
    for key, entry in committed.items():
        if key in ci_noise.run.CI_CASES:
            assert crafted[key]["ci"]["ratio"] == 2 * entry["ci"]["ratio"], key
            assert crafted[key]["ratio"] == entry["ratio"], key     # the full entry is left alone
        else:
            assert crafted[key] == entry, key
