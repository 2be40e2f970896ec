"""The persistent export queue: an append-only log of segment files on local disk.

What the pipeline hands the exporter is appended here first; the senders read it back in order,
and what they are done with (delivered, or dropped and counted) is removed by moving a durable read
pointer past it. After a crash, a restart or a long outage, everything after the pointer is sent
again: nothing is lost, a few payloads may arrive twice.

Layout of the directory (0700, one process at a time: `lock` is flock'ed and holds the pid):

    lock                          the owner's pid
    cursor                        the read pointer: segment and offset of the oldest record not yet
                                  acknowledged; replaced atomically (write cursor.tmp, rename)
    00000000000000000001.seg ...  segments, each appended to until it reaches segment_size; a
                                  segment wholly behind the read pointer is deleted

Every record is one frame, written with one write() call (little endian):

    offset  size
    0       4     magic b"HAQ\\x01" (also what a scan looks for to find the next frame after damage)
    4       4     CRC32C of bytes 8..32 (the rest of the header)
    8       4     body length
    12      4     items (data points or log records)
    16      8     enqueue time, ns since the epoch
    24      1     signal: 0 metrics, 1 logs
    25      1     codec of the body: 1 lz4 frame
    26      2     reserved, 0
    28      4     CRC32C of the body
    32      n     body: the OTLP request bytes, lz4-compressed

Damage is never fatal. At open, a torn or garbled tail of the newest segment is truncated (logged and
counted). While reading, a record whose body fails its CRC is skipped and its items counted as
dropped; a damaged header is skipped by scanning for the next magic whose header checks out; both are
logged and counted (hostagent.queue.corrupt_records, hostagent.queue.corrupt_bytes).

Bounds: the segment files together stay under max_size; a new record that would not fit, or a full
filesystem (ENOSPC), drops the oldest segment (policy drop_oldest; its unread items are counted) or
refuses the new record (refuse_new; counted), and the agent carries on.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import crc32c
import lz4.frame

from agent.export.encoding import Payload
from agent.export.queue import QUEUE_ATTRS, Entry, ExportQueue, QueueError, QueueSettings

log = logging.getLogger("hostagent.export.queue")

MAGIC = b"HAQ\x01"
HEADER = struct.Struct("<4sIIIQBBHI")  # magic, head crc, body length, items, time, signal, codec, 0, body crc
assert HEADER.size == 32
CURSOR = struct.Struct("<4sQQI")  # magic, segment, offset, crc of the first 20 bytes
CURSOR_MAGIC = b"HQC\x01"
CODEC_LZ4 = 1
SIGNAL_CODES = {"metrics": 0, "logs": 1}
SIGNAL_NAMES = {v: k for k, v in SIGNAL_CODES.items()}
SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
MAX_BODY = 1 << 31  # a larger length field is damage, not a record
RESYNC_CHUNK = 1 << 20


def _crc(data) -> int:
    return crc32c.crc32c(data)


_HEADER_REST = struct.Struct("<IIQBBHI")  # the header after magic and head crc


def encode_frame(payload: Payload, now_ns: Optional[int] = None) -> bytes:
    body = lz4.frame.compress(payload.body, compression_level=0)
    rest = _HEADER_REST.pack(len(body), payload.items, now_ns or time.time_ns(),
                             SIGNAL_CODES[payload.signal], CODEC_LZ4, 0, _crc(body))
    return MAGIC + struct.pack("<I", _crc(rest)) + rest + body


@dataclass
class Header:
    body_len: int
    items: int
    created_ns: int
    signal: str
    body_crc: int


def parse_header(raw: bytes) -> Optional[Header]:
    """The header in `raw` (32 bytes), or None if it is not a valid one."""
    if len(raw) < HEADER.size:
        return None
    magic, head_crc, body_len, items, created, signal, codec, _, body_crc = HEADER.unpack_from(raw)
    if magic != MAGIC or head_crc != _crc(raw[8:HEADER.size]):
        return None
    if signal not in SIGNAL_NAMES or codec != CODEC_LZ4 or body_len > MAX_BODY:
        return None
    return Header(body_len, items, created, SIGNAL_NAMES[signal], body_crc)


def _pread(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)


def resync(fd: int, start: int, end: int) -> Optional[int]:
    """The offset of the next valid frame header in [start, end) whose frame fits before `end`."""
    pos = start
    while pos < end:
        chunk = _pread(fd, min(RESYNC_CHUNK, end - pos) + len(MAGIC) - 1, pos)
        i = chunk.find(MAGIC)
        while i >= 0 and pos + i < end:
            off = pos + i
            h = parse_header(_pread(fd, HEADER.size, off))
            if h is not None and off + HEADER.size + h.body_len <= end:
                return off
            i = chunk.find(MAGIC, i + 1)
        pos += RESYNC_CHUNK
    return None


@dataclass
class Frame:
    offset: int
    header: Optional[Header]  # None: damaged bytes, from offset up to `next`
    next: int  # where the next frame starts


def frame_at(fd: int, off: int, end: int) -> Frame:
    """The frame at `off` of a segment whose complete frames end at `end`, or the damaged region
    there (up to the next frame whose header checks out, or to `end`). Every walk over the frames
    of a segment (opening, reading, looking at a stopped queue) steps with this."""
    h = parse_header(_pread(fd, HEADER.size, off))
    if h is not None and off + HEADER.size + h.body_len <= end:
        return Frame(off, h, off + HEADER.size + h.body_len)
    nxt = resync(fd, off + 1, end)
    return Frame(off, None, end if nxt is None else nxt)


def frames(fd: int, start: int, end: int) -> Iterator[Frame]:
    off = start
    while off + HEADER.size <= end:
        frame = frame_at(fd, off, end)
        yield frame
        off = frame.next


def read_body(fd: int, frame: Frame) -> Optional[bytes]:
    """The (compressed) body of a frame, or None if it fails its CRC."""
    body = _pread(fd, frame.header.body_len, frame.offset + HEADER.size)
    return body if _crc(body) == frame.header.body_crc else None


def scan(fd: int, start: int, end: int) -> tuple[int, int, int]:
    """Walk the frame headers of a segment from `start`: (items, records, end of the last valid
    frame). Bodies are checked when read."""
    items = records = 0
    valid_end = start
    for frame in frames(fd, start, end):
        if frame.header is not None:
            items += frame.header.items
            records += 1
            valid_end = frame.next
    return items, records, valid_end


def read_cursor(directory: str) -> Optional[tuple[int, int]]:
    try:
        with open(os.path.join(directory, "cursor"), "rb") as f:
            raw = f.read(CURSOR.size + 1)
    except FileNotFoundError:
        return None
    if len(raw) != CURSOR.size:
        return None
    magic, seq, off, crc = CURSOR.unpack(raw)
    if magic != CURSOR_MAGIC or crc != _crc(raw[:20]):
        return None
    return seq, off


def segment_files(directory: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(directory):
        m = SEGMENT_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(directory, name)
    return dict(sorted(out.items()))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("queue_delete_failed segment=%s error=%r", path, e.strerror)


@dataclass
class Segment:
    seq: int
    path: str
    size: int = 0  # bytes of complete frames (what the reader may read)
    items: int = 0  # items of the records not read yet
    records: int = 0  # records not read yet


@dataclass
class Pending:
    """What `read_pending` finds in a queue directory without changing it."""
    payloads: list = field(default_factory=list)
    corrupt_records: int = 0


def read_pending(directory: str) -> Pending:
    """Every record after the read pointer, decoded; damaged ones counted, nothing modified.
    For tests and for looking at a stopped agent's queue."""
    out = Pending()
    cursor = read_cursor(directory) or (0, 0)
    for seq, path in segment_files(directory).items():
        if seq < cursor[0]:
            continue
        with open(path, "rb") as f:
            fd = f.fileno()
            for frame in frames(fd, cursor[1] if seq == cursor[0] else 0, os.fstat(fd).st_size):
                body = read_body(fd, frame) if frame.header is not None else None
                if body is None:
                    out.corrupt_records += 1
                    continue
                h = frame.header
                out.payloads.append(Payload(h.signal, lz4.frame.decompress(body), h.items))
    return out


class PersistentQueue(ExportQueue):
    """The log behind put/get/ack. The condition lock (`_cond`) guards only what is in memory
    (segments, sizes, counts, the read position, what is in flight) and is never held over disk
    I/O, so a slow or stalled disk (an fsync, a read) holds up no other caller but the one doing
    it. Disk I/O happens under one of three locks, taken in this order, each before `_cond`:
    `_wlock` (the writer: appends, rotation, dropping the oldest segment), `_rlock` (the reader:
    its file descriptor and the reads at the read position), `_plock` (the cursor file and the
    deletion of acknowledged segments). A record becomes readable when, written (and synced with
    fsync: record), its segment's size is moved past it under `_cond`."""
    kind = "persistent"

    def __init__(self, settings: QueueSettings, telemetry):
        super().__init__(settings, telemetry)
        self.dir = settings.directory
        self._segments: dict[int, Segment] = {}
        self._inflight: dict[tuple, int] = {}  # (segment, offset) -> items, handed out, not acked
        self._redo: list = []  # entries released back: handed out again before anything else
        self._items = 0
        self._records = 0  # queued or in flight
        self._disk = 0
        self._head: Optional[Segment] = None
        self._wfd: Optional[int] = None
        self._dirty = False  # appended since the last fsync
        self._full_warned = False
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._plock = threading.Lock()
        self._rfd: Optional[tuple[int, int]] = None  # (segment, fd) the reader has open
        self._written: Optional[tuple[int, int]] = None  # the read pointer in the cursor file
        self._cursor_dirty = False  # the cursor file was replaced since the last fsync
        self._trash: list = []  # segments behind the read pointer, deleted once the cursor says so
        self._persist_wanted = False
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._lock_fd = self._lock()
            try:
                self._open()
            except BaseException:
                os.close(self._lock_fd)
                raise
        except OSError as e:
            raise QueueError(f"cannot use {self.dir}: {e.strerror or e}") from None
        self.metrics.observe(self)
        self._stop = threading.Event()
        self._flusher = None
        if settings.fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, name="queue-fsync", daemon=True)
            self._flusher.start()

    # --- opening ---------------------------------------------------------------------------------

    def _lock(self) -> int:
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QueueError(f"{self.dir} is in use by another process (pid {owner})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self) -> None:
        try:
            os.unlink(os.path.join(self.dir, "cursor.tmp"))
        except FileNotFoundError:
            pass
        files = segment_files(self.dir)
        cursor = read_cursor(self.dir)
        if cursor is None and os.path.exists(os.path.join(self.dir, "cursor")):
            log.warning("queue_cursor_unreadable directory=%s replaying=all_segments", self.dir)
        start_seq, start_off = cursor or (0, 0)
        # segment numbers only grow, also when every segment (the one the pointer names included)
        # was deleted: a smaller number would count as already acknowledged
        last = max(max(files, default=0), start_seq)
        for seq, path in files.items():
            if seq < start_seq:  # wholly acknowledged: deleting it was interrupted
                os.unlink(path)
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                begin = min(start_off, size) if seq == start_seq else 0
                items, records, valid_end = scan(fd, begin, size)
            finally:
                os.close(fd)
            if seq == last and valid_end < size:
                # a torn or damaged tail: cut it off so the log ends with a whole frame
                self.metrics.corrupt.add(1, QUEUE_ATTRS + (("reason", "torn_tail"),))
                self.metrics.corrupt_bytes.add(size - valid_end, QUEUE_ATTRS)
                log.warning("queue_truncated segment=%s bytes=%d at_offset=%d reason=torn_or_damaged_tail",
                            os.path.basename(path), size - valid_end, valid_end)
                os.truncate(path, valid_end)
                size = valid_end
            self._segments[seq] = Segment(seq, path, size, items, records)
            self._items += items
            self._records += records
            self._disk += size
        first = next(iter(self._segments), None)
        self._rseq = first if first is not None else last + 1
        self._roff = min(start_off, self._segments[first].size) if first == start_seq else 0
        self._committed = (self._rseq, self._roff)
        self._new_head(last + 1)
        self._write_cursor(self._committed, sync=True)
        if self._items:
            log.info("queue_replay directory=%s items=%d segments=%d bytes=%d", self.dir, self._items,
                     len(self._segments) - 1, self._disk)

    def _new_head(self, seq: int) -> None:
        path = os.path.join(self.dir, f"{seq:020d}.seg")
        self._wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self.settings.fsync == "record":
            _fsync_dir(self.dir)
        with self._cond:
            self._head = self._segments[seq] = Segment(seq, path)

    # --- writing (under _wlock) ------------------------------------------------------------------

    def put(self, payload: Payload) -> None:
        frame = encode_frame(payload)
        with self._wlock:
            if self._closed:
                self._count_refused(payload.items, "closed")
                return
            try:
                self._put(payload, frame)
            except OSError as e:  # the disk failed in a way dropping old data cannot help
                self._count_refused(payload.items, "io_error")
                log.error("queue_write_failed directory=%s error=%r", self.dir, e.strerror or str(e))
        self._persist()

    def _put(self, payload: Payload, frame: bytes) -> None:
        n = len(frame)
        if n > self.settings.max_bytes:
            self._count_refused(payload.items, "too_large")
            log.warning("queue_refused items=%d bytes=%d reason=larger_than_queue", payload.items, n)
            return
        if self._disk + n > self.settings.max_bytes:
            if self.settings.policy == "refuse_new":
                self._refuse_full(payload, "queue_full")
                return
            while self._disk + n > self.settings.max_bytes and self._drop_oldest("full"):
                pass
        while True:
            try:
                self._append(frame)
                break
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    self._count_refused(payload.items, "io_error")
                    log.error("queue_write_failed directory=%s error=%r", self.dir, e.strerror)
                    return
                if self.settings.policy == "refuse_new" or not self._drop_oldest("disk_full"):
                    self._refuse_full(payload, "no_space")
                    return
        self._full_warned = False
        head = self._head
        with self._cond:  # the record is whole (and synced if asked): readers may have it now
            head.size += n
            head.items += payload.items
            head.records += 1
            self._disk += n
            self._items += payload.items
            self._records += 1
            self._cond.notify()
        self.metrics.enqueued.add(payload.items, QUEUE_ATTRS)
        if head.size >= self.settings.segment_size:
            try:
                self._rotate()
            except OSError as e:  # go on appending to the current segment; try again next time
                log.warning("queue_rotate_failed directory=%s error=%r", self.dir, e.strerror or str(e))

    def _append(self, frame: bytes) -> None:
        try:
            written = os.write(self._wfd, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.settings.fsync == "record":
                os.fdatasync(self._wfd)
            else:
                self._dirty = True
        except OSError:
            try:  # never leave half a frame behind
                os.ftruncate(self._wfd, self._head.size)
            except OSError:
                pass
            raise

    def _refuse_full(self, payload: Payload, reason: str) -> None:
        self._count_refused(payload.items, reason)
        if not self._full_warned:
            self._full_warned = True
            log.warning("queue_full directory=%s bytes=%d policy=%s refused=new reason=%s", self.dir,
                        self._disk, self.settings.policy, reason)

    def _rotate(self) -> None:
        old_fd = self._wfd
        self._new_head(self._head.seq + 1)  # first, so that a failure leaves the old head in use
        try:
            os.fdatasync(old_fd)
        except OSError as e:
            log.warning("queue_fsync_failed directory=%s error=%r", self.dir, e.strerror)
        os.close(old_fd)
        self._dirty = False

    def _drop_oldest(self, reason: str) -> bool:
        """Delete the oldest segment to make room, counting its unread items; False if there is
        nothing left to delete."""
        while True:
            with self._cond:
                seg = next(iter(self._segments.values()))
                if seg is not self._head:
                    self._items -= seg.items
                    self._records -= seg.records
                    self._count_drop(seg.items, reason)
                    self._forget(seg)
                    if self._rseq == seg.seq:
                        self._rseq, self._roff = next(iter(self._segments)), 0
                    self._advance()
                    break
            if not self._head.size:
                return False
            self._rotate()  # the head itself is the only data: close it so it can go
        log.warning("queue_dropped_oldest directory=%s segment=%s items=%d bytes=%d reason=%s", self.dir,
                    os.path.basename(seg.path), seg.items, seg.size, reason)
        _unlink(seg.path)  # now: the room is what the caller needs
        if self._rlock.acquire(blocking=False):  # else the reader is busy and lets go of it itself
            try:
                self._close_reader(unless=self._rseq)
            finally:
                self._rlock.release()
        return True

    def _forget(self, seg: Segment) -> None:
        del self._segments[seg.seq]
        self._disk -= seg.size

    # --- reading (under _rlock) --------------------------------------------------------------------

    def get(self, timeout: Optional[float]) -> Optional[Entry]:
        waited = False
        while True:
            with self._cond:
                if self._closed:
                    return None
                if self._redo:
                    return self._redo.pop(0)
                if (self._rseq, self._roff) >= (self._head.seq, self._head.size):  # nothing unread
                    if waited or not timeout:
                        return None
                    self._cond.wait(timeout)
                    waited = True
                    continue
            entry = self._read_one()
            self._persist()
            if entry is not None:
                return entry

    def _read_one(self) -> Optional[Entry]:
        """The record at the read position, handed out; or None once the reader stepped over what
        is there instead (damage, the end of a segment) or found nothing: the caller looks again."""
        with self._rlock:
            with self._cond:
                seg = self._reader_segment()
                pos, end = (self._rseq, self._roff), seg.size if seg is not None else 0
            if seg is None:
                self._close_reader(unless=pos[0])
                return None
            try:
                fd = self._reader_fd(seg)
                frame = frame_at(fd, pos[1], end)
                body = read_body(fd, frame) if frame.header is not None else None
            except OSError as e:
                self._read_failed(seg, pos, e)
                return None
            with self._cond:
                if (self._rseq, self._roff) != pos:  # dropped while we read it (its items counted then)
                    moved = True
                else:
                    moved = False
                    h = self._took(seg, frame, body)
            if moved:
                self._close_reader(unless=self._rseq)
                return None
        if h is None:
            return None
        try:
            data = lz4.frame.decompress(body)
        except RuntimeError:
            with self._cond:
                self._inflight.pop(pos, None)
                self._items -= h.items
                self._records -= 1
                self._corrupt(pos[0], pos[1], "codec", h.items, len(body))
                self._advance()
            return None
        return Entry(Payload(h.signal, data, h.items), pos)

    def _reader_segment(self) -> Optional[Segment]:
        """The segment with the next record to read, moving past dropped and finished ones."""
        while True:
            seg = self._segments.get(self._rseq)
            if seg is None:  # dropped while we were reading it
                later = [s for s in self._segments if s > self._rseq]
                if not later:
                    return None
                self._rseq, self._roff = later[0], 0
                continue
            if self._roff + HEADER.size > seg.size:
                if seg is self._head:
                    return None
                self._finish(seg)
                continue
            return seg

    def _took(self, seg: Segment, frame: Frame, body: Optional[bytes]) -> Optional[Header]:
        """Move the read position past `frame`; its header if it is now in flight, else None
        (damage, counted)."""
        off, h = frame.offset, frame.header
        self._roff = frame.next
        if h is None:
            self._corrupt(seg.seq, off, "frame", 0, frame.next - off)
            return None
        seg.items -= h.items
        seg.records -= 1
        if body is None:
            self._items -= h.items
            self._records -= 1
            self._corrupt(seg.seq, off, "crc", h.items, HEADER.size + h.body_len)
            self._advance()
            return None
        self._inflight[(seg.seq, off)] = h.items
        return h

    def _read_failed(self, seg: Segment, pos: tuple, e: OSError) -> None:
        """An unreadable segment: skip the rest of it, counted."""
        self._close_reader()
        with self._cond:
            if (self._rseq, self._roff) != pos or seg.seq not in self._segments:  # dropped meanwhile
                return
            log.error("queue_read_failed directory=%s segment=%020d error=%r", self.dir, seg.seq,
                      e.strerror or str(e))
            self._corrupt(seg.seq, pos[1], "io_error", 0, seg.size - pos[1])
            self._roff = seg.size

    def _reader_fd(self, seg: Segment) -> int:
        if self._rfd is None or self._rfd[0] != seg.seq:
            self._close_reader()
            self._rfd = (seg.seq, os.open(seg.path, os.O_RDONLY))
        return self._rfd[1]

    def _close_reader(self, unless: Optional[int] = None) -> None:
        """Close the reader's file (unless it is of segment `unless`), so a deleted segment's space
        is freed."""
        if self._rfd is not None and self._rfd[0] != unless:
            os.close(self._rfd[1])
            self._rfd = None

    def _finish(self, seg: Segment) -> None:
        """The reader leaves `seg`: items its headers promised but that could not be read are lost."""
        if seg.items:
            self._items -= seg.items
            self._count_drop(seg.items, "corrupt")
            seg.items = 0
        self._records -= seg.records
        seg.records = 0
        later = [s for s in self._segments if s > seg.seq]
        self._rseq, self._roff = later[0], 0
        self._advance()

    def _corrupt(self, seq: int, offset: int, reason: str, items: int, size: int) -> None:
        self.metrics.corrupt.add(1, QUEUE_ATTRS + (("reason", reason),))
        self.metrics.corrupt_bytes.add(size, QUEUE_ATTRS)
        if items:
            self._count_drop(items, "corrupt")
        log.warning("queue_corrupt_record segment=%020d offset=%d reason=%s skipped_bytes=%d items=%d",
                    seq, offset, reason, size, items)

    # --- acknowledging (the cursor under _plock) ---------------------------------------------------

    def ack(self, entry: Entry) -> None:
        with self._cond:
            items = self._inflight.pop(entry.token, None)
            if items is None:
                return
            self._items -= items
            self._records -= 1
            self._advance()
        self._persist()

    def release(self, entry: Entry) -> None:
        with self._cond:
            if entry.token in self._inflight:
                self._redo.append(entry)
                self._cond.notify()

    def _advance(self) -> None:
        """Move the read pointer to the oldest record still owed; the segments wholly behind it go
        once the cursor file says so (`_persist`, outside `_cond`)."""
        new = min(self._inflight) if self._inflight else (self._rseq, self._roff)
        if new == self._committed:
            return
        self._committed = new
        for seg in [s for s in self._segments.values() if s.seq < new[0]]:
            self._forget(seg)
            self._trash.append(seg)
        self._persist_wanted = True

    def _persist(self) -> None:
        """Write the read pointer to the cursor file and delete the segments behind it. Never waits:
        while one thread does this, the others leave their share to it."""
        while self._persist_wanted and self._plock.acquire(blocking=False):
            try:
                while True:
                    with self._cond:
                        if not self._persist_wanted or self._closed:
                            break
                        self._persist_wanted = False
                        pos, trash, self._trash = self._committed, self._trash, []
                    if pos != self._written:
                        self._write_cursor(pos, sync=self.settings.fsync == "record")
                    for seg in trash:
                        _unlink(seg.path)
            finally:
                self._plock.release()
            # another thread may have asked (and found the lock taken) just before the release

    def _write_cursor(self, pos: tuple, sync: bool) -> None:
        raw = CURSOR_MAGIC + struct.pack("<QQ", *pos)
        raw += struct.pack("<I", _crc(raw))
        tmp = os.path.join(self.dir, "cursor.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, raw)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.dir, "cursor"))
            if sync:
                _fsync_dir(self.dir)
            self._written = pos
            self._cursor_dirty = not sync
        except OSError as e:  # a full disk: the old pointer stays, which only means duplicates later
            log.warning("queue_cursor_write_failed directory=%s error=%r", self.dir, e.strerror)

    # --- durability, size, shutdown ---------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.fsync_interval):
            self.sync()

    def sync(self) -> None:
        """fsync what was appended and the cursor file; the locks are held only to take what is
        dirty, not over the fsyncs."""
        with self._wlock:
            if self._closed:
                return
            data = os.dup(self._wfd) if self._dirty else None  # stays valid if the head rotates
            self._dirty = False
        with self._plock:
            cursor, self._cursor_dirty = self._cursor_dirty, False
        try:
            if data is not None:
                os.fdatasync(data)
            if cursor:
                fd = os.open(os.path.join(self.dir, "cursor"), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _fsync_dir(self.dir)
        except OSError as e:  # try again next time
            log.warning("queue_fsync_failed directory=%s error=%r", self.dir, e.strerror)
            with self._wlock, self._plock:
                self._dirty = self._dirty or data is not None
                self._cursor_dirty = self._cursor_dirty or cursor
        finally:
            if data is not None:
                os.close(data)

    def reconfigure(self, settings: QueueSettings) -> None:
        with self._cond:
            self.settings = settings

    @property
    def items(self) -> int:
        return self._items

    @property
    def size_bytes(self) -> int:
        return self._disk

    def __len__(self) -> int:
        """Records queued or in flight."""
        return self._records

    def close(self) -> None:
        """Keep what is not acknowledged on disk for the next start."""
        self.sync()
        self._stop.set()
        with self._wlock, self._rlock, self._plock:
            with self._cond:
                if self._closed:
                    return
                self._closed = True
                self._cond.notify_all()
                head_empty = not self._head.size
                if head_empty:
                    self._forget(self._head)
                trash, self._trash = self._trash, []
                pos = self._committed
            try:
                os.fdatasync(self._wfd)
            except OSError:
                pass
            os.close(self._wfd)
            self._close_reader()
            self._write_cursor(pos, sync=True)
            for seg in trash + ([self._head] if head_empty else []):
                _unlink(seg.path)
            os.close(self._lock_fd)
        if self._flusher is not None:
            self._flusher.join()
