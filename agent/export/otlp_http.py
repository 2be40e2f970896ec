"""OTLP/HTTP with binary protobuf bodies over keep-alive connections."""
from __future__ import annotations

import email.utils
import gzip
import logging
import time

import urllib3

from agent.config import OtlpExporterConfig
from agent.export import Exporter, PermanentError, RetryableError
from agent.export.encoding import Payload, rejected_items
from agent.selfmetrics import SELF

log = logging.getLogger("hostagent.export")

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


class HttpExporter(Exporter):
    name = "otlp_http"

    def __init__(self, cfg: OtlpExporterConfig):
        self.cfg = cfg
        self.urls = {signal: cfg.signal_url(signal) for signal in ("metrics", "logs")}
        self.headers = {**cfg.headers, "Content-Type": "application/x-protobuf",
                        "User-Agent": "hostagent"}
        if cfg.compression == "gzip":
            self.headers["Content-Encoding"] = "gzip"
        timeout = urllib3.Timeout(total=float(cfg.timeout))
        # one pool per host, kept alive between exports; urllib3 does no retries of its own
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=2, timeout=timeout, retries=False)
        self.rejected = SELF.counter("hostagent.exporter.rejected", "{items}",
                                     "Items the receiver rejected in a partial success.")

    def send(self, payload: Payload) -> None:
        body = gzip.compress(payload.body, compresslevel=6) if self.cfg.compression == "gzip" else payload.body
        url = self.urls[payload.signal]
        try:
            resp = self.pool.request("POST", url, body=body, headers=self.headers)
        except urllib3.exceptions.HTTPError as err:
            raise RetryableError(f"{payload.signal} export to {url} failed: {err}") from None
        if 200 <= resp.status < 300:
            try:
                rejected, message = rejected_items(payload.signal, resp.data)
            except Exception:  # a 200 whose body is not an OTLP response is still a success
                return
            if rejected or message:
                log.warning("partial_success signal=%s rejected=%d message=%r", payload.signal, rejected, message)
                self.rejected.add(rejected, (("signal", payload.signal),))
            return
        message = f"{payload.signal} export to {url} failed: HTTP {resp.status}: {resp.data[:200]!r}"
        if resp.status in RETRYABLE_STATUSES:
            raise RetryableError(message, parse_retry_after(resp.headers.get("Retry-After")))
        raise PermanentError(message)

    def close(self) -> None:
        self.pool.clear()
