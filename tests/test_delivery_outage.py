"""A backend outage of more than a minute loses nothing: the real gRPC receiver is stopped for 61 s
while the agent keeps collecting every second, then started again on the same port; every data
point collected meanwhile arrives. The check is exact: the agent counts the points its cpu scraper
hands the pipeline (hostagent.pipeline.incoming_items, exported with its other metrics), and the
receiver must hold exactly that many distinct system.cpu.time points, one full set per collection.

The helpers here are shared by the other end-to-end delivery tests."""
import collections
import signal
import socket
import time

from tests.conftest import agent_log, base_config
from tests.otlp_receiver import GrpcReceiver, attributes

CPU_SCOPE = "hostagent/scrapers/cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delivery_config(tmp_path, endpoint, exporter=None, **over) -> dict:
    """An agent sending to `endpoint` over gRPC with its persistent queue under tmp_path."""
    exp = {"type": "otlp", "otlp": {"endpoint": endpoint},
           "retry": {"initial_interval": "200ms", "max_interval": "1s"}}
    for k, v in (exporter or {}).items():
        exp[k] = {**exp.get(k, {}), **v} if isinstance(v, dict) else v
    over.setdefault("state_dir", str(tmp_path / "state"))
    return base_config(tmp_path, exporter=exp, **over)


def wait_until(predicate, timeout: float, proc=None, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None:
            assert proc.poll() is None, agent_log(proc)
        time.sleep(step)
    return predicate()


def cpu_points(receivers) -> collections.Counter:
    """How often each system.cpu.time point (attributes, time) arrived, over all receivers."""
    seen = collections.Counter()
    for rec in receivers:
        with rec._cond:
            metrics = list(rec.all_metrics())
        for _, _, m in metrics:
            if m.name == "system.cpu.time":
                for p in m.sum.data_points:
                    seen[(tuple(sorted(attributes(p).items())), p.time_unix_nano)] += 1
    return seen


def self_metric(receivers, name: str, window=None, **attrs) -> float:
    """The largest value the agent exported for one of its own counters (cumulative: the last),
    among points with a time in `window` (start, end ns) if given."""
    return self_metric_point(receivers, name, window, **attrs)[0]


def self_metric_point(receivers, name: str, window=None, **attrs) -> tuple:
    """(value, time) of the point with the largest value of one of the agent's own counters."""
    best = (0, 0)
    for rec in receivers:
        with rec._cond:
            metrics = list(rec.all_metrics())
        for _, _, m in metrics:
            if m.name == name:
                kind = m.WhichOneof("data")
                for p in getattr(m, kind).data_points:
                    a = attributes(p)
                    if window and not window[0] <= p.time_unix_nano <= window[1]:
                        continue
                    if all(a.get(k) == v for k, v in attrs.items()):
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        best = max(best, (value, p.time_unix_nano))
    return best


def check_exact(seen, receivers, run, whole: bool) -> int:
    """In one agent run (start, end ns): the agent's own count of the cpu points it collected, as
    of its last exported count, equals the distinct system.cpu.time points that arrived up to
    then. `whole`: the run ended cleanly, so that count came after its last collection."""
    produced, at = self_metric_point(receivers, "hostagent.pipeline.incoming_items", run, scope=CPU_SCOPE)
    assert produced, f"run {run}: no count of collected points arrived"
    arrived = sum(1 for _, t in seen if run[0] <= t <= at)
    assert arrived == produced, f"run {run}: {produced} cpu points collected, {arrived} distinct arrived"
    if whole:
        later = sum(1 for _, t in seen if at < t <= run[1])
        assert not later, f"run {run}: {later} cpu points collected after the agent's last count"
    return produced


def check_complete(receivers, runs=((0, 2**63),)) -> dict:
    """Every collection's full set of system.cpu.time points arrived, and for each agent run
    (start, end ns; each ended cleanly) exactly as many distinct points as the agent says its cpu
    scraper produced in it. Returns figures for the caller's asserts."""
    seen = cpu_points(receivers)
    by_time = collections.defaultdict(set)
    for attrs, t in seen:
        by_time[t].add(attrs)
    times = sorted(by_time)
    series = by_time[times[0]]
    missing = {t: len(series - s) for t, s in by_time.items() if s != series}
    assert not missing, f"incomplete collections (timestamp: missing series): {missing}"
    for run in runs:
        check_exact(seen, receivers, run, whole=True)
    return {"collections": len(times), "points": len(seen), "duplicates": sum(seen.values()) - len(seen),
            "times": times}


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
