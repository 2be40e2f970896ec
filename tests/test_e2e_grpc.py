"""End to end over OTLP/gRPC: the agent exports to a real gRPC server (grpcio with the official
opentelemetry-proto servicers); every default hostmetrics metric arrives with the Collector's name,
unit, type and attributes, under the detected host resource."""
import os
import platform
import signal
import socket
import subprocess

import pytest
import yaml

from agent import __version__
from tests import hostmetrics_spec as spec
from tests.helpers import HOSTAGENT, ROOT, agent_log, base_config, clean_env
from tests.otlp_receiver import GrpcReceiver, attributes

HOST_SCRAPERS = ("cpu", "disk", "filesystem", "load", "memory", "network", "paging", "processes", "system")


def has_swap() -> bool:
    return len(open("/proc/swaps").read().splitlines()) > 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory, grpc_receiver_module):
    """What one agent run (two collections, process scraper on for this test's own process) exported."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = base_config(tmp, exporter={"type": "otlp", "otlp": {"endpoint": grpc_receiver_module.endpoint}},
                      scrapers={"process": {"enabled": True, "include": ["python.*"]}})
    (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "agent.log", "w+")
    proc = subprocess.Popen([*HOSTAGENT, "run", "--config", str(tmp / "agent.yaml")], cwd=ROOT,
                            env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    proc.log_file = log
    try:
        ok = grpc_receiver_module.wait_for(
            lambda r: proc.poll() is not None or len({p.time_unix_nano for _, _, m in r.all_metrics() if m.name == "system.cpu.time"
                           for p in m.sum.data_points}) >= 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent_log(proc)
        assert ok, agent_log(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return grpc_receiver_module


@pytest.fixture(scope="module")
def grpc_receiver_module():
    rec = GrpcReceiver().start()
    yield rec
    rec.stop()


def _points(m):
    kind = m.WhichOneof("data")
    return kind, list(getattr(m, kind).data_points)


def check_metric(name: str, s: spec.MetricSpec, metrics: list) -> None:
    assert metrics, f"{name} not exported"
    for m in metrics:
        assert m.unit == s.unit, f"{name}: unit {m.unit!r}, expected {s.unit!r}"
        kind, points = _points(m)
        assert kind == s.instrument, f"{name}: {kind}, expected {s.instrument}"
        if kind == "sum":
            assert m.sum.is_monotonic == s.monotonic, name
            assert m.sum.aggregation_temporality == 2, f"{name}: not cumulative"
        for p in points:
            assert p.WhichOneof("value") == ("as_int" if s.value_type == "int" else "as_double"), name
            attrs = attributes(p)
            assert set(attrs) == {a for a, _ in s.attributes}, f"{name}: attributes {sorted(attrs)}"
            for key, allowed in s.attributes:
                if allowed is not spec.ANY:
                    assert attrs[key] in allowed, f"{name}: {key}={attrs[key]!r} not in {allowed}"
            if kind == "sum":
                assert 0 < p.start_time_unix_nano <= p.time_unix_nano, name


@pytest.mark.parametrize("scraper", HOST_SCRAPERS)
def test_every_default_host_metric(exported, scraper):
    by_name: dict = {}
    for res, _, m in exported.all_metrics():
        by_name.setdefault(m.name, []).append(m)
    for name, s in spec.SCRAPERS[scraper].items():
        if not s.enabled or not s.linux:
            assert name not in by_name, f"optional metric {name} exported without being switched on"
            continue
        if name == "system.paging.usage" and not has_swap():
            continue  # one point per swap device: none on a host without swap
        check_metric(name, s, by_name.get(name, []))


def test_attribute_sets_cover_the_host(exported):
    """Every cpu, both directions of every interface, every state."""
    sets: dict = {}
    for _, _, m in exported.all_metrics():
        for p in _points(m)[1]:
            sets.setdefault(m.name, set()).add(tuple(sorted(attributes(p).items())))
    ncpu = os.cpu_count()
    assert {dict(a)["cpu"] for a in sets["system.cpu.time"]} == {f"cpu{i}" for i in range(ncpu)}
    assert {dict(a)["state"] for a in sets["system.cpu.time"]} == set(spec.CPU_STATE[1])
    devices = set(os.listdir("/sys/class/net"))
    assert {(dict(a)["device"], dict(a)["direction"]) for a in sets["system.network.io"]} == \
        {(d, dr) for d in devices for dr in ("receive", "transmit")}
    assert {dict(a)["state"] for a in sets["system.memory.usage"]} >= {"used", "free", "buffered", "cached"}


def test_process_metrics_one_resource_per_process(exported):
    procs = {}
    for res, _, m in exported.all_metrics():
        if m.name.startswith("process."):
            procs.setdefault(res["process.pid"], (res, set()))[1].add(m.name)
    assert os.getpid() in procs, "the test's own python process was not scraped"
    res, names = procs[os.getpid()]
    assert names == spec.default_metrics("process")
    for key, (typ, required) in spec.PROCESS_RESOURCE_ATTRIBUTES.items():
        if required:
            assert key in res, key
    assert res["process.parent_pid"] == os.getppid()
    assert res["process.executable.name"].startswith("python")
    assert res["host.name"] == socket.gethostname()  # merged onto the host resource


def test_host_resource(exported):
    resources = [res for res, scope, m in exported.all_metrics() if m.name == "system.cpu.time"]
    res = resources[0]
    assert res["service.name"] == "hostagent"
    assert res["service.version"] == __version__
    assert res["host.name"] == socket.gethostname()
    machine_id = open("/etc/machine-id").read().strip() if os.path.exists("/etc/machine-id") else None
    if machine_id:
        assert res["host.id"] == machine_id
    assert res["host.arch"] == {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    assert res["os.type"] == "linux"
    assert res["os.description"]
    assert res["service.instance.id"]
    assert all(r == res for r in resources), "the host resource changed between collections"
