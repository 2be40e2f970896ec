"""OTLP/HTTP with binary protobuf bodies over keep-alive connections.

Per endpoint a pool of `connections` keep-alive connections shared by the senders; endpoints take
turns and fail over (agent/export/pool.py). Bodies are compressed here (gzip, zstd, lz4, zlib,
deflate: agent/export/compression.py). What the server answers decides between retry, drop and
split exactly as the OTLP specification says (`classify`).
"""
from __future__ import annotations

import email.utils
import socket
import time
from typing import Optional
from urllib.parse import urlsplit

import urllib3

from agent.config import OtlpExporterConfig
from agent.export import ExportError, OtlpExporter, PermanentError, RetryableError, TooLargeError
from agent.export.compression import Compressor
from agent.export.encoding import Payload
from agent.export.pool import Endpoint, EndpointPool, log_tls_error


# OTLP spec: only these statuses may succeed on retry.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def parse_retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(status: int, retry_after: Optional[str], message: str) -> ExportError:
    """The error a non-2xx answer becomes, per the OTLP specification."""
    if status in RETRYABLE_STATUSES:
        return RetryableError(message, parse_retry_after(retry_after))
    if status == 413:
        return TooLargeError(message)
    return PermanentError(message)


class HttpExporter(OtlpExporter):
    name = "otlp_http"

    def __init__(self, cfg: OtlpExporterConfig):
        super().__init__()
        self.cfg = cfg
        self.compressor = Compressor(cfg.compression, cfg.compression_level)
        self.headers = {**cfg.all_headers(), "Content-Type": "application/x-protobuf",
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
        self.pool = EndpointPool(self.name, {s: cfg.signal_urls(s) for s in ("metrics", "logs")}, check=self._check)
        self._opened: dict = {}  # url -> connections opened so far

    def send(self, payload: Payload) -> None:
        body = self.compressor.compress(payload.body)
        self.pool.send(payload.signal, lambda ep: self._send_to(ep, payload, body))

    def _send_to(self, ep: Endpoint, payload: Payload, body: bytes) -> None:
        started = time.monotonic()
        try:
            resp = self.http.request("POST", ep.url, body=body, headers=self.headers)
        except urllib3.exceptions.HTTPError as err:
            ep.record("retryable", time.monotonic() - started, len(payload.body), len(body))
            self._count_connections(ep)
            if isinstance(err, urllib3.exceptions.SSLError):
                log_tls_error(ep, str(err.__context__ or err))
            raise RetryableError(f"{payload.signal} export to {ep.url} failed: {err}") from None
        self._count_connections(ep)
        elapsed = time.monotonic() - started
        if 200 <= resp.status < 300:
            ep.record("success", elapsed, len(payload.body), len(body))
            self.partial_success(payload.signal, resp.data)
            return
        message = f"{payload.signal} export to {ep.url} failed: HTTP {resp.status}: {resp.data[:200]!r}"
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

    def close(self) -> None:
        self.pool.close()
        self.http.clear()
