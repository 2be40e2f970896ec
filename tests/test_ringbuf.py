"""The ring buffer reader against the protocol: a hand-built ring in the kernel's exact layout
(for BUSY records, which a BPF program cannot leave behind) and real BPF ring buffers fed by a
test program on task:task_rename, which this process triggers with prctl(PR_SET_NAME)."""
from __future__ import annotations

import ctypes
import mmap
import select
import os
import threading
import time

import numpy as np
import pytest

from agent.sources.ebpf.loader import INCLUDE_DIR, BccObject
from agent.sources.ebpf.ringbuf import (BUSY_BIT, DISCARD_BIT, PAGE_SIZE, Poller, PollSchedule, RingBuffer, cstr,
                                        framed_dtype, read_drops, record_stride)
from tests.helpers import HANG_LIMIT

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")


def test_record_stride_and_framing():
    assert record_stride(1) == 16 and record_stride(8) == 16 and record_stride(40) == 48
    framed = framed_dtype(np.dtype([("a", "<u8"), ("b", "<u4")]))
    assert framed.itemsize == 24 and framed.fields["rec"][1] == 8


# --- a ring in the kernel's layout, written by the test ---------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED, MAP_PRIVATE, MAP_ANONYMOUS, PROT_NONE = 0x10, 0x02, 0x20, 0


class FakeRing:
    """A memfd laid out as [consumer page][producer page][data], mapped for the reader like the
    kernel maps a ring buffer: the producer page, then the data area twice in a row."""

    def __init__(self, size: int, record: np.dtype):
        self.size, self.record = size, np.dtype(record)
        self.fd = os.memfd_create("fake-ring")
        os.ftruncate(self.fd, 2 * PAGE_SIZE + size)
        self.file = mmap.mmap(self.fd, 2 * PAGE_SIZE + size)               # the "kernel" side
        length = PAGE_SIZE + 2 * size
        base = _libc.mmap(None, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        for addr, offset, n in ((base, PAGE_SIZE, PAGE_SIZE + size), (base + PAGE_SIZE + size, 2 * PAGE_SIZE, size)):
            got = _libc.mmap(addr, n, mmap.PROT_READ, mmap.MAP_SHARED | MAP_FIXED, self.fd, offset)
            assert got == addr, os.strerror(ctypes.get_errno())
        self.base, self.length = base, length
        self.consumer = mmap.mmap(self.fd, PAGE_SIZE)
        data = (ctypes.c_uint8 * length).from_address(base)
        self.ring = RingBuffer(self.consumer, data, size, self.record, "fake")
        self.prod = 0

    def write(self, payload: bytes, flags: int = 0, length: int = None) -> int:
        """Append a record (header flags BUSY/DISCARD as given) and publish the producer position."""
        length = len(payload) if length is None else length
        pos = self.prod & (self.size - 1)
        data = 2 * PAGE_SIZE
        body = (length | flags).to_bytes(4, "little") + b"\0\0\0\0" + payload
        for i, byte in enumerate(body):                      # byte-wise so it may wrap
            self.file[data + (pos + i) % self.size] = byte
        start = self.prod
        self.prod += record_stride(length)
        self.file[PAGE_SIZE:PAGE_SIZE + 8] = self.prod.to_bytes(8, "little")
        return start

    def set_flags(self, start: int, flags: int, length: int) -> None:
        pos = 2 * PAGE_SIZE + (start & (self.size - 1))
        self.file[pos:pos + 4] = (length | flags).to_bytes(4, "little")

    def close(self):
        self.ring.close()
        self.consumer.close()
        self.file.close()
        _libc.munmap(self.base, self.length)
        os.close(self.fd)


REC = np.dtype([("seq", "<u8"), ("value", "<u4"), ("_pad", "<u4")])


def rec(seq: int) -> bytes:
    return np.array([(seq, seq * 3, 0)], dtype=REC).tobytes()


@pytest.fixture
def fake():
    ring = FakeRing(PAGE_SIZE, REC)
    yield ring
    ring.close()


def test_empty_ring_returns_nothing(fake):
    out = fake.ring.drain()
    assert len(out) == 0 and out.dtype == REC and fake.ring.consumer_pos == 0


def test_reads_committed_records_and_advances_consumer(fake):
    for i in range(5):
        fake.write(rec(i))
    out = fake.ring.drain()
    assert out["seq"].tolist() == [0, 1, 2, 3, 4] and out["value"].tolist() == [0, 3, 6, 9, 12]
    assert fake.ring.consumer_pos == fake.prod == 5 * 24
    assert len(fake.ring.drain()) == 0


def test_stops_at_busy_record(fake):
    fake.write(rec(0))
    busy = fake.write(rec(1), BUSY_BIT)
    fake.write(rec(2))
    out = fake.ring.drain()
    assert out["seq"].tolist() == [0]
    assert fake.ring.consumer_pos == busy                  # nothing past the busy record released
    assert len(fake.ring.drain()) == 0
    fake.set_flags(busy, 0, REC.itemsize)                   # the producer commits it
    assert fake.ring.drain()["seq"].tolist() == [1, 2]
    assert fake.ring.consumer_pos == fake.prod


def test_skips_discarded_records_but_releases_them(fake):
    for i in range(6):
        fake.write(rec(i), DISCARD_BIT if i % 2 else 0)
    out = fake.ring.drain()
    assert out["seq"].tolist() == [0, 2, 4]
    assert fake.ring.consumer_pos == fake.prod and fake.ring.discarded == 3


def test_busy_first_record_returns_nothing(fake):
    fake.write(rec(0), BUSY_BIT)
    assert len(fake.ring.drain()) == 0 and fake.ring.consumer_pos == 0


def test_record_wrapping_the_end_is_read_through_the_double_mapping(fake):
    # 24-byte records: number 170 starts 16 bytes before the end of the 4096-byte data area
    for i in range(100):
        fake.write(rec(i))
    assert len(fake.ring.drain()) == 100
    for i in range(100, 170):
        fake.write(rec(i))
    assert len(fake.ring.drain()) == 70
    straddle = fake.write(rec(170))
    assert (straddle & (PAGE_SIZE - 1)) + 24 > PAGE_SIZE   # header and sample cross the end
    out = fake.ring.drain()
    assert out["seq"].tolist() == [170] and out["value"].tolist() == [510]
    assert fake.ring.consumer_pos == fake.prod > PAGE_SIZE


def test_records_of_another_size_are_skipped_and_counted(fake):
    fake.write(rec(0))
    fake.write(b"\xff" * 40)                               # a 40-byte sample in a 16-byte ring
    fake.write(rec(2))
    out = fake.ring.drain()
    assert out["seq"].tolist() == [0, 2] and fake.ring.invalid == 1
    assert fake.ring.consumer_pos == fake.prod


def test_drained_arrays_outlive_the_ring():
    ring = FakeRing(PAGE_SIZE, REC)
    ring.write(rec(7))
    out = ring.ring.drain()
    ring.close()                                           # no BufferError: nothing pins the map
    assert out["seq"].tolist() == [7]


def test_poller_stop_wakes_a_blocked_wait():
    poller = Poller()
    result = []
    t = threading.Thread(target=lambda: result.append(poller.wait(3600.0)))
    t.start()
    poller.stop()
    t.join(HANG_LIMIT)                                     # woken, not after the hour
    assert not t.is_alive() and result == [False]
    poller.close()


class _Fill:
    def __init__(self, fill, caught_up=False):
        self.last_fill, self._caught_up = fill, caught_up

    def release(self):
        return self._caught_up


def test_poll_schedule_adapts_to_the_rate():
    s = PollSchedule(max_interval=0.05, min_interval=0.001)
    waits = [s.next_timeout([_Fill(0.0)]) for _ in range(8)]
    assert waits[:6] == [0.002, 0.004, 0.008, 0.016, 0.032, 0.05]   # grows at most twofold
    assert waits[6:] == [0.05, 0.05]                                 # idle: the latency bound
    assert s.next_timeout([_Fill(0.3)]) == 0.0                       # a quarter full: at once
    assert s.next_timeout([_Fill(0.0), _Fill(0.01)]) == 0.001        # the fullest ring decides
    s._last -= 0.010                                                 # 10 ms filled 1/16 of it
    assert abs(s.next_timeout([_Fill(1 / 16)]) - 0.002) < 1e-9       # growth limit (wants 20 ms)
    s._last -= 0.002
    wait = s.next_timeout([_Fill(1 / 16)])                           # 2 ms filled 1/16
    assert 0.0039 < wait < 0.0041                                    # aims at 1/8: ~4 ms


def test_poll_schedule_sleeps_without_a_timer_while_the_rings_are_empty():
    s = PollSchedule(max_interval=0.05, min_interval=0.001)
    assert s.next_timeout([_Fill(0.0, caught_up=True), _Fill(0.0, caught_up=True)]) is None
    # a record committed between the pass and now: the kernel will not wake us for it
    assert s.next_timeout([_Fill(0.0, caught_up=True), _Fill(0.0, caught_up=False)]) == 0.05
    assert s.next_timeout([_Fill(0.01, caught_up=True)]) > 0         # records keep coming: the timer


def test_poller_lingers_after_an_idle_wakeup_and_stop_ends_it():
    r, w = os.pipe()
    poller = Poller([r], linger=3600.0)
    result = []
    t = threading.Thread(target=lambda: result.append(poller.wait(None)))
    t.start()
    os.write(w, b"x")                                      # a ring's wakeup: it lingers
    time.sleep(0.2)
    assert t.is_alive()
    poller.stop()
    t.join(HANG_LIMIT)
    assert not t.is_alive() and result == [False]
    poller.close()
    os.close(r)
    os.close(w)


# --- real BPF ring buffers --------------------------------------------------------------------

TEST_PROGRAM = r"""
#include "hostagent.h"

struct test_event {
    u64 time_ns;
    char comm[16];
    u32 pid;
    u32 tid;
    u64 cpu;
};

BPF_RINGBUF_OUTPUT(small, 1);        /* one page: 85 records of 48 bytes */
BPF_RINGBUF_OUTPUT(big, 64);
BPF_RINGBUF_OUTPUT(woken, 1);

/* newcomm "ha<k><seq>": k = K keep in small, D discard in small, B keep in big,
 * W keep in woken, which wakes the reader every 4th record a CPU commits */
TRACEPOINT_PROBE(task, task_rename)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != HA_TEST_TGID)
        return 0;
    char c[16];
    __builtin_memcpy(c, args->newcomm, sizeof(c));
    if (c[0] != 'h' || c[1] != 'a')
        return 0;
    u32 slot = c[2] == 'B' ? 1 : c[2] == 'W' ? 2 : 0;
    struct test_event *e;
    if (slot == 1)
        e = big.ringbuf_reserve(sizeof(*e));
    else if (slot == 2)
        e = woken.ringbuf_reserve(sizeof(*e));
    else
        e = small.ringbuf_reserve(sizeof(*e));
    if (!e)
        return ha_count_drop(ha_ringbuf_dropped.lookup(&slot));
    e->time_ns = bpf_ktime_get_boot_ns();
    __builtin_memcpy(e->comm, c, sizeof(c));
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->cpu = bpf_get_smp_processor_id();
    if (c[2] == 'D')
        bpf_ringbuf_discard(e, 0);
    else if (slot == 2)
        woken.ringbuf_submit(e, ha_submit_flags(ha_ringbuf_unwoken.lookup(&slot), 4));
    else
        bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 0;
}
"""

TEST_EVENT = np.dtype([("time_ns", "<u8"), ("comm", "S16"), ("pid", "<u4"), ("tid", "<u4"),
                       ("cpu", "<u8")])

_PR_SET_NAME, _PR_GET_NAME = 15, 16


def rename(kind: str, seq: int) -> None:
    ctypes.CDLL(None).prctl(_PR_SET_NAME, f"ha{kind}{seq}".encode(), 0, 0, 0)


def seqs(batch) -> list:
    return [int(cstr(c)[3:]) for c in batch["comm"]]


@pytest.fixture(scope="module")
def program():
    from bcc import BPF
    name = ctypes.create_string_buffer(16)
    libc = ctypes.CDLL(None)
    libc.prctl(_PR_GET_NAME, name, 0, 0, 0)
    b = BPF(text=TEST_PROGRAM.encode(), cflags=[f"-I{INCLUDE_DIR}", f"-DHA_TEST_TGID={os.getpid()}"])
    try:
        yield BccObject(b)
    finally:
        libc.prctl(_PR_SET_NAME, name, 0, 0, 0)
        b.cleanup()


@pytest.fixture
def small(program):
    ring = RingBuffer.from_map(program.map("small"), TEST_EVENT)
    ring.drain()                                           # whatever an earlier test left
    yield ring
    ring.drain()
    ring.close()


def _drops(program):
    return read_drops(program, 2)


@needs_root
def test_real_ring_reads_in_order_and_releases_space(program, small):
    assert small.size == PAGE_SIZE and small.capacity == 85
    for i in range(60):
        rename("K", i)
    out = small.drain()
    assert seqs(out) == list(range(60))
    assert set(out["pid"]) == {os.getpid()}
    assert small.consumer_pos == small.producer_pos
    # the kernel sees the released space: 60 more fit, wrapping around the end of the ring
    before = _drops(program)[0]
    for i in range(60, 120):
        rename("K", i)
    out = small.drain()
    assert seqs(out) == list(range(60, 120))
    assert _drops(program)[0] == before
    assert small.consumer_pos > small.size                 # positions wrapped the ring


@needs_root
def test_real_ring_straddling_record_uses_the_double_mapping(program, small):
    # 48-byte records do not divide 4096: advance until a record crosses the end of the data area
    i = 0
    while (small.producer_pos & (small.size - 1)) + 48 <= small.size:
        rename("K", i)
        i += 1
        small.drain()
    start = small.producer_pos
    rename("K", 999)
    out = small.drain()
    assert (start & (small.size - 1)) + 48 > small.size
    assert seqs(out) == [999] and out["pid"][0] == os.getpid()


@needs_root
def test_real_ring_discarded_records_are_skipped(program, small):
    for i in range(10):
        rename("D" if i % 3 == 0 else "K", i)
    out = small.drain()
    assert seqs(out) == [i for i in range(10) if i % 3]
    assert small.discarded == 4 and small.invalid == 0
    assert small.consumer_pos == small.producer_pos


@needs_root
def test_real_ring_full_counts_exact_drops(program, small):
    before = _drops(program)[0]
    for i in range(100):                                   # nothing reads meanwhile
        rename("K", i)
    out = small.drain()
    assert seqs(out) == list(range(small.capacity))        # the first 85 fit
    assert _drops(program)[0] - before == 100 - small.capacity
    rename("K", 100)                                       # and there is room again
    assert seqs(small.drain()) == [100]


@needs_root
def test_real_ring_concurrent_producers_lose_nothing(program):
    """Two producer threads (so two CPUs reserve concurrently and BUSY records are met) while
    a reader thread drains: every record is read exactly once, in each thread's order."""
    ring = RingBuffer.from_map(program.map("big"), TEST_EVENT)
    ring.drain()
    n, got, done = 10000, [], threading.Event()
    before = _drops(program)[1]

    def produce(offset):
        for i in range(offset, offset + n):
            rename("B", i)

    def read():
        while not done.wait(0.001):
            got.append(ring.drain())
        got.append(ring.drain())

    reader = threading.Thread(target=read)
    reader.start()
    producers = [threading.Thread(target=produce, args=(k * n,)) for k in range(2)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    reader.join()
    ring.close()
    batch = np.concatenate(got)
    dropped = _drops(program)[1] - before
    s = np.array(seqs(batch))
    assert dropped == 0 and len(s) == 2 * n and sorted(s.tolist()) == list(range(2 * n))
    for k in range(2):                                     # per producer, in order
        mine = s[(s >= k * n) & (s < (k + 1) * n)]
        assert (np.diff(mine) > 0).all()


@needs_root
def test_the_first_record_after_a_drain_and_every_nth_wake_the_reader(program):
    """ha_submit_flags: a record committed when the reader has read everything wakes it (the
    kernel's rule; the reader then sleeps with no timer while the rings are empty); the others
    do not, except every 4th per CPU."""
    ring = RingBuffer.from_map(program.map("woken"), TEST_EVENT)
    ep = select.epoll()                            # edge-triggered, as the Poller: one event per wakeup
    ep.register(ring.fd, select.EPOLLIN | select.EPOLLET)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})           # one CPU, one counter

    def woken(seq) -> bool:
        rename("W", seq)
        return bool(ep.poll(0.5))                  # the event itself, not how soon it came

    try:
        ring.drain()
        assert ring.caught_up()
        woken(0)                                   # the reader had caught up: this one may wake it
        assert not ring.caught_up()                # a record waits: no wakeup for the next ones
        seq = 1
        while not woken(seq):                      # find where this CPU's counter stands
            seq += 1
            assert seq < 8
        assert seqs(ring.drain()) == list(range(seq + 1))     # that one woke us: the counter is at 0
        assert ring.caught_up()
        seq += 1
        assert [woken(seq + i) for i in range(4)] == [True, False, False, True]   # caught up; every 4th
        assert seqs(ring.drain()) == list(range(seq, seq + 4))
    finally:
        os.sched_setaffinity(0, cpus)
        ep.close()
        ring.close()


@needs_root
def test_a_held_record_keeps_the_reader_asleep_until_released(program):
    """hold_last: between two passes the kernel does not wake the reader (the consumer stays one
    record behind); once released, the next record wakes it. Nothing is read twice or lost."""
    ring = RingBuffer.from_map(program.map("woken"), TEST_EVENT, hold_last=True)
    ep = select.epoll()
    ep.register(ring.fd, select.EPOLLIN | select.EPOLLET)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})

    def woken(seq) -> bool:
        rename("W", seq)
        return bool(ep.poll(0.5))

    try:
        ring.drain()
        assert ring.release()
        woken(0)                                   # may wake: the reader had given everything back
        seq = 1
        while not woken(seq):                      # this CPU's every-4th counter is at 0 after this
            seq += 1
            assert seq < 8
        assert seqs(ring.drain()) == list(range(seq + 1))     # read, the last record held
        assert not ring.caught_up() and ring.consumer_pos < ring.producer_pos
        assert woken(seq + 1) is False             # no wakeup for the first record after a pass
        assert seqs(ring.drain()) == [seq + 1]     # the held record is not read again
        assert ring.release() and ring.consumer_pos == ring.producer_pos
        assert woken(seq + 2) is True              # released: the next record wakes the reader
        assert seqs(ring.drain()) == [seq + 2]
    finally:
        os.sched_setaffinity(0, cpus)
        ep.close()
        ring.close()
