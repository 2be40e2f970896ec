"""sources -> input queue -> batcher -> export queue -> senders -> exporter, each stage a thread
(the senders: `connections` threads) that hands the next a batch and never calls back up. The
batcher first runs the batch through enrichment and cardinality limits (enrich.py).

The export queue (agent/export/queue.py) is in memory or on disk. On a reload the queue itself
moves to the next pipeline, so nothing queued is lost or sent twice. On shutdown the senders
deliver for at most the shutdown timeout, then a request still in flight is cut short; what is left
is dropped and counted (memory) or kept on disk and sent after the next start (persistent).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from agent.config import ConfigError
from agent.export import Exporter
from agent.export.factory import open_queue
from agent.export.queue import ExportQueue, MemoryQueue, QueueError, QueueSettings
from agent.export.retry import ABORTED, RetryConfig, RetryingSender, internal_error
from agent.model import Batch
from agent.pipeline.batcher import BatchConfig, Batcher
from agent.pipeline.bounded import BoundedQueue
from agent.pipeline.enrich import CardinalityLimiter, ProcessEnricher

log = logging.getLogger("hostagent.pipeline")

# An idle sender's longest sleep; stopping wakes it at once (queue.wake()), so this only bounds
# how often an idle agent wakes up (each timed wait costs 60-190 µs of CPU in a VM).
SENDER_IDLE_WAIT = 2.0


class Pipeline:
    def __init__(self, batch: BatchConfig, retry: RetryConfig, exporter: Exporter, telemetry, backlog=(),
                 queue: Optional[ExportQueue] = None, senders: int = 1, give_up_after: Optional[float] = None,
                 stages=()):
        """`telemetry`: the agent's own metrics; `backlog`: encoded payloads an earlier pipeline
        left (sent first); `queue`: the export queue (default: in memory); `senders`: requests in
        flight at once; `give_up_after`: seconds of retries before a payload is dropped (0: never;
        default from `retry`); `stages`: callables that change each incoming batch in place, in order."""
        self.exporter = exporter
        self.incoming = telemetry.counter("hostagent.pipeline.incoming_items", "{items}",
                                          "Data points and log records handed to the pipeline, by scope.")
        self.inq = BoundedQueue("input", batch.queue_size, telemetry, len)
        self.queue = queue if queue is not None else MemoryQueue(QueueSettings("memory"), telemetry)
        for payload in backlog:
            self.queue.put(payload)
        self.batcher = Batcher(self.inq, self.queue, batch.max_size, float(batch.timeout), telemetry, stages)
        self.abort = threading.Event()
        if give_up_after is None:
            give_up_after = retry.give_up_after(persistent=self.queue.kind == "persistent")
        self.sender = RetryingSender(exporter, retry, telemetry, self.abort, give_up_after)
        self.retry_pause = float(retry.max_interval)
        self._draining = threading.Event()
        self._workers = [threading.Thread(target=self._send_loop, name=f"exporter-{i}", daemon=True)
                         for i in range(max(1, senders))]

    def start(self) -> None:
        self.batcher.start()
        for w in self._workers:
            w.start()

    def emit(self, batch: Batch) -> None:
        """Hand a batch to the pipeline; never blocks (a full queue drops its oldest batch)."""
        n = len(batch)
        if n:
            for g in batch.metrics:
                self.incoming.add(sum(len(m.points) for m in g.metrics), (("scope", g.scope.name),))
            for g in batch.logs:
                self.incoming.add(len(g.records), (("scope", g.scope.name),))
            self.inq.put(batch)

    def _send_loop(self) -> None:
        while not self.abort.is_set():
            entry = self.queue.get(timeout=SENDER_IDLE_WAIT)
            if entry is None:
                if self._draining.is_set() and not self.batcher.is_alive():
                    return
                continue
            try:
                result = self.sender.send(entry.payload)
            except Exception as e:  # a bug must not stop delivery, nor lose the payload: retry later
                log.error("send_failed items=%d error=%r retry_in=%.1fs", entry.payload.items,
                          internal_error(e), self.retry_pause)
                self.sender.internal_errors.add(1, (("exporter", self.exporter.name),
                                                    ("signal", entry.payload.signal)))
                self.abort.wait(self.retry_pause)
                result = ABORTED
            if result == ABORTED:
                self.queue.release(entry)
            else:
                self.queue.ack(entry)

    def healthy(self) -> bool:
        return self.batcher.is_alive() and all(w.is_alive() for w in self._workers)

    def _stop(self, deliver_for: float, cut: bool) -> None:
        """Flush the batcher into the queue, let the senders deliver for at most `deliver_for`
        seconds, then stop them (a retry wait is cut short, its payload goes back to the queue;
        with `cut`, so is a request in flight: shutdown must not wait for a slow server)."""
        deadline = time.monotonic() + deliver_for
        self._draining.set()
        self.batcher.stop()
        self.batcher.join(max(0.0, deadline - time.monotonic()))
        self.queue.wake()           # senders waiting on an empty queue: the batcher has finished
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
        self.abort.set()
        if cut:
            self.exporter.abort()
        self.queue.wake()
        self.batcher.join()
        for w in self._workers:
            w.join()
        self.exporter.close()

    def handover(self) -> ExportQueue:
        """Stop without losing anything: the export queue, with everything not yet delivered,
        goes to the next pipeline (`build_pipeline(cfg, exporter, telemetry, backlog=<this>)`)."""
        self._stop(0.0, cut=False)  # requests in flight end (within their timeout): nothing sent twice
        return self.queue

    def shutdown(self, timeout: float) -> bool:
        """Flush and deliver what was handed over, for at most `timeout` seconds. What is left is
        dropped and counted (memory queue) or kept on disk for the next start (persistent queue).
        True when nothing was left."""
        self._stop(timeout, cut=True)
        left = self.queue.items
        if self.queue.kind == "persistent":
            self.queue.close()
            if left:
                log.warning("shutdown_queued items=%d directory=%s delivery=after_restart", left,
                            self.queue.settings.directory)
        elif left:
            self.queue.metrics.dropped.add(left, (("queue", "export"), ("reason", "shutdown")))
            log.warning("shutdown_dropped items=%d reason=timeout", left)
            self.queue.close()
        return not left


def build_pipeline(cfg, exporter: Exporter, telemetry, backlog=()) -> Pipeline:
    """The pipeline `cfg` (the root Config) describes, recording into `telemetry`. `backlog` is
    what `handover()` of the pipeline it replaces returned (its export queue, kept or emptied into
    the new one), or a list of payloads."""
    reuse = backlog if isinstance(backlog, ExportQueue) else None
    try:
        queue = open_queue(cfg.exporter, cfg.state_dir, telemetry, reuse=reuse)
    except QueueError as e:
        raise ConfigError("exporter.queue.directory", str(e)) from None
    log.info("export_queue type=%s%s items=%d max_size=%d", queue.kind,
             f" directory={queue.settings.directory}" if queue.kind == "persistent" else "",
             queue.items, queue.settings.max_bytes)
    stages = [CardinalityLimiter(cfg.cardinality_limit, telemetry)]
    if cfg.enrichment.enabled:
        stages.insert(0, ProcessEnricher(cfg.enrichment, telemetry))
    return Pipeline(cfg.batch, cfg.exporter.retry, exporter, telemetry, () if reuse is not None else backlog,
                    queue=queue, senders=cfg.exporter.senders(), stages=stages)
