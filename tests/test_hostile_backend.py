"""A broken or hostile backend never loses queued data, never holds shutdown and never makes the
agent log a secret: long outages, absurd server-requested waits, unbounded or trickling answers,
oversized gRPC answers, bogus partial successes, invalid header values; plus the file exporter's
modes and the persistent queue under random damage (property-based)."""
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import grpc
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from agent.config import Duration
from agent.export.encoding import Payload, encode_metrics
from agent.export.factory import EXPORTERS
from agent.export.file import FileExporter, FileExporterConfig
from agent.export.otlp import OtlpExporterConfig
from agent.export.otlp_grpc import GrpcExporter
from agent.export.otlp_http import HttpExporter, parse_retry_after
from agent.export.pool import HEALTH_BACKOFF_MAX, EndpointPool
from agent.export.queue import QueueSettings
from agent.export.retry import SENT, RetryConfig, RetryingSender
from agent.export.wal import HEADER, PersistentQueue, segment_files
from agent.model import Batch, Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.pipeline import Pipeline
from agent.pipeline.batcher import BatchConfig
from agent.selfmetrics import SelfMetrics
from tests.helpers import RecordingEvent, ScriptedGrpcServer, agent_log, base_config, point_ids
from tests.otlp_receiver import HttpReceiver

RES = Resource((("host.name", "hostile-test"),))
TINY = RetryConfig(initial_interval=Duration(0.0001), max_interval=Duration(0.0001))
SECRET = "SUPERSECRET-3f9c"


def payload(n: int, first: int = 0, pad: int = 0) -> Payload:
    points = [NumberPoint((("i", i), ("pad", "x" * pad)), i, 1, 2) for i in range(first, first + n)]
    groups = [MetricGroup(RES, Scope("t"), [Metric("t.count", "", "1", MetricKind.SUM, points, True)])]
    return Payload("metrics", encode_metrics(groups), n)


def http_exporter(endpoint: str, **kw) -> HttpExporter:
    kw.setdefault("timeout", Duration(5))
    return HttpExporter(OtlpExporterConfig(protocol="http/protobuf", endpoint=endpoint, connections=1, **kw),
                        SelfMetrics())


def poll(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def dropped_total(sender: RetryingSender) -> float:
    """Items the export layer has dropped so far, for any reason."""
    return sender.failed.total()


def refused_port() -> socket.socket:
    """A port bound but not listening: connecting to it is refused at once, and nobody else takes
    it until the socket is closed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


# --- long outages, internal errors ----------------------------------------------------------------

def test_ten_thousand_failures_then_every_queued_item_is_delivered(tmp_path):
    """An endpoint refusing 10,000 connections in a row (hours of outage with the default backoff)
    and then coming back gets everything that was queued, once."""
    blocker = refused_port()
    port = blocker.getsockname()[1]
    exporter = http_exporter(f"http://127.0.0.1:{port}")
    queue = PersistentQueue(QueueSettings("persistent", str(tmp_path / "q"), max_bytes=1 << 26), SelfMetrics())
    for k in range(20):
        queue.put(payload(50, first=50 * k))
    pipe = Pipeline(BatchConfig(), TINY, exporter, SelfMetrics(), queue=queue, senders=2, give_up_after=0)
    dropped = dropped_total(pipe.sender)
    ep = exporter.pool.all()[0]
    receiver = None
    try:
        pipe.start()
        assert poll(lambda: ep.failures >= 10_000 or queue.items == 0, timeout=300)
        assert queue.items == 1000, "queued data was dropped during the outage"
        blocker.close()
        receiver = HttpReceiver(port).start()
        assert receiver.wait_for(lambda r: len(point_ids(r.metrics)) >= 1000, timeout=60)
        assert poll(lambda: queue.items == 0)
        assert point_ids(receiver.metrics) == list(range(1000))
        assert dropped_total(pipe.sender) == dropped
    finally:
        blocker.close()
        pipe.shutdown(5)
        if receiver:
            receiver.stop()


def test_pool_backoff_after_any_number_of_failures():
    pool = EndpointPool("t", {"metrics": ["http://a", "http://b"]}, SelfMetrics())
    ep = pool.all()[0]
    for _ in range(5000):
        pool.failed(ep, "down")
    assert ep.retry_at - time.monotonic() <= HEALTH_BACKOFF_MAX
    pool.close()


class Buggy:
    """An exporter whose first `bugs` sends raise an unexpected exception."""
    name = "buggy"

    def __init__(self, bugs: int):
        self.bugs, self.sent = bugs, []

    def send(self, p):
        if self.bugs:
            self.bugs -= 1
            raise ValueError(f"a bug with {SECRET}")
        self.sent.append(p)

    def abort(self):
        pass

    def close(self):
        pass


def test_an_unexpected_exception_keeps_the_payload_queued_and_retries_it(caplog):
    exporter = Buggy(3)
    pipe = Pipeline(BatchConfig(max_size=5), TINY, exporter, SelfMetrics(), senders=1)
    group = MetricGroup(RES, Scope("t"), [Metric("m", "", "1", MetricKind.GAUGE,
                                                 [NumberPoint((), i, 1, 2) for i in range(5)])])
    with caplog.at_level(logging.DEBUG):
        pipe.start()
        pipe.emit(Batch(metrics=[group]))
        assert poll(lambda: len(exporter.sent) == 1, timeout=30)
        assert pipe.shutdown(5)
    assert exporter.bugs == 0 and len(exporter.sent) == 1 and exporter.sent[0].items == 5
    assert dropped_total(pipe.sender) == 0
    assert pipe.sender.internal_errors.value((("exporter", "buggy"), ("signal", "metrics"))) == 3
    assert SECRET not in caplog.text


# --- server-requested waits -----------------------------------------------------------------------

HOSTILE_RETRY_AFTER = ["99999999", "99999999999999999999", "1" + "0" * 400, "-5", "NaN", "inf", "1e400",
                       "soon", "\u00b2", "\u0661\u0662", "Fri, 31 Dec 9999 23:59:59 GMT",
                       "Thu, 01 Jan 1970 00:00:00 GMT", "Mon, 99 Foo 2024 99:99:99 GMT", " " * 5000]


@pytest.mark.parametrize("value", HOSTILE_RETRY_AFTER, ids=range(len(HOSTILE_RETRY_AFTER)))
def test_retry_after_is_capped_at_max_interval_and_never_drops(value):
    receiver = HttpReceiver().start()
    answers = [(503, {"Retry-After": value})]
    receiver.respond = lambda path: (*(answers.pop(0) if answers else (200, {})), b"")
    exporter = http_exporter(receiver.endpoint)
    wait = RecordingEvent()
    cfg = RetryConfig(initial_interval=Duration(0.5), max_interval=Duration(2))
    try:
        sender = RetryingSender(exporter, cfg, SelfMetrics(), wait, give_up_after=0)
        assert sender.send(payload(3)) == SENT
        assert len(wait.waits) == 1 and 0 <= wait.waits[0] <= 2, wait.waits
        assert point_ids(receiver.metrics) == [0, 1, 2]
    finally:
        exporter.close()
        receiver.stop()


def test_parse_retry_after_never_raises():
    assert parse_retry_after("120") == 120.0
    for value in HOSTILE_RETRY_AFTER:
        delay = parse_retry_after(value)
        assert delay is None or delay >= 0, (value, delay)


@pytest.mark.parametrize("delay", [1e15, 9.2e18])
def test_grpc_retry_info_is_capped_at_max_interval(delay):
    server = ScriptedGrpcServer()
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=server.endpoint, timeout=Duration(5), connections=1),
                            SelfMetrics())
    wait = RecordingEvent()
    try:
        server.script[:] = [(grpc.StatusCode.UNAVAILABLE, "slow down", delay, None)]
        sender = RetryingSender(exporter, RetryConfig(max_interval=Duration(7)), SelfMetrics(), wait, give_up_after=0)
        assert sender.send(payload(4)) == SENT
        assert len(wait.waits) == 1 and 0 <= wait.waits[0] <= 7, wait.waits
        assert point_ids(req for _, req in server.calls[1:]) == [0, 1, 2, 3]
    finally:
        exporter.close()
        server.stop()


# --- unbounded and trickling answers --------------------------------------------------------------

class HostileHttpServer:
    """A raw-socket HTTP server on 127.0.0.1 that reads each request and then answers with
    `mode`: "endless" (200, chunked, chunks forever), "trickle" (200, then a body byte per
    second), "trickle_headers" (the status line a byte per second). It stops sending after
    `cap` bytes per answer and records how each answer ended."""

    def __init__(self, mode: str, cap: int = 256 << 20):
        self.mode, self.cap = mode, cap
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.answers = []  # per answer: (bytes sent, "client_closed" | "cap" | "stopped")
        self.requests = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, conn) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")][0])
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            body += chunk
        with self._lock:
            self.requests += 1
        return True

    def _serve(self, conn):
        sent, end = 0, "stopped"
        try:
            if not self._read_request(conn):
                return
            if self.mode == "trickle_headers":
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    if self._stop.wait(1):
                        break
                    conn.sendall(bytes([byte]))
                    sent += 1
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                chunk = b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n" if self.mode == "endless" else b"1\r\n\x00\r\n"
                while not self._stop.is_set() and sent < self.cap:
                    conn.sendall(chunk)
                    sent += len(chunk)
                    if self.mode == "trickle":
                        self._stop.wait(1)
                end = "cap" if sent >= self.cap else end
        except OSError:
            end = "client_closed"
        finally:
            with self._lock:
                self.answers.append((sent, end))
            conn.close()

    def stop(self):
        self._stop.set()
        self.sock.close()


def send_in_thread(sender, p):
    out = []
    t = threading.Thread(target=lambda: out.append(sender.send(p)), daemon=True)
    t.start()
    return t, out


def test_endless_response_body_is_read_only_up_to_a_bound():
    server = HostileHttpServer("endless", cap=64 << 20)
    exporter = http_exporter(server.endpoint)
    try:
        sender = RetryingSender(exporter, TINY, SelfMetrics(), threading.Event(), give_up_after=0)
        t, out = send_in_thread(sender, payload(3))
        t.join(120)
        assert out == [SENT]  # the server said 200: the data was taken, once
        assert server.requests == 1
        assert poll(lambda: server.answers, timeout=30)
        sent, end = server.answers[0]
        assert end == "client_closed", server.answers  # the agent hung up, the cap was not reached
        assert exporter.oversized.value((("exporter", "otlp_http"), ("signal", "metrics"))) == 1
    finally:
        exporter.close()
        server.stop()


@pytest.mark.parametrize("mode", ["trickle", "trickle_headers"])
def test_trickling_response_is_cut_at_the_request_timeout(mode):
    server = HostileHttpServer(mode)
    exporter = http_exporter(server.endpoint, timeout=Duration(1.5))
    abort = threading.Event()
    t = None
    try:
        sender = RetryingSender(exporter, TINY, SelfMetrics(), abort, give_up_after=0)
        t, out = send_in_thread(sender, payload(3))
        # trickle: the 200 arrived, the body was cut at the deadline; trickle_headers: no answer
        # in time, retried (and trickled again) until the server stops
        assert poll(lambda: server.answers, timeout=60)
        assert server.answers[0][1] == "client_closed", server.answers
        if mode == "trickle":
            t.join(60)
            assert out == [SENT] and server.requests == 1
    finally:
        abort.set()
        exporter.abort()
        if t is not None:
            t.join(30)
        server.stop()
        exporter.close()


def hostile_agent_config(tmp_path, endpoint, **over):
    return base_config(tmp_path, shutdown_timeout="2s", exporter={
        "type": "otlp", "otlp": {"protocol": "http/protobuf", "endpoint": endpoint, "timeout": "2s"}}, **over)


def terminate(proc) -> tuple:
    """SIGTERM `proc`: (its exit status, or None if it still runs 30 s past its 2 s shutdown_timeout;
    the seconds it took), for the report."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(2 + 30)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("mode", ["endless", "trickle"])
def test_agent_against_a_hostile_http_server_stays_small_and_stops_on_sigterm(tmp_path, start_agent, mode):
    server = HostileHttpServer(mode, cap=512 << 20)
    try:
        proc = start_agent(hostile_agent_config(tmp_path, server.endpoint))
        assert poll(lambda: server.requests >= 2 or proc.poll() is not None, timeout=60), agent_log(proc)
        assert proc.poll() is None, agent_log(proc)
        peak = rss_kib(proc.pid)
        code, took = terminate(proc)
        print(f"{mode}: peak RSS {peak / 1024:.0f} MiB, exit {code} after {took:.1f}s, answers {server.answers[:4]}")
        assert code == 0, agent_log(proc)
        assert "stopped clean=" in agent_log(proc)
        assert peak < 400 * 1024, peak  # the agent idles at ~60-170 MiB; an unbounded read grows by GiBs
    finally:
        server.stop()


class StallingGrpcServer(ScriptedGrpcServer):
    """Takes each call and answers none until stopped."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def _export(self, body, context):
        with self.lock:
            self.calls.append((time.monotonic(), None))
        self.release.wait(120)
        return b""

    def stop(self):
        self.release.set()
        super().stop()


def test_agent_stops_on_sigterm_while_a_grpc_server_holds_its_requests(tmp_path, start_agent):
    """A server that takes requests and never answers (timeout 2 min) does not hold shutdown: the
    requests in flight are cancelled once shutdown_timeout is over, and stay queued on disk."""
    server = StallingGrpcServer()
    try:
        cfg = base_config(tmp_path, shutdown_timeout="2s", exporter={
            "type": "otlp", "otlp": {"endpoint": server.endpoint, "timeout": "120s"}})
        proc = start_agent(cfg)
        assert poll(lambda: len(server.calls) >= 2 or proc.poll() is not None, timeout=60), agent_log(proc)
        code, took = terminate(proc)
        print(f"grpc stall: exit {code} after {took:.1f}s")
        assert code == 0, agent_log(proc)
        assert "shutdown_queued" in agent_log(proc)  # kept for the next start
    finally:
        server.stop()


# --- gRPC: an answer larger than the client takes ---------------------------------------------------

class HugeAnswerServer(ScriptedGrpcServer):
    def _export(self, body, context):
        super()._export(body, context)
        return b"\x0a\x00" + b"\x00" * (5 << 20)  # 5 MiB


def test_grpc_oversized_answer_is_not_a_reason_to_split():
    server = HugeAnswerServer()
    exporter = GrpcExporter(OtlpExporterConfig(endpoint=server.endpoint, timeout=Duration(5), connections=1),
                            SelfMetrics())
    try:
        sender = RetryingSender(exporter, TINY, SelfMetrics(), threading.Event())
        attrs = (("exporter", "otlp_grpc"), ("signal", "metrics"))
        assert sender.send(payload(1000)) == SENT
        assert len(server.calls) == 1  # delivered once: no split, no duplicate
        assert point_ids(req for _, req in server.calls) == list(range(1000))
        assert sender.splits.value(attrs) == 0 and dropped_total(sender) == 0
        assert exporter.oversized.value(attrs) == 1
    finally:
        exporter.close()
        server.stop()


# --- partial success ------------------------------------------------------------------------------

@pytest.mark.parametrize("rejected", [-1, -(2**63), 2**62])
def test_partial_success_count_is_clamped_and_message_truncated(rejected, caplog):
    receiver = HttpReceiver().start()
    resp = ExportMetricsServiceResponse()
    resp.partial_success.rejected_data_points = rejected
    resp.partial_success.error_message = "E" * 5000
    receiver.respond = lambda path: (200, {}, resp.SerializeToString())
    exporter = http_exporter(receiver.endpoint)
    try:
        before = exporter.rejected.value((("signal", "metrics"),))
        with caplog.at_level(logging.WARNING, logger="hostagent.export"):
            assert RetryingSender(exporter, TINY, SelfMetrics(), threading.Event()).send(payload(10)) == SENT
        counted = exporter.rejected.value((("signal", "metrics"),)) - before
        assert 0 <= counted <= 10
        lines = [r.getMessage() for r in caplog.records if "partial_success" in r.getMessage()]
        assert len(lines) == 1 and len(lines[0]) < 1000, lines
    finally:
        exporter.close()
        receiver.stop()


# --- header values are never logged, and never cost data ------------------------------------------

@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_invalid_header_value_is_never_logged_and_drops_nothing(protocol, caplog, capfd):
    endpoint = "http://127.0.0.1:1"
    cfg = OtlpExporterConfig(protocol=protocol, endpoint=endpoint, timeout=Duration(2), connections=1,
                             headers={"authorization": f"Bearer {SECRET}\n"})
    telemetry = SelfMetrics()
    exporter = EXPORTERS["otlp"].create(cfg, telemetry)
    pipe = Pipeline(BatchConfig(), TINY, exporter, telemetry, senders=1, give_up_after=0)
    pipe.queue.put(payload(7))
    attrs = (("exporter", exporter.name), ("signal", "metrics"))
    with caplog.at_level(logging.DEBUG):
        pipe.start()
        assert poll(lambda: pipe.sender.internal_errors.value(attrs) >= 3, timeout=30)
        assert pipe.queue.items == 7 and dropped_total(pipe.sender) == 0
        pipe.shutdown(0.5)
    assert SECRET not in caplog.text and SECRET not in "".join(capfd.readouterr())


# --- the file exporter's output is private --------------------------------------------------------

def test_file_exporter_output_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        cfg = FileExporterConfig(path=str(out / "metrics.jsonl"), logs_path=str(out / "logs.jsonl"),
                                 max_size=4096, max_backups=2)
        exporter = FileExporter(cfg)
        for k in range(4):
            exporter.send(payload(20, first=20 * k))  # rotates
        exporter.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    files = sorted(os.listdir(out))
    assert "metrics.jsonl.1" in files
    for name in files:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name


# --- the persistent queue under random damage -----------------------------------------------------

def wal_payload(i: int) -> Payload:
    body = struct.pack("<I", i) + bytes([i % 251]) * (40 + 37 * (i % 7))
    return Payload("metrics" if i % 2 else "logs", body, 1 + i % 5)


def wal_records(directory: str) -> list:
    """(segment path, offset, frame length, payload number) of every frame on disk."""
    out = []
    for path in segment_files(directory).values():
        data = open(path, "rb").read()
        off = 0
        while off + HEADER.size <= len(data):
            length = struct.unpack_from("<I", data, off + 8)[0]
            body = lz4.frame.decompress(data[off + HEADER.size: off + HEADER.size + length])
            out.append((path, off, HEADER.size + length, struct.unpack_from("<I", body)[0]))
            off += HEADER.size + length
    return out


DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=300), st.just(0)),
    st.tuples(st.just("zero"), st.integers(0, 1 << 20), st.integers(1, 400)),
    st.tuples(st.just("garbage"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
)


def damage(path: str, kind: str, a, b) -> tuple:
    """Damage `path`; the byte range touched (end 2**62: everything from there on)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if kind == "truncate":
            f.truncate(a % (size + 1))
            return a % (size + 1), 1 << 62
        if kind == "append":
            f.seek(0, os.SEEK_END)
            f.write(a)
            return size, 1 << 62
        if not size:
            return 0, 0
        pos = a % size
        f.seek(pos)
        if kind == "flip":
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ (1 << b)]))
            return pos, pos + 1
        data = b"\x00" * min(b, size - pos) if kind == "zero" else b[:size - pos]
        f.write(data)
        return pos, pos + len(data)


def corruption_counted(q) -> float:
    m = q.metrics
    return m.corrupt.total() + m.dropped.total()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), acked=st.integers(0, 40), segment=st.sampled_from([300, 1000, 64 << 10]),
       damages=st.lists(st.tuples(st.integers(0, 10), DAMAGE), min_size=1, max_size=4))
def test_wal_survives_random_damage(tmp_path_factory, n, acked, segment, damages):
    """Records written, some acknowledged, the files damaged at random: reopening never raises,
    every record the damage did not touch and that was not acknowledged comes back once, in order,
    unchanged; what was lost is counted; the queue goes on taking and giving records."""
    directory = str(tmp_path_factory.mktemp("wal"))
    settings_ = QueueSettings("persistent", directory, max_bytes=1 << 22, segment_size=segment, fsync="record")
    q = PersistentQueue(settings_, SelfMetrics())
    for i in range(n):
        q.put(wal_payload(i))
    acked = min(acked, n)
    for _ in range(acked):
        q.ack(q.get(0))
    q.close()
    records = wal_records(directory)
    files = list(segment_files(directory).values()) + [os.path.join(directory, "cursor")]
    touched: dict = {}
    for which, (kind, a, b) in damages:
        path = files[which % len(files)]
        if os.path.exists(path):
            touched.setdefault(path, []).append(damage(path, kind, a, b))
    started = time.monotonic()
    q = PersistentQueue(settings_, SelfMetrics())
    got = []
    while (e := q.get(0)) is not None:
        got.append(struct.unpack_from("<I", e.payload.body)[0])
        assert e.payload == wal_payload(got[-1])  # delivered as queued, or not at all
        q.ack(e)
    q.put(wal_payload(n))  # and it goes on working
    e = q.get(0)
    assert e is not None and e.payload == wal_payload(n)
    q.ack(e)
    assert q.items == 0
    took = time.monotonic() - started
    lost = corruption_counted(q)
    q.close()
    assert took < 30, took  # a bound, not a measure: a scan of a few KiB, not a loop
    intact = [i for path, off, length, i in records
              if not any(lo < off + length and off < hi for lo, hi in touched.get(path, ()))]
    owed = [i for i in intact if i >= acked]
    assert [i for i in got if i in set(owed)] == owed
    assert len(got) == len(set(got)) and set(got) <= set(range(n))
    cursor = os.path.join(directory, "cursor")
    if cursor not in touched:
        assert all(i >= acked for i in got)
        # bytes changed in place are found (cut-off ones are not: a file cut at a frame boundary
        # looks like one that was never longer)
        changed = {i for path, off, length, i in records if i >= acked and i not in got and any(
            lo < off + length and off < hi and hi - lo < 1 << 40 and lo < truncated(touched, path)
            for lo, hi in touched.get(path, ()))}
        assert not changed or lost > 0, (changed, lost)


def truncated(touched: dict, path: str) -> int:
    """Where `path` was cut, if it was (ranges open to the end: truncation or appended bytes)."""
    return min((lo for lo, hi in touched.get(path, ()) if hi >= 1 << 40), default=1 << 62)
