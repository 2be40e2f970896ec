"""The retry layer around a plain exporter: backoff with jitter, the server's delay honored,
permanent errors dropped at once; every wait can be cut short by `abort`."""
from __future__ import annotations

import logging
import random
import threading
import time

from agent.config import RetryConfig
from agent.export import Exporter, PermanentError, RetryableError
from agent.export.encoding import Payload
from agent.selfmetrics import SELF

log = logging.getLogger("hostagent.export")

SENT, DROPPED, ABORTED = "sent", "dropped", "aborted"


class RetryingSender:
    def __init__(self, exporter: Exporter, cfg: RetryConfig, abort: threading.Event):
        self.exporter, self.cfg, self.abort = exporter, cfg, abort
        self.sent = SELF.counter("hostagent.exporter.sent", "{items}",
                                 "Data points and log records the exporter delivered.")
        self.failed = SELF.counter("hostagent.exporter.send_failed", "{items}",
                                   "Items dropped because they could not be delivered, by reason.")
        self.retries = SELF.counter("hostagent.exporter.retries", "{requests}", "Export requests retried.")

    def _attrs(self, payload: Payload, *extra) -> tuple:
        return (("exporter", self.exporter.name), ("signal", payload.signal), *extra)

    def send(self, payload: Payload) -> str:
        """Deliver or give up: SENT, DROPPED (logged and counted here) or ABORTED (the caller
        still owns the payload: `abort` was set during a retry wait)."""
        started = time.monotonic()
        interval = float(self.cfg.initial_interval)
        while True:
            try:
                self.exporter.send(payload)
                self.sent.add(payload.items, self._attrs(payload))
                return SENT
            except PermanentError as e:
                return self._drop(payload, "permanent", str(e))
            except RetryableError as e:
                if not self.cfg.enabled:
                    return self._drop(payload, "retry_disabled", str(e))
                delay = e.delay if e.delay is not None else min(interval, self.cfg.max_interval) * random.uniform(0.5, 1.5)
                interval *= self.cfg.multiplier
                elapsed = time.monotonic() - started
                if self.cfg.max_elapsed_time and elapsed + delay > self.cfg.max_elapsed_time:
                    return self._drop(payload, "retries_exhausted", str(e))
                log.warning("export_retry exporter=%s delay=%.1fs error=%r", self.exporter.name, delay, str(e))
                self.retries.add(1, self._attrs(payload))
                if self.abort.wait(delay):
                    return ABORTED

    def _drop(self, payload: Payload, reason: str, message: str) -> str:
        log.error("export_dropped exporter=%s signal=%s items=%d reason=%s error=%r",
                  self.exporter.name, payload.signal, payload.items, reason, message)
        self.failed.add(payload.items, self._attrs(payload, ("reason", reason)))
        return DROPPED
