"""What keying by cgroup costs in the kernel: each aggregating probe built with cgroup keys
(`ebpf.attribution: workload`, BY_CGROUP) against the same probe with host-wide keys
(`ebpf.attribution: host`), side by side in one run.

  event-cost/<probe>   ns its programs ran in the kernel per event: run_time_ns / run_cnt of all the
                       probe's programs (the kernel's BPF run-time statistics, BPF_ENABLE_STATS), as
                       bench/loaders.py measures a probe.
  request-cost/<probe> ns its programs ran per event its histogram recorded (runqlat: waits;
                       biolatency: completed requests; syscalls: calls, latency on): run_time_ns /
                       recorded events. The keyed build may run more programs per recorded event
                       (biolatency: block_io_start as well), which the per-run figure spreads out.
                       tcp: connection lifetimes recorded (both ends of each connection).

Both builds of a probe are attached at once and see the same events: a workload of processes in
cgroups of the benchmark's own (CPU contention, sleepers, fsync'd O_DIRECT writes, system calls;
for tcp, loopback connections to a listener of the benchmark's, half closed normally and half
reset, SO_LINGER 0, from a client process in every cgroup; both tcp builds are limited to that
port, so other TCP traffic on the host costs both the same early exit).
The program attached first on a tracepoint measures cheaper (bench/loaders.py saw ~30%), so each
probe runs ROUNDS rounds in both attach orders and the sums over all rounds are compared.
Loaded through the agent's loader (CO-RE objects built into a temporary directory by bpf/build.sh
where the checkout has none, else bcc). The machine is shared: figures are noisy, compare them
side by side only. Ratio: host-wide / by cgroup (< 1: keying by cgroup costs more); target
(issue 13): at most +30%, a ratio >= 1 / 1.3. Needs root.

    python bench/attribution.py [--quick] [--json FILE]
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.agent import enable_bpf_stats  # noqa: E402
from bench.common import finish, parser  # noqa: E402

CATEGORY = "attribution"
BASELINE = "the same probe with host-wide keys (ebpf.attribution: host), attached at the same time"
PROBES = ("runqlat", "biolatency", "syscalls", "tcp")
ROUNDS = {"full": 2, "quick": 1}              # each round: both attach orders
WORKLOAD_SECONDS = {"full": 3.0, "quick": 0.7}
CGROUPS = 4
TARGET_RATIO = 1 / 1.3

# one process per cgroup: system calls, an fsync'd O_DIRECT write and a short sleep, in a loop
WORKER = """
import mmap, os, sys, time
end = time.time() + float(sys.argv[1])
buf = mmap.mmap(-1, 4096)
buf.write(os.urandom(4096))
fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
i = 0
while time.time() < end:
    for _ in range(200):
        os.getppid()
    os.pwritev(fd, [buf], (i % 256) * 4096)
    os.fsync(fd)
    time.sleep(0.001)
    i += 1
os.close(fd)
"""
BUSY = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass\n"
# one process per cgroup (tcp): connections to the port in argv[2], each sending a message, every
# other one reset (SO_LINGER 0)
TCP_CLIENT = """
import socket, struct, sys, time
end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5)
    c.sendall(b"x" * 100)
    if i % 2:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    i += 1
"""
SERVERS = 4         # accepting threads (tcp)


def unavailable() -> str | None:
    from agent.procfs.identity import cgroup2_mount
    if os.geteuid() != 0:
        return "needs root (eBPF probes, cgroups)"
    if not cgroup2_mount():
        return "no cgroup v2 mount"
    return None


def objects(tmp: str) -> str:
    """A directory of CO-RE objects: bpf/build if the checkout has it, else bpf/build.sh's into `tmp`
    ("" when that fails: the loader then uses bcc)."""
    built = os.path.join(ROOT, "bpf", "build")
    if os.path.exists(os.path.join(built, "runqlat.bpf.o")):
        return built
    out = os.path.join(tmp, "bpf")
    proc = subprocess.run([os.path.join(ROOT, "bpf", "build.sh"), out], capture_output=True, timeout=600)
    return out if proc.returncode == 0 else ""


def start(code: str, seconds: float, args: list, cgroup: str) -> subprocess.Popen:
    """`python -c code seconds *args` in `cgroup`."""
    def join():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return subprocess.Popen([sys.executable, "-c", code, str(seconds), *args], preexec_fn=join)


def workload(seconds: float, cgroup_dirs: list, scratch: str) -> None:
    """A worker in every cgroup and two busy loops per CPU in the first, for `seconds`."""
    procs = [start(WORKER, seconds, [os.path.join(scratch, f"w{i}")], cgroup)
             for i, cgroup in enumerate(cgroup_dirs)]
    procs += [start(BUSY, seconds, [], cgroup_dirs[0]) for _ in range(2 * (os.cpu_count() or 1))]
    for p in procs:
        p.wait(timeout=seconds + 60)


def listener() -> socket.socket:
    """A listening socket on a free loopback port (the tcp builds are limited to it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    srv.settimeout(0.2)
    return srv


def tcp_workload(seconds: float, cgroup_dirs: list, srv: socket.socket) -> None:
    """A TCP client in every cgroup connecting to `srv` for `seconds`; SERVERS threads accept and
    read each connection to its end."""
    done = threading.Event()

    def serve():
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

    servers = [threading.Thread(target=serve) for _ in range(SERVERS)]
    for t in servers:
        t.start()
    try:
        procs = [start(TCP_CLIENT, seconds, [str(srv.getsockname()[1])], cgroup) for cgroup in cgroup_dirs]
        for p in procs:
            p.wait(timeout=seconds + 60)
    finally:
        done.set()
        for t in servers:
            t.join()


def recorded(probe) -> int:
    """Events the probe's histograms hold (every exponential histogram point's count)."""
    return sum(pt.count for m in probe.collect(0, 0) for pt in m.points if hasattr(pt, "count"))


def one_round(name: str, order: tuple, object_dir: str, seconds: float, cgroup_dirs: list, scratch: str) -> dict:
    """{"workload"|"host": (run_time_ns, run_cnt, recorded events)} of one round with the builds
    attached in `order`."""
    from agent.procfs.workload import WorkloadResolver
    from agent.sources.ebpf.config import EbpfConfig, ProbeConfig
    from agent.sources.ebpf.loader import load, program_stats, unload
    from agent.sources.ebpf.registry import PROBES as REGISTRY
    cfg = EbpfConfig(loader="auto", object_dir=object_dir, probes={name: ProbeConfig(enabled=True)})
    loaded, out = [], {}
    resolver = WorkloadResolver()
    srv = listener() if name == "tcp" else None
    limit = {"target_port": srv.getsockname()[1]} if srv else {}
    try:
        for kind in order:
            probe = REGISTRY[name](workloads=resolver if kind == "workload" else None, **limit)
            lps, statuses = load(cfg, {name: probe})
            if not lps:
                raise RuntimeError(f"{name} ({kind}) did not load: {statuses[0].reason}")
            loaded.append((kind, lps[0]))
        before = {kind: program_stats(lp.obj) for kind, lp in loaded}
        if srv:
            tcp_workload(seconds, cgroup_dirs, srv)
        else:
            workload(seconds, cgroup_dirs, scratch)
        for kind, lp in loaded:
            ns, runs, _ = program_stats(lp.obj)
            out[kind] = (ns - before[kind][0], runs - before[kind][1], recorded(lp.probe))
            out[kind + "_loader"] = lp.status.loader
    finally:
        if srv:
            srv.close()
        unload([lp for _, lp in loaded])
        resolver.close()
    return out


def measure(quick: bool) -> dict:
    from agent.procfs.identity import cgroup2_mount
    mode = "quick" if quick else "full"
    mount = cgroup2_mount()
    tmp = tempfile.mkdtemp(prefix="bench-attribution-")
    scratch = tempfile.mkdtemp(prefix="hostagent-bench-io-", dir="/var/tmp")    # a block device, not tmpfs
    cgroup_dirs = [os.path.join(mount, f"hostagent-bench-attribution-{os.getpid()}-{i}") for i in range(CGROUPS)]
    stats_fd = enable_bpf_stats()
    if stats_fd is None:
        raise RuntimeError("BPF_ENABLE_STATS refused: the kernel's BPF run-time statistics are needed")
    try:
        for d in cgroup_dirs:
            os.mkdir(d)
        object_dir = objects(tmp)
        out = {}
        for name in PROBES:
            totals = {"workload": [0, 0, 0], "host": [0, 0, 0]}
            loaders = set()
            for _ in range(ROUNDS[mode]):
                for order in (("workload", "host"), ("host", "workload")):
                    r = one_round(name, order, object_dir, WORKLOAD_SECONDS[mode], cgroup_dirs, scratch)
                    for kind in totals:
                        totals[kind] = [a + b for a, b in zip(totals[kind], r[kind])]
                        loaders.add(r[kind + "_loader"])
            out[name] = {"totals": totals, "loaders": sorted(loaders)}
        return out
    finally:
        os.close(stats_fd)
        for d in cgroup_dirs:
            if os.path.isdir(d):
                os.rmdir(d)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


CASES = (("event-cost", 1, "ns in the kernel per program run (run_time_ns / run_cnt)"),
         ("request-cost", 2, "ns in the kernel per recorded event (run_time_ns / events recorded)"))


def rows(m: dict) -> list[dict]:
    out = []
    for prefix, denominator, metric in CASES:
        for name, r in m.items():
            case = f"{prefix}/{name}"
            keyed, host = r["totals"]["workload"], r["totals"]["host"]
            if not keyed[denominator] or not host[denominator]:
                out.append({"case": case, "skipped": "the workload made no event this probe recorded", "details": r})
                continue
            ours, theirs = keyed[0] / keyed[denominator], host[0] / host[denominator]
            details = {kind: dict(zip(("run_time_ns", "run_cnt", "events"), r["totals"][k]))
                       for kind, k in (("by_cgroup", "workload"), ("host", "host"))}
            details.update({"loaders": r["loaders"], "target_ratio": round(TARGET_RATIO, 3),
                            "target_met": theirs / ours >= TARGET_RATIO})
            out.append({"case": case, "baseline": BASELINE, "metric": metric, "ours": ours, "theirs": theirs,
                        "ratio": theirs / ours, "details": details})
    return out


def run(quick: bool = False) -> list[dict]:
    why = unavailable()
    if why:
        return [{"case": f"{prefix}/{name}", "skipped": why} for prefix, *_ in CASES for name in PROBES]
    return rows(measure(quick))


def print_table(results: list) -> None:
    print(f"\n{'case':<26}{'by cgroup':>12}{'host-wide':>12}{'ratio':>9}  metric")
    for r in results:
        if "skipped" in r:
            print(f"{r['case']:<26}  skipped: {r['skipped']}")
            continue
        d = r["details"]
        print(f"{r['case']:<26}{r['ours']:>12.4g}{r['theirs']:>12.4g}{r['ratio']:>8.2f}x  {r['metric']}")
        print(f"{'':<26}runs {d['by_cgroup']['run_cnt']} / {d['host']['run_cnt']}, recorded events "
              f"{d['by_cgroup']['events']} / {d['host']['events']}; loader {','.join(d['loaders'])}; "
              f"target met: {d['target_met']}")


def main(argv=None) -> int:
    args = parser(__doc__, "one round and a 0.7 s workload per probe").parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench/attribution.py: {why}", file=sys.stderr)
        return 2
    return finish(args, CATEGORY, rows(measure(args.quick)), print_table)


if __name__ == "__main__":
    sys.exit(main())
