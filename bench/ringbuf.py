"""Event capture cost: bcc's perf buffer and ring buffer with Python callbacks against hostagent's
zero-copy ring buffer reader (agent/sources/ebpf/ringbuf.py).

A load generator (C, compiled here with cc) calls getppid() in a loop, unthrottled or at a given
rate, pinned to CPU 0. A BPF program on raw_syscalls:sys_enter, filtered to the generator's pid
and to getppid, sends a 56-byte record per call. One consumer thread (placed by the scheduler)
reads:

  a  perf      bcc perf buffer, Python callback per event (perf_buffer_poll, wakeup_events=1)
  b  ringbuf   bcc ring buffer, Python callback per event (ring_buffer_poll, kernel wakeups)
  c  hostagent RingBuffer.drain() in numpy batches, as the agent runs it: the last record read
                held between passes (hold_last), so the kernel wakes the reader only at a forced
                wakeup every quarter ring; adaptive timer (PollSchedule: aims at 1/8 of the ring
                per pass, waits 1-200 ms)
  d  hostagent the same reader woken by the kernel for every record it finds the reader caught
                up on (submit flags 0), to show what the timer saves (full runs only)

For each: events produced and consumed per second, events lost (records the producer could not
place: perf lost callbacks or failed ring reservations), consumer thread CPU seconds per million
events, and the BPF program's average run time (kernel bpf_stats, enabled for the run through
BPF_ENABLE_STATS). Ratios are against (a).

    python bench/ringbuf.py [--quick] [--seconds 5] [--rates 200000,max] [--json FILE]
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import parser, write_json  # noqa: E402

from agent.sources.ebpf.loader import INCLUDE_DIR, BccObject  # noqa: E402
from agent.sources.ebpf.maps import BpfMap  # noqa: E402
from agent.sources.ebpf.source import POLL_INTERVAL  # noqa: E402
from agent.sources.ebpf.ringbuf import Poller, PollSchedule, RingBuffer, read_drops, wakeup_every  # noqa: E402

RING_BYTES = 8 * 2**20               # b, c, d; the perf buffer gets the same per machine
NR_GETPPID = 110                     # x86-64

GENERATOR = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* generator SECONDS RATE: call getppid() for SECONDS, at RATE calls/s (0: as fast as possible),
 * after a line on stdin; print the number of calls. */
int main(int argc, char **argv) {
    double seconds = atof(argv[1]), rate = atof(argv[2]);
    char line[8];
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    double start = now(), end = start + seconds, t = start;
    long calls = 0;
    while (t < end) {
        for (int i = 0; i < 256; i++)
            syscall(SYS_getppid);
        calls += 256;
        t = now();
        if (rate > 0) {
            double ahead = calls / rate - (t - start);
            if (ahead > 0) {
                struct timespec d = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};
                nanosleep(&d, NULL);
                t = now();
            }
        }
    }
    printf("%ld %.6f\n", calls, t - start);
    return 0;
}
"""

PROGRAM = r"""
#include "hostagent.h"

struct event {                        /* 56 bytes */
    u64 time_ns;
    u64 id;
    u64 args[5];
};

#ifdef USE_PERF
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
#endif

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET_TGID || args->id != NR_GETPPID)
        return 0;
#ifdef USE_PERF
    struct event e = {.time_ns = bpf_ktime_get_ns(), .id = args->id};
    events.perf_submit(args, &e, sizeof(e));
#else
    u32 slot = 0;
    struct event *e = events.ringbuf_reserve(sizeof(*e));
    if (!e)
        return ha_count_drop(ha_ringbuf_dropped.lookup(&slot));
    e->time_ns = bpf_ktime_get_ns();
    e->id = args->id;
    e->args[0] = args->args[0];
    e->args[1] = args->args[1];
    e->args[2] = args->args[2];
    e->args[3] = args->args[3];
    e->args[4] = args->args[4];
#ifdef WAKEUP_EVERY
    events.ringbuf_submit(e, ha_submit_flags(ha_ringbuf_unwoken.lookup(&slot), WAKEUP_EVERY));
#else
    events.ringbuf_submit(e, 0);
#endif
#endif
    return 0;
}
"""

EVENT = np.dtype([("time_ns", "<u8"), ("id", "<u8"), ("args", "<u8", (5,))])


class Event(ctypes.Structure):
    _fields_ = [("time_ns", ctypes.c_uint64), ("id", ctypes.c_uint64), ("args", ctypes.c_uint64 * 5)]


MODES = {
    "a": "bcc perf buffer + callback",
    "b": "bcc ring buffer + callback",
    "c": "hostagent reader (timer, last record held)",
    "d": "hostagent reader (kernel wakeups)",
}


# --- kernel statistics for BPF programs -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_NR_BPF = 321
_BPF_OBJ_GET_INFO_BY_FD, _BPF_ENABLE_STATS = 15, 32
_RUN_TIME_NS, _RUN_CNT = 192, 200          # offsets in struct bpf_prog_info


def enable_bpf_stats():
    """An fd keeping kernel.bpf_stats on while open (refcounted; other users are not disturbed)."""
    attr = (ctypes.c_uint32 * 2)(0, 0)     # type = BPF_STATS_RUN_TIME
    fd = _libc.syscall(_NR_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd if fd >= 0 else None


def prog_stats(prog_fd: int):
    """(run_time_ns, run_cnt) of a loaded program."""
    info = (ctypes.c_uint8 * 256)()
    attr = (ctypes.c_uint64 * 2)()
    attr[0] = prog_fd | (ctypes.sizeof(info) << 32)
    attr[1] = ctypes.addressof(info)
    if _libc.syscall(_NR_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        return None
    raw = bytes(info)
    return int.from_bytes(raw[_RUN_TIME_NS:_RUN_TIME_NS + 8], "little"), \
        int.from_bytes(raw[_RUN_CNT:_RUN_CNT + 8], "little")


# --- one run ----------------------------------------------------------------------------------

def build_generator(tmp: str) -> str:
    src, exe = os.path.join(tmp, "gen.c"), os.path.join(tmp, "gen")
    with open(src, "w") as f:
        f.write(GENERATOR)
    subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


def pin(pid: int, cpu: int) -> None:
    if os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(pid, {cpu})


def run_mode(mode: str, generator: str, seconds: float, rate: int) -> dict:
    from bcc import BPF
    gen = subprocess.Popen([generator, str(seconds), str(rate)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    pin(gen.pid, 0)
    cflags = [f"-I{INCLUDE_DIR}", f"-DTARGET_TGID={gen.pid}", f"-DNR_GETPPID={NR_GETPPID}",
              f"-DRING_PAGES={RING_BYTES // 4096}"]
    if mode == "a":
        cflags.append("-DUSE_PERF")
    if mode == "c":
        cflags.append(f"-DWAKEUP_EVERY={wakeup_every(RING_BYTES, EVENT.itemsize)}")
    b = BPF(text=PROGRAM.encode(), cflags=cflags)
    prog_fd = b.funcs[b"tracepoint__raw_syscalls__sys_enter"].fd
    state = {"consumed": 0, "lost": 0, "cpu": 0.0, "bad": 0}
    stop = threading.Event()
    ring = poller = None

    def cb_perf(cpu, data, size):
        e = ctypes.cast(data, ctypes.POINTER(Event)).contents
        state["consumed"] += 1
        if e.id != NR_GETPPID:
            state["bad"] += 1

    def cb_ring(ctx, data, size):
        e = ctypes.cast(data, ctypes.POINTER(Event)).contents
        state["consumed"] += 1
        if e.id != NR_GETPPID:
            state["bad"] += 1
        return 0

    def lost(count):
        state["lost"] += count

    if mode == "a":
        b[b"events"].open_perf_buffer(cb_perf, page_cnt=RING_BYTES // 4096 // max(os.cpu_count(), 1),
                                      lost_cb=lost)
    elif mode == "b":
        b[b"events"].open_ring_buffer(cb_ring)
    else:
        # c holds the last record read between passes, as the agent does, so the kernel does not
        # wake it for the first record after each pass; d leaves the kernel's wakeups on
        ring = RingBuffer.from_map(BpfMap.from_fd(b[b"events"].map_fd, "events"), EVENT, hold_last=mode == "c")
        poller = Poller([ring.fd])

    def consume():
        t0 = time.thread_time()
        if mode == "a":
            while not stop.is_set():
                b.perf_buffer_poll(timeout=50)
        elif mode == "b":
            while not stop.is_set():
                b.ring_buffer_poll(timeout=50)
        else:
            schedule = PollSchedule(POLL_INTERVAL)
            timeout = schedule.min_interval
            while poller.wait(timeout):
                batch = ring.drain()
                state["consumed"] += len(batch)
                state["bad"] += int(np.count_nonzero(batch["id"] != NR_GETPPID))
                timeout = schedule.next_timeout([ring])
            batch = ring.drain()
            state["consumed"] += len(batch)
        state["cpu"] = time.thread_time() - t0

    stats_fd = enable_bpf_stats()
    stats0 = prog_stats(prog_fd)
    consumer = threading.Thread(target=consume)
    consumer.start()
    out, _ = gen.communicate("go\n", timeout=seconds + 60)
    produced, elapsed = out.split()
    produced, elapsed = int(produced), float(elapsed)
    stats1 = prog_stats(prog_fd)
    if stats_fd is not None:
        os.close(stats_fd)
    if mode != "a":
        state["lost"] = read_drops(BccObject(b), 1)[0]
    deadline = time.monotonic() + 5           # let the consumer finish what is buffered
    while state["consumed"] + state["lost"] < produced and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    if poller is not None:
        poller.stop()
    consumer.join()
    if ring is not None:
        ring.close()
        poller.close()
    b.cleanup()
    kernel_ns = None
    if stats0 and stats1 and stats1[1] > stats0[1]:
        kernel_ns = (stats1[0] - stats0[0]) / (stats1[1] - stats0[1])
    consumed = state["consumed"]
    return {
        "mode": mode, "consumer": MODES[mode], "rate": rate or "max", "seconds": elapsed,
        "produced": produced, "consumed": consumed, "lost": state["lost"],
        "unaccounted": produced - consumed - state["lost"], "bad_records": state["bad"],
        "produced_per_s": produced / elapsed, "consumed_per_s": consumed / elapsed,
        "consumer_cpu_s": state["cpu"],
        "cpu_s_per_m": state["cpu"] / consumed * 1e6 if consumed else None,
        "kernel_ns_per_run": kernel_ns,
    }


def measure(seconds: float, rates: list, modes: list, log=None) -> list[dict]:
    """Every mode at every rate ("max" or calls/s), each row with its CPU ratio against mode a."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        generator = build_generator(tmp)
        for rate in rates:
            for mode in modes:
                r = run_mode(mode, generator, seconds, 0 if rate == "max" else int(rate))
                results.append(r)
                if log:
                    log(f"  {mode} rate={r['rate']}: {r['consumed_per_s'] / 1e6:.2f} M/s consumed, "
                        f"{r['lost']} lost, {r['consumer_cpu_s']:.2f} CPU-s")
    for rate in {r["rate"] for r in results}:
        base = next((r for r in results if r["rate"] == rate and r["mode"] == "a"), None)
        for r in results:
            if r["rate"] == rate and base and base["cpu_s_per_m"] and r["cpu_s_per_m"]:
                r["cpu_ratio_vs_a"] = base["cpu_s_per_m"] / r["cpu_s_per_m"]
    return results


CATEGORY = "capture"
# (case prefix, mode) compared with mode a; the rate is appended: reader-max, reader-200k
SUITE_CASES = (("reader", "c"), ("bcc-ringbuf", "b"))


def unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loads BPF programs)"
    import importlib.util
    if importlib.util.find_spec("bcc") is None:
        return "bcc (python3-bpfcc) is not installed"
    import shutil
    if not shutil.which("cc"):
        return "no C compiler (cc) for the load generator"
    return None


def rate_name(rate) -> str:
    return "max" if rate == "max" else f"{int(rate) // 1000}k"


def run(quick: bool = False) -> list[dict]:
    """hostagent's reader (c) and bcc's ring buffer (b) against bcc's perf buffer (a), consumer CPU
    per million events; quick: the top rate only, 2 s per mode."""
    rates = ["max"] if quick else ["200000", "max"]
    why = unavailable()
    if why:
        return [{"case": f"{prefix}-{rate_name(rate)}", "skipped": why}
                for rate in rates for prefix, _ in SUITE_CASES]
    results = measure(2.0 if quick else 5.0, rates, ["a", "b", "c"] if quick else ["a", "b", "c", "d"])
    rows = []
    for rate in rates:
        at_rate = {r["mode"]: r for r in results if str(r["rate"]) == rate}
        base = at_rate["a"]
        for prefix, mode in SUITE_CASES:
            r = at_rate[mode]
            case = f"{prefix}-{rate_name(rate)}"
            if not r.get("cpu_ratio_vs_a"):
                rows.append({"case": case, "skipped": "no events consumed (or none by the baseline)"})
                continue
            details = {k: r[k] for k in ("produced_per_s", "consumed_per_s", "lost", "unaccounted",
                                         "kernel_ns_per_run")}
            details.update(theirs_consumed_per_s=base["consumed_per_s"], theirs_lost=base["lost"],
                           theirs_kernel_ns_per_run=base["kernel_ns_per_run"], seconds=r["seconds"])
            if mode == "c" and "d" in at_rate:
                details["kernel_wakeups_cpu_s_per_m"] = at_rate["d"]["cpu_s_per_m"]
            rows.append({"case": case, "baseline": "bcc perf buffer + Python callback per event",
                         "metric": "consumer CPU-s per M events", "ours": r["cpu_s_per_m"],
                         "theirs": base["cpu_s_per_m"], "ratio": r["cpu_ratio_vs_a"], "details": details})
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "2 s per case, max rate, modes a-c (CI)")
    p.add_argument("--seconds", type=float, default=5.0, help="generator run time per case")
    p.add_argument("--rates", default="200000,max", help="generator rates, calls/s or max")
    p.add_argument("--modes", default=None, help="subset of a,b,c,d")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/ringbuf.py loads BPF programs: run it as root", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else args.seconds
    rates = ["max"] if args.quick else args.rates.split(",")
    modes = (args.modes or ("a,b,c" if args.quick else "a,b,c,d")).split(",")
    results = measure(seconds, rates, modes, log=lambda line: print(line, file=sys.stderr))
    print(f"{'case':<46} {'rate':>8} {'produced/s':>11} {'consumed/s':>11} {'lost':>10} "
          f"{'lost%':>6} {'CPU-s/M':>8} {'vs a':>6} {'BPF ns/run':>10}")
    for r in results:
        lost_pct = 100.0 * r["lost"] / r["produced"] if r["produced"] else 0.0
        ratio = f"{r['cpu_ratio_vs_a']:.1f}x" if r.get("cpu_ratio_vs_a") else "-"
        kns = f"{r['kernel_ns_per_run']:.0f}" if r["kernel_ns_per_run"] else "-"
        cpu = f"{r['cpu_s_per_m']:.3f}" if r["cpu_s_per_m"] else "-"
        print(f"{r['mode'] + ' ' + r['consumer']:<46} {str(r['rate']):>8} "
              f"{r['produced_per_s'] / 1e6:>9.2f} M {r['consumed_per_s'] / 1e6:>9.2f} M "
              f"{r['lost']:>10} {lost_pct:>5.1f}% {cpu:>8} {ratio:>6} {kns:>10}")
    if args.json:
        write_json(args.json, {"ring_bytes": RING_BYTES, "poll_interval_s": POLL_INTERVAL, "cpus": os.cpu_count(),
                               "kernel": os.uname().release, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
