"""A full disk under the persistent queue: the queue sits on a 256 KiB tmpfs mounted for the test,
far below its 1 GiB max_size, while the receiver is down. Writes hit ENOSPC; the oldest data is
dropped and counted (hostagent.queue.dropped{reason=disk_full}), the agent keeps running, and when
the receiver comes back it exports again, the newest data included."""
import signal
import subprocess
import time

import pytest

from tests.helpers import agent_log, cpu_points, delivery_config, free_port, self_metric, wait_until
from tests.otlp_receiver import GrpcReceiver


@pytest.fixture
def small_fs(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test runs as root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_filesystem_drops_oldest_counts_and_keeps_exporting(tmp_path, small_fs, start_agent):
    port = free_port()
    queue_dir = small_fs / "queue"
    cfg = delivery_config(tmp_path, f"http://127.0.0.1:{port}", collection_interval="250ms",
                          exporter={"queue": {"directory": str(queue_dir), "segment_size": "64KiB"}},
                          shutdown_timeout="5s")
    proc = start_agent(cfg)
    assert wait_until(lambda: "reason=disk_full" in agent_log(proc), 60, proc), agent_log(proc)
    assert wait_until(lambda: agent_log(proc).count("reason=disk_full") >= 2, 30, proc), agent_log(proc)
    assert proc.poll() is None
    rec = GrpcReceiver(port).start()
    try:
        back = time.time_ns()
        assert wait_until(lambda: any(t > back for _, t in cpu_points([rec])), 60, proc), agent_log(proc)
        time.sleep(1)
        assert self_metric([rec], "hostagent.queue.dropped", reason="disk_full") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent_log(proc)
        text = agent_log(proc)
        assert "Traceback" not in text and "queue_write_failed" not in text, text
    finally:
        rec.stop()
