"""`hostagent run --profile FILE` (or HOSTAGENT_PROFILE=FILE): a cProfile profile of every thread.

cProfile only sees the thread that enables it, and the agent's work is spread over threads
(scheduler, batcher, exporter-N, ebpf-reader, ...). While profiling is on, every
`threading.Thread` started runs its `run()` under its own `cProfile.Profile`; when the thread
ends, its stats are merged into one `pstats.Stats`. At exit the main thread's profile and those
of threads still running are merged too, and the whole is written to FILE in the marshal format
of `pstats` (`python -m pstats FILE`, snakeviz, flameprof/gprof2dot).

Why wrap `run()` rather than use `threading.setprofile`: a hook installed that way is first
called for the `call` event of `run()` itself, so a profiler it enabled would miss `run()` (the
batcher's loop, for one). Python 3.11 has no `sys.monitoring`.

Times are each thread's CPU time (`time.thread_time`), not wall time: waits in `queue.get`,
`epoll` or `Event.wait` cost nothing, so the profile shows where the CPU goes. Not profiled:
threads that are not Python threads (grpcio's C-core threads) and the time of functions still
running in threads alive at exit (their callees that returned are counted).
"""
from __future__ import annotations

import cProfile
import logging
import os
import pstats
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

ENV = "HOSTAGENT_PROFILE"

log = logging.getLogger("hostagent.profiling")


class ProfileError(Exception):
    """The profile cannot be written where asked (a user error)."""


def profile_path(flag: Optional[str]) -> Optional[str]:
    """The file to write: the --profile flag, else $HOSTAGENT_PROFILE, else None (off)."""
    return flag or os.environ.get(ENV) or None


def check_path(path: str) -> str:
    """The absolute path of `path` if a profile can be written there, else ProfileError.
    Creates nothing: the file is written (to a temp file renamed over it) at exit."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise ProfileError(f"{path} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise ProfileError(f"directory {directory} does not exist")
    # access() also reports a read-only filesystem, even to root
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ProfileError(f"directory {directory} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ProfileError(f"{path} is not writable")
    return path


def _new_profiler() -> cProfile.Profile:
    return cProfile.Profile(time.thread_time)


class ThreadProfiler:
    """Profiles the calling (main) thread and every thread started until `stop()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._merged = pstats.Stats()
        self._running: dict[int, cProfile.Profile] = {}   # thread ident -> profiler of a live thread
        self._threads = 0
        self._main = _new_profiler()
        self._original_start = None

    def start(self) -> None:
        original_start = self._original_start = threading.Thread.start
        profiler = self

        def start(thread, *args, **kwargs):
            if "run" not in thread.__dict__:          # started once; a subclass's run() is found too
                thread.run = profiler._wrap(thread.run)
            return original_start(thread, *args, **kwargs)

        threading.Thread.start = start
        self._main.enable()

    def _wrap(self, run):
        def profiled_run():
            prof = _new_profiler()
            ident = threading.get_ident()
            with self._lock:
                self._running[ident] = prof
                self._threads += 1
            prof.enable()
            try:
                run()
            finally:
                prof.disable()
                with self._lock:
                    self._running.pop(ident, None)
                    self._merged.add(prof)
        return profiled_run

    def stop(self) -> pstats.Stats:
        """Stop profiling new threads and the main thread; the merged stats so far."""
        self._main.disable()
        if self._original_start is not None:
            threading.Thread.start = self._original_start
            self._original_start = None
        with self._lock:
            self._merged.add(self._main)
            for prof in self._running.values():
                # Another thread's profiler cannot be disabled from here (disable() acts on the
                # calling thread), so take what it has recorded: calls that have returned.
                prof.snapshot_stats()
                self._merged.add(_stats_of(prof.stats))
            return self._merged

    @property
    def threads(self) -> int:
        """Threads profiled besides the main thread."""
        return self._threads


def _stats_of(raw: dict) -> pstats.Stats:
    stats = pstats.Stats()
    stats.stats = dict(raw)
    stats.get_top_level_stats()
    return stats


def write(stats: pstats.Stats, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    stats.dump_stats(tmp)
    os.replace(tmp, path)


@contextmanager
def profiling(path: str) -> Iterator[ThreadProfiler]:
    """Profile every thread while the block runs; write the merged profile to `path` after it,
    however it ends. A profile that cannot be written is logged, not raised."""
    profiler = ThreadProfiler()
    profiler.start()
    try:
        yield profiler
    finally:
        stats = profiler.stop()
        try:
            write(stats, path)
        except OSError as e:
            log.error("profile_write_failed path=%s error=%r", path, e.strerror or str(e))
        else:
            log.info("profile_written path=%s threads=%d functions=%d", path, profiler.threads + 1,
                     len(stats.stats))
