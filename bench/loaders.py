"""The two ways the probes get into the kernel, side by side in one run: CO-RE objects loaded
through libbpf (`ebpf.loader: core`, the default where the kernel has BTF) against bcc compiling
the same programs at start (`ebpf.loader: bcc`, the fallback).

  attach/start-to-attached  seconds from spawning `hostagent run` (default config, the default
                            probes) to every default probe attached (the `attached=` of its
                            `ebpf_probes on=...` line; the details also have the line's own time,
                            when the agent has taken the probes over and reads them). Python's start
                            and imports count for both loaders. The agents of a loader share a state
                            directory, as restarts on a host do: the first start on an empty one
                            (CO-RE makes what it keeps of the kernel's BTF and the recipes of its
                            loads then, corebtf.py and early.py) is in the details, the cases are
                            the best of the starts after it, where CO-RE attaches before the agent
                            is imported. The agent's modules are compiled to byte code first, as the
                            packages ship them.
  attach/load-phase         the same without the process start: the loaders' own time, from their
                            start to every probe attached and set up (the `seconds=` of the
                            `ebpf_probes on=` line, plus its `early_seconds=`); the details also have
                            the time from the agent's `started` line to that line, by the log
                            lines' timestamps (ms).
  (details of start-to-attached) the floor of a Python process in the same run: from spawning
                            a bare interpreter, and one that only imports what `hostagent run`
                            imports before it attaches (agent/main.py), to when it gets there (best
                            of FLOOR_RUNS spawns each), and the ratio bcc's start would have against
                            that floor plus the CO-RE load.
  event-cost/<probe>        the probe's in-kernel cost per event: its programs' run_time_ns /
                            run_cnt (the kernel's BPF run-time statistics, BPF_ENABLE_STATS: on
                            while this benchmark holds the fd, back to what they were when it closes
                            it, even if it crashes). An agent per loader, one after the other,
                            each with only this probe on, under the same workload (exec, exit, TCP
                            connections on loopback, written and fsync'd blocks, killed children,
                            an OOM kill in a cgroup of its own each second).

Each attach case starts each loader's agent alone, one after the other, 1 + ATTACH_RUNS times, and
keeps the best run of each but the first (load on the machine only slows a start down). Ratio: bcc / CO-RE
(> 1: CO-RE is faster or cheaper). Targets (issue 12): attach >= 20x, event cost >= 1x.
Needs root.

    python bench/loaders.py [--quick] [--json FILE]
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.agent import agent_python, byte_compile, enable_bpf_stats, wait_until  # noqa: E402
from bench.common import finish, parser, stop  # noqa: E402

CATEGORY = "ebpf loaders"
BASELINE = "the bcc fallback (ebpf.loader: bcc): the same programs compiled at start"
LOADERS = ("core", "bcc")
ATTACH_RUNS = {"full": 3, "quick": 1}
FLOOR_RUNS = {"full": 10, "quick": 3}
# each prints CLOCK_MONOTONIC (system-wide) when it gets there: its exit is not counted
FLOOR = {"interpreter_s": "import time; print(time.monotonic())",
         "imports_s": "import agent.main, time; print(time.monotonic())"}
WORKLOAD_SECONDS = {"full": 6.0, "quick": 1.0}
LOAD_TIMEOUT = 180.0          # bcc compiling on a busy 2-vCPU host
TARGET_ATTACH_RATIO = 20.0
TARGET_EVENT_COST_RATIO = 1.0
OOM_LIMIT = 32 << 20          # the OOM workload's cgroup: a process asking for 64 MiB is killed


# --- the agents --------------------------------------------------------------------------------

class Agent:
    """`hostagent run` with a loader and probe switches, its log in a temp dir of its own; its state
    and output in `state_dir` (default: that temp dir): agents given the same one run the same
    config, as restarts do."""

    def __init__(self, tmp: str, name: str, loader: str, probes: dict | None = None, state_dir: str = ""):
        import yaml
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        ebpf = {"enabled": True, "loader": loader}
        if probes is not None:
            ebpf["probes"] = probes
        home = state_dir or self.dir
        cfg = {"state_dir": state_dir or os.path.join(self.dir, "state"), "health": {"endpoint": "127.0.0.1:0"},
               "exporter": {"type": "file", "file": {"path": os.path.join(home, "metrics.jsonl"),
                                                     "logs_path": os.path.join(home, "logs.jsonl")}},
               "ebpf": ebpf}
        self.config = os.path.join(self.dir, "agent.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)
        self.log_path = os.path.join(self.dir, "agent.log")
        self.proc = None

    def start(self) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HOSTAGENT_"))}
        with open(self.log_path, "w") as log:
            spawned = time.time()
            self.proc = subprocess.Popen([agent_python(), "-m", "agent", "run", "--config", self.config], cwd=ROOT,
                                         env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        return spawned

    def line(self, marker: str) -> str | None:
        with open(self.log_path, errors="replace") as f:
            return next((line for line in f if marker in line), None)

    def wait_attached(self) -> str:
        """The `ebpf_probes on=` line, once logged."""
        return wait_until(lambda: self.line("ebpf_probes on="), LOAD_TIMEOUT, f"{self.dir}: probes attached",
                          self.proc, self.log_path)

    def why_off(self, probe: str) -> str:
        """The reason the agent logged for `probe` being off."""
        m = re.search(rf' {probe}=("(?:[^"\\]|\\.)*")', self.line("ebpf_probes_off ") or "")
        return json.loads(m.group(1)) if m else "no reason logged"

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, 30)


def field(line: str, name: str) -> str:
    """The value of `name=` in a log line ("" when it has none)."""
    m = re.search(rf"(?:^| ){name}=(\S+)", line)
    return m.group(1) if m else ""


def probes_on(line: str) -> list:
    on = field(line, "on")
    return [] if on in ("", "-") else on.split(",")


def log_time(line: str, name: str = "ts") -> float:
    """The time in a log line's `name=` (its own `ts=` by default, also where it has no `name=`),
    in seconds."""
    ts = field(line, name) or field(line, "ts")
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def loader_seconds(line: str) -> float | None:
    """The `seconds=` and `early_seconds=` of an `ebpf_probes on=` line: the loaders' own time."""
    times = [float(t) for t in (field(line, "seconds"), field(line, "early_seconds")) if t]
    return sum(times) if times else None


def start_floor(runs: int) -> dict:
    """{case: best seconds} of spawning a Python process that exits at once (FLOOR): the part of
    `hostagent run`'s start no loader can shorten."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HOSTAGENT_"))}
    out = {}
    for case, code in FLOOR.items():
        times = []
        for _ in range(runs):
            t = time.monotonic()
            p = subprocess.run([agent_python(), "-c", code], cwd=ROOT, env=env, check=True, capture_output=True,
                               text=True)
            times.append(float(p.stdout) - t)
        out[case] = min(times)
    return out


def attach_times(tmp: str, runs: int) -> dict:
    """{loader: {"start_s": [...], "load_s": [...], "since_started_s": [...], "first": {...}}}: the
    default probes, one agent at a time; a loader's agents share a state directory, and the
    first start (on an empty one) is kept apart in "first"."""
    out = {loader: {"start_s": [], "read_s": [], "load_s": [], "since_started_s": [], "btf": [], "early": [],
                    "probes_on": None} for loader in LOADERS}
    for i in range(1 + runs):
        for loader in LOADERS:
            agent = Agent(tmp, f"attach-{loader}-{i}", loader, state_dir=os.path.join(tmp, f"state-{loader}"))
            try:
                spawned = agent.start()
                line = agent.wait_attached()
                started = agent.line(" started version=")
                if field(line, "btf") == "kernel":    # what the next start uses: made once the probes are on
                    wait_until(lambda: agent.line("ebpf_btf_subset_saved") or agent.line("ebpf_btf_cache_failed"),
                               LOAD_TIMEOUT, f"{agent.dir}: the kernel's BTF kept", agent.proc, agent.log_path)
            finally:
                agent.stop()
            since_started = log_time(line) - log_time(started)
            run = {"start_s": log_time(line, "attached") - spawned, "read_s": log_time(line) - spawned,
                   "since_started_s": since_started, "load_s": loader_seconds(line) or since_started,
                   "btf": field(line, "btf"), "early": int(field(line, "early") or 0)}
            if i == 0:
                out[loader]["first"] = run
            else:
                for k, v in run.items():
                    out[loader][k].append(v)
            out[loader]["probes_on"] = probes_on(line)
    return out


# --- in-kernel cost ----------------------------------------------------------------------------

def prog_stats(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs `pid` holds."""
    time_ns = count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key == "run_time_ns":
                        time_ns += int(value)
                    elif key == "run_cnt":
                        count += int(value)
    return time_ns, count


class OomCgroup:
    """A memory cgroup (v1 controller first, as tests/test_probe_oom.py finds it) with a small
    limit, for a process that gets OOM-killed in it; unusable (path None) without a memory
    controller."""

    def __init__(self):
        self.path = None
        found = self.controller()
        if found:
            root, limit_file = found
            self.path = os.path.join(root, f"hostagent-bench-oom-{os.getpid()}")
            os.mkdir(self.path)
            with open(os.path.join(self.path, limit_file), "w") as f:
                f.write(str(OOM_LIMIT))

    @staticmethod
    def controller() -> tuple[str, str] | None:
        """(where to create the cgroup, its limit file)."""
        if os.path.exists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            return "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.subtree_control")) as f:
                if "memory" in f.read().split():
                    return root, "memory.max"
        return None

    def kill_one(self) -> None:
        procs = os.path.join(self.path, "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        subprocess.run([sys.executable, "-c", f"b = b'x' * {2 * OOM_LIMIT}"], preexec_fn=enter,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)

    def close(self) -> None:
        if self.path is None:
            return
        for _ in range(50):             # the killed process leaves the cgroup a moment later
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"could not remove the cgroup {self.path}")


def workload(seconds: float, scratch: str) -> dict:
    """Events for every probe, for `seconds`: returns how many of each were made."""
    made = {"execs": 0, "tcp_connections": 0, "fsyncs": 0, "killed": 0, "oom_kills": 0}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    oom = OomCgroup()
    block = os.urandom(64 << 10)
    fd = os.open(os.path.join(scratch, "blocks"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        end = time.monotonic() + seconds
        next_oom = time.monotonic()
        while time.monotonic() < end:
            subprocess.run(["/bin/true"])
            made["execs"] += 1
            socket.create_connection(listener.getsockname(), timeout=5).close()
            made["tcp_connections"] += 1
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            made["fsyncs"] += 1
            child = subprocess.Popen(["/bin/sleep", "30"])
            child.kill()
            child.wait()
            made["killed"] += 1
            if oom.path and time.monotonic() >= next_oom:
                oom.kill_one()
                made["oom_kills"] += 1
                next_oom += 1.0
    finally:
        os.close(fd)
        stop.set()
        acceptor.join()
        listener.close()
        oom.close()
    return made


def event_costs(tmp: str, seconds: float) -> dict:
    """{probe: {loader: {"run_time_ns", "run_cnt", "workload"}}}: one agent at a time, with only
    `probe` on, under the same workload. (Two agents at once see the same events, but the
    program attached first measured some 30% cheaper with the same loader in both.)"""
    from agent.sources.ebpf.registry import PROBES
    out = {}
    scratch = tempfile.mkdtemp(prefix="hostagent-bench-io-", dir="/var/tmp")   # a block device, not tmpfs
    stats_fd = enable_bpf_stats()
    if stats_fd is None:
        raise RuntimeError("BPF_ENABLE_STATS refused: the kernel's BPF run-time statistics are needed")
    try:
        for probe in PROBES:
            only = {name: {"enabled": name == probe} for name in PROBES}
            out[probe] = {}
            for loader in LOADERS:
                agent = Agent(tmp, f"cost-{probe}-{loader}", loader, only)
                try:
                    agent.start()
                    if probe not in probes_on(agent.wait_attached()):
                        out[probe][loader] = {"off": agent.why_off(probe)}
                        continue
                    before = prog_stats(agent.proc.pid)
                    made = workload(seconds, scratch)
                    after = prog_stats(agent.proc.pid)
                finally:
                    agent.stop()
                out[probe][loader] = {"run_time_ns": after[0] - before[0], "run_cnt": after[1] - before[1],
                                      "workload": made}
    finally:
        os.close(stats_fd)
        for name in os.listdir(scratch):
            os.unlink(os.path.join(scratch, name))
        os.rmdir(scratch)
    return out


# --- rows --------------------------------------------------------------------------------------

def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (eBPF probes)"
    return None


def measure(quick: bool) -> dict:
    mode = "quick" if quick else "full"
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        byte_compile()
        attach = attach_times(tmp, ATTACH_RUNS[mode])
        floor = start_floor(FLOOR_RUNS[mode])
        costs = event_costs(tmp, WORKLOAD_SECONDS[mode])
    return {"attach": attach, "floor": floor, "costs": costs, "quick": quick}


def rows(m: dict) -> list[dict]:
    core, bcc = m["attach"]["core"], m["attach"]["bcc"]
    out = []
    for case, key, metric in (("attach/start-to-attached", "start_s", "s from `hostagent run` to the default probes attached"),
                              ("attach/load-phase", "load_s", "s from the loader's start to the probes attached")):
        if core["probes_on"] != bcc["probes_on"]:
            out.append({"case": case, "skipped": f"CO-RE attached {','.join(core['probes_on']) or 'no probe'}, "
                                                 f"bcc {','.join(bcc['probes_on']) or 'no probe'}"})
            continue
        ours, theirs = min(core[key]), min(bcc[key])
        details = {"core_runs_s": core[key], "bcc_runs_s": bcc[key], "probes_on_core": core["probes_on"],
                   "probes_on_bcc": bcc["probes_on"], "core_btf": core["btf"], "core_early": core["early"],
                   "core_first_start_s": core["first"][key], "bcc_first_start_s": bcc["first"][key],
                   "core_first_start_btf": core["first"]["btf"], "target_ratio": TARGET_ATTACH_RATIO,
                   "target_met": theirs / ours >= TARGET_ATTACH_RATIO}
        if key == "load_s":
            details.update({"core_since_started_s": core["since_started_s"], "bcc_since_started_s": bcc["since_started_s"]})
        else:
            details.update({"core_read_s": core["read_s"], "bcc_read_s": bcc["read_s"]})
        if key == "start_s" and "floor" in m:
            floor = m["floor"]["imports_s"] + min(core["load_s"])
            details.update({"floor_" + k: v for k, v in m["floor"].items()})
            details.update({"floor_s": floor, "ratio_at_floor": theirs / floor})
        out.append({"case": case, "baseline": BASELINE, "metric": metric, "ours": ours, "theirs": theirs,
                    "ratio": theirs / ours, "details": details})
    for probe, c in m["costs"].items():
        case = f"event-cost/{probe}"
        details = {loader: c[loader] for loader in LOADERS}
        off = [f"off under {loader}: {c[loader]['off']}" for loader in LOADERS if "off" in c[loader]]
        if off:
            out.append({"case": case, "skipped": "; ".join(off), "details": details})
            continue
        if not c["core"]["run_cnt"] or not c["bcc"]["run_cnt"]:
            out.append({"case": case, "skipped": "the workload made no event this probe's programs ran for",
                        "details": details})
            continue
        ours = c["core"]["run_time_ns"] / c["core"]["run_cnt"]
        theirs = c["bcc"]["run_time_ns"] / c["bcc"]["run_cnt"]
        details.update({"target_ratio": TARGET_EVENT_COST_RATIO, "target_met": theirs / ours >= TARGET_EVENT_COST_RATIO})
        out.append({"case": case, "baseline": BASELINE, "metric": "ns in the kernel per event (run_time_ns / run_cnt)",
                    "ours": ours, "theirs": theirs, "ratio": theirs / ours, "details": details})
    return out


def run(quick: bool = False) -> list[dict]:
    why = unavailable()
    if why:
        return [{"case": "attach/start-to-attached", "skipped": why}]
    return rows(measure(quick))


def print_table(results: list) -> None:
    print(f"\n{'case':<28}{'CO-RE':>12}{'bcc':>12}{'bcc / CO-RE':>13}  metric")
    for r in results:
        if "skipped" in r:
            print(f"{r['case']:<28}  skipped: {r['skipped']}")
            continue
        print(f"{r['case']:<28}{r['ours']:>12.4g}{r['theirs']:>12.4g}{r['ratio']:>12.1f}x  {r['metric']}")
        d = r["details"]
        if "core_first_start_s" in d:
            print(f"{'':<28}first start (empty state directory): CO-RE {d['core_first_start_s']:.4g} "
                  f"(btf={d['core_first_start_btf']}), bcc {d['bcc_first_start_s']:.4g}; attached early by "
                  f"CO-RE: {d['core_early']}")
        if "core_read_s" in d:
            print(f"{'':<28}taken over and read: CO-RE {min(d['core_read_s']):.4g}, bcc {min(d['bcc_read_s']):.4g}")
        if "floor_s" in d:
            print(f"{'':<28}floor: interpreter {d['floor_interpreter_s']:.3f} s, imports {d['floor_imports_s']:.3f} s, "
                  f"+ CO-RE load = {d['floor_s']:.3f} s (bcc / floor {d['ratio_at_floor']:.1f}x)")
        if "run_cnt" in d.get("core", {}):
            print(f"{'':<28}events: CO-RE {d['core']['run_cnt']}, bcc {d['bcc']['run_cnt']}")


def main(argv=None) -> int:
    args = parser(__doc__, "one attach run per loader and a 1 s workload per probe").parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench/loaders.py: {why}", file=sys.stderr)
        return 2
    return finish(args, CATEGORY, rows(measure(args.quick)), print_table)


if __name__ == "__main__":
    sys.exit(main())
