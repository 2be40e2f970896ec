"""Smoke test of the benchmark modules: each one's quick run completes and every case it reports
names its baseline and has a positive ratio. Each runs in its own process (some start a receiver
process and threads of their own)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# module name in bench/ == its CATEGORY
MODULES = ("aggregation", "batching", "encoding", "memory", "network", "redaction")

RUN_QUICK = """
import json, sys
sys.path.insert(0, {root!r})
import importlib
module = importlib.import_module("bench." + {name!r})
print(json.dumps({{"category": module.CATEGORY, "results": module.run(quick=True)}}))
"""


@pytest.mark.parametrize("name", MODULES)
def test_quick_run_reports_ratios_against_a_named_baseline(name):
    proc = subprocess.run([sys.executable, "-c", RUN_QUICK.format(root=ROOT, name=name)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["category"] == name
    assert out["results"], "no cases"
    for case in out["results"]:
        assert case.get("case"), case
        assert "skipped" not in case, case
        assert isinstance(case.get("baseline"), str) and case["baseline"], case
        assert case["ratio"] > 0, case
        assert case["ours"] > 0 and case["theirs"] > 0, case
