"""Daemon behaviour: systemd notify, health endpoint, SIGHUP reload (a bad config keeps the old one,
a good one takes effect without losing queued data), structured logs."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

from tests.helpers import ROOT, agent_log, base_config, clean_env


def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    return sock


def health_address(proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"health_endpoint address=(\S+)", agent_log(proc))
        if m:
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(agent_log(proc))


def resource_values(receiver, key):
    return {res.get(key) for res, _, _ in receiver.all_metrics()}


def test_notify_health_reload_and_stop(tmp_path, start_agent, grpc_receiver):
    sock = notify_socket(tmp_path)
    cfg = base_config(tmp_path, exporter={"type": "otlp", "otlp": {"endpoint": grpc_receiver.endpoint}},
                      resource={"attributes": {"generation": "one"}})
    env = clean_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="2000000")
    proc = start_agent(cfg, env=env)
    config_path = tmp_path / "agent-0.yaml"

    assert sock.recv(100) == b"READY=1"
    assert sock.recv(100) == b"WATCHDOG=1"  # pinged every WATCHDOG_USEC/2 while healthy
    with urllib.request.urlopen(f"http://{health_address(proc)}/", timeout=5) as resp:
        assert resp.status == 200 and json.load(resp)["status"] == "ok"
    assert grpc_receiver.wait_for(lambda r: "one" in resource_values(r, "generation"))

    # a broken config is rejected with a log line; the agent keeps exporting on the old one
    config_path.write_text("collection_interval: never\n")
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload_rejected" not in agent_log(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload_rejected" in agent_log(proc) and "collection_interval" in agent_log(proc)
    seen = len(grpc_receiver.metrics)
    assert grpc_receiver.wait_for(lambda r: len(r.metrics) > seen + 1)
    assert proc.poll() is None

    # a good config takes effect
    cfg["resource"]["attributes"]["generation"] = "two"
    config_path.write_text(yaml.safe_dump(cfg))
    proc.send_signal(signal.SIGHUP)
    assert grpc_receiver.wait_for(lambda r: "two" in resource_values(r, "generation"))
    assert "reloaded" in agent_log(proc)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    states = []
    sock.settimeout(0.5)
    try:
        while True:
            states.append(sock.recv(100))
    except socket.timeout:
        pass
    assert b"RELOADING=1" in states and b"STOPPING=1" in states
    sock.close()
    # every log line is one structured key=value event
    for line in agent_log(proc).splitlines():
        assert re.match(r"ts=\S+ level=(debug|info|warning|error) logger=hostagent\.\S+ \w+", line), line


def test_reload_keeps_undelivered_data(tmp_path, start_agent, http_receiver):
    """Batches waiting for a down receiver survive a reload and arrive once it is back."""
    http_receiver.respond = lambda path: (503, {}, b"")
    cfg = base_config(tmp_path, exporter={"type": "otlp", "otlp": {"protocol": "http/protobuf",
                                                                   "endpoint": http_receiver.endpoint}},
                      collection_interval="500ms", shutdown_timeout="1s")
    proc = start_agent(cfg)
    time.sleep(3)  # several collections queue up behind the 503s
    cfg["collection_interval"] = "1h"  # after the reload, at most one more collection
    (tmp_path / "agent-0.yaml").write_text(yaml.safe_dump(cfg))
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in agent_log(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    m = re.search(r"carried_over_payloads=(\d+)", agent_log(proc))
    assert m and int(m.group(1)) >= 3, agent_log(proc)
    http_receiver.respond = None
    # every collection before the reload arrives: distinct timestamps of system.cpu.time points
    assert http_receiver.wait_for(lambda r: len({p.time_unix_nano for _, _, m in r.all_metrics()
                                                 if m.name == "system.cpu.time"
                                                 for p in m.sum.data_points}) >= 6, timeout=40), agent_log(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "export_dropped" not in agent_log(proc)


LOG_A_WARNING = """
import logging
from agent.logs import setup_logging
setup_logging("info")
logging.getLogger("hostagent.test").warning("disk_slow device=vda")
logging.getLogger("hostagent.test").info("started")
"""


def test_log_lines_carry_their_priority_to_the_journal(tmp_path):
    """Under systemd (JOURNAL_STREAM names stderr) each line starts with its syslog priority,
    which journald turns into the entry's PRIORITY; elsewhere the lines are plain."""
    err = tmp_path / "stderr"
    for journal in (True, False):
        with open(err, "w") as f:
            st = os.fstat(f.fileno())
            env = clean_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}" if journal else "1:1")
            subprocess.run([sys.executable, "-c", LOG_A_WARNING], cwd=ROOT, env=env, stderr=f, check=True,
                           timeout=60)
        warning, info = err.read_text().splitlines()
        assert re.fullmatch(r"<4>ts=\S+ level=warning logger=hostagent\.test disk_slow device=vda", warning) \
            if journal else warning.startswith("ts=") and "level=warning" in warning, warning
        assert info.startswith("<6>ts=" if journal else "ts="), info
