"""The retry layer around a plain exporter, as the OTLP specification has it: retryable failures
are retried with exponential backoff and jitter (the server's RetryInfo / Retry-After wins, up to
max_interval), permanent ones are dropped and counted at once, a request too large for the server
is split in halves and those are sent instead. Any other error (a bug, a request the transport
refuses) is counted and retried like a retryable failure: only delivery, a permanent rejection or
the give-up time ends a payload. Every wait can be cut short by `abort`."""
from __future__ import annotations

import logging
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass
from typing import ClassVar, Optional

from agent.config import ConfigError, Duration, check_ranges
from agent.export import Exporter, ExportError, PermanentError, RetryableError, TooLargeError
from agent.export.encoding import Payload, split

log = logging.getLogger("hostagent.export")

SENT, DROPPED, ABORTED = "sent", "dropped", "aborted"
RETRY_LOG_EVERY = 10.0  # seconds between two export_retry warnings (others go to debug)


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    # exponential backoff with +-50% jitter; a server's RetryInfo / Retry-After overrides it
    initial_interval: Duration = Duration(5.0)
    max_interval: Duration = Duration(30.0)
    multiplier: float = 1.5
    # give up on a payload (drop and count it) after this long; 0s retries forever;
    # unset: forever with a persistent queue, 5m with a memory queue
    max_elapsed_time: Optional[Duration] = None

    RANGES: ClassVar[dict] = {"initial_interval": (Duration(0.001), Duration(3600.0)),
                              "max_interval": (Duration(0.001), Duration(3600.0)), "multiplier": (1.0, 10.0),
                              "max_elapsed_time": (Duration(0.0), Duration(365 * 86400.0))}

    def validate(self, key: str) -> None:
        check_ranges(self, key)
        if self.max_interval < self.initial_interval:
            raise ConfigError(f"{key}.max_interval", "must be at least initial_interval")

    def give_up_after(self, persistent: bool) -> float:
        """Seconds after which a payload is dropped; 0 for never."""
        if self.max_elapsed_time is not None:
            return float(self.max_elapsed_time)
        return 0.0 if persistent else 300.0


def internal_error(e: Exception) -> str:
    """What is logged of an unexpected exception: its type and where it was raised, not its words
    (a transport's error may quote a header value, i.e. a credential)."""
    if isinstance(e, ExportError):
        return str(e)
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"internal error {type(e).__name__}{where}"


class RetryingSender:
    def __init__(self, exporter: Exporter, cfg: RetryConfig, telemetry, abort: threading.Event,
                 give_up_after: Optional[float] = None):
        """`give_up_after`: seconds after which a payload is dropped (0: never); by default what
        `cfg` says for a memory queue."""
        self.exporter, self.cfg, self.abort = exporter, cfg, abort
        self.give_up_after = cfg.give_up_after(persistent=False) if give_up_after is None else give_up_after
        self.sent = telemetry.counter("hostagent.exporter.sent", "{items}",
                                      "Data points and log records the exporter delivered.")
        self.failed = telemetry.counter("hostagent.exporter.send_failed", "{items}",
                                        "Items dropped because they could not be delivered, by reason.")
        self.retries = telemetry.counter("hostagent.exporter.retries", "{requests}", "Export requests retried.")
        self.internal_errors = telemetry.counter("hostagent.exporter.internal_errors", "{requests}",
                                                 "Export attempts that failed on this host (a bug, or a request "
                                                 "the transport refuses); the payload stays queued and is retried.")
        self.splits = telemetry.counter("hostagent.exporter.splits", "{requests}",
                                        "Requests split in halves because the server found them too large.")
        self._log_lock = threading.Lock()
        self._last_warning = 0.0
        self._quiet = 0

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
            except TooLargeError as e:
                return self._split(payload, str(e))
            except PermanentError as e:
                return self._drop(payload, "permanent", str(e))
            except RetryableError as e:
                if not self.cfg.enabled:
                    return self._drop(payload, "retry_disabled", str(e))
                delay, error = self.server_delay(e.delay), str(e)
            except Exception as e:  # noqa: BLE001 - a bug or a local refusal is no reason to lose data
                self.internal_errors.add(1, self._attrs(payload))
                delay, error = None, internal_error(e)
            if delay is None:
                delay = interval * random.uniform(0.5, 1.5)
                interval = min(interval * self.cfg.multiplier, float(self.cfg.max_interval))
            if self.abort.is_set():
                return ABORTED
            elapsed = time.monotonic() - started
            if self.give_up_after and elapsed + delay > self.give_up_after:
                return self._drop(payload, "retries_exhausted", error)
            self._log_retry(delay, error)
            self.retries.add(1, self._attrs(payload))
            if self.abort.wait(delay):
                return ABORTED

    def server_delay(self, delay: Optional[float]) -> Optional[float]:
        """A server's requested wait, capped at max_interval; None (our own backoff) when it
        makes no sense (negative, NaN)."""
        if delay is None or not delay >= 0:
            return None
        return min(delay, float(self.cfg.max_interval))

    def _split(self, payload: Payload, message: str) -> str:
        halves = split(payload)
        if not halves:  # one data point (log record) is more than the server takes
            return self._drop(payload, "too_large", message)
        log.info("export_split exporter=%s signal=%s items=%d into=%s", self.exporter.name, payload.signal,
                 payload.items, "+".join(str(h.items) for h in halves))
        self.splits.add(1, self._attrs(payload))
        results = []
        for half in halves:
            result = self.send(half)
            if result == ABORTED:  # the halves already sent arrive twice after a restart
                return ABORTED
            results.append(result)
        return SENT if all(r == SENT for r in results) else DROPPED

    def _log_retry(self, delay: float, error: str) -> None:
        now = time.monotonic()
        with self._log_lock:
            loud = now - self._last_warning >= RETRY_LOG_EVERY
            if loud:
                self._last_warning, quiet, self._quiet = now, self._quiet, 0
            else:
                self._quiet += 1
        if loud:
            log.warning("export_retry exporter=%s delay=%.1fs error=%r%s", self.exporter.name, delay, error,
                        f" retries_not_logged={quiet}" if quiet else "")
        else:
            log.debug("export_retry exporter=%s delay=%.1fs error=%r", self.exporter.name, delay, error)

    def _drop(self, payload: Payload, reason: str, message: str) -> str:
        log.error("export_dropped exporter=%s signal=%s items=%d reason=%s error=%r",
                  self.exporter.name, payload.signal, payload.items, reason, message)
        self.failed.add(payload.items, self._attrs(payload, ("reason", reason)))
        return DROPPED
