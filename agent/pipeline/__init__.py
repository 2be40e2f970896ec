"""sources -> input queue -> batcher -> export queue -> sender -> exporter, each stage a thread
that hands the next a batch and never calls back up."""
from __future__ import annotations

import logging
import threading
import time

from agent.config import BatchConfig, RetryConfig
from agent.export import Exporter
from agent.export.retry import ABORTED, RetryingSender
from agent.model import Batch
from agent.pipeline.batcher import Batcher
from agent.pipeline.queue import BoundedQueue

log = logging.getLogger("hostagent.pipeline")


class Pipeline:
    def __init__(self, batch: BatchConfig, retry: RetryConfig, exporter: Exporter, backlog=()):
        """`backlog`: encoded payloads an earlier pipeline handed over (on reload); sent first."""
        self.exporter = exporter
        self.inq = BoundedQueue("input", batch.queue_size, len)
        self.outq = BoundedQueue("export", batch.queue_size, lambda p: p.items)
        for payload in backlog:
            self.outq.put(payload)
        self.batcher = Batcher(self.inq, self.outq, batch.max_size, float(batch.timeout))
        self.abort = threading.Event()
        self.sender = RetryingSender(exporter, retry, self.abort)
        self._unsent = []  # a payload whose retries were cut short by abort
        self._draining = threading.Event()
        self._worker = threading.Thread(target=self._send_loop, name="exporter", daemon=True)

    def start(self) -> None:
        self.batcher.start()
        self._worker.start()

    def emit(self, batch: Batch) -> None:
        """Hand a batch to the pipeline; never blocks (a full queue drops its oldest batch)."""
        if len(batch):
            self.inq.put(batch)

    def _send_loop(self) -> None:
        while not self.abort.is_set():
            payload = self.outq.get(timeout=0.2)
            if payload is not None:
                if self.sender.send(payload) == ABORTED:
                    self._unsent.append(payload)
            elif self._draining.is_set() and not self.batcher.is_alive():
                return

    def healthy(self) -> bool:
        return self.batcher.is_alive() and self._worker.is_alive()

    def _stop(self, timeout: float) -> list:
        """Flush the batcher, deliver for at most `timeout` seconds, then stop the sender.
        Returns the payloads left undelivered."""
        deadline = time.monotonic() + timeout
        self._draining.set()
        self.batcher.stop()
        self.batcher.join(max(0.0, deadline - time.monotonic()))
        self._worker.join(max(0.0, deadline - time.monotonic()))
        self.abort.set()  # cut a retry wait short; the payload comes back through _unsent
        self._worker.join()
        self.exporter.close()
        return self._unsent + self.outq.drain()

    def handover(self, timeout: float) -> list:
        """Stop without losing anything: the undelivered payloads go to the next pipeline."""
        return self._stop(timeout)

    def shutdown(self, timeout: float) -> bool:
        """Flush and deliver what was handed over, for at most `timeout` seconds; what is left
        is dropped and counted. True when nothing was left."""
        left = self._stop(timeout)
        if left:
            n = sum(p.items for p in left)
            self.outq.dropped.add(n, (("queue", "export"), ("reason", "shutdown")))
            log.warning("shutdown_dropped items=%d reason=timeout", n)
        return not left
