"""A backend outage of more than a minute loses nothing: the real gRPC receiver is stopped for 61 s
while the agent keeps collecting every second, then started again on the same port; every data
point collected meanwhile arrives. The check is exact: the agent counts the points its cpu scraper
hands the pipeline (hostagent.pipeline.incoming_items, exported with its other metrics), and the
receiver must hold exactly that many distinct system.cpu.time points, one full set per collection."""
import signal
import time

from tests.helpers import agent_log, check_complete, cpu_points, delivery_config, self_metric, wait_until
from tests.otlp_receiver import GrpcReceiver


def test_receiver_down_for_61s_loses_nothing(tmp_path, start_agent):
    rec = GrpcReceiver().start()
    port = rec.port
    receivers = [rec]
    cfg = delivery_config(tmp_path, rec.endpoint, shutdown_timeout="20s")
    proc = start_agent(cfg)
    try:
        assert wait_until(lambda: len({t for _, t in cpu_points([rec])}) >= 3, 30, proc), agent_log(proc)
        down_at = time.time_ns()
        rec.stop()
        time.sleep(61)
        assert proc.poll() is None, agent_log(proc)
        rec = GrpcReceiver(port).start()  # the same address again
        receivers.append(rec)
        up_at = time.time_ns()
        # the backlog drains: the first collection after the outage arrives with all before it
        assert wait_until(lambda: any(t > up_at for _, t in cpu_points([rec])), 60, proc), agent_log(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent_log(proc)
        figures = check_complete(receivers)
        during = [t for t in figures["times"] if down_at < t < up_at]
        assert len(during) >= 59, f"only {len(during)} collections during the outage"
        print(f"outage: {len(during)} collections during 61s down, {figures['collections']} in all, "
              f"{figures['points']} cpu points, {figures['duplicates']} duplicates")
        text = agent_log(proc)
        assert "export_dropped" not in text and "shutdown_queued" not in text, text
        # the agent's own view of the outage, exported like any other metric
        assert self_metric(receivers, "hostagent.exporter.retries") > 0
        assert self_metric(receivers, "hostagent.queue.size", queue="export") > 0
        assert self_metric(receivers, "hostagent.queue.capacity_bytes", queue="export") == 2**30
        assert self_metric(receivers, "hostagent.exporter.requests", outcome="retryable") > 0
        assert self_metric(receivers, "hostagent.exporter.sent") > 0
    finally:
        rec.stop()
