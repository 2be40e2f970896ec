"""Workloads: which workload a cgroup path is (real layouts, hostile names), the resolver's bounds
and thread safety, and through the whole agent: short-lived cgroups keep their workload on every
record, and cgroup churn leaves the agent's memory bounded."""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.procfs.identity import UNIT_SUFFIXES, CgroupPaths, cgroup_attributes, container_id, decoded
from agent.procfs.workload import (CACHE_SIZE, CACHED_METRIC, CGROUP_OVERFLOW, EVICTED_METRIC, HOST, UNRESOLVED,
                                   UNRESOLVED_METRIC, Workload, WorkloadResolver, classify)
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.registry import PROBES
from agent.sources.ebpf.syscalls import SyscallsProbe
from tests.ebpf_helpers import ebpf_config
from tests.helpers import (agent_log, base_config, file_requests, remove_cgroups, short_lived_cgroups,
                           v2_cgroup_root, wait_for_log, wait_until)
from tests.otlp_receiver import attributes

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs and creates cgroups")

ID = "0123456789abcdef" * 4
POD = "1f2e3d4c_5b6a_4789_8a7b_6c5d4e3f2a1b"


def container(root: str, cid: str = ID) -> Workload:
    return Workload("container", root, (("container.id", cid), ("process.linux.cgroup", "0::" + root)))


def unit(root: str) -> Workload:
    return Workload("service", root, (("linux.systemd.unit", root.rsplit("/", 1)[1]),
                                      ("process.linux.cgroup", "0::" + root)))


def top(root: str) -> Workload:
    return Workload("slice", root, (("process.linux.cgroup", "0::" + root),))


KUBE_SYSTEMD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice"
LAYOUTS = [
    ("/", HOST),
    ("", HOST),
    # docker: cgroupfs driver (v1 and v2), systemd driver
    (f"/docker/{ID}", container(f"/docker/{ID}")),
    (f"/system.slice/docker-{ID}.scope", container(f"/system.slice/docker-{ID}.scope")),
    (f"/system.slice/docker-{ID}.scope/init", container(f"/system.slice/docker-{ID}.scope")),
    ("/system.slice/docker.service", unit("/system.slice/docker.service")),
    ("/system.slice/docker.socket", unit("/system.slice/docker.socket")),
    # kubernetes, cgroupfs driver: QoS level, pod level, container (the pause container is one)
    ("/kubepods", top("/kubepods")),
    ("/kubepods/burstable", top("/kubepods")),
    (f"/kubepods/burstable/pod{POD}", top("/kubepods")),
    (f"/kubepods/burstable/pod{POD}/{ID}", container(f"/kubepods/burstable/pod{POD}/{ID}")),
    (f"/kubepods/pod{POD}/{ID}", container(f"/kubepods/pod{POD}/{ID}")),
    # kubernetes, systemd driver: containerd, cri-o (and its conmon), docker
    (KUBE_SYSTEMD, top("/kubepods.slice")),
    (f"{KUBE_SYSTEMD}/cri-containerd-{ID}.scope", container(f"{KUBE_SYSTEMD}/cri-containerd-{ID}.scope")),
    (f"{KUBE_SYSTEMD}/crio-{ID}.scope", container(f"{KUBE_SYSTEMD}/crio-{ID}.scope")),
    (f"{KUBE_SYSTEMD}/crio-{ID}.scope/container", container(f"{KUBE_SYSTEMD}/crio-{ID}.scope")),
    (f"{KUBE_SYSTEMD}/crio-conmon-{ID}.scope", unit(f"{KUBE_SYSTEMD}/crio-conmon-{ID}.scope")),
    (f"{KUBE_SYSTEMD}/docker-{ID}.scope", container(f"{KUBE_SYSTEMD}/docker-{ID}.scope")),
    # podman, root and rootless; its conmon
    (f"/machine.slice/libpod-{ID}.scope", container(f"/machine.slice/libpod-{ID}.scope")),
    (f"/machine.slice/libpod-{ID}.scope/container", container(f"/machine.slice/libpod-{ID}.scope")),
    (f"/machine.slice/libpod-conmon-{ID}.scope", unit(f"/machine.slice/libpod-conmon-{ID}.scope")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container",
     container(f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope")),
    # nerdctl / containerd without kubernetes
    (f"/system.slice/nerdctl-{ID}.scope", container(f"/system.slice/nerdctl-{ID}.scope")),
    (f"/default/{ID}", container(f"/default/{ID}")),
    # systemd: services and their sub-cgroups, the user manager's units, sessions, PID 1
    ("/system.slice/nginx.service", unit("/system.slice/nginx.service")),
    ("/system.slice/nginx.service/workers", unit("/system.slice/nginx.service")),
    ("/system.slice/system-getty.slice/getty@tty1.service",
     unit("/system.slice/system-getty.slice/getty@tty1.service")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/org.gnome.Terminal.scope",
     unit("/user.slice/user-1000.slice/user@1000.service")),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", unit("/user.slice/user-1000.slice/user@1000.service")),
    ("/user.slice/user-1000.slice/session-3.scope", unit("/user.slice/user-1000.slice/session-3.scope")),
    ("/init.scope", unit("/init.scope")),
    ("/system.slice/dev-hugepages.mount", unit("/system.slice/dev-hugepages.mount")),
    # slices and other top-level cgroups
    ("/user.slice", top("/user.slice")),
    ("/user.slice/user-1000.slice", top("/user.slice")),
    ("/system.slice", top("/system.slice")),
    ("/hostagent-test", top("/hostagent-test")),
    ("//system.slice//nginx.service/", unit("/system.slice/nginx.service")),
    # names that look like a container id and are not one
    (f"/system.slice/docker-{ID[:-1]}.scope", unit(f"/system.slice/docker-{ID[:-1]}.scope")),
    (f"/system.slice/docker-{ID}0.scope", unit(f"/system.slice/docker-{ID}0.scope")),
    (f"/system.slice/docker-{ID.upper()}.scope", unit(f"/system.slice/docker-{ID.upper()}.scope")),
    (f"/system.slice/rkt-{ID}.scope", unit(f"/system.slice/rkt-{ID}.scope")),
    (f"/docker/x{ID}", top("/docker")),
    (f"/docker/{ID}.service", unit(f"/docker/{ID}.service")),
    # a container's directory named inside an unrelated parent that happens to hold its id
    (f"/x{ID}/docker-{ID}.scope", container(f"/x{ID}/docker-{ID}.scope")),
    # docker in docker: the inner container is the workload
    (f"/docker/{ID}/docker/{'f' * 64}", container(f"/docker/{ID}/docker/{'f' * 64}", "f" * 64)),
    (f"/docker/{ID}/docker", container(f"/docker/{ID}")),
]


@pytest.mark.parametrize("path, workload", LAYOUTS, ids=[p[:60] or "empty" for p, _ in LAYOUTS])
def test_real_cgroup_layouts_are_classified(path, workload):
    assert classify(path) == workload


# --- properties ------------------------------------------------------------------------------------

HEX = "0123456789abcdef"
container_dirs = st.builds(lambda prefix, cid, suffix: f"{prefix}{cid}{suffix}",
                           st.sampled_from(["", "docker-", "cri-containerd-", "crio-", "libpod-", "nerdctl-"]),
                           st.text(HEX, min_size=64, max_size=64),
                           st.sampled_from(["", ".scope"]))
# text as the kernel's names reach classify(): decoded, so no lone surrogates (raw_names has the bytes)
plain_names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                      max_size=255).filter(
    lambda name: container_id(name) is None and not name.endswith(UNIT_SUFFIXES))
# what a kernel may hand us: any bytes but '/' and NUL, up to NAME_MAX, decoded with replacement
raw_names = st.binary(min_size=1, max_size=255).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
names = st.one_of(plain_names, container_dirs, raw_names.map(decoded),
                  st.sampled_from(["system.slice", "user.slice", "x.service", "session-1.scope", "init.scope",
                                   "user@1000.service", "app.slice", "kubepods.slice", "a.mount"]))
paths = st.lists(names, max_size=40).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(paths)
def test_a_workload_is_a_prefix_of_its_cgroup_and_its_own_workload(path):
    w = classify(path)
    assert w.kind in ("container", "service", "slice", "host")
    parts = [p for p in path.split("/") if p]
    own = [p for p in w.path.split("/") if p]
    assert parts[:len(own)] == own                        # the workload's cgroup contains the cgroup
    assert classify(w.path) == w                          # and is its own workload
    if w.kind != "host":
        assert ("process.linux.cgroup", "0::" + w.path) in w.attributes
    for key, value in w.attributes:                       # every value exportable as UTF-8
        value.encode("utf-8")
    if w.kind == "container":
        assert dict(w.attributes)["container.id"] == container_id(path)


@settings(max_examples=200, deadline=None)
@given(paths, st.lists(plain_names, min_size=1, max_size=10))
def test_sub_cgroups_collapse_into_their_container_or_unit(path, sub):
    w = classify(path)
    if w.kind in ("container", "service"):
        assert classify(path + "/" + "/".join(sub)) == w


@settings(max_examples=100, deadline=None)
@given(st.lists(raw_names, min_size=1, max_size=8))
def test_undecodable_names_learned_as_bytes_are_replaced_not_dropped(parts):
    raw = b"/" + b"/".join(parts)
    resolver = WorkloadResolver(paths=CgroupPaths(mount=""))
    w = resolver.learn(7, raw)
    assert w == classify(decoded(raw)) and resolver.path(7) == decoded(raw)
    "".join(v for _, v in w.attributes).encode("utf-8")


def test_deep_and_long_paths_are_classified_in_linear_time():
    deep = "/" + "/".join(["a" * 255] * 2000)             # 512 KiB: far beyond any real path
    assert classify(deep) == top("/" + "a" * 255)
    assert classify(deep + f"/docker-{ID}.scope/x") == container(deep + f"/docker-{ID}.scope")


# --- the resolver --------------------------------------------------------------------------------

def gone_id(i: int) -> int:
    """A cgroup id no cgroup has (ids count up from 1; these are far beyond)."""
    return 2**62 + i


def test_the_resolver_keeps_the_most_recently_used_ids_and_counts_what_it_forgets():
    telemetry = SelfMetrics()
    resolver = WorkloadResolver(telemetry, cache_size=100, paths=CgroupPaths(mount=""))
    for i in range(100):
        resolver.learn(gone_id(i), f"/s{i}.service")
    resolver.resolve(gone_id(0))                          # used: kept
    for i in range(100, 150):
        resolver.learn(gone_id(i), f"/s{i}.service")
    assert len(resolver) == 100
    assert telemetry.counter(EVICTED_METRIC, "", "").value() == resolver.evicted == 50
    metrics = {m.name: m for g in telemetry.collect() for m in g.metrics}
    assert metrics[CACHED_METRIC].points[0].value == 100
    assert resolver.path(gone_id(0)) == "/s0.service"
    assert resolver.path(gone_id(149)) == "/s149.service"
    assert resolver.path(gone_id(1)) is None              # the least recently used went first


@needs_root
def test_ids_of_live_cgroups_resolve_from_the_kernel_and_gone_unknown_ones_are_counted_once():
    telemetry = SelfMetrics()
    resolver = WorkloadResolver(telemetry)
    root = v2_cgroup_root()
    name = f"/hostagent-test-wl{os.getpid()}.slice/docker-{ID}.scope"
    os.makedirs(root + name)
    try:
        cgroup_id = os.stat(root + name).st_ino
        assert resolver.alive(cgroup_id)
        assert resolver.resolve(cgroup_id) == container(name)
        assert resolver.attributes(cgroup_id) == cgroup_attributes(name)
    finally:
        remove_cgroups(root + name, os.path.dirname(root + name))
    assert not resolver.alive(cgroup_id)
    assert resolver.resolve(cgroup_id) == container(name)         # known before it went
    assert resolver.resolve(os.stat(root).st_ino) == HOST
    for _ in range(3):
        assert resolver.resolve(gone_id(1)) is UNRESOLVED
        assert resolver.workload(gone_id(2)) is None
    assert resolver.attributes(gone_id(1)) == ()
    assert resolver.resolve(CGROUP_OVERFLOW) is UNRESOLVED           # the overflow key: not a cgroup
    assert telemetry.counter(UNRESOLVED_METRIC, "", "").value() == resolver.unresolved == 2


def test_a_failing_sync_hook_costs_no_answer():
    resolver = WorkloadResolver(paths=CgroupPaths(mount=""))
    resolver.learn(gone_id(1), "/a.service")

    def broken():
        raise RuntimeError("ring gone")
    resolver.set_sync(broken)
    assert resolver.resolve(gone_id(2)) is UNRESOLVED and resolver.resolve(gone_id(3)) is UNRESOLVED
    assert resolver.resolve(gone_id(1)) == unit("/a.service") and resolver.unresolved == 2


def test_threads_asking_about_the_same_gone_ids_count_each_once():
    telemetry = SelfMetrics()
    resolver = WorkloadResolver(telemetry, paths=CgroupPaths(mount=""))
    barrier = threading.Barrier(8)

    def ask():
        barrier.wait()
        for i in range(200):
            assert resolver.resolve(gone_id(i)) is UNRESOLVED
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert resolver.unresolved == telemetry.counter(UNRESOLVED_METRIC, "", "").value() == 200


def test_the_resolver_is_safe_to_share_between_threads():
    resolver = WorkloadResolver(cache_size=500, paths=CgroupPaths(mount=""))
    errors = []
    syncs = []
    resolver.set_sync(lambda: syncs.append(1))

    def work(k):
        try:
            for i in range(3000):
                n = (i * 7 + k) % 1000
                resolver.learn(gone_id(n), f"/w{n}.service")
                w = resolver.resolve(gone_id((n + 13) % 1000))
                assert w is UNRESOLVED or w.path == f"/w{(n + 13) % 1000}.service"
                assert len(resolver) <= 500
        except Exception as e:             # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(resolver) <= 500 and syncs


# --- through the agent -------------------------------------------------------------------------

def agent_config(tmp_path, probes=("cgroups", "process")) -> dict:
    return base_config(tmp_path, ebpf=ebpf_config(enabled=True, probes={n: {"enabled": n in probes} for n in PROBES}))


def exported_logs(tmp_path) -> list:
    return [(r.event_name, attributes(r))
            for req in file_requests(str(tmp_path / "out" / "logs.jsonl"), ExportLogsServiceRequest)
            for rl in req.resource_logs for sl in rl.scope_logs for r in sl.log_records]


def exported_points(tmp_path, name: str) -> list:
    """The agent's data points of metric `name`, in the order written."""
    return [p for req in file_requests(str(tmp_path / "out" / "metrics.jsonl"), ExportMetricsServiceRequest)
            for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name
            for p in getattr(m, m.WhichOneof("data")).data_points]


def exported_metric(tmp_path, name: str) -> list:
    """The values of the agent's points of metric `name`, in the order written."""
    return [p.as_int or p.as_double for p in exported_points(tmp_path, name)]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read())[1])


def exported_workloads(tmp_path, name: str) -> list:
    """The process.linux.cgroup attribute of every point of metric `name` written so far."""
    return [attributes(p).get("process.linux.cgroup") for p in exported_points(tmp_path, name)]


@needs_root
def test_every_event_of_a_short_lived_cgroup_names_its_workload(tmp_path, start_agent):
    """A cgroup created, used for 50 ms and removed, 100 times in a row (docker, cgroupfs,
    kubelet, podman and systemd service layouts): each one's exec and exit records carry its
    cgroup, and its container id where it names one; the system calls counted in the kernel by
    cgroup id are exported under each one's workload, none unresolved."""
    cfg = agent_config(tmp_path, probes=("cgroups", "process", "syscalls"))
    cfg["ebpf"]["probes"]["syscalls"]["counting_only"] = True
    cfg["cardinality_limit"] = 100_000          # 100 workloads x their system calls
    proc = start_agent(cfg)
    wait_for_log(proc, "ebpf_probes on=")
    assert "ebpf_probes on=syscalls,cgroups,process" in agent_log(proc), agent_log(proc)
    ran = short_lived_cgroups(100)
    pids = {cg["pid"]: cg for cg in ran}

    def ours():
        return [(e, a) for e, a in exported_logs(tmp_path) if a.get("process.pid") in pids
                and e in ("process.exec", "process.exit") and a.get("process.executable.name") == "true"]
    assert wait_until(lambda: len(ours()) >= 200, 30, proc), f"{len(ours())} records\n{agent_log(proc)[-2000:]}"
    records = ours()
    assert sorted(e for e, _ in records) == ["process.exec"] * 100 + ["process.exit"] * 100
    wrong = [(e, a.get("process.linux.cgroup"), a.get("container.id"), pids[a["process.pid"]]) for e, a in records
             if a.get("process.linux.cgroup") != "0::" + pids[a["process.pid"]]["path"]
             or a.get("container.id") != pids[a["process.pid"]]["container_id"]]
    assert wrong == [], f"{len(wrong)} of 200 records without their cgroup, e.g. {wrong[:3]}"
    assert sum(cg["container_id"] is not None for cg in ran) == 80

    expected = {"0::" + classify(cg["path"]).path for cg in ran}
    assert len(expected) == 100
    assert wait_until(lambda: expected <= set(exported_workloads(tmp_path, SyscallsProbe.CALLS)), 30, proc), \
        f"{len(expected - set(exported_workloads(tmp_path, SyscallsProbe.CALLS)))} of 100 workloads without calls"
    assert UNRESOLVED.attributes[0][1] not in exported_workloads(tmp_path, SyscallsProbe.CALLS)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)


@needs_root
def test_cgroup_churn_keeps_the_resolver_and_the_agent_bounded(tmp_path, start_agent):
    """More cgroups than the resolver keeps (5,000 and its bound) created and removed while the
    agent runs, some running a process: the resolver holds at most its bound, the agent's RSS
    does not grow with the churn, nothing fails. Figures (RSS before/after) are printed, not
    asserted beyond a generous bound."""
    proc = start_agent(agent_config(tmp_path))
    wait_for_log(proc, "ebpf_probes on=cgroups,process")
    ran = short_lived_cgroups(20, lifetime=0)              # warm up: every code path once
    assert wait_until(lambda: len(exported_metric(tmp_path, CACHED_METRIC)) >= 2, 30, proc)
    before = rss_kib(proc.pid)
    root = v2_cgroup_root()
    started = time.monotonic()
    top = f"{root}/hostagent-test-wl{os.getpid()}-churn"
    os.mkdir(top)
    try:
        for i in range(5000 + CACHE_SIZE):
            path = f"{top}/docker-{i:064x}.scope"
            os.mkdir(path)
            os.rmdir(path)
            if i % 500 == 0:
                ran += short_lived_cgroups(1, lifetime=0)
    finally:
        remove_cgroups(top)
    churn = time.monotonic() - started
    assert wait_until(lambda: max(exported_metric(tmp_path, "system.linux.cgroups.created")) >= 5000 + CACHE_SIZE,
                      30, proc)
    pids = {cg["pid"]: cg for cg in ran}

    def exits():
        return [a for e, a in exported_logs(tmp_path) if e == "process.exit" and a.get("process.pid") in pids
                and a.get("process.executable.name") == "true"]
    assert wait_until(lambda: len(exits()) >= len(ran), 30, proc)
    assert [a for a in exits() if a.get("process.linux.cgroup") != "0::" + pids[a["process.pid"]]["path"]] == []
    after = rss_kib(proc.pid)
    print(f"churn of {5000 + CACHE_SIZE} cgroups: {churn:.1f} s; agent RSS before {before} KiB, after {after} KiB")
    created = exported_metric(tmp_path, "system.linux.cgroups.created")
    cached = exported_metric(tmp_path, CACHED_METRIC)
    assert max(created) >= 5000 + CACHE_SIZE and 0 < max(cached) <= CACHE_SIZE
    assert max(exported_metric(tmp_path, EVICTED_METRIC)) >= 5000
    assert after - before < 32 * 1024, (before, after)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)
    log = agent_log(proc)
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
    dropped = exported_metric(tmp_path, "hostagent.ebpf.ringbuf.dropped")
    assert max(dropped or [0]) == 0


# Run in a cgroup of the test's own (argv[1]): n times, make a child cgroup, move in, make a few
# system calls, move back out and remove the child.
CHURN_WORKER = r"""
import os, sys
top, n = sys.argv[1], int(sys.argv[2])
me = str(os.getpid())
for i in range(n):
    path = f"{top}/docker-{i:064x}.scope"
    os.mkdir(path)
    with open(f"{path}/cgroup.procs", "w") as f:
        f.write(me)
    for _ in range(3):
        os.getppid()
    with open(f"{top}/cgroup.procs", "w") as f:
        f.write(me)
    os.rmdir(path)
"""


def agent_map_entries(pid: int, name: str) -> int:
    """Entries of the agent's BPF map `name` (found through the agent's fds), by bpftool."""
    ids = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^map_id:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            ids.append(m[1])
    for map_id in ids:
        shown = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", map_id], check=True,
                                          capture_output=True, text=True).stdout)
        if shown.get("name") == name:
            return len(json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", map_id], check=True,
                                                 capture_output=True, text=True).stdout))
    raise AssertionError(f"the agent has no map {name}")


def points_per_collection(tmp_path, name: str) -> list:
    """For each collection (points of one timestamp), how many points metric `name` had."""
    times = collections.Counter(p.time_unix_nano for p in exported_points(tmp_path, name))
    return [times[t] for t in sorted(times)]


@needs_root
@pytest.mark.skipif(shutil.which("bpftool") is None, reason="needs bpftool")
def test_cgroup_churn_under_load_keeps_kernel_maps_and_series_bounded(tmp_path, start_agent):
    """5,000 cgroups created, each making system calls counted in the kernel by cgroup id, and
    removed: the keyed map keeps only live cgroups' entries (the gone ones are folded into their
    workloads' totals and deleted), each collection exports at most the cardinality limit plus
    the overflow series, the agent's RSS stays bounded."""
    limit = 500
    cfg = agent_config(tmp_path, probes=("cgroups", "syscalls"))
    cfg["ebpf"]["probes"]["syscalls"]["counting_only"] = True
    cfg["cardinality_limit"] = limit
    proc = start_agent(cfg)
    wait_for_log(proc, "ebpf_probes on=syscalls,cgroups")
    assert wait_until(lambda: len(points_per_collection(tmp_path, SyscallsProbe.CALLS)) >= 2, 30, proc)
    before = rss_kib(proc.pid)
    top = f"{v2_cgroup_root()}/hostagent-test-wl{os.getpid()}-load"
    os.mkdir(top)
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", CHURN_WORKER, top, "5000"], check=True, timeout=600,
                       preexec_fn=lambda: open(f"{top}/cgroup.procs", "w").write(str(os.getpid())))
        churn = time.monotonic() - started
    finally:
        remove_cgroups(top)
    assert wait_until(lambda: max(exported_metric(tmp_path, "system.linux.cgroups.created")) >= 5001, 30, proc)
    collections = len(points_per_collection(tmp_path, SyscallsProbe.CALLS))
    assert wait_until(lambda: len(points_per_collection(tmp_path, SyscallsProbe.CALLS)) >= collections + 2, 30, proc)
    entries = agent_map_entries(proc.pid, "syscall_calls")
    after = rss_kib(proc.pid)
    per_collection = points_per_collection(tmp_path, SyscallsProbe.CALLS)
    print(f"churn of 5000 busy cgroups: {churn:.1f} s; syscall_calls entries after: {entries}; points per "
          f"collection max {max(per_collection)}; agent RSS before {before} KiB, after {after} KiB")
    assert entries < 1000, entries                  # the live cgroups' keys only, not 5,000 x 3
    assert max(per_collection) <= limit + 1
    assert max(exported_metric(tmp_path, "hostagent.pipeline.cardinality_overflow")) > 0
    assert after - before < 32 * 1024, (before, after)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)
    assert "Traceback" not in agent_log(proc)
