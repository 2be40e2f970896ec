"""The psutil/procfs scrapers against the Collector's definitions and against the kernel.

Shape: every scraper emits exactly the spec's default metrics (tests/hostmetrics_spec.py, written
from the Collector's metadata.yaml), with its units, instruments, value types and attributes;
optional metrics appear only when switched on.
Truth: each value is checked against the kernel's own files, read independently right before and
right after the scrape; a counter must lie between the two readings, a level within them plus a
tolerance the time between reads explains. Synthetic /proc contents pin the field mapping where
the live values cannot (states that are all zero on a quiet host).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pwd
import re
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import agent
from agent import config
from agent.components import ScrapersConfig, build_scrapers
from agent.model import Resource, Temporality
from agent.procfs.identity import RedactionConfig, Redactor
from agent.resource import ResourceConfig, detect, host_arch, os_description
from agent.selfmetrics import SelfMetrics
from agent.sources import host
from agent.sources.host import METRICS, PSEUDO_FILESYSTEMS, TABLE, MetricSwitch, ScraperConfig
from agent.sources.process import ProcessScraper, ProcessScraperConfig
from tests import hostmetrics_spec as spec
from tests.helpers import finishes

RESOURCE = Resource((("service.name", "test"), ("host.name", "test-host")))
HOST_SCRAPERS = ("cpu", "disk", "filesystem", "load", "memory", "network", "paging", "processes", "system")
# not the Collector's (semantic conventions and proposals): tests/test_pressure.py, tests/test_cgroup_usage.py
OWN_SCRAPERS = ("pressure", "cgroups")
HZ = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20


# --- independent readers of the kernel's files ------------------------------------------------

def read(path: str) -> str:
    # Kernel files hold bytes: another process may be named with any of them.
    with open(path, errors="surrogateescape") as f:
        return f.read()


def boot_ns() -> int:
    for line in read("/proc/stat").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) * 10**9
    raise AssertionError("no btime in /proc/stat")


def proc_stat_counters() -> dict:
    return {p[0]: int(p[1]) for p in (line.split() for line in read("/proc/stat").splitlines())
            if len(p) == 2}


def proc_stat_cpus() -> dict:
    """cpuN -> {state: ticks} with the kernel's column meanings (proc(5))."""
    columns = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    out = {}
    for line in read("/proc/stat").splitlines():
        parts = line.split()
        if parts and re.fullmatch(r"cpu\d+", parts[0]):
            out[parts[0]] = dict(zip(columns, map(int, parts[1:9])))
    return out


COLLECTOR_CPU_STATE = {"user": "user", "nice": "nice", "system": "system", "idle": "idle",
                       "wait": "iowait", "interrupt": "irq", "softirq": "softirq", "steal": "steal"}


def meminfo() -> dict:
    out = {}
    for line in read("/proc/meminfo").splitlines():
        name, rest = line.split(":", 1)
        value, *unit = rest.split()
        out[name] = int(value) * (1024 if unit == ["kB"] else 1)
    return out


def collector_memory(m: dict) -> dict:
    """The Collector's Linux memory states (gopsutil: Cached includes SReclaimable)."""
    cached = m["Cached"] + m["SReclaimable"]
    return {"used": m["MemTotal"] - m["MemFree"] - m["Buffers"] - cached, "free": m["MemFree"],
            "buffered": m["Buffers"], "cached": cached, "slab_reclaimable": m["SReclaimable"],
            "slab_unreclaimable": m["SUnreclaim"]}


def diskstats() -> dict:
    out = {}
    for line in read("/proc/diskstats").splitlines():
        f = line.split()
        out[f[2]] = [int(v) for v in f[3:14]]
    return out


def net_sysfs() -> dict:
    """device -> counters from /sys/class/net/<dev>/statistics (the kernel's rtnl_link_stats64)."""
    out = {}
    for dev in os.listdir("/sys/class/net"):
        base = f"/sys/class/net/{dev}/statistics/"
        s = {name: int(read(base + name)) for name in os.listdir(base)}
        # /proc/net/dev (and so the Collector) counts missed packets as dropped on receive
        out[dev] = {("io", "receive"): s["rx_bytes"], ("io", "transmit"): s["tx_bytes"],
                    ("packets", "receive"): s["rx_packets"], ("packets", "transmit"): s["tx_packets"],
                    ("errors", "receive"): s["rx_errors"], ("errors", "transmit"): s["tx_errors"],
                    ("dropped", "receive"): s["rx_dropped"] + s["rx_missed_errors"],
                    ("dropped", "transmit"): s["tx_dropped"]}
    return out


def tcp_states() -> dict:
    names = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT_1", 5: "FIN_WAIT_2",
             6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
    counts = dict.fromkeys(spec.LINUX_TCP_STATES, 0)
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read(path).splitlines()[1:]:
            counts[names[int(line.split()[3], 16)]] += 1
    return counts


def vmstat() -> dict:
    return {k: int(v) for k, v in (line.split() for line in read("/proc/vmstat").splitlines())}


def swaps() -> list:
    return [line.split() for line in read("/proc/swaps").splitlines()[1:] if line.strip()]


def within(value, before, after, slack=0) -> bool:
    return min(before, after) - slack <= value <= max(before, after) + slack


# --- building and collecting ------------------------------------------------------------------

def scraper_config(name: str, metrics=None, all_metrics=False, **fields):
    default = getattr(ScrapersConfig(), name)
    switches = {m: MetricSwitch(True) for m in METRICS[name]} if all_metrics else {}
    switches.update({m: MetricSwitch(on) for m, on in (metrics or {}).items()})
    return dataclasses.replace(default, enabled=True, metrics=switches, **fields)


def build(name: str, metrics=None, all_metrics=False, telemetry=None, **fields):
    """One scraper through the public constructor, every other scraper disabled; it records into
    `telemetry` (default: a registry of its own)."""
    others = {f.name: dataclasses.replace(getattr(ScrapersConfig(), f.name), enabled=False)
              for f in dataclasses.fields(ScrapersConfig)}
    others[name] = scraper_config(name, metrics, all_metrics, **fields)
    [source] = build_scrapers(ScrapersConfig(**others), telemetry or SelfMetrics(), RESOURCE)
    return source


def by_name(groups) -> dict:
    """{metric name: [points]} over all groups (the process scraper has one group per process)."""
    out: dict = {}
    for g in groups:
        for m in g.metrics:
            out.setdefault(m.name, []).extend(m.points)
    return out


def metrics_of(groups) -> dict:
    assert len(groups) == 1
    return {m.name: m for m in groups[0].metrics}


def point(points, **attrs):
    want = tuple(attrs.items())
    found = [p for p in points if all(kv in p.attributes for kv in want)]
    assert len(found) == 1, (attrs, found)
    return found[0].value


def check_shape(metric, scraper: str) -> None:
    s = spec.SCRAPERS[scraper][metric.name]
    assert metric.unit == s.unit, metric.name
    assert metric.kind.value == s.instrument, metric.name
    if s.instrument == "sum":
        assert metric.monotonic is s.monotonic, metric.name
        assert metric.temporality == Temporality.CUMULATIVE, metric.name
    assert metric.points, metric.name
    names = tuple(n for n, _ in s.attributes)
    for p in metric.points:
        assert type(p.value) is (int if s.value_type == "int" else float), (metric.name, p.value)
        assert tuple(k for k, _ in p.attributes) == names, (metric.name, p.attributes)
        for (key, value), (_, allowed) in zip(p.attributes, s.attributes):
            assert isinstance(value, str) and value, (metric.name, key, value)
            assert allowed is spec.ANY or value in allowed, (metric.name, key, value)
    keys = [p.attributes for p in metric.points]
    assert len(keys) == len(set(keys)), f"{metric.name}: duplicate series"


def host_lacks(scraper: str, all_metrics: bool) -> set:
    """Metrics that have no data on this host, which the Collector leaves out too."""
    lacks = set()
    if scraper == "paging" and not swaps():
        lacks |= {"system.paging.usage", "system.paging.utilization"}
    if scraper == "network" and not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_count"):
        lacks |= {"system.network.conntrack.count", "system.network.conntrack.max"}
    if scraper == "memory" and meminfo().get("HugePages_Total", 0) == 0:
        lacks.add("system.memory.linux.hugepages.utilization")
    if scraper == "cpu" and all_metrics:
        if "cpu MHz" not in read("/proc/cpuinfo"):
            lacks.add("system.cpu.frequency")
        if not psutil.cpu_count(logical=False):
            lacks.add("system.cpu.physical.count")
    return lacks


# --- the table against the spec ---------------------------------------------------------------

def test_metric_table_is_the_collectors():
    assert set(METRICS) == set(spec.SCRAPERS) | set(OWN_SCRAPERS)
    for scraper, metrics in spec.SCRAPERS.items():
        assert METRICS[scraper] == {name: s.enabled for name, s in metrics.items()}, scraper
        for d in TABLE[scraper]:
            s = metrics[d.name]
            assert (d.unit, d.kind.value, d.monotonic, d.value_type) == \
                (s.unit, s.instrument, s.monotonic, int if s.value_type == "int" else float), d.name
            assert d.description


def test_config_validation_knows_every_metric():
    on = {"enabled": True}
    cfg = config.build(ScrapersConfig, {"cpu": {"metrics": {"system.cpu.utilization": on}},
                                               "process": {"metrics": {"process.threads": on}}})
    assert cfg.cpu.metrics["system.cpu.utilization"].enabled
    with pytest.raises(config.ConfigError, match="system.cpu.utilisation"):
        config.build(ScrapersConfig, {"cpu": {"metrics": {"system.cpu.utilisation": on}}})


def test_build_scrapers_follows_config():
    names = [s.name for s in build_scrapers(ScrapersConfig(), SelfMetrics(), RESOURCE)]
    assert names == list(HOST_SCRAPERS) + list(OWN_SCRAPERS)  # process is opt-in
    cfg = ScrapersConfig(process=ProcessScraperConfig(enabled=True), cpu=ScraperConfig(enabled=False))
    names = [s.name for s in build_scrapers(cfg, SelfMetrics(), RESOURCE)]
    assert "process" in names and "cpu" not in names
    assert isinstance(build_scrapers(cfg, SelfMetrics(), RESOURCE)[names.index("process")], ProcessScraper)


# --- shape: default and optional metrics --------------------------------------------------------

@pytest.mark.parametrize("scraper", HOST_SCRAPERS)
def test_default_metrics_exactly(scraper):
    source = build(scraper)
    groups = source.collect()
    assert len(groups) == 1
    group = groups[0]
    assert group.resource == RESOURCE
    assert group.scope.name == f"hostagent/scrapers/{scraper}"
    assert group.scope.version == agent.__version__
    names = [m.name for m in group.metrics]
    assert len(names) == len(set(names))
    assert set(names) == spec.default_metrics(scraper) - host_lacks(scraper, False)
    for m in group.metrics:
        check_shape(m, scraper)


@pytest.mark.parametrize("scraper", HOST_SCRAPERS)
def test_optional_metrics_only_when_switched_on(scraper):
    source = build(scraper, all_metrics=True)
    source.collect()  # utilization needs a previous sample
    time.sleep(0.05)
    groups = source.collect()
    linux = {n for n, s in spec.SCRAPERS[scraper].items() if s.linux}
    got = metrics_of(groups)
    assert set(got) == linux - host_lacks(scraper, True)
    for m in got.values():
        check_shape(m, scraper)
    # and a default metric can be switched off
    first_default = sorted(spec.default_metrics(scraper))[0]
    off = build(scraper, metrics={first_default: False}).collect()
    assert first_default not in by_name(off)


@pytest.mark.parametrize("scraper", HOST_SCRAPERS)
def test_cumulative_points_start_at_boot(scraper):
    start = boot_ns()
    before = time.time_ns()
    groups = build(scraper, all_metrics=True).collect()
    after = time.time_ns()
    for m in groups[0].metrics:
        for p in m.points:
            assert p.start_time_ns == start, m.name
            assert before <= p.time_ns <= after, m.name


# --- truth --------------------------------------------------------------------------------------

def test_cpu_time_is_proc_stat():
    source = build("cpu")
    before = proc_stat_cpus()
    points = metrics_of(source.collect())["system.cpu.time"].points
    after = proc_stat_cpus()
    assert {dict(p.attributes)["cpu"] for p in points} == set(before)
    assert len(points) == 8 * len(before)
    for p in points:
        a = dict(p.attributes)
        column = COLLECTOR_CPU_STATE[a["state"]]
        assert before[a["cpu"]][column] / HZ - 1e-9 <= p.value <= after[a["cpu"]][column] / HZ + 1e-9, a


def test_cpu_state_mapping_with_distinct_values(monkeypatch):
    # on a quiet host nice/irq/steal are all 0 and a swapped column would go unnoticed
    stat = ("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 100 200 300 400 500 600 700 800 900 1000\n"
            "cpu1 11 22 33 44 55 66 77 88 0 0\nintr 1 2\nbtime 1\n")
    real = host._read
    monkeypatch.setattr(host, "_read", lambda path: stat if path == "/proc/stat" else real(path))
    points = metrics_of(build("cpu").collect())["system.cpu.time"].points
    assert point(points, cpu="cpu0", state="user") == 100 / HZ
    assert point(points, cpu="cpu0", state="nice") == 200 / HZ
    assert point(points, cpu="cpu0", state="system") == 300 / HZ
    assert point(points, cpu="cpu0", state="idle") == 400 / HZ
    assert point(points, cpu="cpu0", state="wait") == 500 / HZ
    assert point(points, cpu="cpu0", state="interrupt") == 600 / HZ
    assert point(points, cpu="cpu0", state="softirq") == 700 / HZ
    assert point(points, cpu="cpu0", state="steal") == 800 / HZ
    assert point(points, cpu="cpu1", state="steal") == 88 / HZ


def test_cpu_utilization_is_the_share_of_elapsed_ticks():
    source = build("cpu", metrics={"system.cpu.utilization": True})
    first = metrics_of(source.collect())
    assert "system.cpu.utilization" not in first  # no previous sample yet
    before = proc_stat_cpus()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # burn some user time so the shares are not all idle
        sum(range(1000))
    second = metrics_of(source.collect())
    after = proc_stat_cpus()
    util = second["system.cpu.utilization"].points
    for cpu in before:
        shares = {dict(p.attributes)["state"]: p.value for p in util if dict(p.attributes)["cpu"] == cpu}
        assert set(shares) == set(COLLECTOR_CPU_STATE)
        assert all(0.0 <= v <= 1.0 for v in shares.values())
        assert abs(sum(shares.values()) - 1.0) < 1e-9
    busy = sum(p.value for p in util if dict(p.attributes)["state"] in ("user", "system"))
    assert busy > 0, "0.3 s of busy loop left no user/system share"
    assert sum(after[c]["user"] for c in after) > sum(before[c]["user"] for c in before)


def test_cpu_counts_and_frequency():
    source = build("cpu", all_metrics=True)
    m = metrics_of(source.collect())
    assert m["system.cpu.logical.count"].points[0].value == os.cpu_count()
    cpuinfo = read("/proc/cpuinfo")
    cores = set(re.findall(r"physical id\s*:\s*(\d+)[\s\S]*?core id\s*:\s*(\d+)", cpuinfo))
    if cores and "system.cpu.physical.count" in m:
        assert m["system.cpu.physical.count"].points[0].value == len(cores)
    mhz = [float(v) * 1e6 for v in re.findall(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)]
    if mhz:
        freq = {dict(p.attributes)["cpu"]: p.value for p in m["system.cpu.frequency"].points}
        assert set(freq) == {f"cpu{i}" for i in range(len(mhz))}
        for i, hz in enumerate(mhz):
            assert abs(freq[f"cpu{i}"] - hz) <= 0.2 * hz  # the clock may move between reads


def test_memory_is_proc_meminfo():
    source = build("memory", all_metrics=True)
    before = meminfo()
    m = metrics_of(source.collect())
    after = meminfo()
    usage = {dict(p.attributes)["state"]: p.value for p in m["system.memory.usage"].points}
    assert set(usage) == {"used", "free", "buffered", "cached", "slab_reclaimable", "slab_unreclaimable"}
    b, a = collector_memory(before), collector_memory(after)
    for state, value in usage.items():
        assert within(value, b[state], a[state], 4 * MiB), (state, value, b[state], a[state])
    total = before["MemTotal"]
    assert usage["used"] + usage["free"] + usage["buffered"] + usage["cached"] == total
    assert m["system.memory.limit"].points[0].value == total
    for p in m["system.memory.utilization"].points:
        assert p.value == usage[dict(p.attributes)["state"]] / total
    assert m["system.memory.page_size"].points[0].value == os.sysconf("SC_PAGE_SIZE")
    for name, field, slack in (("system.linux.memory.available", "MemAvailable", 4 * MiB),
                               ("system.linux.memory.dirty", "Dirty", 16 * MiB),
                               ("system.memory.linux.shared", "Shmem", 4 * MiB)):
        assert within(m[name].points[0].value, before[field], after[field], slack), name
    assert m["system.memory.linux.hugepages.limit"].points[0].value == before["HugePages_Total"]
    assert m["system.memory.linux.hugepages.page_size"].points[0].value == before["Hugepagesize"]
    hp = {dict(p.attributes)["system.memory.linux.hugepages.state"]: p.value
          for p in m["system.memory.linux.hugepages.usage"].points}
    assert hp == {"free": before["HugePages_Free"],
                  "used": before["HugePages_Total"] - before["HugePages_Free"]}


def test_memory_state_mapping_with_distinct_values(monkeypatch):
    text = ("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 600 kB\nBuffers: 20 kB\nCached: 300 kB\n"
            "Shmem: 7 kB\nSReclaimable: 40 kB\nSUnreclaim: 30 kB\nDirty: 5 kB\nHugePages_Total: 10\n"
            "HugePages_Free: 4\nHugePages_Rsvd: 1\nHugePages_Surp: 2\nHugepagesize: 2048 kB\n")
    real = host._read
    monkeypatch.setattr(host, "_read", lambda path: text if path == "/proc/meminfo" else real(path))
    m = metrics_of(build("memory", all_metrics=True).collect())
    usage = {dict(p.attributes)["state"]: p.value for p in m["system.memory.usage"].points}
    assert usage == {"used": (1000 - 100 - 20 - 340) * 1024, "free": 100 * 1024, "buffered": 20 * 1024,
                     "cached": 340 * 1024, "slab_reclaimable": 40 * 1024, "slab_unreclaimable": 30 * 1024}
    assert m["system.linux.memory.available"].points[0].value == 600 * 1024
    assert m["system.linux.memory.dirty"].points[0].value == 5 * 1024
    assert m["system.memory.linux.shared"].points[0].value == 7 * 1024
    assert m["system.memory.linux.hugepages.reserved"].points[0].value == 1
    assert m["system.memory.linux.hugepages.surplus"].points[0].value == 2
    util = {dict(p.attributes)["system.memory.linux.hugepages.state"]: p.value
            for p in m["system.memory.linux.hugepages.utilization"].points}
    assert util == {"used": 0.6, "free": 0.4}


def root_statvfs() -> dict:
    st = os.statvfs("/")
    return {"used": (st.f_blocks - st.f_bfree) * st.f_frsize, "free": st.f_bavail * st.f_frsize,
            "reserved": (st.f_bfree - st.f_bavail) * st.f_frsize,
            "inodes used": st.f_files - st.f_ffree, "inodes free": st.f_ffree,
            "total": st.f_blocks * st.f_frsize}


def test_filesystem_is_statvfs():
    source = build("filesystem", all_metrics=True)
    before = root_statvfs()
    m = metrics_of(source.collect())
    after = root_statvfs()
    usage = [p for p in m["system.filesystem.usage"].points if dict(p.attributes)["mountpoint"] == "/"]
    values = {dict(p.attributes)["state"]: p.value for p in usage}
    for state in ("used", "free", "reserved"):
        assert within(values[state], before[state], after[state], MiB), state
    assert sum(values.values()) == before["total"]
    inodes = {dict(p.attributes)["state"]: p.value for p in m["system.filesystem.inodes.usage"].points
              if dict(p.attributes)["mountpoint"] == "/"}
    assert within(inodes["used"], before["inodes used"], after["inodes used"], 64)
    assert within(inodes["free"], before["inodes free"], after["inodes free"], 64)
    [util] = [p.value for p in m["system.filesystem.utilization"].points
              if dict(p.attributes)["mountpoint"] == "/"]
    assert util == values["used"] / (values["used"] + values["free"])
    # device, type and mode of / as the kernel lists its mounts (the last mount on / is the visible one)
    mounts = [line.split() for line in read("/proc/self/mounts").splitlines()]
    device, _, fstype, opts = [mt for mt in mounts if mt[1] == "/"][-1][:4]
    attrs = dict(usage[0].attributes)
    assert (attrs["device"], attrs["type"]) == (device, fstype)
    assert attrs["mode"] == ("rw" if "rw" in opts.split(",") else "ro")
    # pseudo filesystems are left out, each mount point appears once
    types = {dict(p.attributes)["type"] for p in m["system.filesystem.usage"].points}
    assert not types & set(PSEUDO_FILESYSTEMS)
    usage_points = m["system.filesystem.usage"].points
    per_mount = collections.Counter(dict(p.attributes)["mountpoint"] for p in usage_points)
    assert set(per_mount.values()) == {3}


def test_filesystem_skips_a_mount_it_cannot_stat(monkeypatch, caplog):
    real = os.statvfs

    def statvfs(path):
        if path == "/":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with caplog.at_level(logging.WARNING, logger="hostagent.sources.host"):
        m = metrics_of(build("filesystem").collect())
    mounts = {dict(p.attributes)["mountpoint"] for p in m["system.filesystem.usage"].points}
    assert "/" not in mounts and mounts  # the others are still there
    assert any("statvfs /" in r.getMessage() for r in caplog.records)


def test_filesystem_a_hung_network_mount_costs_one_timeout(monkeypatch):
    release = threading.Event()
    real = os.statvfs
    calls = []

    def statvfs(path):
        if path == "/mnt/nfs":
            calls.append(path)
            release.wait(3600)
        return real("/")

    monkeypatch.setattr(host, "read_mounts", lambda path: [("server:/export", "/mnt/nfs", "nfs4", "rw,relatime")])
    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(host, "STAT_TIMEOUT_S", 0.1)
    source = build("filesystem")
    try:
        assert finishes(source.collect) == []  # the server hangs for an hour: given up on
        assert finishes(source.collect) == []  # still blocked: skipped, no second thread
        assert calls == ["/mnt/nfs"]
    finally:
        release.set()

    def back_once_the_server_answers():
        while not by_name(source.collect()).get("system.filesystem.usage"):
            time.sleep(0.05)
    finishes(back_once_the_server_answers)


def test_network_counters_are_the_kernels():
    # some loopback traffic, so lo has counters to compare
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"x" * 1000, rx.getsockname())
        rx.recv(2000)
    source = build("network")
    before = net_sysfs()
    m = metrics_of(source.collect())
    after = net_sysfs()
    seen = set()
    for kind in ("io", "packets", "errors", "dropped"):
        for p in m[f"system.network.{kind}"].points:
            a = dict(p.attributes)
            key = (kind, a["direction"])
            assert before[a["device"]][key] <= p.value <= after[a["device"]][key], (a, kind, p.value)
            seen.add(a["device"])
    assert seen == set(before)
    assert point(m["system.network.io"].points, device="lo", direction="receive") >= 1000


def test_network_connections_are_the_kernels():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            source = build("network")
            before = tcp_states()
            m = metrics_of(source.collect())
            after = tcp_states()
        finally:
            client.close()
            server.close()
    counts = {dict(p.attributes)["state"]: p.value for p in m["system.network.connections"].points}
    assert set(counts) == set(spec.LINUX_TCP_STATES)
    assert all(dict(p.attributes)["protocol"] == "tcp" for p in m["system.network.connections"].points)
    for state, value in counts.items():
        assert within(value, before[state], after[state], 2), (state, value, before[state], after[state])
    assert counts["LISTEN"] >= 1 and counts["ESTABLISHED"] >= 2
    assert counts["DELETE"] == 0


def test_network_connections_without_netlink(monkeypatch):
    def no_netlink():
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(host, "tcp_states_netlink", no_netlink)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        before = tcp_states()
        m = metrics_of(build("network").collect())
        after = tcp_states()
    counts = {dict(p.attributes)["state"]: p.value for p in m["system.network.connections"].points}
    assert within(counts["LISTEN"], before["LISTEN"], after["LISTEN"])
    assert counts["LISTEN"] >= 1


def test_tcp_state_names_with_every_kernel_state(monkeypatch):
    # one line per socket: state 0x01 once, 0x02 twice, ... 0x0C twelve times
    rows = [f"{i}: 0100007F:1F90 0100007F:C350 {state:02X} 00000000:00000000 00:00000000 00000000 0 0 1"
            for state in range(1, 13) for i in range(state)]
    text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    tables = {"/proc/net/tcp": text + "\n".join(rows) + "\n", "/proc/net/tcp6": text}
    real = host._read
    monkeypatch.setattr(host, "_read", lambda path: tables.get(path) or real(path))
    monkeypatch.setattr(host, "tcp_states_netlink", lambda: (_ for _ in ()).throw(OSError(93, "no")))
    m = metrics_of(build("network").collect())
    counts = {dict(p.attributes)["state"]: p.value for p in m["system.network.connections"].points}
    assert counts == {"ESTABLISHED": 1, "SYN_SENT": 2, "SYN_RECV": 3 + 12, "FIN_WAIT_1": 4, "FIN_WAIT_2": 5,
                      "TIME_WAIT": 6, "CLOSE": 7, "CLOSE_WAIT": 8, "LAST_ACK": 9, "LISTEN": 10, "CLOSING": 11,
                      "DELETE": 0}


def test_network_conntrack():
    path = "/proc/sys/net/netfilter/nf_conntrack_"
    if not os.path.exists(path + "count"):
        pytest.skip("no conntrack on this host")
    before = int(read(path + "count"))
    m = metrics_of(build("network", all_metrics=True).collect())
    after = int(read(path + "count"))
    assert within(m["system.network.conntrack.count"].points[0].value, before, after, 8)
    assert m["system.network.conntrack.max"].points[0].value == int(read(path + "max"))


def test_disk_is_proc_diskstats():
    with open("/tmp/.hostagent-disk-test", "wb") as f:  # some I/O to count
        f.write(os.urandom(1 << 16))
        f.flush()
        os.fsync(f.fileno())
    os.unlink("/tmp/.hostagent-disk-test")
    source = build("disk")
    before = diskstats()
    m = metrics_of(source.collect())
    after = diskstats()
    # column index in /proc/diskstats after the name, and the scale the Collector applies
    read_cols = {"system.disk.io": (2, 512), "system.disk.operations": (0, 1),
                 "system.disk.operation_time": (3, 1e-3), "system.disk.merged": (1, 1)}
    write_cols = {"system.disk.io": (6, 512), "system.disk.operations": (4, 1),
                  "system.disk.operation_time": (7, 1e-3), "system.disk.merged": (5, 1)}
    device_cols = {"system.disk.io_time": (9, 1e-3), "system.disk.weighted_io_time": (10, 1e-3)}
    for name, metric in m.items():
        for p in metric.points:
            a = dict(p.attributes)
            b, e = before[a["device"]], after[a["device"]]
            if name == "system.disk.pending_operations":
                assert within(p.value, b[8], e[8], 4)
                continue
            col, scale = (read_cols if a.get("direction") == "read" else write_cols).get(name) \
                if "direction" in a else device_cols[name]
            assert b[col] * scale - 1e-9 <= p.value <= e[col] * scale + 1e-9, (name, a, p.value)
    assert {dict(p.attributes)["device"] for p in m["system.disk.io"].points} == set(before)


def test_load_is_proc_loadavg():
    before = [float(v) for v in read("/proc/loadavg").split()[:3]]
    m = metrics_of(build("load").collect())
    after = [float(v) for v in read("/proc/loadavg").split()[:3]]
    for i, name in enumerate(("1m", "5m", "15m")):
        assert within(m[f"system.cpu.load_average.{name}"].points[0].value, before[i], after[i], 0.011)


def test_uptime_is_proc_uptime():
    before = float(read("/proc/uptime").split()[0])
    m = metrics_of(build("system").collect())
    after = float(read("/proc/uptime").split()[0])
    assert before <= m["system.uptime"].points[0].value <= after


def test_paging_is_proc_vmstat_and_swaps():
    source = build("paging", all_metrics=True)
    before = vmstat()
    m = metrics_of(source.collect())
    after = vmstat()
    ops = m["system.paging.operations"].points
    for field, direction, kind in (("pswpin", "page_in", "major"), ("pswpout", "page_out", "major"),
                                   ("pgpgin", "page_in", "minor"), ("pgpgout", "page_out", "minor")):
        assert before[field] <= point(ops, direction=direction, type=kind) <= after[field], field
    faults = m["system.paging.faults"].points
    assert before["pgmajfault"] <= point(faults, type="major") <= after["pgmajfault"]
    assert before["pgfault"] - after["pgmajfault"] <= point(faults, type="minor") <= \
        after["pgfault"] - before["pgmajfault"]
    for device, _, size, used, _ in swaps():
        assert point(m["system.paging.usage"].points, device=device, state="used") == int(used) * 1024
        free = (int(size) - int(used)) * 1024
        assert point(m["system.paging.usage"].points, device=device, state="free") == free


def test_paging_usage_with_swap_devices(monkeypatch):
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/dm-1                               partition\t1000\t\t250\t\t-2\n"
            "/swapfile                               file\t\t400\t\t0\t\t-3\n")
    real = host._read
    monkeypatch.setattr(host, "_read", lambda path: text if path == "/proc/swaps" else real(path))
    m = metrics_of(build("paging", all_metrics=True).collect())
    usage = m["system.paging.usage"].points
    assert point(usage, device="/dev/dm-1", state="used") == 250 * 1024
    assert point(usage, device="/dev/dm-1", state="free") == 750 * 1024
    assert point(usage, device="/swapfile", state="free") == 400 * 1024
    assert point(m["system.paging.utilization"].points, device="/dev/dm-1", state="used") == 0.25


def test_processes_are_proc():
    source = build("processes")
    before = proc_stat_counters()
    letters_before = process_letters()
    m = metrics_of(source.collect())
    letters_after = process_letters()
    after = proc_stat_counters()
    assert before["processes"] <= m["system.processes.created"].points[0].value <= after["processes"]
    counts = {dict(p.attributes)["status"]: p.value for p in m["system.processes.count"].points}
    assert within(counts["running"], before["procs_running"], after["procs_running"], 2)
    assert within(counts["blocked"], before["procs_blocked"], after["procs_blocked"], 2)
    sleeping = (letters_before.count("S"), letters_after.count("S"))
    assert within(counts.get("sleeping", 0), *sleeping, 3)
    assert within(counts.get("idle", 0), letters_before.count("I"), letters_after.count("I"), 3)


def test_processes_running_blocked_created_are_the_kernel_counters(monkeypatch):
    real = host._read
    stat = ("cpu  1 2 3 4 5 6 7 8\ncpu0 1 2 3 4 5 6 7 8\nbtime 1\nprocesses 123456\n"
            "procs_running 42\nprocs_blocked 7\n")
    monkeypatch.setattr(host, "_read", lambda path: stat if path == "/proc/stat" else real(path))
    m = metrics_of(build("processes").collect())
    counts = {dict(p.attributes)["status"]: p.value for p in m["system.processes.count"].points}
    assert (counts["running"], counts["blocked"]) == (42, 7)
    assert m["system.processes.created"].points[0].value == 123456


def process_letters() -> list:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            data = read(f"/proc/{pid}/stat")
        except OSError:
            continue
        out.append(data[data.rindex(")") + 2])
    return out


def test_processes_status_mapping_with_a_stopped_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        os.kill(child.pid, 19)  # SIGSTOP
        for _ in range(100):
            if read(f"/proc/{child.pid}/stat").rsplit(")", 1)[1].split()[0] == "T":
                break
            time.sleep(0.01)
        counts = {dict(p.attributes)["status"]: p.value
                  for p in metrics_of(build("processes").collect())["system.processes.count"].points}
        assert counts.get("stopped", 0) >= 1
    finally:
        child.kill()
        child.wait()


# --- include / exclude --------------------------------------------------------------------------

def devices(groups, metric) -> set:
    return {dict(p.attributes)["device"] for p in by_name(groups).get(metric, [])}


def test_disk_include_exclude():
    names = list(diskstats())
    assert devices(build("disk", include=(re.escape(names[0]),)).collect(), "system.disk.io") == {names[0]}
    rest = devices(build("disk", exclude=(r"loop\d+",)).collect(), "system.disk.io")
    assert rest == {n for n in names if not re.fullmatch(r"loop\d+", n)}
    # patterns match the whole name: "vd" alone matches nothing
    assert build("disk", include=("vd", "loo")).collect() == []


def test_network_include_exclude():
    assert devices(build("network", include=("lo",)).collect(), "system.network.io") == {"lo"}
    assert "lo" not in devices(build("network", exclude=("lo",)).collect(), "system.network.io")
    # connections are host-wide: not filtered by device
    assert by_name(build("network", include=("nothing",)).collect())["system.network.connections"]


def test_filesystem_include_exclude():
    groups = build("filesystem", include=("/",)).collect()
    assert {dict(p.attributes)["mountpoint"] for p in by_name(groups)["system.filesystem.usage"]} == {"/"}
    groups = build("filesystem", exclude=("/.*",)).collect()
    assert groups == []
    groups = build("filesystem", exclude_fs_types=PSEUDO_FILESYSTEMS + ("ext4", "tmpfs"))
    types = {dict(p.attributes)["type"] for p in by_name(groups.collect()).get("system.filesystem.usage", [])}
    assert not types & {"ext4", "tmpfs"}


# --- host errors never raise ---------------------------------------------------------------------

def test_unreadable_proc_files_are_logged_once_and_skipped(monkeypatch, caplog):
    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(host, "_read", denied)
    def gone(**kw):
        raise FileNotFoundError(2, "No such file or directory", "/proc/net/dev")

    monkeypatch.setattr(psutil, "net_io_counters", gone)
    telemetry = SelfMetrics()
    sources = [build(name, all_metrics=True, telemetry=telemetry) for name in HOST_SCRAPERS]
    errors = telemetry.counter("hostagent.scraper.errors", "{error}", "")
    before = errors.total()
    with caplog.at_level(logging.DEBUG, logger="hostagent.sources.host"):
        for s in sources:
            s.collect()
        first = [r for r in caplog.records if r.levelno == logging.WARNING]
        caplog.clear()
        for s in sources:
            s.collect()
        second = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert first and not second
    assert {m for r in first for m in re.findall(r"scraper=(\w+)", r.getMessage())} >= \
        {"cpu", "memory", "network", "paging", "processes", "system"}
    assert errors.total() > before


def test_a_missing_proc_file_skips_only_that_part(monkeypatch):
    real = host._read

    def no_vmstat(path):
        if path == "/proc/vmstat":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real(path)

    monkeypatch.setattr(host, "_read", no_vmstat)
    m = by_name(build("paging", all_metrics=True).collect())
    assert "system.paging.operations" not in m and "system.paging.faults" not in m


# --- performance ---------------------------------------------------------------------------------

def test_full_default_scrape_is_fast():
    sources = build_scrapers(ScrapersConfig(), SelfMetrics(), RESOURCE)
    for s in sources:
        s.collect()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for s in sources:
            s.collect()
        times.append(time.perf_counter() - t)
    assert sorted(times)[3] < 0.050, f"median full scrape {sorted(times)[3] * 1000:.1f} ms"


# --- the process scraper -------------------------------------------------------------------------

def proc_self() -> dict:
    fields = read(f"/proc/{os.getpid()}/stat").rsplit(")", 1)[1].split()
    statm = read(f"/proc/{os.getpid()}/statm").split()
    io = {k: int(v) for k, v in (line.split(": ") for line in read(f"/proc/{os.getpid()}/io").splitlines())}
    page = os.sysconf("SC_PAGE_SIZE")
    # fields[0] is the state (field 3 in proc(5)): utime is field 14, stime 15, starttime 22
    return {"user": int(fields[11]) / HZ, "system": int(fields[12]) / HZ, "start": int(fields[19]),
            "vms": int(statm[0]) * page, "rss": int(statm[1]) * page,
            "read": io["read_bytes"], "write": io["write_bytes"]}


def own_group(groups):
    [group] = [g for g in groups if dict(g.resource.attributes)["process.pid"] == os.getpid()]
    return group


def test_process_own_metrics_are_proc_pid():
    source = build("process")
    before = proc_self()
    groups = source.collect()
    after = proc_self()
    group = own_group(groups)
    assert group.scope.name == "hostagent/scrapers/process"
    m = {x.name: x for x in group.metrics}
    assert set(m) == spec.default_metrics("process")
    for x in group.metrics:
        check_shape(x, "process")
    cpu = {dict(p.attributes)["state"]: p.value for p in m["process.cpu.time"].points}
    assert before["user"] <= cpu["user"] <= after["user"]
    assert before["system"] <= cpu["system"] <= after["system"]
    assert within(m["process.memory.usage"].points[0].value, before["rss"], after["rss"], 2 * MiB)
    assert within(m["process.memory.virtual"].points[0].value, before["vms"], after["vms"], 8 * MiB)
    io = {dict(p.attributes)["direction"]: p.value for p in m["process.disk.io"].points}
    assert before["read"] <= io["read"] <= after["read"]
    assert before["write"] <= io["write"] <= after["write"]
    start = boot_ns() + before["start"] * 10**9 // HZ
    for x in group.metrics:
        for p in x.points:
            assert abs(p.start_time_ns - start) < 10**6, x.name  # the process's create time


def test_process_resource_is_the_process():
    group = own_group(build("process").collect())
    attrs = dict(group.resource.attributes)
    assert attrs["service.name"] == "test" and attrs["host.name"] == "test-host"  # merged on the host
    argv = read(f"/proc/{os.getpid()}/cmdline").rstrip("\0").split("\0")
    assert attrs["process.pid"] == os.getpid()
    assert attrs["process.parent_pid"] == os.getppid()
    assert attrs["process.executable.path"] == os.readlink(f"/proc/{os.getpid()}/exe")
    assert attrs["process.executable.name"].startswith(read(f"/proc/{os.getpid()}/comm").strip())
    assert attrs["process.command"] == argv[0]
    assert attrs["process.command_line"] == Redactor(RedactionConfig())(argv)
    assert attrs["process.owner"] == pwd.getpwuid(os.getuid()).pw_name
    for key, (value_type, enabled) in spec.PROCESS_RESOURCE_ATTRIBUTES.items():
        assert (key in attrs) is enabled, key
        if enabled:
            assert type(attrs[key]) is (int if value_type == "int" else str), key


def test_process_optional_metrics():
    source = build("process", all_metrics=True)
    source.collect()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        sum(range(1000))
    before_fds = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    before_threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    group = own_group(source.collect())
    after_fds = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    after_threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    m = {x.name: x for x in group.metrics}
    linux = {n for n, s in spec.SCRAPERS["process"].items() if s.linux}
    assert set(m) == linux
    for x in group.metrics:
        check_shape(x, "process")
    util = {dict(p.attributes)["state"]: p.value for p in m["process.cpu.utilization"].points}
    assert 0 < util["user"] + util["system"] <= 1.0
    # threads of earlier tests' libraries (grpc) may still be ending while we look
    assert within(m["process.threads"].points[0].value, before_threads, after_threads, 0)
    assert within(m["process.open_file_descriptors"].points[0].value, before_fds, after_fds, 1)
    assert m["process.memory.utilization"].points[0].value == \
        m["process.memory.usage"].points[0].value / meminfo()["MemTotal"]
    uptime = m["process.uptime"].points[0]
    assert abs(uptime.value - (uptime.time_ns - uptime.start_time_ns) / 1e9) < 1e-3
    faults = {dict(p.attributes)["type"]: p.value for p in m["process.paging.faults"].points}
    fields = read(f"/proc/{os.getpid()}/stat").rsplit(")", 1)[1].split()
    assert 0 < faults["minor"] <= int(fields[7]) and faults["major"] <= int(fields[9])


def test_process_command_line_is_redacted():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--password", "hunter2",
                              "--token=abc123", "https://bob:pw123@example.com/db", "AWS_SECRET_KEY=xyz789"])
    try:
        time.sleep(0.1)
        groups = build("process").collect()
        [group] = [g for g in groups if dict(g.resource.attributes)["process.pid"] == child.pid]
        line = dict(group.resource.attributes)["process.command_line"]
        for secret in ("hunter2", "abc123", "pw123", "xyz789"):
            assert secret not in line
        assert "--password ***" in line and "--token=***" in line and "bob:***@example.com" in line
    finally:
        child.kill()
        child.wait()


def test_process_include_exclude_by_executable_name():
    name = psutil.Process().name()
    groups = build("process", include=(re.escape(name),)).collect()
    assert groups and {dict(g.resource.attributes)["process.executable.name"] for g in groups} == {name}
    assert build("process", exclude=(".*",)).collect() == []
    assert build("process", include=(re.escape(name[:-1]),)).collect() == []  # a full match only


CpuTimes = collections.namedtuple("CpuTimes", "user system children_user children_system iowait")
Memory = collections.namedtuple("Memory", "rss vms")
Io = collections.namedtuple("Io", "read_count write_count read_bytes write_bytes")


class FakeProcess:
    """Enough of psutil.Process for the scraper, with chosen fields failing."""

    def __init__(self, pid, name, fail=None, cmdline=("/usr/bin/fake", "--flag"), exe="/usr/bin/fake"):
        self.pid, self._name, self._fail, self._cmdline, self._exe = pid, name, fail or {}, list(cmdline), exe

    def oneshot(self):
        return contextlib.nullcontext()

    def _value(self, field, value):
        if field in self._fail:
            raise self._fail[field]
        return value

    def name(self):
        return self._value("name", self._name)

    def cmdline(self):
        return self._value("cmdline", self._cmdline)

    def exe(self):
        return self._value("exe", self._exe)

    def create_time(self):
        return self._value("create_time", time.time() - 10)

    def ppid(self):
        return self._value("ppid", 1)

    def username(self):
        return self._value("username", "nobody")

    def cpu_times(self):
        return self._value("cpu_times", CpuTimes(1.0, 2.0, 0.0, 0.0, 0.5))

    def memory_info(self):
        return self._value("memory_info", Memory(100, 200))

    def io_counters(self):
        return self._value("io_counters", Io(1, 2, 3, 4))


def test_process_vanishing_or_denied_fields(monkeypatch):
    procs = [
        FakeProcess(101, "gone", {"cpu_times": psutil.NoSuchProcess(101)}),
        FakeProcess(102, "private", {"exe": psutil.AccessDenied(102), "username": psutil.AccessDenied(102),
                                     "io_counters": psutil.AccessDenied(102)}),
        FakeProcess(103, "kthread", cmdline=(), exe=""),
        FakeProcess(104, "zombie", {"cmdline": psutil.ZombieProcess(104)}),
        FakeProcess(105, "fine"),
    ]
    telemetry = SelfMetrics()
    source = build("process", telemetry=telemetry)
    monkeypatch.setattr(source, "processes", lambda: iter(procs))
    vanished = telemetry.counter("hostagent.scraper.process.vanished", "{process}", "")
    before = vanished.total()
    groups = {dict(g.resource.attributes)["process.pid"]: g for g in source.collect()}
    assert set(groups) == {102, 105}
    assert vanished.total() == before + 1
    private = dict(groups[102].resource.attributes)
    assert "process.executable.path" not in private and "process.owner" not in private
    assert private["process.command_line"] == "/usr/bin/fake --flag"
    assert {m.name for m in groups[102].metrics} == {"process.cpu.time", "process.memory.usage",
                                                     "process.memory.virtual"}
    assert {m.name for m in groups[105].metrics} == spec.default_metrics("process")
    cpu = {dict(p.attributes)["state"]: p.value for m in groups[105].metrics if m.name == "process.cpu.time"
           for p in m.points}
    assert cpu == {"user": 1.0, "system": 2.0, "wait": 0.5}


REDACTION_CASES = [
    (["app", "--password", "hunter2"], "app --password ***"),
    (["app", "--password=hunter2", "-v"], "app --password=*** -v"),
    (["app", "--token", "t0k", "--port", "80"], "app --token *** --port 80"),
    (["app", "--token=t0k"], "app --token=***"),
    (["curl", "https://api.example.com/v1?token=t0k&page=2"],
     "curl https://api.example.com/v1?token=***&page=2"),
    (["app", "secret=s3cr3t"], "app secret=***"),
    (["app", "--client-secret", "s3cr3t"], "app --client-secret ***"),
    (["/usr/bin/mysql", "-uroot", "-phunter2", "db"], "/usr/bin/mysql -uroot -p*** db"),
    (["mysql", "-u", "root", "-p", "--database", "db"], "mysql -u root -p --database db"),  # -p prompts
    (["mysql", "-u", "root", "-p", "db"], "mysql -u root -p ***"),  # maybe prompting: hidden all the same
    (["redis-cli", "-a", "s3cr3t", "ping"], "redis-cli -a *** ping"),
    (["sshpass", "-pS3cret", "ssh", "host"], "sshpass -p*** ssh host"),
    (["mysqldump", "--password=x", "db"], "mysqldump --password=*** db"),
    (["grep", "-phunter2"], "grep -phunter2"),  # -p means a password only for mysql-style clients
    (["env", "AWS_SECRET_ACCESS_KEY=abc", "API_KEY=def", "AWS_ACCESS_KEY_ID=AKIA", "APP_SECRET=ghi"],
     "env AWS_SECRET_ACCESS_KEY=*** API_KEY=*** AWS_ACCESS_KEY_ID=*** APP_SECRET=***"),
    (["psql", "postgres://bob:pw123@db:5432/app"], "psql postgres://bob:***@db:5432/app"),
    (["redis-cli", "-u", "redis://:pw@cache:6379"], "redis-cli -u redis://:***@cache:6379"),
    (["git", "clone", "https://github.com/org/repo.git"], "git clone https://github.com/org/repo.git"),
    (["curl", "-H", "Authorization: Bearer eyJhbGci"], "curl -H Authorization: Bearer ***"),
    (["app", "--password"], "app --password"),
    (["app", "--password", "--verbose"], "app --password --verbose"),
    (["sh", "-c", "DB_PASSWORD=x ./run --size=10"], "sh -c DB_PASSWORD=*** ./run --size=10"),
    (["nginx", "-g", "daemon off;"], "nginx -g daemon off;"),
    ([], ""),
]


@pytest.mark.parametrize("argv, expected", REDACTION_CASES)
def test_redact_command_line(argv, expected):
    assert Redactor(RedactionConfig())(argv) == expected


# --- resource detection --------------------------------------------------------------------------

def test_resource_detection():
    cfg = ResourceConfig(service_name="svc", attributes={"host.name": "override", "team": "a"})
    first = dict(detect(cfg).attributes)
    assert first == dict(detect(cfg).attributes)  # stable, service.instance.id included
    assert first["service.name"] == "svc" and first["service.version"] == agent.__version__
    assert first["host.name"] == "override" and first["team"] == "a"  # config wins
    mid = read("/etc/machine-id").strip() if os.path.exists("/etc/machine-id") else None
    if mid:
        assert first["host.id"] == mid
    import uuid
    assert uuid.UUID(first["service.instance.id"]).version == 5
    assert dict(detect(ResourceConfig()).attributes)["host.name"] == socket.gethostname()
    assert first["os.type"] == "linux"
    assert first["host.arch"] == host_arch(os.uname().machine)
    assert os.uname().release in first["os.description"]


def test_host_arch_values():
    assert [host_arch(m) for m in ("x86_64", "aarch64", "armv7l", "i686", "ppc64le", "s390x", "riscv64")] == \
        ["amd64", "arm64", "arm32", "x86", "ppc64", "s390x", "riscv64"]


def test_os_description_like_the_sdk():
    uname = os.uname_result(("Linux", "vm", "6.1.0", "#1 SMP", "x86_64"))
    release = {"NAME": "Debian GNU/Linux", "VERSION": "12 (bookworm)", "PRETTY_NAME": "x"}
    assert os_description(release, uname) == "Debian GNU/Linux 12 (bookworm) (Linux vm 6.1.0 #1 SMP x86_64)"
    assert os_description({"PRETTY_NAME": "Arch Linux"}, uname) == "Arch Linux (Linux vm 6.1.0 #1 SMP x86_64)"
    assert os_description({}, uname) == "Linux vm 6.1.0 #1 SMP x86_64"


def test_metrics_document_lists_every_metric_with_unit_and_default():
    import os
    import re
    from agent.sources.host import TABLE
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")).read()
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^\| `([a-z0-9_.]+)` \| [^|]* \| `([^`]*)` \| [^|]* \| (on|off) \|", doc, re.M)}
    table = {d.name: (d.unit, "on" if d.enabled else "off") for defs in TABLE.values() for d in defs}
    assert rows == table


def test_filesystem_scraper_reports_the_hosts_mounts_from_a_private_namespace(tmp_path):
    """Run as a sandboxed unit is (own mount namespace, everything remounted read-only, a private
    tmpfs), the scraper still reports the host's filesystems as the host sees them."""
    import json
    import subprocess
    import sys
    private = tmp_path / "private"
    private.mkdir()
    # PID 1 of this machine may be out of reach; a process of ours stands in for the host's
    host_process = subprocess.Popen(["sleep", "60"])
    script = f"""
import json, subprocess
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", {str(private)!r}], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", "/"], check=True)
from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources import host
from agent.sources.host import FilesystemScraper, FilesystemScraperConfig
host.HOST_PID = {host_process.pid}
out = {{}}
for g in FilesystemScraper(FilesystemScraperConfig(exclude_fs_types=()), SelfMetrics(), Resource(())).collect():
    for m in g.metrics:
        for p in m.points:
            a = dict(p.attributes)
            out[a["mountpoint"]] = a["mode"]
print(json.dumps(out))
"""
    try:
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             capture_output=True, text=True, timeout=60)
    finally:
        host_process.kill()
        host_process.wait()
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert str(private) not in seen  # the sandbox's private mount is not the host's
    host_root_mode = next(opts for _, mp, _, opts in
                          (line.split()[:4] for line in open("/proc/self/mounts")) if mp == "/")
    assert seen["/"] == ("rw" if "rw" in host_root_mode.split(",") else "ro")
