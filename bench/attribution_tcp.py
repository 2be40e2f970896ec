"""The tcp probe keyed by cgroup against the same probe host-wide, side by side in one run: both
loaded at once (two BPF objects on the same tracepoints), so every event runs both programs.

  event-cost/tcp/<loader>   ns in the kernel per event: the probe's programs' run_time_ns /
                            run_cnt (BPF run-time statistics, on while this benchmark runs), keyed
                            (ebpf.attribution: workload: the socket's cgroup read, {cgroup, event}
                            keys) over host-wide ({0, event} keys). The workload: loopback TCP
                            connections to the benchmark's port, each sending a message, half
                            closed normally and half reset (SO_LINGER 0), from 4 threads.

Both probes are limited to the benchmark's port, so other TCP traffic on the host costs both the
same early exit. The machine is shared and busy: figures are noisy; the ratio within one run is the
figure to read. Ratio: host-wide / keyed, as bench/run.py reads ratios (> 1 better; the target
of issue 13, keyed at most 30% dearer, is a ratio >= 1 / 1.30 = 0.77). Needs root. A function,
measure_tcp(seconds, loader), is what a combined attribution benchmark can call.

    python bench/attribution_tcp.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.agent import enable_bpf_stats  # noqa: E402
from bench.common import finish, parser  # noqa: E402

CATEGORY = "attribution tcp"
BASELINE = "the same tcp probe host-wide (ebpf.attribution: host), loaded beside it"
WORKLOAD_SECONDS = {"full": 8.0, "quick": 1.0}
TARGET_RATIO = 1 / 1.30            # keyed at most 30% dearer per event than host-wide
THREADS = 4


def listener() -> socket.socket:
    """A listening socket on a free loopback port (the probes are limited to it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    return srv


def workload(srv: socket.socket, seconds: float) -> int:
    """Loopback connections to `srv` for `seconds`; the number made. Closes `srv`."""
    port = srv.getsockname()[1]
    done = threading.Event()
    made = [0] * THREADS

    def serve():
        srv.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            try:
                conn.settimeout(1)
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            conn.close()

    def client(i):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"x" * 100)
            if made[i] % 2:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            made[i] += 1

    servers = [threading.Thread(target=serve) for _ in range(THREADS)]
    clients = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
    for t in servers + clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    for t in servers:
        t.join()
    srv.close()
    return sum(made)


def core_objects(tmp: str) -> str:
    """bpf/build.sh's objects in `tmp` ("" if they do not build: then only bcc is measured)."""
    p = subprocess.run([os.path.join(ROOT, "bpf", "build.sh"), tmp], capture_output=True, timeout=600)
    return tmp if p.returncode == 0 else ""


def measure_tcp(seconds: float, loader: str, object_dir: str = "") -> dict:
    """{"host": {run_time_ns, run_cnt}, "keyed": {...}, "connections": n} for the tcp probe loaded
    twice under `loader` (core or bcc), or {"off": reason}."""
    from agent.procfs.workload import WorkloadResolver
    from agent.sources.ebpf.loader import ON, HostCheck, Plan, ProbeStatus, load_one, program_stats, unload
    from agent.sources.ebpf.tcp import TcpProbe
    srv = listener()
    port = srv.getsockname()[1]
    resolver = WorkloadResolver()
    loaded, out = [], {}
    try:
        for name, probe in (("host", TcpProbe(target_port=port)),
                            ("keyed", TcpProbe(target_port=port, workloads=resolver))):
            kind, reason, _ = HostCheck().loader(loader, probe, object_dir)
            if reason is not None:
                return {"off": reason}
            status = ProbeStatus(probe.name, probe.tracepoints, ON, "", probe.description, kind)
            lp, status = load_one(Plan(probe, status, probe.tracepoints, object_dir))
            if lp is None:
                return {"off": status.reason}
            loaded.append((name, lp))
        before = {name: program_stats(lp.obj) for name, lp in loaded}
        out["connections"] = workload(srv, seconds)
        for name, lp in loaded:
            run_time, runs, _ = program_stats(lp.obj)
            out[name] = {"run_time_ns": run_time - before[name][0], "run_cnt": runs - before[name][1]}
        keyed = loaded[1][1].probe
        out["workloads"] = len({p.attributes for m in keyed.collect(time.time_ns(), 0) for p in m.points})
    finally:
        srv.close()
        unload([lp for _, lp in loaded])
        resolver.close()
    return out


def measure(quick: bool) -> dict:
    seconds = WORKLOAD_SECONDS["quick" if quick else "full"]
    stats_fd = enable_bpf_stats()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-attribution-tcp-") as tmp:
            objects = core_objects(tmp)
            return {loader: measure_tcp(seconds, loader, objects) for loader in ("core", "bcc")}
    finally:
        if stats_fd is not None:
            os.close(stats_fd)


def rows(m: dict) -> list[dict]:
    out = []
    for loader, r in m.items():
        case = f"event-cost/tcp/{loader}"
        if "off" in r:
            out.append({"case": case, "skipped": r["off"]})
            continue
        if not r["host"]["run_cnt"] or not r["keyed"]["run_cnt"]:
            out.append({"case": case, "skipped": "no event ran the programs (BPF statistics off?)", "details": r})
            continue
        keyed = r["keyed"]["run_time_ns"] / r["keyed"]["run_cnt"]
        host = r["host"]["run_time_ns"] / r["host"]["run_cnt"]
        out.append({"case": case, "baseline": BASELINE, "metric": "ns in the kernel per event (run_time_ns / run_cnt)",
                    "ours": keyed, "theirs": host, "ratio": host / keyed,
                    "details": {**r, "target_ratio": TARGET_RATIO, "target_met": host / keyed >= TARGET_RATIO}})
    return out


def run(quick: bool = False) -> list[dict]:
    if os.geteuid() != 0:
        return [{"case": "event-cost/tcp", "skipped": "needs root (eBPF probes)"}]
    return rows(measure(quick))


def print_table(results: list) -> None:
    print(f"\n{'case':<24}{'keyed':>10}{'host-wide':>11}{'host / keyed':>14}  metric")
    for r in results:
        if "skipped" in r:
            print(f"{r['case']:<24}  skipped: {r['skipped']}")
            continue
        d = r["details"]
        print(f"{r['case']:<24}{r['ours']:>10.1f}{r['theirs']:>11.1f}{r['ratio']:>13.2f}x  {r['metric']}")
        print(f"{'':<24}events {d['keyed']['run_cnt']} (host-wide {d['host']['run_cnt']}), "
              f"{d['connections']} connections, target >= {TARGET_RATIO:.2f}x")


def main(argv=None) -> int:
    args = parser(__doc__, "a 1 s workload per loader").parse_args(argv)
    if os.geteuid() != 0:
        print("bench/attribution_tcp.py: needs root (eBPF probes)", file=sys.stderr)
        return 2
    return finish(args, CATEGORY, rows(measure(args.quick)), print_table)


if __name__ == "__main__":
    sys.exit(main())
