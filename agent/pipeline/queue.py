"""A bounded FIFO between two stages. put() never blocks the producer: when the queue is full
the oldest item is dropped and counted, so memory stays bounded and nothing is lost silently."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

from agent.selfmetrics import SELF


class BoundedQueue:
    def __init__(self, name: str, capacity: int, items_of: Callable[[object], int] = lambda _: 1):
        self.name, self.capacity, self.items_of = name, capacity, items_of
        self._dq: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.dropped = SELF.counter("hostagent.queue.dropped", "{items}",
                                    "Items dropped because a queue was full, oldest first.")
        SELF.gauge("hostagent.queue.size", "{batches}", "Batches waiting in a queue.").observe(
            (("queue", name),), self.__len__)
        SELF.gauge("hostagent.queue.capacity", "{batches}", "Capacity of a queue.").observe(
            (("queue", name),), lambda: capacity)

    def put(self, item) -> None:
        with self._cond:
            if len(self._dq) >= self.capacity:
                oldest = self._dq.popleft()
                self.dropped.add(self.items_of(oldest), (("queue", self.name), ("reason", "full")))
            self._dq.append(item)
            self._cond.notify()

    def get(self, timeout: Optional[float]):
        """The oldest item, or None if none arrived within `timeout` seconds."""
        with self._cond:
            if not self._dq:
                self._cond.wait(timeout)
            return self._dq.popleft() if self._dq else None

    def drain(self) -> list:
        with self._cond:
            items, self._dq = list(self._dq), collections.deque()
            return items

    def __len__(self) -> int:
        return len(self._dq)
