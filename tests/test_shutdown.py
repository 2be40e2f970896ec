"""SIGTERM/SIGINT: what was collected before the signal reaches the receiver, and the exit is 0."""
import signal
import socket
import time

from tests.helpers import agent_log, base_config, wait_for_log


def grpc_config(tmp_path, endpoint, **over):
    return base_config(tmp_path, exporter={"type": "otlp", "otlp": {"endpoint": endpoint}}, **over)


def test_sigterm_flushes_buffered_data_and_exits_0(tmp_path, start_agent, grpc_receiver):
    # a long batch timeout: nothing leaves before the signal unless shutdown flushes it
    cfg = grpc_config(tmp_path, grpc_receiver.endpoint, collection_interval="1m", batch={"timeout": "1m"})
    proc = start_agent(cfg)
    wait_for_log(proc, " started ")
    time.sleep(1.5)  # the first collection runs right after start
    assert grpc_receiver.metrics == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    assert {"system.cpu.time", "system.memory.usage"} <= grpc_receiver.metric_names()


def test_sigint_also_drains(tmp_path, start_agent, grpc_receiver):
    proc = start_agent(grpc_config(tmp_path, grpc_receiver.endpoint, batch={"timeout": "1m"}))
    wait_for_log(proc, " started ")
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, agent_log(proc)
    assert "system.cpu.time" in grpc_receiver.metric_names()


def test_unreachable_endpoint_is_not_a_config_error(tmp_path, start_agent):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a memory queue drops what it could not deliver (a persistent one keeps it: test_delivery_crash.py)
    cfg = grpc_config(tmp_path, f"127.0.0.1:{port}", shutdown_timeout="2s")
    cfg["exporter"]["queue"] = {"type": "memory"}
    proc = start_agent(cfg)
    wait_for_log(proc, "export_retry")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    assert "shutdown_dropped" in agent_log(proc)
