"""End to end over OTLP/HTTP into a real third-party backend: VictoriaMetrics ingests what the
agent sends to /opentelemetry/v1/metrics, and its PromQL API returns the host's series."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import ROOT, agent_log, base_config, free_port

VM_BIN = os.environ.get("HOSTAGENT_VM_BIN") or os.path.join(ROOT, ".cache", "bin", "victoria-metrics")


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


@pytest.fixture
def victoria_metrics(tmp_path):
    assert os.access(VM_BIN, os.X_OK), f"{VM_BIN} missing: run ./install.sh --dev"
    port = free_port()
    log = open(tmp_path / "vm.log", "w")
    proc = subprocess.Popen([VM_BIN, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={tmp_path / 'vm'}",
                             "-retentionPeriod=1d", "-search.latencyOffset=0s", "-search.disableCache"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(base + "/health") == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "vm.log").read()
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def query(base: str, promql: str) -> list:
    get(base + "/internal/force_flush")
    body = json.loads(get(base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_host_series_arrive_in_victoriametrics(tmp_path, start_agent, victoria_metrics):
    cfg = base_config(tmp_path, exporter={"type": "otlp", "otlp": {
        "protocol": "http/protobuf",
        "metrics_endpoint": victoria_metrics + "/opentelemetry/v1/metrics"}})
    proc = start_agent(cfg)
    host = socket.gethostname()
    selector = f'{{__name__="system.cpu.time", "host.name"="{host}"}}'
    deadline = time.monotonic() + 60
    series = []
    while time.monotonic() < deadline and len(series) < os.cpu_count() * 8:
        assert proc.poll() is None, agent_log(proc)
        series = query(victoria_metrics, selector)
        time.sleep(1)
    # the cpu time of every cpu, in every state
    cpus = {s["metric"]["cpu"] for s in series}
    assert cpus == {f"cpu{i}" for i in range(os.cpu_count())}, series
    assert {s["metric"]["state"] for s in series} >= {"user", "system", "idle"}
    # the received and transmitted bytes of every network interface
    net = query(victoria_metrics, f'{{__name__="system.network.io", "host.name"="{host}"}}')
    assert {(s["metric"]["device"], s["metric"]["direction"]) for s in net} == \
        {(d, dr) for d in os.listdir("/sys/class/net") for dr in ("receive", "transmit")}
    # values are the host's: used + free + buffered + cached is what /proc/meminfo calls MemTotal
    mem = query(victoria_metrics, f'sum(last_over_time({{__name__="system.memory.usage", "host.name"="{host}", '
                                  f'state=~"used|free|buffered|cached"}}[1m]))')
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert abs(float(mem[0]["value"][1]) - total) / total < 0.05
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    assert "export_dropped" not in agent_log(proc) and "export_retry" not in agent_log(proc)
