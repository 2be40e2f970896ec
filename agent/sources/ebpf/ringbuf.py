"""Zero-copy reading of BPF ring buffers (BPF_MAP_TYPE_RINGBUF), in batches.

The kernel's layout (kernel/bpf/ringbuf.c), mapped from the map's fd:
- offset 0, one page, read-write: the consumer position (u64), which only we write;
- offset one page, read-only: the producer position page, then the data area mapped twice in a
  row, so a record that wraps around the end is contiguous in our address space.
Each record is an 8-byte header {u32 len, u32 page offset} followed by the sample, and takes
round_up(len + 8, 8) bytes. While the producer writes a record its len has the BUSY bit (31);
a record the producer gave up on has the DISCARD bit (30) and is skipped.

`RingBuffer.drain()` reads everything committed since the last call as one numpy array:
1. load the producer position (one aligned 8-byte load);
2. read every header of the span with one strided copy and stop at the first BUSY one -- all
   headers are read before any sample, the order the protocol needs;
3. copy the samples out with one structured-dtype copy (DISCARD records left out);
4. publish the new consumer position with one aligned 8-byte store, after the copy, so the kernel
   never reuses space we are still reading.
On x86-64 plain loads and stores give exactly this order (loads are not reordered with loads,
stores not with earlier loads). Every record of a ring has the same size (the probe reserves
sizeof(struct)), so the headers sit at a fixed stride; a header with another length is handled
by a record-by-record walk that skips and counts it.

Nothing here runs per record in Python. Numpy arrays and memoryviews over the mapping pin it:
the only long-lived ones belong to the RingBuffer and are released by close(); everything
drain() returns is a copy.

Waking up: the probes commit records without asking for a wakeup (ha_submit_flags), so the kernel
wakes the reader only by its own rule -- for a record committed where the consumer position stands,
i.e. the first record after the reader gave back everything -- and at every wakeup_every()-th
record a CPU commits to a ring (a quarter of the ring over all CPUs), a backstop against bursts.
While records keep coming the reader reads on a timer whose interval adapts to the rate
(PollSchedule: at most 200 ms, shorter as rings fill, at once when one is a quarter full), and it
holds back the last record it read (hold_last: the consumer position stays one record behind), so
the kernel's rule never wakes it between two passes. When a pass finds every ring empty, it gives
those records back and sleeps in epoll with no timeout (Poller): an idle host costs no wakeups.
The first record then wakes it, and it lingers up to 200 ms to gather what follows before it
reads. A wakeup per record costs the producer 100-200 ns more and the consumer a pass per tiny
batch; the timer costs one pass per interval whatever the rate (docs/performance.md has the
figures). What does not fit in a ring is counted in the BPF map ha_ringbuf_dropped
(bpf/include/hostagent.h) and exported as hostagent.ebpf.ringbuf.dropped.
"""
from __future__ import annotations

import logging
import mmap
import os
import select
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np

from agent.model import LogRecord, Metric, MetricKind, NumberPoint
from agent.procfs.identity import boot_to_wall_ns
from agent.sources.ebpf.probe import Probe

log = logging.getLogger("hostagent.ebpf")

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LEN_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
HEADER_SIZE = 8
PAGE_SIZE = mmap.PAGESIZE
DROPS_MAP = "ha_ringbuf_dropped"      # bpf/include/hostagent.h
MAX_RINGS = 4                         # HA_MAX_RINGS
LINGER = 0.2                          # s: Poller's wait for more records after an idle wakeup


def record_stride(size: int) -> int:
    """Bytes a record with a `size`-byte sample takes in the ring: header plus sample, 8-aligned."""
    return (size + HEADER_SIZE + 7) & ~7


def wakeup_every(ring_bytes: int, record_size: int, cpus: Optional[int] = None) -> int:
    """Records a CPU commits between two forced wakeups of the reader (ha_submit_flags in
    bpf/include/hostagent.h): a quarter of the ring's capacity, shared by the CPUs."""
    cpus = cpus or os.cpu_count() or 1
    capacity = (ring_bytes - 1) // record_stride(record_size)
    return max(1, capacity // (4 * cpus))


def framed_dtype(record: np.dtype) -> np.dtype:
    """`record` as it sits in the ring: header fields, the sample, padding to the stride."""
    return np.dtype({"names": ["len", "pg_off", "rec"], "formats": ["<u4", "<u4", record],
                     "offsets": [0, 4, HEADER_SIZE], "itemsize": record_stride(record.itemsize)})


class RingBuffer:
    """The consumer side of one BPF ring buffer. One reader at a time (a single thread)."""

    def __init__(self, consumer, data, size: int, record: np.dtype, name: str = "",
                 fd: Optional[int] = None, mappings: tuple = (), hold_last: bool = False):
        """`consumer`: a writable buffer whose first 8 bytes are the consumer position;
        `data`: a read-only buffer of PAGE_SIZE + 2 * size bytes -- the producer position page,
        then the data area twice. Use RingBuffer.open() for a map fd. `hold_last`: drain()
        gives the ring's space back up to the last record it read, not including it, so the
        kernel does not wake the reader for each first record after a drain (its rule: a record
        committed where the consumer stands); release() gives that record back too."""
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, got {size}")
        record = np.dtype(record)
        self.name, self.size, self.record = name, size, record
        self.fd = fd
        self.stride = record_stride(record.itemsize)
        if self.stride > size:
            raise ValueError(f"a {record.itemsize}-byte record does not fit a {size}-byte ring")
        self._mask = size - 1
        self._framed = framed_dtype(record)
        self._words = self.stride // 4
        self._cons = memoryview(consumer).cast("B").cast("Q")
        self._prod = memoryview(data)[:8].cast("B").cast("Q")
        self._data = np.frombuffer(data, dtype=np.uint8, count=2 * size, offset=PAGE_SIZE)
        self._mappings = mappings
        self._empty = np.empty(0, dtype=record)
        self.hold_last = hold_last
        self._read = self._cons[0]     # where the next drain starts (the consumer position, or
                                       # one record past it while the last one is held)
        self._fence = threading.Lock()
        # reader-side statistics (written by the reading thread only)
        self.records = 0          # samples returned
        self.discarded = 0        # DISCARD records skipped
        self.invalid = 0          # records whose length is not the record size, skipped
        self.last_fill = 0.0      # committed-or-busy bytes found by the last drain / size

    @classmethod
    def open(cls, map_fd: int, size: int, record: np.dtype, name: str = "", hold_last: bool = False) -> "RingBuffer":
        """Map the ring buffer map `map_fd` (`size` = its max_entries, in bytes)."""
        fd = os.dup(map_fd)           # our own reference: the mapping outlives any other fd
        try:
            consumer = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, access=mmap.ACCESS_WRITE, offset=0)
            try:
                data = mmap.mmap(fd, PAGE_SIZE + 2 * size, mmap.MAP_SHARED, access=mmap.ACCESS_READ,
                                 offset=PAGE_SIZE)
            except BaseException:
                consumer.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(consumer, data, size, record, name, fd=fd, mappings=(consumer, data), hold_last=hold_last)

    @classmethod
    def from_map(cls, ring, record: np.dtype, hold_last: bool = False) -> "RingBuffer":
        """Map a ring buffer map (maps.BpfMap of BPF_MAP_TYPE_RINGBUF)."""
        return cls.open(ring.fd, ring.max_entries, record, ring.name, hold_last)

    # --- positions -------------------------------------------------------------------------

    @property
    def consumer_pos(self) -> int:
        return self._cons[0]

    @property
    def producer_pos(self) -> int:
        return self._prod[0]

    def caught_up(self) -> bool:
        """Whether the kernel will wake the reader for the next record committed: the reader has
        given back everything (consumer = producer) or stopped at a record still being written
        (its commit finds the consumer at its position). False when records wait or one is held."""
        cons = self._cons[0]
        with self._fence:       # a full barrier: our consumer store is seen before we load
            pass
        if self._prod[0] == cons:
            return True
        off = cons & self._mask
        return cons == self._read and bool(int(self._data[off:off + 4].view("<u4")[0]) & BUSY_BIT)

    def release(self) -> bool:
        """Give back the record drain() held (hold_last), then caught_up(): the reader may sleep
        without a timer only when this is True."""
        if self._cons[0] != self._read:
            self._cons[0] = self._read
        return self.caught_up()

    def _publish(self, end: int, last_stride: int) -> None:
        """Everything before `end` has been read; the last record (`last_stride` bytes) is kept
        while hold_last. One aligned 8-byte store."""
        self._read = end
        self._cons[0] = end - last_stride if self.hold_last else end

    @property
    def capacity(self) -> int:
        """Records the ring holds at most (the kernel keeps one byte of the ring free)."""
        return (self.size - 1) // self.stride

    # --- reading ---------------------------------------------------------------------------

    def drain(self) -> np.ndarray:
        """Every record committed since the last call, in ring order, as a contiguous array of
        `record` (a copy; the ring space is released before returning, but for the last
        record's while hold_last)."""
        cons = self._read
        prod = self._prod[0]                      # 1. producer position first
        avail = prod - cons
        self.last_fill = avail / self.size
        if avail <= 0:
            return self._empty
        if avail > self.size:
            raise RuntimeError(f"ring {self.name}: producer {prod} is more than a ring ahead of "
                               f"consumer {cons}")
        start = cons & self._mask
        stride = self.stride
        n_max = avail // stride
        if n_max == 0 or avail % stride:
            return self._drain_walk(cons, prod)
        span = self._data[start:start + n_max * stride]   # contiguous thanks to the double mapping
        lens = span.view("<u4")[::self._words].copy()     # 2. all headers, before any sample
        busy = np.flatnonzero(lens & BUSY_BIT)
        n = int(busy[0]) if busy.size else n_max
        if n == 0:
            return self._empty
        lens = lens[:n]
        if np.any((lens & LEN_MASK) != self.record.itemsize):
            return self._drain_walk(cons, prod)
        samples = span[:n * stride].view(self._framed)["rec"]
        discard = (lens & DISCARD_BIT) != 0
        if discard.any():
            out = samples[~discard]                       # 3. copy (fancy indexing copies)
            self.discarded += int(discard.sum())
        else:
            out = samples.copy()                          # 3. copy
        del samples, span
        self._publish(cons + n * stride, stride)          # 4. one aligned 8-byte store
        self.records += len(out)
        return out

    def _drain_walk(self, cons: int, prod: int) -> np.ndarray:
        """Record by record, for a span holding records of another size than `record`."""
        keep = []
        pos = cons
        size = self.record.itemsize
        invalid = self.invalid
        last = 0
        while pos < prod:
            off = pos & self._mask
            header = int(self._data[off:off + 4].view("<u4")[0])
            if header & BUSY_BIT:
                break
            length = header & LEN_MASK
            if header & DISCARD_BIT:
                self.discarded += 1
            elif length == size:
                keep.append(self._data[off + HEADER_SIZE:off + HEADER_SIZE + size].copy())
            else:
                self.invalid += 1
            last = record_stride(length)
            pos += last
        out = (np.concatenate(keep).view(self.record) if keep else self._empty)
        if pos != cons:
            self._publish(pos, last)
        self.records += len(out)
        if self.invalid > invalid:
            log.warning("ringbuf_invalid_records ring=%s skipped=%d record_size=%d",
                        self.name, self.invalid - invalid, size)
        return out

    def close(self) -> None:
        """Unmap the ring. Arrays returned by drain() stay valid (they are copies)."""
        self._data = None
        for view in (self._cons, self._prod):
            if view is not None:
                view.release()
        self._cons = self._prod = None
        for m in self._mappings:
            m.close()
        self._mappings = ()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_drops(obj, rings: int) -> list:
    """Records each of the first `rings` rings of a loaded object could not reserve, summed
    over CPUs (bpf/include/hostagent.h); [] if the object has no drop counter."""
    try:
        drops = obj.map(DROPS_MAP)
    except KeyError:
        return []
    return [drops.sum(i) for i in range(min(rings, MAX_RINGS))]


# --- waiting ---------------------------------------------------------------------------------

class Poller:
    """Waits until a ring may have records: epoll on the rings' fds, edge-triggered, for the
    wakeups the kernel sends (the first record after the reader caught up, and one per quarter
    ring, ha_submit_flags), a timeout, and an eventfd that stop() uses to end a wait at once."""

    def __init__(self, fds=(), linger: float = LINGER):
        """`linger`: after a wakeup out of an idle wait (no timeout), how long to let records
        gather before returning (a forced wakeup, a quarter ring, or stop() ends it early)."""
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        for fd in fds:
            self._ep.register(fd, select.EPOLLIN | select.EPOLLET)
        self.linger = linger
        self.stopped = False

    def wait(self, timeout: Optional[float]) -> bool:
        """Block up to `timeout` seconds, or (None) until a ring's wakeup and then up to `linger`
        more; False once stop() has been called."""
        if self.stopped:
            return False
        woken = self._poll(timeout)
        if timeout is None and woken and not self.stopped:
            self._poll(self.linger)
        return not self.stopped

    def _poll(self, timeout: Optional[float]) -> bool:
        """One epoll wait; True if a ring woke it."""
        try:
            events = self._ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            events = ()
        ring = False
        for fd, _ in events:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            else:
                ring = True
        return ring

    def stop(self) -> None:
        self.stopped = True
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake)


class PollSchedule:
    """How long to wait before the next pass over the rings, from how full the last pass found
    them: aim to find each ring about `target` full (an eighth), so there is room for seven more
    intervals of records if the reader is held up; read again at once when a ring was a quarter
    full or more; wait at least `min_interval` and at most `max_interval` (the latency bound when
    little arrives). The wait grows at most twofold per pass, so a producer that pauses briefly
    and resumes at full rate still finds a short interval."""

    def __init__(self, max_interval: float, min_interval: float = 0.001, target: float = 0.125,
                 busy: float = 0.25):
        self.max_interval, self.min_interval = max_interval, min(min_interval, max_interval)
        self.target, self.busy = target, busy
        self._last = time.monotonic()
        self._timeout = self.min_interval

    def next_timeout(self, rings) -> Optional[float]:
        """Call after each pass with the rings just drained; returns seconds to wait, or None
        when the pass found every ring empty and, their held records given back, the kernel will
        wake the reader for the next record (RingBuffer.release): then no timer runs until one
        comes."""
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        fill = max((r.last_fill for r in rings), default=0.0)
        if fill <= 0.0 and all([r.release() for r in rings]):
            self._timeout = self.max_interval
            return None
        if fill >= self.busy:
            wanted = 0.0
        elif fill <= 0.0:
            wanted = self.max_interval
        else:
            wanted = self.target * elapsed / fill
        grown = max(self._timeout, self.min_interval) * 2
        self._timeout = min(wanted, grown, self.max_interval)
        if self._timeout:
            self._timeout = max(self._timeout, self.min_interval)
        return self._timeout


# --- probes that send records ----------------------------------------------------------------

@dataclass(frozen=True)
class Ring:
    """One ring buffer of a probe, declared once: everything the BPF program is told about it
    comes from here (RingProbe.params, RingProbe.map_sizes).

    `param` names its parameters in the program: HA_<param>_RING_PAGES (its size, under bcc),
    HA_<param>_WAKEUP_EVERY (wakeup_every() for that size and record) and HA_RING_<param> (its
    slot in the ha_ringbuf_dropped counters: its position in the probe's `rings`)."""
    map: str
    record: np.dtype
    pages: int
    param: str

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE


class RingProbe(Probe):
    """A probe whose BPF program sends records through ring buffers.

    `rings` lists its Ring specs (set per instance when sizes are options); a ring's position in
    it is its slot in the ha_ringbuf_dropped counter. `decode()` turns a
    drained batch into log records and may count with `self.count()`; `counters` describes those
    counters. The reader thread is the only writer of the counts: it publishes an immutable
    snapshot once per poll that changed them, and collect() reads whichever snapshot is current,
    so neither side takes a lock.
    """
    rings: tuple = ()           # of Ring
    ring_order: tuple = ()      # ring names in the order a pass drains them (default: `rings`)
    # metric name -> (unit, description, attribute sets reported as 0 before the first event)
    counters: Mapping[str, tuple] = {}

    def params(self, tracepoints: tuple) -> dict:
        params = {}
        for slot, ring in enumerate(self.rings):
            params.update({f"HA_{ring.param}_RING_PAGES": ring.pages, f"HA_RING_{ring.param}": slot,
                           f"HA_{ring.param}_WAKEUP_EVERY": wakeup_every(ring.size, ring.record.itemsize)})
        return params

    def map_sizes(self) -> dict:
        return {ring.map: ring.size for ring in self.rings}

    def setup(self, obj) -> None:
        super().setup(obj)
        self._counts: dict = {}
        self._dirty = False
        self.counts: Mapping = MappingProxyType({})
        self.ring_buffers: list = []
        self._boot_to_wall = 0
        try:
            for ring in self.rings:
                self.ring_buffers.append(RingBuffer.from_map(obj.map(ring.map), ring.record, hold_last=True))
        except BaseException:
            self.close()
            raise
        order = self.ring_order or [ring.map for ring in self.rings]
        self._drain_order = sorted(self.ring_buffers, key=lambda ring: order.index(ring.name))

    def decode(self, ring: str, batch: np.ndarray, boot_to_wall: int) -> list[LogRecord]:
        return []

    def count(self, metric: str, attributes: tuple = (), amount: int = 1) -> None:
        """Add to an event-derived counter (reader thread only)."""
        key = (metric, attributes)
        self._counts[key] = self._counts.get(key, 0) + amount
        self._dirty = True

    def poll(self) -> list[LogRecord]:
        batches = {}
        for ring in self._drain_order:
            batch = ring.drain()
            if len(batch):
                batches[ring.name] = batch
        records = self.decode_pass(batches, self._boot_to_wall_ns()) if batches else []
        if self._dirty:
            self.counts = MappingProxyType(dict(self._counts))   # one reference swap
            self._dirty = False
        return records

    def decode_pass(self, batches: dict, boot_to_wall: int) -> list[LogRecord]:
        """The records of one pass ({ring name: batch}); probes that need an order across
        their rings override this."""
        return [r for name, batch in batches.items() for r in self.decode(name, batch, boot_to_wall)]

    def _boot_to_wall_ns(self) -> int:
        """The boot-clock -> Unix time offset, held steady: the same kernel timestamp gives the
        same wall time in every record (an exec and an exit record name one creation time); a
        change over 1 ms is a clock step and is followed."""
        now = boot_to_wall_ns()
        if abs(now - self._boot_to_wall) > 1_000_000:
            self._boot_to_wall = now
        return self._boot_to_wall

    def counter_metrics(self, now_ns: int, start_ns: int) -> list[Metric]:
        return counter_metrics(self.counters, self.counts, now_ns, start_ns)   # the current snapshot

    def collect(self, now_ns: int, start_ns: int) -> list[Metric]:
        return self.counter_metrics(now_ns, start_ns)

    def close(self) -> None:
        for ring in getattr(self, "ring_buffers", ()):
            ring.close()
        self.ring_buffers = []


def counter_metrics(counters: Mapping[str, tuple], counts: Mapping, now_ns: int, start_ns: int) -> list[Metric]:
    """The metrics `counters` describes ({name: (unit, description, initial attribute sets)})
    from `counts` ({(name, attributes): value})."""
    metrics = []
    for name, (unit, description, initial) in counters.items():
        values = {attrs: 0 for attrs in initial}
        values.update({attrs: v for (metric, attrs), v in counts.items() if metric == name})
        if values:
            metrics.append(Metric(name, description, unit, MetricKind.SUM,
                                  [NumberPoint(a, v, start_ns, now_ns) for a, v in values.items()],
                                  monotonic=True))
    return metrics


def cstr(raw: bytes) -> str:
    """A NUL-terminated C string from a fixed-size field (bytes after the NUL are stale)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
