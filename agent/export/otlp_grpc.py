"""OTLP/gRPC: sends encoded payloads as unary Export calls, bytes passed through untouched.

Per endpoint, `connections` channels (each its own HTTP/2 connection) are used in turn by the
senders; endpoints take turns and fail over (agent/export/pool.py). TLS with the system's or a given
CA, optional client certificate (mTLS), headers as call metadata. What the server answers decides
between retry, drop and split exactly as the OTLP specification says (`classify`). At most
MAX_RESPONSE bytes of an answer are taken: a larger one still means the server took the request.
"""
from __future__ import annotations

import itertools
import os
import re
import threading
import time
from typing import Optional
from urllib.parse import urlsplit

# grpc core's own log lines (a failed TLS handshake, a lost connection ...) would repeat on stderr
# what the exporter already logs once, as one structured line
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402

from agent.export import ExportError, LocalError, PermanentError, RetryableError, TooLargeError  # noqa: E402
from agent.export.encoding import Payload  # noqa: E402
from agent.export.otlp import MAX_RESPONSE, OtlpExporter, OtlpExporterConfig  # noqa: E402
from agent.export.pool import Endpoint, EndpointPool, log_tls_error  # noqa: E402


METHODS = {
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}

# OTLP spec: these codes may succeed on retry; RESOURCE_EXHAUSTED only when the server says when.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
COMPRESSION = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate,
               "none": grpc.Compression.NoCompression}
_TLS_ERROR = re.compile(r"(ssl|tls|handshake|certificate)", re.I)


def answer_too_large(code: grpc.StatusCode, details: str) -> bool:
    """The server answered, with more than this client takes (grpc core: "CLIENT: Received message
    larger than max"; the server's own limit on the request says "SERVER: ...")."""
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and "CLIENT:" in details and "larger than max" in details


def metadata_refused(code: grpc.StatusCode, details: str) -> bool:
    """grpc core refused to send the call's metadata (a header name or value it finds invalid)."""
    return code is grpc.StatusCode.INTERNAL and details == "Invalid metadata"


def retry_delay(metadata) -> Optional[float]:
    """RetryInfo.retry_delay in seconds from a call's trailing metadata, or None."""
    for key, value in (metadata or ()):
        if key == "grpc-status-details-bin":
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:
                return None
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def classify(code: grpc.StatusCode, details: str, delay: Optional[float], message: str) -> ExportError:
    """The error a failed Export call becomes, per the OTLP specification."""
    if code in RETRYABLE_CODES:
        return RetryableError(message, delay)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if delay is not None:
            return RetryableError(message, delay)
        if "larger than" in (details or "").lower():  # "Received message larger than max (N vs. M)"
            return TooLargeError(message)
    return PermanentError(message)


def tls_failure(details: str) -> str:
    """The TLS part of a connection failure's details ("" when it is not about TLS)."""
    if not details or not _TLS_ERROR.search(details):
        return ""
    # grpc core: "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: Tls handshake
    # failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:...:CERTIFICATE_VERIFY_FAILED: ...: OK"
    m = re.search(r"\w+ handshake failed.*", details, re.I)
    text = m.group(0) if m else details
    return re.sub(r": OK$", "", text.strip())


def credentials(cfg: OtlpExporterConfig) -> grpc.ChannelCredentials:
    tls = cfg.tls
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(root_certificates=read(tls.ca_file), private_key=read(tls.key_file),
                                        certificate_chain=read(tls.cert_file))


class _Channels:
    """The channels of one endpoint, used in turn, each with its callables per signal.

    A channel whose call failed UNAVAILABLE (its connection was lost or refused) and then
    succeeds has connected again: that counts as a reconnect. Watching the channels' state
    instead (Channel.subscribe) costs a polling thread per channel that wakes 5 times a second,
    about half of an idle agent's CPU."""

    def __init__(self, exporter: "GrpcExporter", ep: Endpoint):
        self.channels = [exporter.open_channel(ep.url) for _ in range(exporter.cfg.connections)]
        self.calls = [{signal: ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                       for signal, method in METHODS.items()} for ch in self.channels]
        self._next = itertools.count()
        self._lost = [False] * len(self.channels)
        self.endpoint = ep

    def call(self, signal: str):
        """(channel index, the callable of `signal` on that channel), channels in turn."""
        i = next(self._next) % len(self.calls)
        return i, self.calls[i][signal]

    def outcome(self, i: int, code: Optional[grpc.StatusCode]) -> None:
        """What a call on channel `i` ended with (None: success)."""
        if code is grpc.StatusCode.UNAVAILABLE:
            self._lost[i] = True
        elif code is None and self._lost[i]:
            self._lost[i] = False
            self.endpoint.reconnected()

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


class GrpcExporter(OtlpExporter):
    name = "otlp_grpc"

    def __init__(self, cfg: OtlpExporterConfig, telemetry):
        headers = cfg.all_headers()
        super().__init__(headers, telemetry)
        self.cfg = cfg
        self.timeout = float(cfg.timeout)
        self.metadata = tuple((k.lower(), v) for k, v in headers.items())
        self._inflight: set = set()  # calls under way, cancelled by abort()
        self._lock = threading.Lock()
        self.compression = COMPRESSION[cfg.compression]
        self._credentials = None
        self.pool = EndpointPool(self.name, {s: cfg.signal_urls(s) for s in METHODS}, telemetry, check=self._check)
        for ep in self.pool.all():
            ep.conn = _Channels(self, ep)

    def open_channel(self, url: str) -> grpc.Channel:
        target = urlsplit(url).netloc
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", MAX_RESPONSE),
                   ("grpc.enable_retries", 0),
                   # come back quickly after an outage: grpc's own reconnect backoff grows to 120s
                   ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", 5000),
                   ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
                   ("grpc.primary_user_agent", "hostagent")]
        if self.cfg.is_insecure(url):
            return grpc.insecure_channel(target, options=options, compression=self.compression)
        if self.cfg.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.cfg.tls.server_name_override))
        if self._credentials is None:
            self._credentials = credentials(self.cfg)
        return grpc.secure_channel(target, self._credentials, options=options, compression=self.compression)

    def send(self, payload: Payload) -> None:
        self.pool.send(payload.signal, lambda ep: self._send_to(ep, payload))

    def _send_to(self, ep: Endpoint, payload: Payload) -> None:
        started = time.monotonic()
        channel, call = ep.conn.call(payload.signal)
        future = call.future(payload.body, timeout=self.timeout, metadata=self.metadata)
        with self._lock:
            self._inflight.add(future)
        try:
            body = future.result()
        except grpc.FutureCancelledError:
            raise RetryableError(f"{payload.signal} export to {ep.url} cancelled at shutdown") from None
        except grpc.RpcError as err:
            code, details = err.code(), self.scrub(err.details() or "")
            if answer_too_large(code, details):
                ep.conn.outcome(channel, None)
                ep.record("success", time.monotonic() - started, len(payload.body), None)
                self.answered_oversized(payload.signal, ep.url)
                return
            if metadata_refused(code, details):
                raise LocalError("gRPC refuses the call's metadata: a header name or value is invalid "
                                 "(exporter.otlp.headers, headers_file)") from None
            ep.conn.outcome(channel, code)
            error = classify(code, details, retry_delay(err.trailing_metadata()),
                             f"{payload.signal} export to {ep.url} failed: {code.name}: {details}")
            ep.record(error.reason, time.monotonic() - started, len(payload.body), None)
            if code is grpc.StatusCode.UNAVAILABLE:
                tls = tls_failure(details)
                if tls:
                    log_tls_error(ep, tls)
            raise error from None
        finally:
            with self._lock:
                self._inflight.discard(future)
        ep.conn.outcome(channel, None)
        ep.record("success", time.monotonic() - started, len(payload.body), None)
        self.partial_success(payload.signal, body, payload.items)

    def _check(self, ep: Endpoint) -> bool:
        """Health check of a down endpoint: can one of its channels connect within 2s?"""
        try:
            grpc.channel_ready_future(ep.conn.channels[0]).result(timeout=2)
            return True
        except grpc.FutureTimeoutError:
            return False

    def abort(self) -> None:
        with self._lock:
            calls = list(self._inflight)
        for future in calls:
            future.cancel()

    def close(self) -> None:
        self.pool.close()
        for ep in self.pool.all():
            ep.conn.close()
