"""A bounded FIFO between two stages. put() never blocks the producer: when the queue is full
the oldest item is dropped and counted, so memory stays bounded and nothing is lost silently.
It records into the export queue's instruments (hostagent.queue.*), with queue=<name>."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

from agent.export.queue import QueueMetrics


class BoundedQueue:
    def __init__(self, name: str, capacity: int, telemetry, items_of: Callable[[object], int] = lambda _: 1):
        """`capacity` entries (batches); `items_of(entry)` counts the data points and log records in one."""
        self.name, self.capacity, self.items_of = name, capacity, items_of
        self._dq: collections.deque = collections.deque()
        self._items = 0
        self._cond = threading.Condition()
        metrics = QueueMetrics(telemetry)  # the same instruments as the export queue's, with queue=<name>
        self.dropped = metrics.dropped
        metrics.size.observe((("queue", name),), lambda: self._items)
        telemetry.gauge("hostagent.queue.capacity_batches", "{batches}",
                        "Capacity of a queue bounded by batches.").observe((("queue", name),), lambda: capacity)

    def put(self, item) -> None:
        n = self.items_of(item)
        with self._cond:
            if len(self._dq) >= self.capacity:
                oldest = self._dq.popleft()
                lost = self.items_of(oldest)
                self._items -= lost
                self.dropped.add(lost, (("queue", self.name), ("reason", "full")))
            self._dq.append(item)
            self._items += n
            self._cond.notify()

    def get(self, timeout: Optional[float]):
        """The oldest item, or None if none arrived within `timeout` seconds."""
        with self._cond:
            if not self._dq:
                self._cond.wait(timeout)
            if not self._dq:
                return None
            item = self._dq.popleft()
            self._items -= self.items_of(item)
            return item

    def drain(self) -> list:
        with self._cond:
            items, self._dq, self._items = list(self._dq), collections.deque(), 0
            return items

    def __len__(self) -> int:
        return len(self._dq)
