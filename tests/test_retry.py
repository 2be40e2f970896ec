"""Retry, drop and split exactly as the OTLP specification says, against real servers: a gRPC server
answering each of the 16 non-OK status codes (with and without RetryInfo), an OTLP/HTTP server
answering the listed statuses (with Retry-After), partial success, and requests too large for the
server split in halves."""
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from agent.config import Duration
from agent.export import RetryableError
from agent.export.encoding import Payload, encode_metrics
from agent.export.otlp import OtlpExporterConfig
from agent.export.otlp_grpc import GrpcExporter
from agent.export.otlp_http import HttpExporter, parse_retry_after
from agent.export.retry import DROPPED, SENT, RetryConfig, RetryingSender
from agent.model import Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.selfmetrics import SelfMetrics
from tests.helpers import RecordingEvent, ScriptedGrpcServer, finishes, point_ids
from tests.otlp_receiver import HttpReceiver

RES = Resource((("host.name", "retry-test"),))
FAST = RetryConfig(initial_interval=Duration(0.05), max_interval=Duration(0.1))
RETRYABLE = {"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"}
NON_OK = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]
assert len(NON_OK) == 16


def payload(n: int, tag: str = "", pad: int = 0) -> Payload:
    points = [NumberPoint((("i", i), ("tag", tag + "x" * pad)), i, 1, 2) for i in range(n)]
    groups = [MetricGroup(RES, Scope("t"), [Metric("t.count", "", "1", MetricKind.SUM, points, True)])]
    return Payload("metrics", encode_metrics(groups), n)


@pytest.fixture(scope="module")
def grpc_server():
    server = ScriptedGrpcServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def grpc_exporter(grpc_server):
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=grpc_server.endpoint, timeout=Duration(5), connections=1),
                            SelfMetrics())
    yield exporter
    exporter.close()


def failed(sender, reason, signal="metrics"):
    return sender.failed.value((("exporter", sender.exporter.name), ("signal", signal), ("reason", reason)))


@pytest.mark.parametrize("code", NON_OK, ids=[c.name for c in NON_OK])
def test_every_grpc_status_code(grpc_server, grpc_exporter, code):
    grpc_server.calls.clear()
    grpc_server.script[:] = [(code, f"test answer {code.name}", None, None)]
    sender = RetryingSender(grpc_exporter, FAST, SelfMetrics(), threading.Event(), give_up_after=10)
    before = failed(sender, "permanent")
    result = sender.send(payload(3))
    if code.name in RETRYABLE:
        assert result == SENT and len(grpc_server.calls) == 2, code
        assert failed(sender, "permanent") == before
    else:  # RESOURCE_EXHAUSTED included: without RetryInfo it is not retryable
        assert result == DROPPED and len(grpc_server.calls) == 1, code
        assert failed(sender, "permanent") - before == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
def test_grpc_retry_info_is_honored(grpc_server, grpc_exporter, code):
    """The server's RetryInfo sets the wait, whatever the backoff says (here 30s)."""
    grpc_server.calls.clear()
    grpc_server.script[:] = [(code, "slow down", 0.6, None)]
    slow = RetryConfig(initial_interval=Duration(30), max_interval=Duration(30))
    abort = RecordingEvent()
    sender = RetryingSender(grpc_exporter, slow, SelfMetrics(), abort, give_up_after=0)
    assert sender.send(payload(2)) == SENT
    assert len(grpc_server.calls) == 2
    assert abort.waits == [0.6]


def test_grpc_partial_success_is_not_retried(grpc_server, grpc_exporter, caplog):
    grpc_server.calls.clear()
    resp = ExportMetricsServiceResponse()
    resp.partial_success.rejected_data_points = 2
    resp.partial_success.error_message = "points too old"
    grpc_server.script[:] = [(None, "", None, resp)]
    sender = RetryingSender(grpc_exporter, FAST, SelfMetrics(), threading.Event())
    before = grpc_exporter.rejected.value((("signal", "metrics"),))
    with caplog.at_level("WARNING", logger="hostagent.export"):
        assert sender.send(payload(5)) == SENT
    assert len(grpc_server.calls) == 1
    assert grpc_exporter.rejected.value((("signal", "metrics"),)) - before == 2
    assert any("partial_success" in r.getMessage() and "rejected=2" in r.getMessage()
               and "points too old" in r.getMessage() for r in caplog.records)


def test_grpc_message_larger_than_max_is_split():
    server = ScriptedGrpcServer(max_receive=20_000)
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=server.endpoint, timeout=Duration(5), connections=1,
                                               compression="none"), SelfMetrics())
    try:
        sender = RetryingSender(exporter, FAST, SelfMetrics(), threading.Event())
        splits = sender.splits.value((("exporter", "otlp_grpc"), ("signal", "metrics")))
        big = payload(1000, pad=40)  # ~80KB: split 1000 -> 500 -> 250 -> 125 (<20KB each)
        assert len(big.body) > 60_000
        assert sender.send(big) == SENT
        accepted = [req for _, req in server.calls if req is not None]
        assert point_ids(accepted) == list(range(1000))  # every point once, none lost
        assert sender.splits.value((("exporter", "otlp_grpc"), ("signal", "metrics"))) - splits >= 7
        # a single data point larger than the server takes is dropped and counted
        before = failed(sender, "too_large")
        assert sender.send(payload(1, pad=30_000)) == DROPPED
        assert failed(sender, "too_large") - before == 1
    finally:
        exporter.close()
        server.stop()


# --- OTLP/HTTP ------------------------------------------------------------------------------------

HTTP_RETRYABLE = (429, 502, 503, 504)
HTTP_PERMANENT = (400, 401, 403, 404, 405, 408, 409, 410, 411, 412, 415, 422, 500, 501, 505)


@pytest.fixture(scope="module")
def http_server():
    rec = HttpReceiver().start()
    yield rec
    rec.stop()


@pytest.fixture
def http_receiver(http_server):
    """One server for the module (stopping one takes a while), fresh for every test."""
    http_server.respond = None
    http_server.metrics.clear()
    http_server.headers.clear()
    return http_server


@pytest.fixture
def http_exporter(http_receiver):
    exporter = HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=http_receiver.endpoint,
                                               timeout=Duration(5), connections=1), SelfMetrics())
    yield exporter
    exporter.close()


def scripted(receiver, answers):
    """Answer from `answers` (status, headers) in turn, then 200; record each status answered."""
    answered = []
    lock = threading.Lock()

    def respond(path):
        with lock:
            status, headers = answers.pop(0) if answers else (200, {})
            answered.append((time.monotonic(), status))
        return status, headers, b""
    receiver.respond = respond
    return answered


@pytest.mark.parametrize("status", HTTP_RETRYABLE + HTTP_PERMANENT)
def test_every_http_status(http_receiver, http_exporter, status):
    answered = scripted(http_receiver, [(status, {})])
    sender = RetryingSender(http_exporter, FAST, SelfMetrics(), threading.Event(), give_up_after=10)
    before = failed(sender, "permanent")
    result = sender.send(payload(3))
    if status in HTTP_RETRYABLE:
        assert result == SENT and [s for _, s in answered] == [status, 200]
    else:
        assert result == DROPPED and [s for _, s in answered] == [status]
        assert failed(sender, "permanent") - before == 3


@pytest.mark.parametrize("status", HTTP_RETRYABLE)
def test_http_retry_after_is_honored(http_receiver, http_exporter, status):
    answered = scripted(http_receiver, [(status, {"Retry-After": "1"})])
    slow = RetryConfig(initial_interval=Duration(30), max_interval=Duration(30))
    abort = RecordingEvent()
    sender = RetryingSender(http_exporter, slow, SelfMetrics(), abort, give_up_after=0)
    assert sender.send(payload(2)) == SENT
    assert [s for _, s in answered] == [status, 200]
    assert abort.waits == [1.0]  # the server's delay, not the 30 s backoff


def test_retry_after_http_date():
    assert parse_retry_after("120") == 120.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= parse_retry_after(date) <= 31
    assert parse_retry_after("soon") is None and parse_retry_after("") is None


def test_http_413_splits_in_halves_and_single_points_are_dropped(http_receiver, http_exporter):
    answered = scripted(http_receiver, [(413, {})])
    sender = RetryingSender(http_exporter, FAST, SelfMetrics(), threading.Event())
    assert sender.send(payload(10)) == SENT
    assert [s for _, s in answered] == [413, 200, 200]
    assert [len(m.sum.data_points) for _, _, m in http_receiver.all_metrics()] == [5, 5]
    assert point_ids(http_receiver.metrics) == list(range(10))
    # a server that takes nothing this size: halves down to single points, each dropped and counted
    http_receiver.respond = lambda path: (413, {}, b"")
    before = failed(sender, "too_large")
    assert sender.send(payload(4)) == DROPPED
    assert failed(sender, "too_large") - before == 4


def test_http_partial_success_is_not_retried(http_receiver, http_exporter):
    resp = ExportMetricsServiceResponse()
    resp.partial_success.rejected_data_points = 1
    resp.partial_success.error_message = "bad unit"
    calls = []
    http_receiver.respond = lambda path: calls.append(path) or (200, {}, resp.SerializeToString())
    sender = RetryingSender(http_exporter, FAST, SelfMetrics(), threading.Event())
    before = http_exporter.rejected.value((("signal", "metrics"),))
    assert sender.send(payload(3)) == SENT
    assert len(calls) == 1
    assert http_exporter.rejected.value((("signal", "metrics"),)) - before == 1


# --- the backoff itself (no server: a stub exporter and a recording wait) ---------------------------

class Flaky:
    name = "stub"

    def __init__(self, failures: int):
        self.failures = failures

    def send(self, payload):
        if self.failures:
            self.failures -= 1
            raise RetryableError("try later")


def test_backoff_is_exponential_with_jitter_and_capped():
    abort = RecordingEvent()
    cfg = RetryConfig(initial_interval=Duration(1), max_interval=Duration(8), multiplier=2)
    sender = RetryingSender(Flaky(8), cfg, SelfMetrics(), abort, give_up_after=0)
    assert sender.send(payload(1)) == SENT
    for k, wait in enumerate(abort.waits):
        base = min(1 * 2 ** k, 8)
        assert 0.5 * base <= wait <= 1.5 * base, (k, wait)
    assert len(set(abort.waits)) == len(abort.waits)  # jittered


def test_max_elapsed_zero_retries_forever_and_elapsed_time_gives_up():
    abort = RecordingEvent()
    sender = RetryingSender(Flaky(200), RetryConfig(initial_interval=Duration(1)), SelfMetrics(), abort,
                            give_up_after=0)
    assert sender.send(payload(1)) == SENT and len(abort.waits) == 200
    # with a limit: the retries stop once the next wait would pass it
    sender = RetryingSender(Flaky(10**6), RetryConfig(initial_interval=Duration(0.01), max_interval=Duration(0.02)),
                            SelfMetrics(), threading.Event(), give_up_after=0.3)
    assert finishes(sender.send, payload(1)) == DROPPED  # fails forever: given up on


def test_abort_cuts_a_retry_wait_short():
    abort = threading.Event()
    sender = RetryingSender(Flaky(10**6), RetryConfig(initial_interval=Duration(3600), max_interval=Duration(3600)),
                            SelfMetrics(), abort, give_up_after=0)
    threading.Timer(0.3, abort.set).start()
    assert finishes(sender.send, payload(1)) == "aborted"  # not after the hour's wait
