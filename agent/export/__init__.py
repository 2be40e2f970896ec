"""OTLP encoding and the exporters that send it.

An exporter only sends one encoded Payload and says how it went by raising one of the errors
below; retrying, queueing and batching are separate layers (agent/export/retry.py,
agent/export/queue.py, agent/pipeline/).
"""
from __future__ import annotations

import logging
from typing import Optional

from agent.selfmetrics import SELF

log = logging.getLogger("hostagent.export")

# The most of an answer read: a status and a partial success fit many times over. An answer that
# goes on (larger, or still arriving at the request timeout) is cut there, never held in memory.
MAX_RESPONSE = 64 * 2**10
LOGGED_MESSAGE = 256  # characters of a server's message in a log line


class ExportError(Exception):
    """Base of export failures; `reason` is a short label used as a metric attribute."""
    reason = "error"


class RetryableError(ExportError):
    """The server may take the same payload later; `delay` is the server's requested wait."""
    reason = "retryable"

    def __init__(self, message: str, delay: Optional[float] = None):
        super().__init__(message)
        self.delay = delay


class PermanentError(ExportError):
    """Sending the same payload again cannot succeed: drop it and count it."""
    reason = "permanent"


class TooLargeError(PermanentError):
    """The server refuses the request for its size (HTTP 413, gRPC RESOURCE_EXHAUSTED "message
    larger than max"): split it in halves and send those instead."""
    reason = "too_large"


class LocalError(ExportError):
    """The request cannot leave this host for a reason of the agent's own (e.g. a header the
    transport refuses): like any unexpected error, the payload stays queued and is retried."""
    reason = "internal_error"


class Exporter:
    name = ""

    def send(self, payload) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Cut the requests in flight short (shutdown: the time to deliver is over)."""

    def close(self) -> None:
        pass


class OtlpExporter(Exporter):
    """An exporter to an OTLP receiver, whose success answers may carry a partial success."""

    def __init__(self, headers: dict):
        self.rejected = SELF.counter("hostagent.exporter.rejected", "{items}",
                                     "Items the receiver rejected in a partial success.")
        self.oversized = SELF.counter("hostagent.exporter.oversized_responses", "{responses}",
                                      "Success answers cut unread: larger than 64 KiB, or still arriving "
                                      "at the request timeout. The request counts as delivered, once.")
        self._secrets = sorted({v.strip() for v in headers.values() if len(v.strip()) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """`text` (a server's or a library's words) without any header value it may echo."""
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def answered_oversized(self, signal: str, url: str) -> None:
        self.oversized.add(1, (("exporter", self.name), ("signal", signal)))
        log.warning("response_cut exporter=%s endpoint=%s signal=%s read_at_most=%d delivered=true",
                    self.name, url, signal, MAX_RESPONSE)

    def partial_success(self, signal: str, body: bytes, items: int) -> None:
        """Log and count what a success answer says was rejected; it is never retried. A body
        that is not an OTLP response (some backends answer 2xx with anything) is a plain success.
        The count is taken as at most the `items` sent, the message logged only in part."""
        from agent.export.encoding import rejected_items
        try:
            rejected, message = rejected_items(signal, body)
        except Exception:
            return
        if rejected or message:
            rejected = min(max(rejected, 0), items)
            message = self.scrub(message)
            if len(message) > LOGGED_MESSAGE:
                message = message[:LOGGED_MESSAGE] + f"... ({len(message)} characters)"
            log.warning("partial_success exporter=%s signal=%s rejected=%d message=%r", self.name,
                        signal, rejected, message)
            self.rejected.add(rejected, (("signal", signal),))
