"""Pipeline stages against a real OTLP/HTTP receiver: batching by size and time, bounded queues
that count what they drop, retry decisions taken from the server's answers."""
import threading
import time

from agent.config import Duration
from agent.export import PermanentError, RetryableError
from agent.export.encoding import Payload, encode_metrics
from agent.export.otlp import OtlpExporterConfig
from agent.export.otlp_http import HttpExporter
from agent.export.retry import DROPPED, SENT, RetryConfig, RetryingSender
from agent.model import Batch, Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.pipeline import Pipeline
from agent.pipeline.batcher import BatchConfig
from agent.pipeline.bounded import BoundedQueue
from agent.selfmetrics import SelfMetrics
from tests.helpers import RecordingEvent, finishes

RES = Resource((("host.name", "test"),))


def batch(n: int, tag: str = "") -> Batch:
    points = [NumberPoint((("i", i), ("tag", tag)), i, 1, 2) for i in range(n)]
    return Batch(metrics=[MetricGroup(RES, Scope("t"), [Metric("t.count", "", "1", MetricKind.SUM, points, True)])])


def payload(n: int) -> Payload:
    return Payload("metrics", encode_metrics(batch(n).metrics), n)


def http_exporter(receiver, **kw) -> HttpExporter:
    return HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=receiver.endpoint,
                                           timeout=Duration(5), **kw), SelfMetrics())


def points_received(receiver) -> int:
    return sum(len(m.sum.data_points) for _, _, m in receiver.all_metrics())


def test_bounded_queue_drops_oldest_and_counts():
    q = BoundedQueue("t-drop", 3, SelfMetrics())
    for i in range(5):
        q.put(i)
    assert q.drain() == [2, 3, 4]
    assert q.dropped.value((("queue", "t-drop"), ("reason", "full"))) == 2


def sizes(receiver) -> list:
    return [len(req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points) for req in receiver.metrics]


def test_batches_flush_on_size(http_receiver):
    exporter = http_exporter(http_receiver)
    # an hour's timeout: only the size can send these
    pipe = Pipeline(BatchConfig(max_size=100, timeout=Duration(3600), queue_size=16), RetryConfig(), exporter,
                    SelfMetrics())
    pipe.start()
    try:
        for _ in range(4):
            pipe.emit(batch(50))  # 200 points -> two flushes by size
        assert http_receiver.wait_for(lambda r: len(r.metrics) >= 2)
        assert sizes(http_receiver) == [100, 100]
        # resource and scope are encoded once per request even when groups were merged
        assert len(http_receiver.metrics[0].resource_metrics) == 1
        pipe.emit(batch(10))  # below max_size: stays until shutdown flushes it
    finally:
        assert pipe.shutdown(5)
    assert sizes(http_receiver) == [100, 100, 10]


def test_batches_flush_on_time(http_receiver):
    exporter = http_exporter(http_receiver)
    pipe = Pipeline(BatchConfig(max_size=100, timeout=Duration(0.5), queue_size=16), RetryConfig(), exporter,
                    SelfMetrics())
    pipe.start()
    try:
        started = time.monotonic()
        pipe.emit(batch(10))  # below max_size: leaves on the timeout
        assert http_receiver.wait_for(lambda r: len(r.metrics) == 1)
        # a lower bound, measured from before the emit: load can only lengthen it
        assert time.monotonic() - started >= 0.5
        assert sizes(http_receiver) == [10]
    finally:
        assert pipe.shutdown(5)


def test_empty_success_body_and_partial_success(http_receiver):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
    exporter = http_exporter(http_receiver)
    exporter.send(payload(3))  # 200 with empty body
    resp = ExportMetricsServiceResponse()
    resp.partial_success.rejected_data_points = 2
    resp.partial_success.error_message = "too old"
    http_receiver.respond = lambda path: (200, {"Content-Type": "application/x-protobuf"}, resp.SerializeToString())
    before = exporter.rejected.value((("signal", "metrics"),))
    exporter.send(payload(3))  # partial success is success: no exception, counted
    assert exporter.rejected.value((("signal", "metrics"),)) - before == 2


def test_http_statuses_decide_retry(http_receiver):
    exporter = http_exporter(http_receiver)
    for status in (429, 502, 503, 504):
        http_receiver.respond = lambda path, s=status: (s, {"Retry-After": "7"}, b"")
        try:
            exporter.send(payload(1))
        except RetryableError as e:
            assert e.delay == 7.0
        else:
            raise AssertionError(f"{status} did not raise")
    for status in (400, 401, 403, 404, 413, 500):
        http_receiver.respond = lambda path, s=status: (s, {}, b"")
        try:
            exporter.send(payload(1))
        except PermanentError:
            pass
        else:
            raise AssertionError(f"{status} did not raise PermanentError")


def test_retry_honors_server_delay_then_delivers(http_receiver):
    answers = iter([(503, {"Retry-After": "1"}, b""), (200, {}, b"")])
    http_receiver.respond = lambda path: next(answers)
    abort = RecordingEvent()
    sender = RetryingSender(http_exporter(http_receiver), RetryConfig(initial_interval=Duration(0.01)), SelfMetrics(),
                            abort)
    assert sender.send(payload(5)) == SENT
    assert abort.waits == [1.0]  # the server's delay, not the 10 ms backoff
    assert points_received(http_receiver) == 5


def test_permanent_failure_is_dropped_and_counted(http_receiver):
    http_receiver.respond = lambda path: (400, {}, b"bad")
    sender = RetryingSender(http_exporter(http_receiver), RetryConfig(), SelfMetrics(), threading.Event())
    attrs = (("exporter", "otlp_http"), ("signal", "metrics"), ("reason", "permanent"))
    before = sender.failed.value(attrs)
    assert sender.send(payload(4)) == DROPPED
    assert sender.failed.value(attrs) - before == 4


def test_retries_give_up_after_max_elapsed_time(http_receiver):
    http_receiver.respond = lambda path: (503, {}, b"")
    sender = RetryingSender(http_exporter(http_receiver),
                            RetryConfig(initial_interval=Duration(0.05), max_interval=Duration(0.1),
                                        max_elapsed_time=Duration(0.5)), SelfMetrics(), threading.Event())
    attrs = (("exporter", "otlp_http"), ("signal", "metrics"), ("reason", "retries_exhausted"))
    before = sender.failed.value(attrs)
    assert finishes(sender.send, payload(2)) == DROPPED  # the server fails forever: given up on
    assert sender.failed.value(attrs) - before == 2
