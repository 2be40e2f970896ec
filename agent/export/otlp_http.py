"""OTLP/HTTP with binary protobuf bodies over keep-alive connections.

Per endpoint a pool of `connections` keep-alive connections shared by the senders; endpoints take
turns and fail over (agent/export/pool.py). Bodies are compressed here (gzip, zstd, lz4, zlib,
deflate: agent/export/compression.py). What the server answers decides between retry, drop and
split exactly as the OTLP specification says (`classify`).

A server cannot hold a sender or its memory: at most MAX_RESPONSE bytes of an answer are read, and
the request timeout is a deadline for the whole exchange (`Deadlines`).
"""
from __future__ import annotations

import contextlib
import email.utils
import http.client
import socket
import threading
import time
from typing import Optional
from urllib.parse import urlsplit

import urllib3
import urllib3.poolmanager

from agent.export import ExportError, PermanentError, RetryableError, TooLargeError
from agent.export.compression import Compressor
from agent.export.encoding import Payload
from agent.export.otlp import MAX_RESPONSE, OtlpExporter, OtlpExporterConfig
from agent.export.pool import Endpoint, EndpointPool, log_tls_error


# OTLP spec: only these statuses may succeed on retry.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def parse_retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)  # a number too large for a float is inf: the retry layer caps it
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def classify(status: int, retry_after: Optional[str], message: str) -> ExportError:
    """The error a non-2xx answer becomes, per the OTLP specification."""
    if status in RETRYABLE_STATUSES:
        return RetryableError(message, parse_retry_after(retry_after))
    if status == 413:
        return TooLargeError(message)
    return PermanentError(message)


class Deadlines:
    """Cuts an exchange with a server at its deadline, whatever it is waiting for (sending, the
    status, the body): a thread per exporter shuts down the socket of each connection whose
    deadline passed, which ends a blocked send or receive at once. A socket timeout bounds one
    receive, not the exchange: a server trickling a byte a second would hold a sender forever."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._watched: dict = {}  # connection -> (deadline (monotonic), thread of the exchange)
        self._local = threading.local()  # the deadline of the exchange this thread runs
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-deadlines", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def exchange(self, seconds: float):
        """The requests this thread makes inside the block end at most `seconds` from now."""
        self._local.deadline, self._local.conns = time.monotonic() + seconds, []
        try:
            yield
        finally:
            self._local.deadline = None
            me = threading.get_ident()
            with self._cond:  # a connection given back to the pool may already serve another thread
                for conn in self._local.conns:
                    if self._watched.get(conn, (0, me))[1] == me:
                        self._watched.pop(conn, None)

    def started(self, conn) -> None:
        """`conn` starts a request (called by the connection, in the sending thread)."""
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None:
            with self._cond:
                self._watched[conn] = (deadline, threading.get_ident())
                self._local.conns.append(conn)
                self._cond.notify()

    def cut_all(self) -> None:
        with self._cond:
            for conn, (_, owner) in self._watched.items():
                self._watched[conn] = (0.0, owner)
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for conn in [c for c, (d, _) in self._watched.items() if d <= now]:
                    if _cut(conn):  # not connected yet: the next round
                        del self._watched[conn]
                soonest = min((d for d, _ in self._watched.values()), default=None)
                self._cond.wait(None if soonest is None else max(soonest - now, 0.05))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)


def _cut(conn) -> bool:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return False
    try:  # the plain socket's shutdown, under TLS too: the TLS layer then sees the end of the stream
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    return True


class _Watched:
    """A connection that tells its exporter's Deadlines when a request starts on it."""
    deadlines: Deadlines

    def request(self, *args, **kw):
        self.deadlines.started(self)
        return super().request(*args, **kw)


def _watched_pools(deadlines: Deadlines) -> dict:
    """urllib3's connection pool classes by scheme, with connections watched by `deadlines`."""
    out = {}
    for scheme, pool in urllib3.poolmanager.pool_classes_by_scheme.items():
        conn = type(pool.ConnectionCls.__name__, (_Watched, pool.ConnectionCls), {"deadlines": deadlines})
        out[scheme] = type(pool.__name__, (pool,), {"ConnectionCls": conn})
    return out


def read_answer(resp) -> tuple[bytes, bool]:
    """At most MAX_RESPONSE bytes of an answer's body, and whether that was all of it. The
    connection goes back to the pool only when it was; otherwise it is closed unread."""
    data, complete = b"", False
    try:
        while len(data) <= MAX_RESPONSE:
            chunk = resp.read(MAX_RESPONSE + 1 - len(data))
            if not chunk:
                complete = True
                break
            data += chunk
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
        pass  # cut at the deadline, or the server hung up: what was read is what there is
    if not complete:
        resp.close()
    resp.release_conn()
    return data[:MAX_RESPONSE], complete


class HttpExporter(OtlpExporter):
    name = "otlp_http"

    def __init__(self, cfg: OtlpExporterConfig, telemetry):
        headers = cfg.all_headers()
        super().__init__(headers, telemetry)
        self.cfg = cfg
        self.timeout = float(cfg.timeout)
        self.compressor = Compressor(cfg.compression, cfg.compression_level)
        self.headers = {**headers, "Content-Type": "application/x-protobuf",
                        "User-Agent": "hostagent"}
        if self.compressor.encoding:
            self.headers["Content-Encoding"] = self.compressor.encoding
        timeout = urllib3.Timeout(total=float(cfg.timeout))
        tls = cfg.tls
        kw = {}
        if tls.server_name_override:
            kw.update(server_hostname=tls.server_name_override, assert_hostname=tls.server_name_override)
        # one pool of `connections` keep-alive connections per host; urllib3 does no retries of its own
        self.http = urllib3.PoolManager(num_pools=16, maxsize=cfg.connections, block=True, timeout=timeout,
                                        retries=False, cert_reqs="CERT_REQUIRED", ca_certs=tls.ca_file or None,
                                        cert_file=tls.cert_file or None, key_file=tls.key_file or None, **kw)
        self.deadlines = Deadlines(self.name)
        self.http.pool_classes_by_scheme = _watched_pools(self.deadlines)
        self.pool = EndpointPool(self.name, {s: cfg.signal_urls(s) for s in ("metrics", "logs")}, telemetry,
                                 check=self._check)
        self._opened: dict = {}  # url -> connections opened so far

    def send(self, payload: Payload) -> None:
        body = self.compressor.compress(payload.body)
        self.pool.send(payload.signal, lambda ep: self._send_to(ep, payload, body))

    def _send_to(self, ep: Endpoint, payload: Payload, body: bytes) -> None:
        started = time.monotonic()
        with self.deadlines.exchange(self.timeout):
            try:
                resp = self.http.request("POST", ep.url, body=body, headers=self.headers, preload_content=False)
            except urllib3.exceptions.HTTPError as err:
                ep.record("retryable", time.monotonic() - started, len(payload.body), len(body))
                self._count_connections(ep)
                if isinstance(err, urllib3.exceptions.SSLError):
                    log_tls_error(ep, self.scrub(str(err.__context__ or err)))
                raise RetryableError(f"{payload.signal} export to {ep.url} failed: {self.scrub(str(err))}") from None
            data, complete = read_answer(resp)
        self._count_connections(ep)
        elapsed = time.monotonic() - started
        if 200 <= resp.status < 300:
            ep.record("success", elapsed, len(payload.body), len(body))
            if complete:
                self.partial_success(payload.signal, data, payload.items)
            else:
                self.answered_oversized(payload.signal, ep.url)
            return
        message = self.scrub(f"{payload.signal} export to {ep.url} failed: HTTP {resp.status}: {data[:200]!r}")
        error = classify(resp.status, resp.headers.get("Retry-After"), message)
        ep.record(error.reason, elapsed, len(payload.body), len(body))
        raise error

    def _count_connections(self, ep: Endpoint) -> None:
        """Connections opened beyond the first `connections` of a pool count as reconnects."""
        try:
            opened = self.http.connection_from_url(ep.url).num_connections
        except Exception:
            return
        before = self._opened.get(ep.url, 0)
        if opened > before:
            self._opened[ep.url] = opened
            again = opened - max(before, self.cfg.connections)
            if again > 0:
                ep.reconnected(again)

    def _check(self, ep: Endpoint) -> bool:
        """Health check of a down endpoint: does its host accept a TCP connection within 2s?"""
        parts = urlsplit(ep.url)
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=2).close()
            return True
        except OSError:
            return False

    def abort(self) -> None:
        self.deadlines.cut_all()

    def close(self) -> None:
        self.pool.close()
        self.deadlines.close()
        self.http.clear()
