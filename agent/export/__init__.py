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


class Exporter:
    name = ""

    def send(self, payload) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OtlpExporter(Exporter):
    """An exporter to an OTLP receiver, whose success answers may carry a partial success."""

    def __init__(self):
        self.rejected = SELF.counter("hostagent.exporter.rejected", "{items}",
                                     "Items the receiver rejected in a partial success.")

    def partial_success(self, signal: str, body: bytes) -> None:
        """Log and count what a success answer says was rejected; it is never retried. A body
        that is not an OTLP response (some backends answer 2xx with anything) is a plain success."""
        from agent.export.encoding import rejected_items
        try:
            rejected, message = rejected_items(signal, body)
        except Exception:
            return
        if rejected or message:
            log.warning("partial_success exporter=%s signal=%s rejected=%d message=%r", self.name,
                        signal, rejected, message)
            self.rejected.add(rejected, (("signal", signal),))
