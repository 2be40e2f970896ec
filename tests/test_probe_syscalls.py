"""syscalls on the real kernel: exact counts and errors for one process (-DTARGET_TGID)."""
import os
import subprocess
import sys
import time

import pytest

from agent.model import MetricKind
from agent.procfs.workload import WorkloadResolver
from agent.sources.ebpf import syscalls
from agent.sources.ebpf.syscalls import SYSCALL_OTHER, SyscallsProbe, errno_name, syscall_name, syscall_names, syscall_table
from tests.ebpf_helpers import attached, checked_structs, core_objects
from tests.helpers import SYSCALL_LOOP, SYSCALLS_FAILING, SYSCALLS_SUCCEEDING

FAILING, SUCCEEDING = SYSCALLS_FAILING, SYSCALLS_SUCCEEDING

# Waits for a line, then makes the calls of SYSCALL_LOOP, says so, and waits for a line before exiting.
CHILD = "import sys\nsys.stdin.readline()\n" + SYSCALL_LOOP + 'print("done", flush=True)\nsys.stdin.readline()\n'


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ebpf.attribution: the probe keyed by cgroup (the default) and host-wide
ATTRIBUTIONS = {"workload": WorkloadResolver, "host": lambda: None}


@pytest.fixture(params=ATTRIBUTIONS)
def attribution(request):
    return request.param


@pytest.fixture(params=[False, True], ids=["count", "latency"])
def probe(request, child, attribution):
    """The probe limited to `child`, compiled, attached and set up by the loader, per attribution."""
    with attached(SyscallsProbe(latency=request.param, target_tgid=child.pid,
                                workloads=ATTRIBUTIONS[attribution]())) as p:
        yield p


def summed(points, names) -> dict:
    """{values of the attributes `names`: value or count}, summed over workloads."""
    out = {}
    for pt in points:
        a = dict(pt.attributes)
        key = tuple(a[n] for n in names)
        out[key] = out.get(key, 0) + (pt.count if hasattr(pt, "count") else pt.value)
    return out


def metrics_by_name(p, start):
    return {m.name: m for m in p.collect(time.time_ns(), start)}


def test_exact_counts_and_errors_for_one_process(probe, child):
    start = time.time_ns()
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "done"
    ms = metrics_by_name(probe, start)

    calls = ms[SyscallsProbe.CALLS]
    assert (calls.kind, calls.monotonic, calls.unit) == (MetricKind.SUM, True, "{call}")
    counts = summed(calls.points, ["syscall"])
    assert counts[("fchdir",)] == FAILING
    assert counts[("getppid",)] == SUCCEEDING

    errors = summed(ms[SyscallsProbe.ERRORS].points, ["syscall", "error.type"])
    assert errors[("fchdir", "EBADF")] == FAILING
    assert not [k for k in errors if k[0] == "getppid"]

    if probe.latency:
        # one process: one workload
        [d] = [pt for pt in ms[SyscallsProbe.DURATION].points if dict(pt.attributes)["syscall"] == "fchdir"]
        assert d.count == FAILING
        assert sum(d.positive_counts) + d.zero_count == FAILING
        assert 0 < d.sum / d.count < 1e9
        assert ms[SyscallsProbe.DURATION].unit == "ns"
        assert ms[SyscallsProbe.DURATION].kind == MetricKind.EXPONENTIAL_HISTOGRAM
    else:
        assert SyscallsProbe.DURATION not in ms


def test_other_processes_are_not_counted(probe, child):
    for _ in range(50):
        os.getppid()
    ms = metrics_by_name(probe, 0)
    calls = ms.get(SyscallsProbe.CALLS)
    assert not calls or "getppid" not in {dict(pt.attributes)["syscall"] for pt in calls.points}


def test_key_layouts_match_bpf(probe):
    assert {"syscall_error"} | ({"syscall_key"} if probe.latency else {"syscall_call"}) <= checked_structs(probe)


def test_without_headers_or_bcc_the_names_come_from_the_table_built_with_the_objects(child, monkeypatch):
    """A host with neither `unistd` headers nor bcc (the package's target): the probe loaded
    through CO-RE names the calls with bpf/build.sh's table; without it they would be
    `syscall_<n>`."""
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    monkeypatch.setattr(syscalls, "UNISTD_HEADERS", ())
    monkeypatch.setitem(sys.modules, "bcc", None)           # import bcc fails
    syscall_names.cache_clear()
    try:
        assert syscall_names() == {}
        with attached(SyscallsProbe(latency=False, target_tgid=child.pid), loader="core") as probe:
            start = time.time_ns()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            counts = summed(metrics_by_name(probe, start)[SyscallsProbe.CALLS].points, ["syscall"])
    finally:
        syscall_names.cache_clear()
    assert counts[("fchdir",)] == FAILING and counts[("getppid",)] == SUCCEEDING


def test_the_table_built_with_the_objects_is_the_installed_headers(tmp_path):
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    headers = syscall_names()
    assert len(headers) > 300
    assert syscall_table(core_objects()) == {nr: name for nr, name in headers.items() if nr < SYSCALL_OTHER}


def test_a_damaged_table_keeps_its_good_lines(tmp_path):
    (tmp_path / "syscalls.txt").write_bytes(b"0 read\n1 write\n\xff\xfe junk\n99999 big\n-1 neg\n3 Close\n39 getpid\n"
                                             + b"9" * 100_000)
    assert syscall_table(str(tmp_path)) == {0: "read", 1: "write", 39: "getpid"}
    assert syscall_table(str(tmp_path / "none")) == {}


def test_names():
    names = syscall_names()
    assert len(names) > 300
    assert {"read", "write", "getppid", "fchdir", "openat"} <= set(names.values())
    nr = {v: k for k, v in names.items()}
    assert syscall_name(nr["getppid"]) == "getppid"
    assert syscall_name(1023) == "other"
    assert errno_name(9) == "EBADF"
    assert errno_name(512) == "ERESTARTSYS"
    assert errno_name(4000) == "E4000"
