"""The export queues in process: order, acknowledgement, bounds and their counters; the persistent
log's replay after reopening, its read pointer, damage handling (flipped bytes, torn tails, a
garbled cursor) and its lock."""
import os
import struct
import threading
import time

import pytest

from agent.export.encoding import Payload
from agent.export.queue import MemoryQueue, QueueError, QueueSettings
from agent.export.wal import HEADER, MAGIC, PersistentQueue, read_pending, segment_files
from agent.selfmetrics import SelfMetrics

REASON = lambda r: (("queue", "export"), ("reason", r))  # noqa: E731


def payload(i: int, size: int = 2000) -> Payload:
    """A payload whose body says which one it is (and does not compress much)."""
    body = struct.pack("<I", i) + os.urandom(size)
    return Payload("metrics" if i % 3 else "logs", body, 10 + i)


def ident(p: Payload) -> int:
    return struct.unpack_from("<I", p.body)[0]


def persistent(tmp_path, **kw) -> PersistentQueue:
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("segment_size", 64 << 10)
    return PersistentQueue(QueueSettings("persistent", str(tmp_path / "q"), **kw), SelfMetrics())


def take_all(q) -> list:
    out = []
    while True:
        e = q.get(0)
        if e is None:
            return out
        out.append(e)


# --- memory ---------------------------------------------------------------------------------------

def test_memory_queue_order_ack_release_and_bounds():
    q = MemoryQueue(QueueSettings("memory", max_bytes=10_100, max_items=1000), SelfMetrics())
    dropped = q.metrics.dropped.value(REASON("full"))
    for i in range(6):
        q.put(payload(i))  # 2004 bytes each: the sixth pushes out the first
    assert q.metrics.dropped.value(REASON("full")) - dropped == 10
    e = q.get(0)
    assert ident(e.payload) == 1 and len(q) == 5 and q.items == sum(10 + i for i in range(1, 6))
    q.release(e)  # back to the front
    entries = take_all(q)
    assert [ident(x.payload) for x in entries] == [1, 2, 3, 4, 5]
    for x in entries:
        q.ack(x)
    assert q.items == 0 and q.size_bytes == 0 and len(q) == 0


def test_memory_queue_refuse_new_counts():
    q = MemoryQueue(QueueSettings("memory", max_bytes=1 << 20, max_items=25, policy="refuse_new"), SelfMetrics())
    refused = q.metrics.enqueue_failed.value(REASON("queue_full"))
    q.put(payload(0))
    q.put(payload(1))  # 10 + 11 items fit, 12 more do not
    q.put(payload(2))
    assert q.metrics.enqueue_failed.value(REASON("queue_full")) - refused == 12
    assert [ident(e.payload) for e in take_all(q)] == [0, 1]


# --- persistent -----------------------------------------------------------------------------------

def test_persistent_roundtrip_and_replay_after_reopen(tmp_path):
    q = persistent(tmp_path)
    sent = [payload(i) for i in range(60)]
    for p in sent:
        q.put(p)
    assert q.items == sum(p.items for p in sent)
    assert len(segment_files(q.dir)) > 1  # rotated
    first = take_all(q)[:25]
    assert [e.payload for e in first] == sent[:25]
    for e in first[:20]:
        q.ack(e)
    q.close()  # 5 in flight, not acknowledged: they come back
    q = persistent(tmp_path)
    assert q.items == sum(p.items for p in sent[20:])
    again = take_all(q)
    assert [e.payload for e in again] == sent[20:]
    for e in again:
        q.ack(e)
    assert q.items == 0
    q.close()
    assert [f for f in os.listdir(tmp_path / "q") if f.endswith(".seg")] == []  # all reclaimed


def test_out_of_order_acks_keep_the_oldest_unacknowledged(tmp_path):
    q = persistent(tmp_path)
    for i in range(10):
        q.put(payload(i))
    entries = take_all(q)
    for e in entries[1:]:  # everything but the first is delivered
        q.ack(e)
    q.close()
    assert [ident(p) for p in read_pending(str(tmp_path / "q")).payloads] == list(range(10))
    q = persistent(tmp_path)
    entries = take_all(q)  # the first comes back, and (being after it) the others too: duplicates
    assert ident(entries[0].payload) == 0
    q.ack(entries[0])
    for e in entries[1:]:
        q.ack(e)
    q.close()
    assert read_pending(str(tmp_path / "q")).payloads == []


def test_released_entries_come_back_first(tmp_path):
    q = persistent(tmp_path)
    for i in range(3):
        q.put(payload(i))
    a, _ = q.get(0), q.get(0)
    q.release(a)
    assert ident(q.get(0).payload) == 0
    assert ident(q.get(0).payload) == 2
    q.close()


def test_drop_oldest_when_full_counts_every_item(tmp_path):
    q = persistent(tmp_path, max_bytes=256 << 10, segment_size=64 << 10)
    before = q.metrics.dropped.value(REASON("full"))
    sent = [payload(i, 8000) for i in range(100)]  # ~800KB into a 256KiB queue
    for p in sent:
        q.put(p)
    assert q.size_bytes <= 256 << 10
    kept = [e.payload for e in take_all(q)]
    assert kept == sent[len(sent) - len(kept):]  # the newest, in order
    lost = sum(p.items for p in sent[:len(sent) - len(kept)])
    assert q.metrics.dropped.value(REASON("full")) - before == lost
    q.close()


def test_refuse_new_when_full(tmp_path):
    q = persistent(tmp_path, max_bytes=128 << 10, segment_size=64 << 10, policy="refuse_new")
    before = q.metrics.enqueue_failed.value(REASON("queue_full"))
    sent = [payload(i, 8000) for i in range(40)]
    for p in sent:
        q.put(p)
    kept = [e.payload for e in take_all(q)]
    assert kept == sent[:len(kept)]  # the oldest, in order
    assert q.metrics.enqueue_failed.value(REASON("queue_full")) - before == sum(p.items for p in sent[len(kept):])
    q.close()


def _segment_bytes(tmp_path):
    return [(path, bytearray(open(path, "rb").read())) for path in segment_files(str(tmp_path / "q")).values()]


def test_flipped_body_bytes_skip_one_record_and_count_it(tmp_path):
    q = persistent(tmp_path)
    sent = [payload(i) for i in range(12)]
    for p in sent:
        q.put(p)
    q.close()
    path, data = _segment_bytes(tmp_path)[0]
    # the body of the third record of the first segment
    off = 0
    for _ in range(2):
        off += HEADER.size + struct.unpack_from("<I", data, off + 8)[0]
    data[off + HEADER.size + 40] ^= 0xFF
    open(path, "wb").write(data)
    q = persistent(tmp_path)
    corrupt = q.metrics.corrupt.value((("queue", "export"), ("reason", "crc")))
    dropped = q.metrics.dropped.value(REASON("corrupt"))
    got = [e.payload for e in take_all(q)]
    assert got == sent[:2] + sent[3:]
    assert q.metrics.corrupt.value((("queue", "export"), ("reason", "crc"))) - corrupt == 1
    assert q.metrics.dropped.value(REASON("corrupt")) - dropped == sent[2].items
    q.close()


def test_damaged_header_resyncs_at_the_next_frame(tmp_path):
    q = persistent(tmp_path)
    sent = [payload(i) for i in range(12)]
    for p in sent:
        q.put(p)
    q.close()
    path, data = _segment_bytes(tmp_path)[0]
    second = HEADER.size + struct.unpack_from("<I", data, 8)[0]
    data[second + 9] ^= 0x55  # the second record's length field
    open(path, "wb").write(data)
    q = persistent(tmp_path)
    before = q.metrics.corrupt.value((("queue", "export"), ("reason", "frame")))
    got = [ident(e.payload) for e in take_all(q)]
    assert got == [0] + list(range(2, 12))
    assert q.metrics.corrupt.value((("queue", "export"), ("reason", "frame"))) - before == 1
    q.close()


def test_torn_tail_is_truncated_on_open(tmp_path):
    q = persistent(tmp_path, segment_size=1 << 20)
    sent = [payload(i) for i in range(5)]
    for p in sent:
        q.put(p)
    q.close()
    path, data = _segment_bytes(tmp_path)[-1]
    open(path, "wb").write(data[:-700])  # the last record loses its end
    q = persistent(tmp_path)
    assert os.path.getsize(path) < len(data) - 700  # cut back to the last whole frame
    got = [e.payload for e in take_all(q)]
    assert got == sent[:4]
    q.put(payload(99))  # and the log goes on
    assert ident(q.get(0).payload) == 99
    q.close()
    assert read_pending(str(tmp_path / "q")).corrupt_records == 0


def test_garbled_cursor_replays_everything(tmp_path):
    q = persistent(tmp_path)
    for i in range(5):
        q.put(payload(i))
    for e in take_all(q)[:3]:
        q.ack(e)
    q.close()
    (tmp_path / "q" / "cursor").write_bytes(b"garbage")
    q = persistent(tmp_path)
    assert [ident(e.payload) for e in take_all(q)] == [0, 1, 2, 3, 4]  # duplicates, no loss
    q.close()


def test_one_process_at_a_time(tmp_path):
    q = persistent(tmp_path)
    with pytest.raises(QueueError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        persistent(tmp_path)
    q.close()
    persistent(tmp_path).close()


def test_concurrent_producers_and_consumers(tmp_path):
    q = persistent(tmp_path, max_bytes=64 << 20, segment_size=256 << 10)
    n, got, lock = 400, [], threading.Lock()

    def produce(start):
        for i in range(start, n, 4):
            q.put(payload(i, 500))

    def consume():
        while True:
            e = q.get(0.5)
            if e is None:
                return
            with lock:
                got.append(ident(e.payload))
            q.ack(e)

    producers = [threading.Thread(target=produce, args=(s,)) for s in range(4)]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in producers + consumers:
        t.start()
    for t in producers + consumers:
        t.join(30)
    assert sorted(got) == list(range(n))
    assert q.items == 0
    q.close()
    assert read_pending(str(tmp_path / "q")).payloads == []


def test_frame_layout_starts_with_magic(tmp_path):
    q = persistent(tmp_path)
    q.put(payload(1))
    q.close()
    _, data = _segment_bytes(tmp_path)[0]
    assert data[:4] == MAGIC


def test_segment_numbers_never_go_back(tmp_path):
    """Even when every segment was deleted (all acknowledged, the pointer naming a deleted one),
    a reopened queue numbers its new segments after the pointer, so nothing new counts as read."""
    q = persistent(tmp_path, segment_size=64 << 10)
    for i in range(40):
        q.put(payload(i))
    for e in take_all(q):
        q.ack(e)
    q.close()
    for path in segment_files(str(tmp_path / "q")).values():
        os.unlink(path)
    q = persistent(tmp_path)
    q.put(payload(7))
    q.close()
    q = persistent(tmp_path)
    assert [ident(e.payload) for e in take_all(q)] == [7]
    q.close()


# --- choosing and handing over queues (what the pipeline does at start and on a reload) ------------

def cfg(tmp_path, **queue):
    from agent import config
    from agent.components import Config
    return config.build(Config, {"state_dir": str(tmp_path / "state"), "exporter": {"type": "otlp", "queue": queue}})


def open_queue(tmp_path, reuse=None, **queue):
    """The export queue the exporter section asks for, as the pipeline opens it."""
    from agent.export.factory import open_queue
    c = cfg(tmp_path, **queue)
    return open_queue(c.exporter, c.state_dir, SelfMetrics(), reuse=reuse)


def test_auto_is_persistent_for_otlp_and_falls_back_to_memory_when_locked(tmp_path, caplog):
    q = open_queue(tmp_path)
    assert q.kind == "persistent" and q.settings.directory == str(tmp_path / "state" / "queue" / "otlp")
    assert q.settings.max_bytes == 2**30
    with caplog.at_level("WARNING", logger="hostagent.export.queue"):
        other = open_queue(tmp_path)  # a second agent on the same directory
    assert other.kind == "memory" and other.settings.max_bytes == 64 * 2**20
    assert any("queue_fallback" in r.getMessage() for r in caplog.records)
    with pytest.raises(QueueError, match="in use"):
        open_queue(tmp_path, type="persistent")
    # which the agent reports as a config error naming the key (exit status 2, one line)
    from agent.config import ConfigError
    from agent.pipeline import build_pipeline
    with pytest.raises(ConfigError, match=r"^exporter.queue.directory: .* is in use by another process"):
        build_pipeline(cfg(tmp_path, type="persistent"), None, SelfMetrics())
    q.close()


def test_reload_keeps_the_queue_or_moves_its_content(tmp_path):
    q = open_queue(tmp_path)
    for i in range(3):
        q.put(payload(i))
    assert open_queue(tmp_path, reuse=q, max_size="2GiB") is q and q.settings.max_bytes == 2 * 2**30
    mem = open_queue(tmp_path, reuse=q, type="memory")
    assert mem.kind == "memory" and [ident(p) for p in mem.payloads()] == [0, 1, 2]
    assert read_pending(str(tmp_path / "state" / "queue" / "otlp")).payloads == []  # moved, not copied
    moved = open_queue(tmp_path, reuse=mem, type="persistent", directory=str(tmp_path / "elsewhere"))
    assert moved.kind == "persistent" and [ident(e.payload) for e in take_all(moved)] == [0, 1, 2]
    moved.close()


def test_retries_never_give_up_with_a_persistent_queue_by_default(tmp_path):
    from agent import config
    from agent.components import Config
    from agent.export.file import FileExporter, FileExporterConfig
    from agent.pipeline import build_pipeline
    c = cfg(tmp_path)
    files = FileExporterConfig(path=str(tmp_path / "m"), logs_path=str(tmp_path / "l"))
    p = build_pipeline(c, FileExporter(files), SelfMetrics())
    assert p.queue.kind == "persistent" and p.sender.give_up_after == 0 and len(p._workers) == 2
    p.queue.close()
    p = build_pipeline(cfg(tmp_path, type="memory"), p.exporter, SelfMetrics())
    assert p.sender.give_up_after == 300
    c = config.build(Config, {"state_dir": str(tmp_path / "s2"),
                              "exporter": {"type": "otlp", "retry": {"max_elapsed_time": "1m"}}})
    p = build_pipeline(c, p.exporter, SelfMetrics())
    assert p.sender.give_up_after == 60
    p.queue.close()


# --- the persistent queue's lock, recursion and length (no disk work where callers wait) --------------

@pytest.mark.parametrize("fsync, stalled", [("interval", "sync"), ("record", "put"), ("record", "ack")])
def test_a_stalled_fsync_holds_up_no_other_caller(tmp_path, monkeypatch, fsync, stalled):
    """One thread's fsync hangs (a slow disk, a hung NFS server); the other threads still put, get,
    acknowledge and ask the length: the queue's lock is never held over disk I/O."""
    q = persistent(tmp_path, fsync=fsync, fsync_interval=3600.0)  # the flusher stays asleep
    for i in range(3):
        q.put(payload(i))
    first = q.get(0)
    entered, release, outcome = threading.Event(), threading.Event(), {}

    def stalling(real):
        def call(fd):
            if threading.current_thread() is staller:
                entered.set()
                outcome["released"] = release.wait(20)  # False: the others had to wait it out
            return real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", stalling(os.fdatasync))
    monkeypatch.setattr(os, "fsync", stalling(os.fsync))
    staller = threading.Thread(target={"sync": q.sync, "put": lambda: q.put(payload(9)),
                                       "ack": lambda: q.ack(first)}[stalled])
    staller.start()
    assert entered.wait(30)
    second = q.get(0)
    assert ident(second.payload) == 1
    q.ack(second)
    if stalled != "put":  # (puts take turns: one stalled in record mode holds up the next put only)
        q.put(payload(10))
    assert len(q) >= 2 and q.items >= 12
    release.set()
    staller.join(30)
    assert outcome == {"released": True}
    q.close()


def test_get_steps_over_thousands_of_undecodable_records(tmp_path):
    """Records whose CRC checks out but whose body is not lz4 (a bug, a foreign writer) are each
    counted and skipped; however many follow one another, get() goes on to the next good one."""
    import crc32c
    from agent.export.wal import encode_frame
    n = 3000
    frames = []
    for i in range(n):
        body = b"not lz4 %d" % i
        rest = struct.pack("<IIQBBHI", len(body), 1, time.time_ns(), 0, 1, 0, crc32c.crc32c(body))
        frames.append(MAGIC + struct.pack("<I", crc32c.crc32c(rest)) + rest + body)
    good = payload(7)
    directory = tmp_path / "q"
    directory.mkdir()
    (directory / f"{1:020d}.seg").write_bytes(b"".join(frames) + encode_frame(good))
    q = persistent(tmp_path)
    codec = q.metrics.corrupt.value((("queue", "export"), ("reason", "codec")))
    dropped = q.metrics.dropped.value(REASON("corrupt"))
    assert len(q) == n + 1
    e = q.get(0)
    assert e is not None and e.payload == good
    assert q.metrics.corrupt.value((("queue", "export"), ("reason", "codec"))) - codec == n
    assert q.metrics.dropped.value(REASON("corrupt")) - dropped == n
    q.ack(e)
    assert len(q) == 0 and q.items == 0
    q.close()


def test_length_is_kept_in_memory(tmp_path, monkeypatch):
    """len() and the item count read nothing from disk, however long the queue; they are right
    after a reopen, and after records are handed out, acknowledged and dropped."""
    q = persistent(tmp_path, max_bytes=512 << 10, segment_size=64 << 10)
    sent = [payload(i) for i in range(200)]  # ~400 KiB: several segments, nothing dropped yet
    for p in sent:
        q.put(p)
    q.close()
    q = persistent(tmp_path, max_bytes=512 << 10, segment_size=64 << 10)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda *a: reads.append(a) or real_pread(*a))
    assert len(q) == 200 and q.items == sum(p.items for p in sent)
    assert reads == []
    entries = [q.get(0) for _ in range(50)]
    for e in entries[:30]:
        q.ack(e)
    del reads[:]
    assert len(q) == 170 and q.items == sum(p.items for p in sent[30:])
    assert reads == []
    for i in range(200, 260):  # past max_bytes: the oldest segments go
        q.put(payload(i))
    rest = take_all(q)
    assert len(q) == 20 + len(rest)  # 20 still in flight, the rest handed out now
    for e in entries[30:] + rest:
        q.ack(e)
    assert len(q) == 0 and q.items == 0
    q.close()


def test_concurrent_producers_consumers_and_drops_account_for_every_item(tmp_path):
    """Producers overflow a small queue while consumers take and acknowledge: every item put is
    delivered or counted as dropped, and the queue ends empty on disk and in its counts."""
    q = persistent(tmp_path, max_bytes=256 << 10, segment_size=64 << 10)
    before = q.metrics.dropped.value(REASON("full"))
    n, got, lock = 600, [], threading.Lock()
    done = threading.Event()

    def produce(start):
        for i in range(start, n, 3):
            q.put(payload(i, 4000))

    def consume():
        while True:
            e = q.get(0.2)
            if e is None:
                if done.is_set():
                    return
                continue
            with lock:
                got.append(e.payload)
            q.ack(e)

    producers = [threading.Thread(target=produce, args=(s,)) for s in range(3)]
    consumers = [threading.Thread(target=consume) for _ in range(2)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(60)
    done.set()
    for t in consumers:
        t.join(60)
    delivered = sum(p.items for p in got)
    dropped = q.metrics.dropped.value(REASON("full")) - before
    assert delivered + dropped == sum(10 + i for i in range(n))
    assert len({ident(p) for p in got}) == len(got)  # no duplicates within one run
    assert q.items == 0 and len(q) == 0
    q.close()
    assert read_pending(str(tmp_path / "q")).payloads == []
