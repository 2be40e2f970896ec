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
hostagent.exporter.enqueue_failed) and the size and capacity are exported as gauges. Which kind a
config asks for, and opening it, is agent/export/factory.py's (QUEUES, open_queue).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal, Optional

from agent.config import ConfigError, Duration, Size, check_ranges, check_writable_dir
from agent.export.encoding import Payload

log = logging.getLogger("hostagent.export.queue")

QUEUE_ATTRS = (("queue", "export"),)
MEMORY_DEFAULT_MAX_SIZE = 64 * 2**20
PERSISTENT_DEFAULT_MAX_SIZE = 2**30


@dataclass(frozen=True)
class QueueConfig:
    # persistent: an append-only log on disk that survives restarts and outages; memory: lost on
    # exit; auto: persistent for the otlp exporter when the directory is usable, memory otherwise
    type: Literal["auto", "memory", "persistent"] = "auto"
    # empty: <state_dir>/queue/otlp
    directory: str = ""
    # bytes on disk (persistent) or of encoded payloads in memory; unset: 1GiB on disk, 64MiB in memory
    max_size: Optional[Size] = None
    # memory queue: also bound the number of data points and log records; 0: no bound by count
    max_items: int = 0
    # when full: drop the oldest data (and count it) or refuse the new (and count it)
    full_policy: Literal["drop_oldest", "refuse_new"] = "drop_oldest"
    # persistent: the log is cut into files of this size (at most max_size/8); space is
    # reclaimed, and the oldest data dropped, a whole file at a time
    segment_size: Size = Size(16 * 2**20)
    # persistent: fsync every record (and every read-pointer move), or every fsync_interval
    fsync: Literal["record", "interval"] = "interval"
    fsync_interval: Duration = Duration(1.0)

    RANGES: ClassVar[dict] = {"max_size": (Size(2**20), Size(2**40)), "max_items": (0, 10**9),
                              "segment_size": (Size(64 * 2**10), Size(2**30)),
                              "fsync_interval": (Duration(0.001), Duration(3600.0))}

    def validate(self, key: str) -> None:
        check_ranges(self, key)
        if self.directory and not os.path.isabs(self.directory):
            raise ConfigError(f"{key}.directory", f"must be an absolute path, got {self.directory!r}")

    def check_directory(self, state_dir: str, key: str) -> None:
        """A persistent queue's directory can be created and written (`key`: the queue section)."""
        if self.type == "persistent":
            check_writable_dir(self.path(state_dir), f"{key}.directory" if self.directory else "state_dir")

    def path(self, state_dir: str) -> str:
        """Where the persistent queue keeps its log."""
        return self.directory or os.path.join(state_dir, "queue", "otlp")


class QueueError(Exception):
    """The persistent queue cannot be used (directory unusable, or in use by another process)."""


@dataclass(frozen=True)
class QueueSettings:
    kind: str  # "memory" | "persistent"
    directory: str = ""
    max_bytes: int = MEMORY_DEFAULT_MAX_SIZE
    max_items: int = 0
    policy: str = "drop_oldest"  # | "refuse_new"
    segment_size: int = 16 * 2**20
    fsync: str = "interval"  # | "record"
    fsync_interval: float = 1.0


@dataclass(eq=False)
class Entry:
    payload: Payload
    token: object = None  # the queue's own bookkeeping (the record's place on disk)


class QueueMetrics:
    """The instruments every export queue records into."""

    def __init__(self, telemetry):
        self.enqueued = telemetry.counter("hostagent.queue.enqueued", "{items}",
                                          "Data points and log records put into a queue.")
        self.dropped = telemetry.counter("hostagent.queue.dropped", "{items}",
                                         "Items dropped from a queue, by reason: full (oldest first), "
                                         "corrupt (a damaged record of the persistent queue), shutdown.")
        self.enqueue_failed = telemetry.counter("hostagent.exporter.enqueue_failed", "{items}",
                                                "Items refused by the export queue, by reason.")
        self.corrupt = telemetry.counter("hostagent.queue.corrupt_records", "{records}",
                                         "Damaged records or regions skipped in the persistent queue, by reason.")
        self.corrupt_bytes = telemetry.counter("hostagent.queue.corrupt_bytes", "By",
                                               "Bytes of the persistent queue skipped or truncated as damaged.")
        self.size = telemetry.gauge("hostagent.queue.size", "{items}", "Items waiting in a queue or in flight.")
        self.size_bytes = telemetry.gauge("hostagent.queue.size_bytes", "By",
                                          "Bytes a queue holds: encoded payloads in memory, or its files on disk.")
        self.capacity = telemetry.gauge("hostagent.queue.capacity", "{items}",
                                        "Item bound of a queue; 0 when it is bounded by bytes only.")
        self.capacity_bytes = telemetry.gauge("hostagent.queue.capacity_bytes", "By", "Byte bound of a queue.")

    def observe(self, queue: "ExportQueue") -> None:
        self.size.observe(QUEUE_ATTRS, lambda: queue.items)
        self.size_bytes.observe(QUEUE_ATTRS, lambda: queue.size_bytes)
        self.capacity.observe(QUEUE_ATTRS, lambda: queue.settings.max_items if queue.kind == "memory" else 0)
        self.capacity_bytes.observe(QUEUE_ATTRS, lambda: queue.settings.max_bytes)


class ExportQueue:
    kind = ""

    def __init__(self, settings: QueueSettings, telemetry):
        self.settings = settings
        self.metrics = QueueMetrics(telemetry)
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

    def __init__(self, settings: QueueSettings, telemetry):
        super().__init__(settings, telemetry)
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


def settings(cfg: QueueConfig, kind: str, directory: str) -> QueueSettings:
    """The bounds `cfg` asks for, for a queue of `kind` (memory or persistent) in `directory`."""
    default_max = PERSISTENT_DEFAULT_MAX_SIZE if kind == "persistent" else MEMORY_DEFAULT_MAX_SIZE
    max_bytes = int(cfg.max_size) if cfg.max_size is not None else default_max
    return QueueSettings(kind=kind, directory=directory, max_bytes=max_bytes, max_items=cfg.max_items,
                         policy=cfg.full_policy,
                         segment_size=max(64 * 2**10, min(int(cfg.segment_size), max_bytes // 8)),
                         fsync=cfg.fsync, fsync_interval=float(cfg.fsync_interval))
