"""OTLP encoding and the exporters that send it.

An exporter only sends one encoded Payload and says how it went by raising one of the errors
below; retrying, queueing and batching are separate layers (agent/export/retry.py,
agent/export/queue.py, agent/pipeline/). Each part's config sits beside its code; the
`exporter:` section and the tables that build exporters and queues are in agent/export/factory.py.
"""
from __future__ import annotations

from typing import Optional


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

