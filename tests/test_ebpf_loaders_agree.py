"""The same workload under the CO-RE loader and under bcc gives the same telemetry: syscall counts
and errors of one process, its latency histogram's counts, and the exec and exit records of the
processes it starts (one source, two compilers: bpf/include/compat.h)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent.sources.ebpf.process import ProcessProbe
from agent.sources.ebpf.syscalls import SyscallsProbe
from tests.ebpf_helpers import attached, core_objects
from tests.helpers import HANG_LIMIT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")

CALLS, FAILING = 200, 70
EXIT_CODES = (0, 3, 77)

# Waits for a line, then makes CALLS getppid() and FAILING fchdir() on a closed fd (EBADF), starts
# a shell per exit code, says so, and waits for a line before exiting.
CHILD = f"""
import os, subprocess, sys
sys.stdin.readline()
for _ in range({CALLS}):
    os.getppid()
for _ in range({FAILING}):
    try:
        os.fchdir(999_999)
    except OSError:
        pass
pids = [subprocess.Popen(["/bin/sh", "-c", "exit " + str(code)]) for code in {EXIT_CODES}]
print(" ".join(str(p.pid) for p in pids), flush=True)
for p in pids:
    p.wait()
print("done", flush=True)
sys.stdin.readline()
"""

# attributes that differ from run to run whatever the loader
RUN_SPECIFIC = {"process.pid", "process.parent_pid", "process.creation.time", "process.exit.time",
                "linux.process.lifetime", "process.linux.cgroup", "linux.systemd.unit", "container.id"}


def _syscall_points(metrics, name):
    return {dict(p.attributes)["syscall"] if len(p.attributes) == 1 else tuple(v for _, v in p.attributes):
            (p.value if hasattr(p, "value") else p.count) for m in metrics if m.name == name for p in m.points}


def run(loader: str) -> dict:
    """The workload under `loader`: what the syscalls and process probes report about it."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with attached(SyscallsProbe(latency=True, target_tgid=child.pid), loader=loader) as sc, \
                attached(ProcessProbe(), loader=loader) as proc:
            start = time.time_ns()
            child.stdin.write("go\n")
            child.stdin.flush()
            shells = {int(pid) for pid in child.stdout.readline().split()}
            assert child.stdout.readline().strip() == "done"
            records, deadline = [], time.monotonic() + HANG_LIMIT
            while sum(r.event_name == "process.exit" and dict(r.attributes)["process.pid"] in shells
                      for r in records) < len(shells):
                assert time.monotonic() < deadline, records
                records += proc.poll()
                time.sleep(0.05)
            metrics = sc.collect(time.time_ns(), start)
    finally:
        child.stdin.write("bye\n")
        child.stdin.flush()
        child.wait()
    ours = [r for r in records if dict(r.attributes)["process.pid"] in shells]
    return {
        "calls": {k: v for k, v in _syscall_points(metrics, SyscallsProbe.CALLS).items()
                  if k in ("getppid", "fchdir")},
        "errors": {k: v for k, v in _syscall_points(metrics, SyscallsProbe.ERRORS).items() if k[0] == "fchdir"},
        "latency_counts": {k: v for k, v in _syscall_points(metrics, SyscallsProbe.DURATION).items()
                           if k in ("getppid", "fchdir")},
        "records": sorted((r.event_name, r.severity, tuple(sorted((k, v) for k, v in r.attributes
                                                                 if k not in RUN_SPECIFIC)))
                          for r in ours),
    }


def test_core_and_bcc_report_the_same_workload_alike():
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    core, bcc = run("core"), run("bcc")
    assert core["calls"] == {"getppid": CALLS, "fchdir": FAILING}
    assert core["errors"] == {("fchdir", "EBADF"): FAILING}
    assert core["latency_counts"] == core["calls"]
    assert len(core["records"]) == 2 * len(EXIT_CODES)
    assert core == bcc
