"""Per-workload resource usage from cgroupfs, against the kernel's own files; the walk to the
workloads' cgroups against hostile hierarchies; the file parsers against hostile text.

Workloads are cgroups the tests make under the cgroup v2 mount and, where the v2 hierarchy has no
controllers (hybrid hosts, as here), at the same path in the v1 cpuacct, memory and blkio
hierarchies, as systemd does. Counters are checked between readings of the kernel's files taken
right before and right after the scrape."""
from __future__ import annotations

import os
import signal
import time

import pytest
from google.protobuf import json_format
from hypothesis import given, settings, strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent import config
from agent.components import Config
from agent.model import Resource
from agent.procfs import cgroupfs
from agent.selfmetrics import SelfMetrics
from agent.sources.cgroups import CgroupScraperConfig, CgroupUsageScraper, PressureScraper, PressureScraperConfig
from agent.sources.host import MetricSwitch
from tests.helpers import (OwnCgroups, agent_log, base_config, finishes, loop_device,  # noqa: F401 (a fixture)
                           scrape_points, wait_until)
from tests.otlp_receiver import attributes

RESOURCE = Resource((("service.name", "test"),))
MiB = 1 << 20
BUSY = "import sys; sys.stdin.readline()\nwhile True: pass"
TOUCH_64MIB = ("import sys; sys.stdin.readline(); block = b'\\x01' * (64 << 20); print('ready', flush=True); "
               "sys.stdin.readline()")
DIRECT_WRITES = """
import mmap, os, sys
sys.stdin.readline()
fd = os.open(sys.argv[1] if len(sys.argv) > 1 else {device!r}, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
buf.write(os.urandom(4096))
for i in range({n}):
    assert os.pwritev(fd, [buf], i * 8192) == 4096
os.fsync(fd)
os.close(fd)
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def cgroups():
    cg = OwnCgroups(v1=("cpuacct", "memory", "blkio"))
    yield cg
    cg.close()


def scraper(telemetry=None, **cfg) -> CgroupUsageScraper:
    return CgroupUsageScraper(CgroupScraperConfig(**cfg), telemetry or SelfMetrics(), RESOURCE)


def of(scraped: dict, metric: str, cgroup: str, **attrs) -> int | float:
    want = {"process.linux.cgroup": "0::" + cgroup, **{k.replace("_", "."): v for k, v in attrs.items()}}
    found = [v for (name, a), v in scraped.items() if name == metric and want.items() <= dict(a).items()]
    assert len(found) == 1, (metric, cgroup, attrs, found)
    return found[0]


def flat(path: str) -> dict:
    return cgroupfs.parse_flat(open(path).read())


def v1(controller: str) -> str:
    mount = cgroupfs.v1_mounts().get(controller)
    if mount is None:
        pytest.skip(f"no v1 {controller} hierarchy")
    return mount


def names(tag: str) -> tuple:
    """A container's cgroup (as docker names it under systemd) and a service's, under one slice."""
    cid = f"{os.getpid():x}".rjust(64, "a")
    return f"/{tag}.slice/docker-{cid}.scope", f"/{tag}.slice/{tag}-b.service", cid


def test_cpu_time_of_a_busy_container_is_its_cpu_stat(cgroups):
    a, b, cid = names(f"hostagent-usage-cpu-{os.getpid()}")
    cgroups.make(a)
    cgroups.make(b)
    source = scraper()
    first = scrape_points(source)
    cgroups.start(a, BUSY)
    v2 = cgroups.v2
    assert wait_until(lambda: flat(f"{v2}{a}/cpu.stat")["usage_usec"] >= 500_000, 60)
    before = flat(f"{v2}{a}/cpu.stat")
    scraped = scrape_points(source)
    after = flat(f"{v2}{a}/cpu.stat")
    for mode, key in (("user", "user_usec"), ("kernel", "system_usec")):
        value = of(scraped, "container.cpu.time", a, cpu_mode=mode)
        assert type(value) is float
        assert before[key] <= round(value * 1e6) <= after[key], mode
    user = of(scraped, "container.cpu.time", a, cpu_mode="user")
    assert user - of(first, "container.cpu.time", a, cpu_mode="user") >= 0.3
    assert of(scraped, "container.cpu.time", a, cpu_mode="user", container_id=cid) == user
    # the idle service: its own names, nothing used
    assert of(scraped, "cgroup.cpu.time", b, cpu_mode="user", linux_systemd_unit=b.rsplit("/", 1)[1]) == 0.0
    assert not [k for k in scraped if k[0].startswith("container.") and ("0::" + b) in dict(k[1]).values()]


def test_memory_of_a_container_touching_64_mib(cgroups):
    """Its v1 memory cgroup (this host's v2 has no memory controller) holds 64 MiB of anonymous
    memory: usage and working set both show it; the kernel's files bracket the values."""
    a, _, _ = names(f"hostagent-usage-mem-{os.getpid()}")
    cgroups.make(a)
    child = cgroups.start(a, TOUCH_64MIB)
    assert finishes(child.stdout.readline) == "ready\n"
    v2 = cgroups.v2
    if os.path.exists(f"{v2}{a}/memory.current"):
        usage_file, stat_file, inactive = f"{v2}{a}/memory.current", f"{v2}{a}/memory.stat", "inactive_file"
    else:
        base = v1("memory") + a
        usage_file, stat_file, inactive = f"{base}/memory.usage_in_bytes", f"{base}/memory.stat", "total_inactive_file"

    def kernel() -> tuple:
        usage = int(open(usage_file).read())
        return usage, max(0, usage - flat(stat_file)[inactive])

    before = kernel()
    scraped = scrape_points(scraper())
    after = kernel()
    usage = of(scraped, "container.memory.usage", a)
    working_set = of(scraped, "container.memory.working_set", a)
    print(f"container A: usage {usage / MiB:.1f} MiB, working set {working_set / MiB:.1f} MiB")
    assert type(usage) is int and type(working_set) is int
    assert usage >= 64 * MiB and working_set >= 64 * MiB
    assert working_set <= usage
    assert min(before[0], after[0]) <= usage <= max(before[0], after[0])
    assert min(before[1], after[1]) <= working_set <= max(before[1], after[1])


def device_number(dev: str) -> str:
    rdev = os.stat(dev).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.mark.parametrize("accounting", ["bfq", "throttle"])
def test_disk_io_of_a_container_writing_to_a_loop_device(cgroups, loop_device, accounting):
    """32 direct 4 KiB writes and an fsync from A: A's bytes and operations on that device (by its
    name) show them; the kernel's files bracket the values; the service B did none. With v1 blkio
    (this host) the kernel counts a cgroup's I/O on a device only while bfq schedules the device
    or a throttle limit is set on it, so the test sets one or the other (a limit no write reaches)."""
    a, b, _ = names(f"hostagent-usage-io-{accounting}-{os.getpid()}")
    cgroups.make(a)
    cgroups.make(b)
    name, number, v2 = os.path.basename(loop_device), device_number(loop_device), cgroups.v2
    v2_io = os.path.exists(f"{v2}{a}/io.stat")
    if v2_io and accounting == "throttle":
        pytest.skip("cgroup v2 io.stat counts without a limit")
    if accounting == "bfq":
        with open(f"/sys/block/{name}/queue/scheduler", "w") as f:
            f.write("bfq")
    elif not v2_io:
        with open(f"{v1('blkio')}{a}/blkio.throttle.write_bps_device", "w") as f:
            f.write(f"{number} {1 << 40}")
    n = 32
    child = cgroups.start(a, DIRECT_WRITES.format(device=loop_device, n=n))
    assert finishes(child.stdout.readline) == "done\n"

    def kernel() -> tuple:
        if v2_io:
            s = cgroupfs.parse_io_stat(open(f"{v2}{a}/io.stat").read()).get(number, {})
            return s.get("wbytes", 0), s.get("wios", 0)
        base = f"{v1('blkio')}{a}/blkio.{accounting}"
        nbytes = cgroupfs.parse_blkio(open(f"{base}.io_service_bytes_recursive").read())
        ops = cgroupfs.parse_blkio(open(f"{base}.io_serviced_recursive").read())
        return nbytes.get(number, {}).get("Write", 0), ops.get(number, {}).get("Write", 0)

    before = kernel()
    scraped = scrape_points(scraper())
    after = kernel()
    written = of(scraped, "container.disk.io", a, system_device=name, disk_io_direction="write")
    ops = of(scraped, "container.disk.operations", a, system_device=name, disk_io_direction="write")
    print(f"container A on {name} ({accounting}): {written} bytes in {ops} writes")
    assert written >= n * 4096 and ops >= n
    assert before[0] <= written <= after[0] and before[1] <= ops <= after[1]
    assert of(scraped, "container.disk.io", a, system_device=name, disk_io_direction="read") == 0
    assert not [k for k in scraped if k[0].startswith("cgroup.disk") and ("system.device", name) in k[1]
                and ("process.linux.cgroup", "0::" + b) in k[1] and scraped[k]]


# --- hostile hierarchies ---------------------------------------------------------------------------

def test_hostile_hierarchy_keeps_the_scrape_bounded_and_the_other_workloads(cgroups, caplog):
    """A top-level cgroup named with bytes that are not UTF-8, a service with a 255-byte name,
    a chain 100 levels deep and 2,000 siblings in one cgroup: both scrapers finish, stop at their
    limits (counted), and still report the other workloads, each name as valid text."""
    tag = f"hostagent-hostile-{os.getpid()}"
    crowd = f"/{tag}.slice/crowd"
    cgroups.make(crowd, v1=False)
    started = time.monotonic()
    for i in range(2000):
        os.mkdir(f"{cgroups.v2}{crowd}/c{i}")
        cgroups.made.append(os.fsencode(f"{cgroups.v2}{crowd}/c{i}"))
    chain = f"/{tag}.slice/deep" + "/d" * 99
    cgroups.make(chain, v1=False)
    weird = b"/" + tag.encode() + b"-\xff\xfe\x80.slice"
    cgroups.make(weird, v1=False)
    long_unit = f"{tag}-" + "x" * (255 - len(tag) - 1 - len(".service")) + ".service"
    assert len(long_unit) == 255
    cgroups.make(f"/{tag}.slice/{long_unit}", v1=False)
    # a Kubernetes container, deeper than the crowd: listed after it
    pod = f"/{tag}-kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{os.getpid()}.slice"
    neighbour = f"{pod}/cri-containerd-{'e' * 64}.scope"
    cgroups.make(neighbour, v1=False)
    print(f"made {len(cgroups.made)} cgroups in {time.monotonic() - started:.1f} s")

    for cls, cfg in ((CgroupUsageScraper, CgroupScraperConfig), (PressureScraper, PressureScraperConfig)):
        telemetry = SelfMetrics()
        truncated = telemetry.counter("hostagent.scraper.cgroup.walk.truncated", "{walk}", "")
        source = cls(cfg(max_cgroups=1000), telemetry, RESOURCE)
        started = time.monotonic()
        scraped = finishes(scrape_points, source)
        print(f"{source.name}: {len(scraped)} points in {time.monotonic() - started:.3f} s")
        cgroup_values = {dict(a).get("process.linux.cgroup") for _, a in scraped}
        for value in cgroup_values - {None}:
            value.encode("utf-8")  # valid text
        assert "0::" + neighbour in cgroup_values
        assert f"0::/{tag}.slice/{long_unit}" in cgroup_values
        assert "0::/" + tag + "-\ufffd\ufffd\ufffd.slice" in cgroup_values
        assert f"0::/{tag}.slice" in cgroup_values  # the crowd and the chain are in their slice
        assert truncated.value((("scraper", source.name), ("limit", "cgroups"))) == 1
        assert truncated.value((("scraper", source.name), ("limit", "depth"))) == 1
        warned = [r.getMessage() for r in caplog.records if f"scraper={source.name} limit=" in r.getMessage()]
        assert len(warned) == 2  # once per limit
        finishes(scrape_points, source)
        assert len([r for r in caplog.records if f"scraper={source.name} limit=" in r.getMessage()]) == 2


def walk_tree(tmp_path, tree: dict, limits: cgroupfs.Limits, clock=time.monotonic) -> cgroupfs.Walk:
    def make(base, t):
        for name, sub in t.items():
            os.mkdir(os.path.join(base, name))
            make(os.path.join(base, name), sub)
    make(os.fsencode(tmp_path), tree)
    return cgroupfs.walk(os.fsencode(tmp_path), limits, clock)


def test_walk_finds_each_workloads_own_cgroup_breadth_first(tmp_path):
    cid = "c" * 64
    tree = {b"system.slice": {b"a.service": {b"sub": {}}, b"docker-" + cid.encode() + b".scope": {b"init": {}}},
            b"user.slice": {b"user-1.slice": {b"user@1.service": {b"app.slice": {b"b.service": {}}}}}}
    w = walk_tree(tmp_path, tree, cgroupfs.Limits())
    paths = [wl.path for wl, _, _ in w.workloads]
    assert sorted(paths) == ["/system.slice", "/system.slice/a.service", f"/system.slice/docker-{cid}.scope",
                             "/user.slice", "/user.slice/user-1.slice/user@1.service"]
    assert [p.count("/") for p in paths] == sorted(p.count("/") for p in paths)  # shallowest first
    kinds = {wl.path: wl.kind for wl, _, _ in w.workloads}
    assert kinds[f"/system.slice/docker-{cid}.scope"] == "container" and kinds["/system.slice/a.service"] == "service"
    assert not w.truncated and not w.skipped


def test_walk_limits_are_counted(tmp_path):
    tree = {f"s{i}.slice".encode(): {b"x.service": {}} for i in range(10)}
    w = walk_tree(tmp_path, tree, cgroupfs.Limits(max_workloads=5))
    assert len(w.workloads) == 5 and w.skipped["workloads"] == 15
    w = cgroupfs.walk(os.fsencode(tmp_path), cgroupfs.Limits(max_depth=1))
    assert len(w.workloads) == 10 and w.truncated == {"depth"}
    w = cgroupfs.walk(os.fsencode(tmp_path), cgroupfs.Limits(max_cgroups=4))
    assert w.listed <= 4 and w.truncated == {"cgroups"}
    ticks = iter(range(10**6))
    w = cgroupfs.walk(os.fsencode(tmp_path), cgroupfs.Limits(timeout_s=3), clock=lambda: next(ticks))
    assert w.truncated == {"time"} and len(w.workloads) <= 3


def test_walk_names_that_read_the_same_are_one_workload(tmp_path):
    """Bytes that are not UTF-8 read as U+FFFD: b"\\xff", b"\\xfe" and "\\ufffd" itself read the
    same. The first is reported, the others counted."""
    w = walk_tree(tmp_path, {b"\xff": {}, b"\xfe": {}, "\ufffd".encode(): {}}, cgroupfs.Limits())
    assert [wl.path for wl, _, _ in w.workloads] == ["/\ufffd"]
    assert w.skipped["duplicate"] == 2


# --- parsers against hostile text ------------------------------------------------------------------------

def test_parsers_take_the_kernels_formats():
    assert cgroupfs.parse_flat("usage_usec 10\nuser_usec 7\nsystem_usec 3\nnr_periods 0\n") == {
        "usage_usec": 10, "user_usec": 7, "system_usec": 3, "nr_periods": 0}
    assert cgroupfs.parse_io_stat("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n7:3 rbytes=1\n") == {
        "8:0": {"rbytes": 4096, "wbytes": 8192, "rios": 1, "wios": 2, "dbytes": 0, "dios": 0}, "7:3": {"rbytes": 1}}
    assert cgroupfs.parse_blkio("8:0 Read 10\n8:0 Write 20\n8:0 Sync 5\nTotal 30\n") == {
        "8:0": {"Read": 10, "Write": 20, "Sync": 5}}
    for bad in ("user_usec nan", "user_usec -1", f"user_usec {1 << 64}", "user_usec 1e3", "user_usec", "a b c"):
        assert cgroupfs.parse_flat(bad) == {}, bad
    assert cgroupfs.parse_io_stat("x:0 rbytes=1\n8: rbytes=1\n:0 rbytes=1\n8:0 rbytes=nan wbytes=2\n") == {"8:0": {"wbytes": 2}}


TEXT = st.text(alphabet=st.sampled_from(list("0123456789:= \n\tabrwiosyteuscRWTal_-.nNe\u00e9\x00")), max_size=500)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_parsers_never_raise_and_return_64_bit_counters(text):
    values = [cgroupfs.parse_flat(text)]
    values += cgroupfs.parse_io_stat(text).values()
    values += cgroupfs.parse_blkio(text).values()
    for parsed in values:
        assert all(type(v) is int and 0 <= v < 1 << 64 for v in parsed.values())
    for device in list(cgroupfs.parse_io_stat(text)) + list(cgroupfs.parse_blkio(text)):
        major, minor = device.split(":")
        assert major.isdigit() and minor.isdigit()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["rbytes", "wbytes", "rios", "wios", "dbytes", "dios"]),
                       st.integers(min_value=0, max_value=(1 << 64) - 1)),
       st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=(1 << 20) - 1))
def test_io_stat_round_trips(values, major, minor):
    line = f"{major}:{minor} " + " ".join(f"{k}={v}" for k, v in values.items())
    assert cgroupfs.parse_io_stat(line) == {f"{major}:{minor}": values}


def test_a_file_larger_than_the_limit_is_read_to_the_limit(tmp_path):
    path = tmp_path / "memory.stat"
    path.write_bytes(b"inactive_file 5\n" + b"x 1\n" * (cgroupfs.FILE_LIMIT // 4 + 100))
    text = cgroupfs.read_text(os.fsencode(path))
    assert len(text) == cgroupfs.FILE_LIMIT and cgroupfs.parse_flat(text)["inactive_file"] == 5


def test_a_workloads_points_start_when_its_cgroup_was_made(cgroups):
    """There at the first scrape: its points start at boot, as the host's. Made later: at the
    scrape before the one that saw it first. Made again at the same path (counters back at 0):
    the start moves on, so a backend sees the reset."""
    tag = f"hostagent-usage-start-{os.getpid()}"
    old, new = f"/{tag}.slice/old.service", f"/{tag}.slice/new.service"
    cgroups.make(old)
    source = scraper()

    def starts(scraped_at) -> dict:
        out: dict = {}
        for g in scraped_at:
            for m in g.metrics:
                for p in m.points:
                    if m.name == "cgroup.cpu.time":
                        out.setdefault(dict(p.attributes)["process.linux.cgroup"], set()).add(p.start_time_ns)
        return out

    first = source.collect()
    first_time = first[0].metrics[0].points[0].time_ns
    assert starts(first)["0::" + old] == {source.start_ns}
    cgroups.make(new)
    second = source.collect()
    second_time = second[0].metrics[0].points[0].time_ns
    assert starts(second)["0::" + old] == {source.start_ns}
    assert starts(second)["0::" + new] == {first_time}
    for root in cgroups.roots:
        os.rmdir(f"{root}{new}")
    cgroups.make(new)
    assert starts(source.collect())["0::" + new] == {second_time}


def test_the_agent_exports_workload_usage_and_pressure(tmp_path, start_agent, cgroups):
    """Through `hostagent run` and the OTLP file exporter: a container's usage under container.*,
    a service's under cgroup.*, the host's and both workloads' pressure, names as text."""
    tag = f"hostagent-usage-e2e-{os.getpid()}"
    a, b, cid = names(tag)
    weird = b"/" + tag.encode() + b"-\xff.slice"
    for rel in (a, b, weird):
        cgroups.make(rel)
    cgroups.start(a, BUSY)
    off = {name: {"enabled": False} for name in ("cpu", "disk", "filesystem", "load", "memory", "network",
                                                 "paging", "processes", "system")}
    proc = start_agent(base_config(tmp_path, scrapers=off))
    path = tmp_path / "out" / "metrics.jsonl"

    def exported() -> dict:
        """{(metric, process.linux.cgroup or None): (unit, monotonic or None, attributes)}"""
        out = {}
        if path.exists():
            for line in path.read_text().splitlines():
                req = json_format.Parse(line, ExportMetricsServiceRequest())
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            for p in m.sum.data_points:
                                attrs = attributes(p)
                                out[(m.name, attrs.get("process.linux.cgroup"))] = (m.unit, m.sum.is_monotonic, attrs)
        return out

    want = {("container.cpu.time", "0::" + a), ("cgroup.memory.usage", "0::" + b),
            ("system.cpu.linux.pressure.total", None), ("system.cpu.linux.pressure.total", "0::" + a),
            ("system.io.linux.pressure.total", "0::" + b)}
    assert wait_until(lambda: want <= exported().keys(), 60, proc), sorted(exported())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)
    got = exported()
    unit, monotonic, attrs = got[("container.cpu.time", "0::" + a)]
    assert (unit, monotonic, attrs["container.id"]) == ("s", True, cid)
    assert attrs["cpu.mode"] in ("user", "kernel")
    unit, monotonic, attrs = got[("cgroup.memory.usage", "0::" + b)]
    assert (unit, monotonic, attrs["linux.systemd.unit"]) == ("By", False, f"{tag}-b.service")
    assert ("system.cpu.linux.pressure.total", f"0::/{tag}-\ufffd.slice") in got
    assert got[("system.cpu.linux.pressure.total", None)][2].keys() == {"system.linux.pressure.stall_type"}


def test_without_cgroup_v2_the_v1_hierarchies_are_walked(cgroups, monkeypatch):
    """A v1-only host (no cgroup2 mount): workloads are found in the v1 cpuacct hierarchy and
    their CPU time and memory read from v1 files; there is no per-workload pressure."""
    monkeypatch.setattr("agent.sources.cgroups.cgroup2_mount", lambda: None)
    tag = f"hostagent-usage-v1-{os.getpid()}"
    a, _, cid = names(tag)
    cgroups.make(a)
    child = cgroups.start(a, TOUCH_64MIB)
    assert finishes(child.stdout.readline) == "ready\n"
    base = v1("cpuacct") + a
    before = [int(open(f"{base}/cpuacct.usage_{m}").read()) for m in ("user", "sys")]
    scraped = scrape_points(scraper())
    after = [int(open(f"{base}/cpuacct.usage_{m}").read()) for m in ("user", "sys")]
    for i, mode in enumerate(("user", "kernel")):
        value = of(scraped, "container.cpu.time", a, cpu_mode=mode, container_id=cid)
        assert before[i] <= round(value * 1e9) <= after[i]
    assert of(scraped, "container.memory.usage", a) >= 64 * MiB
    assert not [k for k in scrape_points(PressureScraper(PressureScraperConfig(), SelfMetrics(), RESOURCE))
                if dict(k[1]).get("process.linux.cgroup")]


def test_workloads_not_read_within_the_timeout_are_counted(cgroups, monkeypatch):
    """The timeout covers the reads too: a clock that jumps 0.4 s at each look lets two of five
    workloads be read within 1 s; the other three are counted, none is half read."""
    tag = f"hostagent-usage-slow-{os.getpid()}"
    for i in range(5):
        cgroups.make(f"/{tag}-{i}.slice", v1=False)
    clock = iter(range(10**6))
    telemetry = SelfMetrics()
    source = scraper(telemetry)
    skipped = telemetry.counter("hostagent.scraper.cgroup.skipped", "{item}", "")
    walk = cgroupfs.walk(source.walk_root, source.limits)
    ours = [wl for wl, _, _ in walk.workloads if wl.path.startswith(f"/{tag}-")]
    assert len(ours) == 5
    monkeypatch.setattr("agent.sources.cgroups.time.monotonic", lambda: next(clock) * 0.4)
    scraped = scrape_points(source)
    reported = {dict(a).get("process.linux.cgroup") for _, a in scraped}
    assert len(reported) == 2
    # (other cgroups of the host may come and go meanwhile: at least our other three)
    assert skipped.value((("scraper", "cgroups"), ("reason", "time"))) >= 3


FILE_TEXT = st.one_of(TEXT, st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
                      st.sampled_from(["nan", "inf", "max", "-0", "1e30", "", "\x00" * 10]))


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({name: FILE_TEXT for name in (
    "cpu.stat", "memory.current", "memory.stat", "io.stat", "cpu.pressure", "memory.pressure", "io.pressure")}))
def test_reader_takes_hostile_files_without_raising(tmp_path_factory, files):
    """A cgroup whose files hold anything: the reader returns what parses as 64-bit counters and
    counts each file that held none of what it looks for."""
    root = tmp_path_factory.mktemp("cg")
    os.mkdir(root / "w")
    for name, text in files.items():
        (root / "w" / name).write_text(text, errors="surrogateescape")
    unreadable = []
    reader = cgroupfs.Reader(os.fsencode(root), {}, lambda path, error: unreadable.append(os.fsdecode(os.path.basename(path))))
    usage = reader.usage(b"/w")
    pressure = reader.pressure(b"/w")
    for seconds in usage.cpu.values():
        assert 0 <= seconds < (1 << 64) / 1e6
    for value in usage.memory.values():
        assert type(value) is int and 0 <= value < 1 << 64
    assert usage.memory.get("working_set", 0) <= usage.memory.get("usage", 0)
    for device, values in usage.io.items():
        assert all(type(v) is int and 0 <= v < 1 << 64 for v in values)
    for totals in pressure.values():
        assert all(type(v) is int and 0 <= v < 1 << 64 for v in totals.values())
    assert ("cpu.stat" in unreadable) == (not usage.cpu)
    assert ("memory.current" in unreadable) == ("usage" not in usage.memory)
    for resource in ("cpu", "memory", "io"):
        assert (f"{resource}.pressure" in unreadable) == (resource not in pressure)


def test_metrics_switched_off_are_not_exported(cgroups):
    b = f"/hostagent-usage-switch-{os.getpid()}.slice/b.service"
    cgroups.make(b)
    off = {name: MetricSwitch(False) for name in ("container.cpu.time", "cgroup.cpu.time", "cgroup.disk.io",
                                                  "cgroup.disk.operations", "container.disk.io",
                                                  "container.disk.operations")}
    scraped = scrape_points(scraper(metrics=off))
    assert {name.split(".", 1)[1] for name, _ in scraped} == {"memory.usage", "memory.working_set"}
    of(scraped, "cgroup.memory.usage", b)
    pressure = PressureScraper(PressureScraperConfig(metrics={"system.cpu.linux.pressure.total": MetricSwitch(False)}),
                               SelfMetrics(), RESOURCE)
    names_ = {name for name, _ in scrape_points(pressure)}
    assert "system.cpu.linux.pressure.total" not in names_ and "system.io.linux.pressure.total" in names_


def test_limits_out_of_range_are_config_errors():
    cfg = config.build(Config, {"scrapers": {"cgroups": {"max_workloads": 5, "timeout": "250ms"},
                                             "pressure": {"workloads": False}}})
    assert cfg.scrapers.cgroups.max_workloads == 5 and cfg.scrapers.cgroups.timeout == 0.25
    assert cfg.scrapers.pressure.workloads is False
    for section, key, value in (("cgroups", "max_depth", 0), ("pressure", "max_cgroups", 0),
                                ("cgroups", "timeout", "0s"), ("pressure", "max_workloads", 10**6)):
        with pytest.raises(config.ConfigError, match=rf"^scrapers\.{section}\.{key}: must be at least"):
            config.build(Config, {"scrapers": {section: {key: value}}})


NAME = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
TREE = st.recursive(st.just({}), lambda children: st.dictionaries(NAME, children, max_size=4), max_leaves=30)


@settings(max_examples=60, deadline=None)
@given(TREE, st.integers(min_value=1, max_value=6), st.integers(min_value=1, max_value=40),
       st.integers(min_value=1, max_value=10))
def test_walk_over_any_names_and_shapes_stays_within_its_limits(tmp_path_factory, tree, depth, cgroups_, workloads):
    root = tmp_path_factory.mktemp("tree")
    w = walk_tree(root, tree, cgroupfs.Limits(max_depth=depth, max_cgroups=cgroups_, max_workloads=workloads))
    assert w.listed <= cgroups_ and len(w.workloads) <= workloads
    for workload, rel, _ in w.workloads:
        assert rel.count(b"/") <= depth and os.path.isdir(os.fsencode(root) + rel)
        for _, value in workload.attributes:
            value.encode("utf-8")
    assert len({wl.path for wl, _, _ in w.workloads}) == len(w.workloads)


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({name: FILE_TEXT for name in (
    "cpuacct/w/cpuacct.usage_user", "cpuacct/w/cpuacct.usage_sys", "memory/w/memory.usage_in_bytes",
    "memory/w/memory.stat", "blkio/w/blkio.throttle.io_service_bytes_recursive",
    "blkio/w/blkio.bfq.io_serviced_recursive")}))
def test_reader_takes_hostile_v1_files_without_raising(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("v1")
    for controller in ("cpuacct", "memory", "blkio"):
        os.makedirs(root / controller / "w")
    for name, text in files.items():
        (root / name).write_text(text, errors="surrogateescape")
    unreadable = []
    reader = cgroupfs.Reader(None, {c: str(root / c) for c in ("cpuacct", "memory", "blkio")},
                             lambda path, error: unreadable.append(os.fsdecode(os.path.basename(path))))
    usage = reader.usage(b"/w")
    assert all(0 <= v < (1 << 64) / 1e9 for v in usage.cpu.values())
    assert all(type(v) is int and 0 <= v < 1 << 64 for v in usage.memory.values())
    assert all(type(v) is int and 0 <= v < 1 << 64 for values in usage.io.values() for v in values)
    assert ("memory.usage_in_bytes" in unreadable) == ("usage" not in usage.memory)
    assert (bool({"cpuacct.usage_user", "cpuacct.usage_sys"} & set(unreadable))) == (not usage.cpu)
    assert reader.pressure(b"/w") == {}
