"""The cgroups probe on the real kernel: cgroups this test creates under the v2 mount (unique
names, removed afterwards) are reported with their exact ids and paths, under both loaders, and
make the workload resolver answer for them after they are gone."""
from __future__ import annotations

import contextlib
import os
import threading
import uuid

import pytest

from agent.procfs.workload import UNRESOLVED, WorkloadResolver
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.cgroups import CGROUP_EVENT, CREATED, PATH_LEN, TRUNCATED, CgroupsProbe
from agent.sources.ebpf.ringbuf import cstr, read_drops
from tests.ebpf_helpers import attached, object_layout_problems
from tests.helpers import finishes, remove_cgroups, v2_cgroup_root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs and creates cgroups")
LOADERS = pytest.mark.parametrize("loader", ["core", "bcc"])


def test_record_layout_matches_the_objects_btf():
    probe = CgroupsProbe()
    assert probe.structs == {"cgroup_event": CGROUP_EVENT}
    assert object_layout_problems(probe) == []


def unique(tag: str = "") -> str:
    return f"hostagent-test-wl{os.getpid()}-{tag}{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def cgroups(*relative):
    """The cgroups (paths relative to the v2 root, parents first) created, and removed at the end."""
    root = v2_cgroup_root()
    made = []
    try:
        for path in relative:
            os.mkdir(root + path)
            made.append(root + path)
        yield {path: os.stat(root + path).st_ino for path in relative}
    finally:
        remove_cgroups(*reversed(made))


def drain(probe) -> dict:
    """{id: (level, path_size, path)} of the records pending in the probe's ring (read past the
    probe: the records themselves)."""
    (ring,) = probe.ring_buffers
    return {r["id"]: (r["level"], r["path_size"], cstr(r["path"])) for r in ring.drain()}


@needs_root
@LOADERS
def test_nested_cgroups_are_reported_with_their_ids_levels_and_paths(loader):
    top = "/" + unique()
    paths = (top, top + "/system.slice", top + "/system.slice/docker-" + "ab" * 32 + ".scope",
             top + "/system.slice/docker-" + "ab" * 32 + ".scope/init")
    with attached(CgroupsProbe(), loader=loader) as probe:
        with cgroups(*paths) as ids:
            pass
        records = drain(probe)
    for path, cgroup_id in ids.items():
        level = path.count("/")
        assert records[cgroup_id] == (level, len(path) + 1, path), path


@needs_root
@LOADERS
def test_cgroup_v1_hierarchies_are_left_out(loader):
    v1 = "/sys/fs/cgroup/pids"
    if not os.path.isdir(v1):
        pytest.skip("no cgroup v1 pids hierarchy")
    name = unique("v1-")
    with attached(CgroupsProbe(), loader=loader) as probe:
        os.mkdir(os.path.join(v1, name))
        try:
            v1_id = os.stat(os.path.join(v1, name)).st_ino
            with cgroups("/" + name) as ids:     # the same name on v2: reported
                pass
        finally:
            remove_cgroups(os.path.join(v1, name))
        records = drain(probe)
    assert [p for _, _, p in records.values() if p.endswith(name)] == ["/" + name]
    assert records[ids["/" + name]][2] == "/" + name
    assert v1_id not in records or records[v1_id][2] != "/" + name


@needs_root
def test_removed_cgroups_resolve_through_the_probe_without_waiting_for_its_reader():
    """No reader thread runs here: the resolver's miss makes the probe read its ring."""
    resolver = WorkloadResolver(SelfMetrics())
    top = "/" + unique()
    cid = "cd" * 32
    with attached(CgroupsProbe.create(None, workloads=resolver)):
        with cgroups(top, f"{top}/libpod-{cid}.scope", f"{top}/libpod-{cid}.scope/container") as ids:
            pass
        assert resolver.path(ids[f"{top}/libpod-{cid}.scope/container"]) == f"{top}/libpod-{cid}.scope/container"
        workload = resolver.resolve(ids[f"{top}/libpod-{cid}.scope/container"])
        assert workload.kind == "container" and workload.path == f"{top}/libpod-{cid}.scope"
        assert dict(workload.attributes) == {"container.id": cid,
                                             "process.linux.cgroup": f"0::{top}/libpod-{cid}.scope"}
        assert resolver.resolve(ids[top]).kind == "slice"
        assert resolver.unresolved == 0 and not resolver.alive(ids[top])
    assert resolver._sync is None                  # the unloaded probe is no longer asked


@needs_root
def test_cgroups_that_exist_before_the_probe_are_known_after_they_go():
    resolver = WorkloadResolver(SelfMetrics())
    top = "/" + unique()
    with cgroups(top, top + "/x.service") as ids:
        with attached(CgroupsProbe.create(None, workloads=resolver)):
            pass
    assert resolver.path(ids[top + "/x.service"]) == top + "/x.service"
    assert resolver.resolve(ids[top + "/x.service"]).attributes == (
        ("linux.systemd.unit", "x.service"), ("process.linux.cgroup", f"0::{top}/x.service"))
    assert resolver.unresolved == 0


@needs_root
def test_a_path_longer_than_the_record_is_looked_up_in_the_kernel_and_counted():
    telemetry = SelfMetrics()
    resolver = WorkloadResolver(telemetry)
    top = "/" + unique("long-")
    deep = [top]
    while len(deep[-1]) < PATH_LEN + 100:
        deep.append(deep[-1] + "/" + "d" * 200)
    gone = top + "-gone"
    gone_deep = [gone] + [gone + p[len(top):] for p in deep[1:]]
    with attached(CgroupsProbe.create(None, telemetry=telemetry, workloads=resolver)) as probe:
        with cgroups(*gone_deep) as gone_ids:
            pass
        with cgroups(*deep) as ids:
            probe.poll()                           # while the deep one exists: asked of the kernel
        probe.poll()
        counted = telemetry.counter(TRUNCATED, "", "").value()
        assert counted >= 2 and probe.truncated == counted
        assert resolver.path(ids[deep[-1]]) == deep[-1]           # exact, from the kernel
        assert resolver.path(ids[deep[1]]) == deep[1]             # short enough: from the record
        assert resolver.resolve(gone_ids[gone_deep[-1]]) == UNRESOLVED   # gone before it was read
        assert resolver.path(gone_ids[gone_deep[1]]) == gone_deep[1]
        assert resolver.unresolved >= 1
        assert probe.counts[(CREATED, ())] >= len(deep) + len(gone_deep)


@needs_root
def test_the_reader_and_another_thread_resolving_at_once_neither_block_nor_lose_a_cgroup():
    """The ring reader polls while a collection thread resolves ids of cgroups already removed
    (each miss makes it read the ring too): every id resolves to its own path, nothing hangs."""
    resolver = WorkloadResolver(SelfMetrics())
    stop = threading.Event()
    with attached(CgroupsProbe.create(None, workloads=resolver)) as probe:
        def reader():
            while not stop.wait(0.001):
                probe.poll()

        def churn_and_resolve():
            top = "/" + unique("race-")
            made = {}
            with cgroups(top):
                for i in range(300):
                    with cgroups(f"{top}/s{i}.service") as ids:
                        made.update(ids)
                    assert resolver.path(ids[f"{top}/s{i}.service"]) == f"{top}/s{i}.service"
            return made

        t = threading.Thread(target=reader)
        t.start()
        try:
            made = finishes(churn_and_resolve)
        finally:
            stop.set()
            t.join()
    assert {resolver.path(i) for i in made.values()} == set(made)
    assert resolver.unresolved == 0


@needs_root
def test_hostile_cgroup_names_resolve_with_invalid_bytes_replaced():
    """Names of 255 bytes, names that are not UTF-8, a name that looks like a container's: learned
    from the records exactly as the kernel would name them, with U+FFFD for each invalid byte."""
    resolver = WorkloadResolver(SelfMetrics())
    root = os.fsencode(v2_cgroup_root())
    top = b"/" + unique("bad-").encode()
    names = [top, top + b"/" + b"\xff\xfebad\x80.service", top + b"/" + b"n" * 255,
             top + b"/" + b"n" * 255 + b"/docker-" + b"E" * 64 + b".scope"]
    made = []
    with attached(CgroupsProbe.create(None, workloads=resolver)):
        try:
            for name in names:
                os.mkdir(root + name)
                made.append(root + name)
            ids = {name: os.stat(root + name).st_ino for name in names}
        finally:
            remove_cgroups(*reversed(made))
        for name, cgroup_id in ids.items():
            assert resolver.path(cgroup_id) == name.decode("utf-8", "replace"), name
    top_text = top.decode()
    assert resolver.resolve(ids[names[1]]).attributes == (
        ("linux.systemd.unit", "\ufffd\ufffdbad\ufffd.service"),
        ("process.linux.cgroup", f"0::{top_text}/\ufffd\ufffdbad\ufffd.service"))
    assert resolver.resolve(ids[names[3]]).kind == "service"   # upper-case hex: a scope, not a container
    assert resolver.unresolved == 0


@needs_root
def test_records_lost_to_a_full_ring_are_counted_and_their_cgroups_counted_unresolved():
    """A ring of one page (7 records) and 41 cgroups created and removed before it is read: the
    records that did not fit are counted as dropped, and their cgroups, gone and never learned,
    as unresolved; the others resolve exactly."""
    resolver = WorkloadResolver(SelfMetrics())
    top = "/" + unique("full-")
    subs = [f"{top}/s{i}.service" for i in range(40)]
    with attached(CgroupsProbe(ring_pages=1, workloads=resolver)) as probe:
        with cgroups(top, *subs) as ids:
            pass
        resolved = {s: resolver.path(ids[s]) for s in subs}      # the first miss reads the ring
        (dropped,) = read_drops(probe.obj, 1)
    lost = [s for s, p in resolved.items() if p is None]
    assert all(p == s for s, p in resolved.items() if p is not None)
    assert len(lost) >= len(subs) + 1 - 7 and resolver.unresolved == len(lost)
    assert dropped >= len(lost)
