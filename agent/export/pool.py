"""Endpoints of one exporter: round robin over those that work, failover within a request, a
backoff health check that brings a failed endpoint back, and per-endpoint statistics.

An endpoint that answers a request with a retryable failure (unreachable, UNAVAILABLE, 503, a
throttle...) is marked down and the same request goes to the next endpoint at once. A down endpoint
gets no traffic while another is up; a health check (`check(endpoint)`, e.g. a connect) runs after
1s, 2s, 4s ... up to 30s and marks it up again when it passes. When every endpoint is down, all are
tried anyway and the retry layer's backoff paces the attempts.

Statistics, per exporter and endpoint, are the agent's own metrics: requests by outcome, bytes
before and after compression, request duration, reconnects, and whether the endpoint is up.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Optional

from agent.export import PermanentError, RetryableError

log = logging.getLogger("hostagent.export")

HEALTH_BACKOFF_INITIAL = 1.0
HEALTH_BACKOFF_MAX = 30.0


def health_backoff(failures: int) -> float:
    """Seconds before checking an endpoint again after `failures` failures in a row (the exponent is
    capped: 2 ** 1024 does not fit a float, and an outage may last that many failures)."""
    return min(HEALTH_BACKOFF_INITIAL * 2 ** min(failures - 1, 16), HEALTH_BACKOFF_MAX)


class EndpointStats:
    def __init__(self, telemetry):
        self.requests = telemetry.counter("hostagent.exporter.requests", "{requests}",
                                          "Export requests, by exporter, endpoint and outcome "
                                          "(success, retryable, permanent, too_large).")
        self.bytes = telemetry.counter("hostagent.exporter.sent_bytes", "By",
                                       "Encoded request bytes before compression, by exporter and endpoint.")
        self.wire_bytes = telemetry.counter("hostagent.exporter.sent_wire_bytes", "By",
                                            "Request body bytes after compression, as sent (OTLP/HTTP), "
                                            "by exporter and endpoint.")
        self.duration = telemetry.histogram("hostagent.exporter.request.duration", "s",
                                            "Duration of export requests, by exporter and endpoint.")
        self.reconnects = telemetry.counter("hostagent.exporter.reconnects", "{connections}",
                                            "Connections to an endpoint established again after the first, "
                                            "by exporter and endpoint.")
        self.up = telemetry.gauge("hostagent.exporter.endpoint.up", "1",
                                  "1 while an endpoint takes traffic, 0 while it is skipped after failures.")


class Endpoint:
    """One receiver URL of one signal. Exporters hang their connections on it (`conn`)."""

    def __init__(self, url: str, exporter: str, stats: EndpointStats):
        self.url = url
        self.attrs = (("exporter", exporter), ("endpoint", url))
        self.stats = stats
        self.up = True
        self.failures = 0
        self.retry_at = 0.0
        self.tls_error = ""  # the TLS error already logged, until the endpoint works again
        self.conn = None
        stats.up.observe(self.attrs, lambda: 1 if self.up else 0)

    def record(self, outcome: str, seconds: float, raw: int, wire: Optional[int]) -> None:
        s = self.stats
        s.requests.add(1, self.attrs + (("outcome", outcome),))
        s.duration.record(seconds, self.attrs)
        s.bytes.add(raw, self.attrs)
        if wire is not None:
            s.wire_bytes.add(wire, self.attrs)

    def reconnected(self, n: int = 1) -> None:
        self.stats.reconnects.add(n, self.attrs)


class EndpointPool:
    def __init__(self, exporter: str, urls: dict, telemetry, check: Optional[Callable[[Endpoint], bool]] = None):
        """`urls`: {signal: [url, ...]}; `check(endpoint)` -> True when it looks reachable."""
        self.exporter = exporter
        self.stats = EndpointStats(telemetry)
        self._by_url: dict = {}  # one Endpoint per URL, shared by the signals sent to it (gRPC)
        self.endpoints = {signal: [self._endpoint(u) for u in us] for signal, us in urls.items()}
        self._rr = {signal: itertools.count() for signal in urls}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.multiple = any(len(eps) > 1 for eps in self.endpoints.values())
        self.check = check
        self._health = None
        if check is not None and self.multiple:
            self._health = threading.Thread(target=self._health_loop, name=f"{exporter}-health", daemon=True)
            self._health.start()

    def _endpoint(self, url: str) -> Endpoint:
        ep = self._by_url.get(url)
        if ep is None:
            ep = self._by_url[url] = Endpoint(url, self.exporter, self.stats)
        return ep

    def all(self) -> list:
        return list(self._by_url.values())

    def order(self, signal: str) -> list:
        """Endpoints to try for one request: those up, starting with the next in turn, then the
        ones down (a last resort), soonest due first."""
        eps = self.endpoints[signal]
        if len(eps) == 1:
            return eps
        with self._lock:
            up = [ep for ep in eps if ep.up]
            down = sorted((ep for ep in eps if not ep.up), key=lambda ep: ep.retry_at)
            if up:
                i = next(self._rr[signal]) % len(up)
                up = up[i:] + up[:i]
        return up + down

    def send(self, signal: str, attempt: Callable[[Endpoint], None]) -> None:
        """Run `attempt(endpoint)` on endpoints in turn until one succeeds; a retryable failure
        moves on to the next endpoint, a permanent one ends the request."""
        last: Optional[RetryableError] = None
        for ep in self.order(signal):
            try:
                attempt(ep)
            except RetryableError as e:
                self.failed(ep, str(e))
                last = e
                continue
            except PermanentError:
                self.succeeded(ep)  # it answered: the endpoint is up, the request is the problem
                raise
            self.succeeded(ep)
            return
        assert last is not None
        raise last

    def failed(self, ep: Endpoint, error: str) -> None:
        with self._lock:
            ep.failures += 1
            ep.retry_at = time.monotonic() + health_backoff(ep.failures)
            if ep.up and self.multiple:
                log.warning("endpoint_down exporter=%s endpoint=%s error=%r", self.exporter, ep.url, error)
            ep.up = False
            self._wake.notify()

    def succeeded(self, ep: Endpoint) -> None:
        if ep.up and not ep.failures:
            return
        with self._lock:
            if not ep.up and self.multiple:
                log.info("endpoint_up exporter=%s endpoint=%s", self.exporter, ep.url)
            ep.up, ep.failures, ep.tls_error = True, 0, ""

    def _health_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                down = [ep for ep in self.all() if not ep.up]
                now = time.monotonic()
                due = [ep for ep in down if ep.retry_at <= now]
                if not due:
                    wait = min((ep.retry_at for ep in down), default=now + 60) - now
                    self._wake.wait(max(0.05, wait))
                    continue
            for ep in due:
                ok = False
                try:
                    ok = self.check(ep)
                except Exception:  # a check must never kill the loop
                    log.exception("endpoint_check_failed endpoint=%s", ep.url)
                with self._lock:
                    if ep.up:
                        continue
                    if ok:
                        ep.up = True
                        ep.retry_at = 0.0
                        log.info("endpoint_up exporter=%s endpoint=%s check=passed", self.exporter, ep.url)
                    else:
                        ep.failures += 1
                        ep.retry_at = time.monotonic() + health_backoff(ep.failures)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._health is not None:
            self._health.join(5)


def log_tls_error(ep: Endpoint, error: str) -> None:
    """One error line per endpoint and distinct TLS failure (again only after it worked)."""
    if ep.tls_error != error:
        ep.tls_error = error
        log.error("tls_error endpoint=%s error=%r", ep.url, error)
