"""Batching by size and time: many small Batches in, few encoded Payloads out."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from agent.config import Duration, check_ranges
from agent.export.encoding import EncodingCounters, encode
from agent.model import Batch
from agent.pipeline.bounded import BoundedQueue

log = logging.getLogger("hostagent.pipeline")


@dataclass(frozen=True)
class BatchConfig:
    # flush when this many data points and log records are buffered ...
    max_size: int = 8192
    # ... or when the oldest buffered item is this old
    timeout: Duration = Duration(1.0)
    # collected batches waiting for the batcher; when full the oldest is dropped and counted
    # (the queue in front of the exporter is exporter.queue)
    queue_size: int = 64

    RANGES: ClassVar[dict] = {"max_size": (1, 1_000_000), "timeout": (Duration(0.001), Duration(600.0)),
                              "queue_size": (1, 10_000)}

    def validate(self, key: str) -> None:
        check_ranges(self, key)


class Batcher(threading.Thread):
    """Moves items from `inq` (Batch) to `outq` (Payload), flushing when `max_size` items are
    buffered or the oldest buffered item is `timeout` seconds old. Encoding happens here, once
    per flushed batch, so everything downstream handles wire bytes. `stages` change each incoming
    batch in place first (enrichment, cardinality limits), all on this one thread. The encoder's
    replacements and drops are counted in `telemetry`."""

    def __init__(self, inq: BoundedQueue, outq: BoundedQueue, max_size: int, timeout: float, telemetry,
                 stages: Sequence[Callable[[Batch], None]] = ()):
        super().__init__(name="batcher", daemon=True)
        self.inq, self.outq, self.max_size, self.timeout = inq, outq, max_size, timeout
        self.counters = EncodingCounters(telemetry)
        self.stages = tuple(stages)
        self._stopping = threading.Event()
        self._pending = Batch()
        self._size = 0
        self._oldest = 0.0

    def run(self) -> None:
        while not self._stopping.is_set():
            wait = self.timeout if not self._size else max(0.0, self._oldest + self.timeout - time.monotonic())
            item = self.inq.get(timeout=wait)
            if item is not None:
                self._add(item)
            if self._size and (self._size >= self.max_size or time.monotonic() - self._oldest >= self.timeout):
                self._flush()
        for item in self.inq.drain():  # stopping: take what producers already handed over
            self._add(item)
        self._flush()

    def _add(self, batch: Batch) -> None:
        for stage in self.stages:
            try:
                stage(batch)
            except Exception:  # a bug in a stage must not stop the pipeline nor lose the batch
                log.exception("stage_failed stage=%s", type(stage).__name__)
        if not self._size:
            self._oldest = time.monotonic()
        self._pending.metrics.extend(batch.metrics)
        self._pending.logs.extend(batch.logs)
        self._size += len(batch)
        if self._size >= self.max_size:
            self._flush()

    def _flush(self) -> None:
        if not self._size:
            return
        batch, self._pending, self._size = self._pending, Batch(), 0
        try:
            payloads = encode(batch, self.counters)
        except Exception:  # a bug in one source's data must not stop the pipeline
            log.exception("encode_failed items=%d", len(batch))
            return
        for payload in payloads:
            self.outq.put(payload)

    def stop(self) -> None:
        """Flush everything handed over so far, then end the thread."""
        self._stopping.set()
        self.inq.put(Batch())  # wake a blocked get()
