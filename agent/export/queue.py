"""The queue between the pipeline and the exporter's senders.

Two kinds with one interface: MemoryQueue (lost on exit) and PersistentQueue (agent/export/wal.py:
an append-only log on disk that survives restarts, crashes and long outages). Both hold encoded
Payloads, so what is queued does not depend on the exporter.

    put(payload)       never blocks; when full, drop the oldest or refuse the new, and count it
    get(timeout)       the oldest entry not handed out yet, or None; it is then "in flight"
    ack(entry)         the entry is done with (delivered, or dropped and counted by the sender)
    release(entry)     not delivered (shutdown cut it short): it stays queued for a later get()
                       (memory) or on disk for the next start (persistent)

Every drop is counted in the agent's own metrics (hostagent.queue.dropped by reason,
hostagent.exporter.enqueue_failed) and the size and capacity are exported as gauges.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Iterator, Optional

from agent.export.encoding import Payload
from agent.selfmetrics import SELF

log = logging.getLogger("hostagent.export.queue")

QUEUE_ATTRS = (("queue", "export"),)
MEMORY_DEFAULT_MAX_SIZE = 64 * 2**20
PERSISTENT_DEFAULT_MAX_SIZE = 2**30


class QueueError(Exception):
    """The persistent queue cannot be used (directory unusable, or in use by another process)."""


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    kind: str  # "memory" | "persistent"
    directory: str = ""
    max_bytes: int = MEMORY_DEFAULT_MAX_SIZE
    max_items: int = 0
    policy: str = "drop_oldest"  # | "refuse_new"
    segment_size: int = 16 * 2**20
    fsync: str = "interval"  # | "record"
    fsync_interval: float = 1.0


@dataclasses.dataclass(eq=False)
class Entry:
    payload: Payload
    token: object = None  # the queue's own bookkeeping (the record's place on disk)


class QueueMetrics:
    """The instruments every export queue records into."""

    def __init__(self):
        self.enqueued = SELF.counter("hostagent.queue.enqueued", "{items}",
                                     "Data points and log records put into a queue.")
        self.dropped = SELF.counter("hostagent.queue.dropped", "{items}",
                                    "Items dropped from a queue, by reason: full (oldest first), "
                                    "corrupt (a damaged record of the persistent queue), shutdown.")
        self.enqueue_failed = SELF.counter("hostagent.exporter.enqueue_failed", "{items}",
                                           "Items refused by the export queue, by reason.")
        self.corrupt = SELF.counter("hostagent.queue.corrupt_records", "{records}",
                                    "Damaged records or regions skipped in the persistent queue, by reason.")
        self.corrupt_bytes = SELF.counter("hostagent.queue.corrupt_bytes", "By",
                                          "Bytes of the persistent queue skipped or truncated as damaged.")
        self.size = SELF.gauge("hostagent.queue.size", "{items}", "Items waiting in a queue or in flight.")

    def observe(self, queue: "ExportQueue") -> None:
        self.size.observe(QUEUE_ATTRS, lambda: queue.items)
        SELF.gauge("hostagent.queue.size_bytes", "By",
                   "Bytes a queue holds: encoded payloads in memory, or its files on disk.").observe(
            QUEUE_ATTRS, lambda: queue.size_bytes)
        SELF.gauge("hostagent.queue.capacity", "{items}",
                   "Item bound of a queue; 0 when it is bounded by bytes only.").observe(
            QUEUE_ATTRS, lambda: queue.settings.max_items if queue.kind == "memory" else 0)
        SELF.gauge("hostagent.queue.capacity_bytes", "By", "Byte bound of a queue.").observe(
            QUEUE_ATTRS, lambda: queue.settings.max_bytes)


class ExportQueue:
    kind = ""

    def __init__(self, settings: QueueSettings):
        self.settings = settings
        self.metrics = QueueMetrics()
        self._cond = threading.Condition()
        self._closed = False

    # the interface
    def put(self, payload: Payload) -> None:
        raise NotImplementedError

    def get(self, timeout: Optional[float]) -> Optional[Entry]:
        raise NotImplementedError

    def ack(self, entry: Entry) -> None:
        raise NotImplementedError

    def release(self, entry: Entry) -> None:
        raise NotImplementedError

    def reconfigure(self, settings: QueueSettings) -> None:
        """New bounds and policies for a queue kept across a reload."""
        with self._cond:
            self.settings = settings

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def items(self) -> int:
        """Items queued or in flight."""
        raise NotImplementedError

    @property
    def size_bytes(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        """Payloads queued or in flight."""
        raise NotImplementedError

    def wake(self) -> None:
        """Let threads blocked in get() look again (e.g. to notice a shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def drain(self) -> Iterator[Payload]:
        """Take everything still queued, acknowledging it (to move it to another queue)."""
        while True:
            entry = self.get(0)
            if entry is None:
                return
            yield entry.payload
            self.ack(entry)

    def _count_drop(self, payload_items: int, reason: str) -> None:
        self.metrics.dropped.add(payload_items, QUEUE_ATTRS + (("reason", reason),))

    def _count_refused(self, payload_items: int, reason: str) -> None:
        self.metrics.enqueue_failed.add(payload_items, QUEUE_ATTRS + (("reason", reason),))


class MemoryQueue(ExportQueue):
    """FIFO of payloads bounded by bytes (of the encoded bodies) and optionally by items."""
    kind = "memory"

    def __init__(self, settings: QueueSettings = QueueSettings("memory")):
        super().__init__(settings)
        self._dq: collections.deque = collections.deque()
        self._items = self._bytes = 0  # queued and in flight
        self._inflight = 0
        self.metrics.observe(self)

    def _full(self, items: int, size: int) -> bool:
        s = self.settings
        return (self._bytes + size > s.max_bytes) or bool(s.max_items and self._items + items > s.max_items)

    def put(self, payload: Payload) -> None:
        size = len(payload.body)
        with self._cond:
            if size > self.settings.max_bytes or (self.settings.max_items and payload.items > self.settings.max_items):
                self._count_refused(payload.items, "too_large")
                log.warning("queue_refused items=%d bytes=%d reason=larger_than_queue", payload.items, size)
                return
            if self.settings.policy == "refuse_new" and self._full(payload.items, size):
                self._count_refused(payload.items, "queue_full")
                return
            while self._dq and self._full(payload.items, size):
                oldest = self._dq.popleft()
                self._items -= oldest.items
                self._bytes -= len(oldest.body)
                self._count_drop(oldest.items, "full")
            self._dq.append(payload)
            self._items += payload.items
            self._bytes += size
            self.metrics.enqueued.add(payload.items, QUEUE_ATTRS)
            self._cond.notify()

    def get(self, timeout: Optional[float]) -> Optional[Entry]:
        with self._cond:
            if not self._dq and timeout:
                self._cond.wait(timeout)
            if not self._dq:
                return None
            self._inflight += 1
            return Entry(self._dq.popleft())

    def ack(self, entry: Entry) -> None:
        with self._cond:
            self._inflight -= 1
            self._items -= entry.payload.items
            self._bytes -= len(entry.payload.body)

    def release(self, entry: Entry) -> None:
        with self._cond:
            self._inflight -= 1
            self._dq.appendleft(entry.payload)
            self._cond.notify()

    def payloads(self) -> list:
        with self._cond:
            return list(self._dq)

    @property
    def items(self) -> int:
        return self._items

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._dq) + self._inflight


def settings_from_config(cfg) -> QueueSettings:
    """What the config asks for; `auto` resolved to persistent for the otlp exporter."""
    from agent.config import queue_directory
    q = cfg.exporter.queue
    kind = q.type
    if kind == "auto":
        kind = "persistent" if cfg.exporter.type == "otlp" else "memory"
    default_max = PERSISTENT_DEFAULT_MAX_SIZE if kind == "persistent" else MEMORY_DEFAULT_MAX_SIZE
    max_bytes = int(q.max_size) if q.max_size is not None else default_max
    return QueueSettings(kind=kind, directory=queue_directory(cfg), max_bytes=max_bytes,
                         max_items=q.max_items, policy=q.full_policy,
                         segment_size=max(64 * 2**10, min(int(q.segment_size), max_bytes // 8)),
                         fsync=q.fsync, fsync_interval=float(q.fsync_interval))


def open_queue(cfg, reuse: Optional[ExportQueue] = None) -> ExportQueue:
    """The export queue `cfg` asks for. `reuse`, the queue of the pipeline being replaced on a
    reload, is kept when it is the same kind (and directory); otherwise its content is moved over.
    With `auto`, a persistent queue that cannot be opened falls back to memory (logged)."""
    settings = settings_from_config(cfg)
    if reuse is not None and reuse.kind == settings.kind and (
            settings.kind == "memory" or reuse.settings.directory == settings.directory):
        reuse.reconfigure(settings)
        return reuse
    queue: ExportQueue
    if settings.kind == "persistent":
        from agent.export.wal import PersistentQueue
        try:
            queue = PersistentQueue(settings)
        except QueueError as e:
            if cfg.exporter.queue.type == "persistent":
                raise
            log.warning("queue_fallback type=memory reason=%r", str(e))
            max_size = cfg.exporter.queue.max_size
            queue = MemoryQueue(dataclasses.replace(
                settings, kind="memory", max_bytes=int(max_size) if max_size is not None else MEMORY_DEFAULT_MAX_SIZE))
    else:
        queue = MemoryQueue(settings)
    if reuse is not None:
        moved = 0
        for payload in reuse.drain():
            queue.put(payload)
            moved += 1
        reuse.close()
        log.info("queue_moved payloads=%d from=%s to=%s", moved, reuse.kind, queue.kind)
    return queue
