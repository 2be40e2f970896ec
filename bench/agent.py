"""The whole agent's cost on this host, against Prometheus' node_exporter, in one run.

Started side by side, each with its own temp dir, and measured over the same window:

  hostagent, all probes     `hostagent run` at the default config (collection interval, scrapers, batching,
                            queue) with eBPF on and every probe on, the opt-in `syscalls` included,
                            loaded as CO-RE objects (`ebpf.loader: core`), exporting OTLP/gRPC to a
                            local receiver (a separate process, not counted)
  hostagent, all probes, bcc  the same with the probes compiled by bcc at start (`ebpf.loader: bcc`,
                            the fallback where a kernel has no BTF)
  hostagent, all probes, file  all probes (CO-RE) with the default exporter, OTLP-JSON files in its temp
                            dir: the agent as `hostagent run` starts it, gRPC never imported (its
                            data is not counted: the receiver sees none)
  hostagent, default probes the same with the probes that are on by default (`syscalls` off)
  hostagent, psutil only    the same with `ebpf.enabled: false` (node_exporter has no eBPF)
  node_exporter             /usr/bin/prometheus-node-exporter (Debian's prometheus-node-exporter) with its
                            default collectors, scraped by this process once per collection interval, as
                            Prometheus would (gzip, OpenMetrics Accept header); the scrape's cost in the
                            exporter counts, the client's does not

Steady state only: the window opens after every probe has loaded (loading is not counted;
bench/loaders.py times it) and, in the full run, after the receiver got the first export holding eBPF metrics.
Its edges fall midway between two collections and it lasts a whole number of intervals (full:
3 minutes; --quick: one interval, NOT representative). Measured: CPU seconds (user + system,
children included, /proc/<pid>/stat) per minute, RSS sampled every second in the window (median:
"steady") and VmHWM (peak, probe loading included), PSS at the end; the host's CPU use besides
these processes and the in-kernel run time of the agent's BPF programs (BPF_ENABLE_STATS; that
time is charged to the processes whose events the probes see, not to the agent).

Ratio: node_exporter CPU / hostagent CPU (> 1: hostagent is cheaper). Targets (issue 12, CO-RE):
hostagent at the default config with all probes <= 0.25% of one core, <= 64 MB steady RSS and
<= 80 MB peak RSS. Needs root for eBPF.

    python bench/agent.py [--quick] [--json FILE] [--minutes M]
"""
from __future__ import annotations

import argparse
import compileall
import ctypes as ct
import gzip
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import parser, stop, write_json  # noqa: E402

CATEGORY = "whole agent"

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
NODE_EXPORTER_PACKAGE = "prometheus-node-exporter"
BASELINE = "node_exporter 1.x (Debian prometheus-node-exporter), default collectors, scraped once per interval"
TARGET_CORE_PERCENT = 0.25
TARGET_RSS_MB = 64.0
TARGET_PEAK_MB = 80.0
MB = 1e6
FULL_MINUTES = 3.0
BUSY_AFTER_COLLECTION = 2.0   # s: a collection, the batch timeout (1s) and the export
LOAD_TIMEOUT = 180.0          # bcc compiling every probe, on a busy 2-vCPU host
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# (case, agent config beyond the defaults); the probes of all-probes* are filled in from the registry
AGENTS = (
    ("all-probes", {"ebpf": {"enabled": True, "loader": "core"}}),
    ("all-probes-bcc", {"ebpf": {"enabled": True, "loader": "bcc"}}),
    ("all-probes-file", {"ebpf": {"enabled": True, "loader": "core"}, "exporter": {"type": "file"}}),
    ("default-probes", {"ebpf": {"enabled": True, "loader": "core"}}),
    ("psutil-only", {"ebpf": {"enabled": False}}),
)


# --- the receiver (its own process) -------------------------------------------------------------

def serve(status_file: str, ports: int) -> None:
    """OTLP/gRPC receivers on `ports` loopback ports; every 0.5 s writes, per port, the requests,
    data points, log records and metric names received (JSON, to `status_file`)."""
    import threading
    from concurrent import futures
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

    lock = threading.Lock()
    status = []
    servers = []
    for _ in range(ports):
        counts = {"metrics_requests": 0, "logs_requests": 0, "points": 0, "log_records": 0,
                  "bytes": 0, "names": set()}

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context, counts=counts):
                with lock:
                    counts["metrics_requests"] += 1
                    counts["bytes"] += request.ByteSize()
                    for rm in request.resource_metrics:
                        for sm in rm.scope_metrics:
                            for m in sm.metrics:
                                counts["names"].add(m.name)
                                kind = m.WhichOneof("data")
                                counts["points"] += len(getattr(m, kind).data_points) if kind else 0
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context, counts=counts):
                with lock:
                    counts["logs_requests"] += 1
                    counts["bytes"] += request.ByteSize()
                    counts["log_records"] += sum(len(sl.log_records) for rl in request.resource_logs
                                                 for sl in rl.scope_logs)
                return logs_service_pb2.ExportLogsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                             options=[("grpc.max_receive_message_length", -1)])
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
        counts["port"] = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        status.append(counts)
    while True:
        with lock:
            text = json.dumps([{**c, "names": sorted(c["names"])} for c in status])
        with open(status_file + ".tmp", "w") as f:
            f.write(text)
        os.replace(status_file + ".tmp", status_file)
        time.sleep(0.5)


# --- /proc readings -----------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """CPU seconds of `pid`: user + system, and those of its waited-for children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK   # utime stime cutime cstime


def proc_mem(pid: int) -> dict:
    """{'rss': bytes, 'hwm': bytes (peak RSS)} from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) * 1024
    return out


def proc_pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_by_mapping(pid: int, top: int = 12) -> dict:
    """Where a process's RSS is: bytes per mapping (a file's name, [heap], [anon], the BPF maps'
    anon_inode:bpf-map), the `top` largest, from /proc/<pid>/smaps."""
    sizes: dict = {}
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line.startswith("Rss:"):
                    sizes[name] = sizes.get(name, 0) + int(line.split()[1]) * 1024
                elif "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
                    fields = line.split(None, 5)
                    name = fields[5].strip() if len(fields) == 6 else "[anon]"
    except OSError:
        return {}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot, all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]                                  # idle + iowait
    total = sum(v[:8])                                  # guest time is already in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


# --- in-kernel BPF run time ---------------------------------------------------------------------

_NR_BPF = 321                 # x86-64
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


def enable_bpf_stats() -> int | None:
    """An fd that keeps the kernel's BPF run-time statistics on while it is open (None if refused)."""
    attr = ct.create_string_buffer(8)
    ct.c_uint32.from_buffer(attr).value = _BPF_STATS_RUN_TIME
    libc = ct.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_BPF, _BPF_ENABLE_STATS, attr, 8)
    return fd if fd >= 0 else None


def bpf_run_time(pid: int) -> float:
    """Seconds the BPF programs that `pid` holds have run, summed (needs enable_bpf_stats)."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("run_time_ns:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1e9


# --- the processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def byte_compile() -> None:
    """The agent's modules compiled to byte code, as the packages ship them: a checkout run under
    PYTHONDONTWRITEBYTECODE would compile every module at every start (some 40 ms)."""
    compileall.compile_dir(os.path.join(ROOT, "agent"), quiet=1)


def agent_python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def wait_until(predicate, timeout: float, what: str, proc=None, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = open(log_path).read()[-2000:] if log_path else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def log_line(path: str, marker: str) -> str | None:
    with open(path, errors="replace") as f:
        for line in f:
            if marker in line:
                return line
    return None


class Measured:
    """A started process, its CPU and memory over the window."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: str):
        self.name, self.proc, self.log_path = name, proc, log_path
        self.rss: list[int] = []
        self.cpu0 = self.cpu1 = 0.0
        self.bpf0 = self.bpf1 = 0.0
        self.end: dict = {}

    def sample(self) -> None:
        self.rss.append(proc_mem(self.proc.pid)["rss"])

    def stop(self) -> int:
        return stop(self.proc, 30)


def agent_config(tmp: str, case: str, overrides: dict, port: int, probes: list) -> str:
    import yaml
    cfg = {
        "state_dir": os.path.join(tmp, case, "state"),
        "health": {"endpoint": "127.0.0.1:0"},
        "exporter": {"type": "otlp", "otlp": {"protocol": "grpc", "endpoint": f"127.0.0.1:{port}"}},
        **overrides,
    }
    if case.startswith("all-probes"):
        cfg["ebpf"] = {**overrides["ebpf"], "probes": {name: {"enabled": True} for name in probes}}
    if cfg["exporter"]["type"] == "file":
        cfg["exporter"]["file"] = {"path": os.path.join(tmp, case, "metrics.jsonl"),
                                   "logs_path": os.path.join(tmp, case, "logs.jsonl")}
    os.makedirs(os.path.join(tmp, case), exist_ok=True)
    path = os.path.join(tmp, case, "agent.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def scrape(port: int) -> dict:
    """One Prometheus-like scrape of node_exporter: {'bytes': wire bytes, 'series': samples}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip",
                                                 "User-Agent": "Prometheus/2.45.0",
                                                 "X-Prometheus-Scrape-Timeout-Seconds": "10"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"node_exporter answered {resp.status}")
    finally:
        conn.close()
    text = gzip.decompress(body) if resp.getheader("Content-Encoding") == "gzip" else body
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return {"bytes": len(body), "series": series}


def node_exporter_version() -> str:
    try:
        out = subprocess.run([NODE_EXPORTER, "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def measure(minutes: float, quick: bool, log=print) -> dict:
    """Starts everything, waits for steady state, measures one window, stops everything."""
    from agent.components import Config
    from agent.sources.ebpf.registry import PROBES

    interval = float(Config().collection_interval)
    intervals = 1 if quick else max(1, round(minutes * 60 / interval))
    window = intervals * interval
    has_node_exporter = os.access(NODE_EXPORTER, os.X_OK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HOSTAGENT_"))}
    procs: list[Measured] = []
    receiver = None
    stats_fd = None
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        try:
            status_file = os.path.join(tmp, "receiver.json")
            receiver = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", status_file,
                                         str(len(AGENTS))], stdout=subprocess.DEVNULL)
            wait_until(lambda: os.path.exists(status_file), 30, "the OTLP receiver", receiver)

            def receiver_status() -> list:
                with open(status_file) as f:
                    return json.load(f)

            ports = [s["port"] for s in receiver_status()]

            ne = None
            if has_node_exporter:
                ne_port = free_port()
                ne_log = os.path.join(tmp, "node_exporter.log")
                ne_proc = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}"],
                                           stdout=open(ne_log, "w"), stderr=subprocess.STDOUT, cwd=tmp, env=env,
                                           start_new_session=True)
                ne = Measured("node_exporter", ne_proc, ne_log)
                procs.append(ne)

            agents = []
            for (case, overrides), port in zip(AGENTS, ports):
                path = agent_config(tmp, case, overrides, port, list(PROBES))
                log_path = os.path.join(tmp, case, "agent.log")
                proc = subprocess.Popen([agent_python(), "-m", "agent", "run", "--config", path], cwd=ROOT,
                                        env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
                                        start_new_session=True)
                m = Measured(case, proc, log_path)
                m.ebpf = overrides["ebpf"]["enabled"]
                m.to_receiver = overrides.get("exporter", {}).get("type") != "file"
                agents.append(m)
                procs.append(m)

            log(f"started {len(agents)} agents{' and node_exporter' if ne else ''}; waiting for the probes ...")
            for m in agents:
                # the first collection starts just before this line is logged
                wait_until(lambda: log_line(m.log_path, " started "), 60, f"{m.name} to start", m.proc, m.log_path)
                m.started = time.monotonic()
            first_collection = max(m.started for m in agents)
            for m in agents:
                if m.ebpf:
                    line = wait_until(lambda: log_line(m.log_path, "ebpf_probes on="), LOAD_TIMEOUT,
                                      f"{m.name}: probes loaded", m.proc, m.log_path)
                    m.probes_on = line.split("ebpf_probes on=")[1].split()[0]
                    off = line.split(" off=")[1].split()[0]
                    if m.name.startswith("all-probes") and off != "-":
                        # a stale object (bpf/build.sh not rerun after a change) turns its probe off
                        raise SystemExit(f"{m.name}: probes off: {off}; see {m.log_path}")
            loaded = time.monotonic()
            ebpf_ports = [i for i, m in enumerate(agents) if m.ebpf and m.to_receiver]
            if not quick:
                # a whole collection with eBPF metrics has been exported by every eBPF agent
                wait_until(lambda: all(any(n.startswith("system.linux.") for n in receiver_status()[i]["names"])
                                       for i in ebpf_ports), 3 * interval + 30, "the first eBPF export")
            if ne:
                wait_until(lambda: _scrape_ok(ne_port), 30, "node_exporter", ne.proc, ne.log_path)
                scrape(ne_port)                          # its first scrape sets things up once
            # the edges fall where no agent is collecting or exporting (a collection, its batch
            # timeout and the send take about 1.5 s); the agents started within a second or so
            spread = first_collection - min(m.started for m in agents)
            start = time.monotonic() + 1.0
            phase = (start - first_collection) % interval
            if phase < BUSY_AFTER_COLLECTION:
                start += BUSY_AFTER_COLLECTION - phase
            elif phase > interval - spread - 0.5:
                start += interval - phase + BUSY_AFTER_COLLECTION
            log(f"probes loaded after {loaded - first_collection:.1f}s; measuring {window:.0f}s "
                f"({intervals} collections) from +{start - first_collection:.1f}s ...")
            stats_fd = enable_bpf_stats()
            time.sleep(max(0.0, start - time.monotonic()))

            host0 = host_cpu()
            for m in procs:
                m.cpu0 = proc_cpu(m.proc.pid)
                m.bpf0 = bpf_run_time(m.proc.pid) if getattr(m, "ebpf", False) else 0.0
            received0 = receiver_status()
            scrapes = []
            next_scrape = start + interval / 2
            next_sample = start
            end = start + window
            load_avg = []
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if ne and now >= next_scrape:
                    scrapes.append(scrape(ne_port))
                    next_scrape += interval
                if now >= next_sample:
                    for m in procs:
                        m.sample()
                    load_avg.append(os.getloadavg()[0])
                    next_sample += 1.0
                time.sleep(max(0.0, min(end, next_sample, next_scrape if ne else end) - time.monotonic()))
            host1 = host_cpu()
            for m in procs:
                m.cpu1 = proc_cpu(m.proc.pid)
                m.bpf1 = bpf_run_time(m.proc.pid) if getattr(m, "ebpf", False) else 0.0
                m.end = {**proc_mem(m.proc.pid), "pss": proc_pss(m.proc.pid), "rss_by_mapping": rss_by_mapping(m.proc.pid)}
            received1 = receiver_status()
            elapsed = time.monotonic() - start
        finally:
            if stats_fd is not None:
                os.close(stats_fd)
            codes = {m.name: m.stop() for m in procs}
            if receiver is not None:
                receiver.kill()
                receiver.wait()
        logs_tail = {m.name: open(m.log_path, errors="replace").read()[-1500:] for m in procs}

    measured = sum(m.cpu1 - m.cpu0 for m in procs)
    host_busy = host1[0] - host0[0]
    out = {"interval_s": interval, "window_s": elapsed, "collections": intervals, "quick": quick,
           "cpus": os.cpu_count(), "kernel": os.uname().release,
           "host_busy_cores": host_busy / elapsed, "background_cores": (host_busy - measured) / elapsed,
           "load_avg_1m_median": statistics.median(load_avg) if load_avg else None,
           "probes_loaded_after_s": loaded - first_collection, "processes": {}}
    for i, m in enumerate(procs):
        cpu = m.cpu1 - m.cpu0
        r = {"cpu_s_per_min": cpu / elapsed * 60, "core_percent": cpu / elapsed * 100,
             "rss_steady_bytes": statistics.median(m.rss) if m.rss else None,
             "rss_max_in_window_bytes": max(m.rss) if m.rss else None,
             "rss_peak_bytes": m.end.get("hwm"), "pss_end_bytes": m.end.get("pss"),
             "rss_by_mapping_end": m.end.get("rss_by_mapping"),
             "exit_code": codes.get(m.name)}
        if m is not ne:
            r["probes_on"] = getattr(m, "probes_on", "-")
            if m.to_receiver:           # (a file-exporting agent's data goes to its files)
                got0, got1 = received0[agents.index(m)], received1[agents.index(m)]
                r.update({"points_per_collection": (got1["points"] - got0["points"]) / intervals,
                          "log_records_in_window": got1["log_records"] - got0["log_records"],
                          "export_requests_in_window": (got1["metrics_requests"] - got0["metrics_requests"]
                                                        + got1["logs_requests"] - got0["logs_requests"]),
                          "ebpf_metrics_received": sorted(n for n in got1["names"] if n.startswith("system.linux."))})
            if m.ebpf:
                r["kernel_bpf_cpu_s_per_min"] = (m.bpf1 - m.bpf0) / elapsed * 60 if stats_fd is not None else None
            if codes.get(m.name) != 0:
                r["log_tail"] = logs_tail[m.name]
        else:
            r.update({"scrapes": len(scrapes), "series_per_scrape": scrapes[-1]["series"] if scrapes else None,
                      "gzip_bytes_per_scrape": scrapes[-1]["bytes"] if scrapes else None,
                      "version": node_exporter_version()})
        out["processes"][m.name] = r
    return out


def _scrape_ok(port: int) -> bool:
    try:
        scrape(port)
        return True
    except (OSError, RuntimeError, http.client.HTTPException):
        return False


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (eBPF probes)"
    return None


def run(quick: bool = False, minutes: float = FULL_MINUTES) -> list[dict]:
    """One row per hostagent configuration against node_exporter, measured side by side."""
    why = unavailable()
    if why:
        return [{"case": case, "skipped": why} for case, _ in AGENTS]
    m = measure(minutes, quick, log=lambda *a: None)
    return rows(m)


def rows(m: dict) -> list[dict]:
    procs = m["processes"]
    ne = procs.get("node_exporter")
    out = []
    for case, _ in AGENTS:
        ours = procs[case]
        details = {
            "core_percent": ours["core_percent"],
            "core_percent_target": TARGET_CORE_PERCENT,
            "cpu_target_met": ours["core_percent"] <= TARGET_CORE_PERCENT,
            "rss_steady_mb": ours["rss_steady_bytes"] / MB,
            "rss_max_in_window_mb": ours["rss_max_in_window_bytes"] / MB,
            "rss_peak_mb": ours["rss_peak_bytes"] / MB,
            "pss_end_mb": (ours["pss_end_bytes"] or 0) / MB,
            "rss_by_mapping_end_mb": {k: round(v / MB, 1) for k, v in (ours["rss_by_mapping_end"] or {}).items()},
            "rss_target_mb": TARGET_RSS_MB,
            "rss_target_met": ours["rss_steady_bytes"] / MB <= TARGET_RSS_MB,
            "rss_peak_target_mb": TARGET_PEAK_MB,
            "rss_peak_target_met": ours["rss_peak_bytes"] / MB <= TARGET_PEAK_MB,
            "points_per_collection": ours.get("points_per_collection"),
            "log_records_in_window": ours.get("log_records_in_window"),
            "probes_on": ours["probes_on"],
            "kernel_bpf_cpu_s_per_min": ours.get("kernel_bpf_cpu_s_per_min"),
            "interval_s": m["interval_s"], "window_s": m["window_s"], "collections": m["collections"],
            "background_cores": m["background_cores"], "load_avg_1m_median": m["load_avg_1m_median"],
            "quick_not_representative": m["quick"],
            "agent_exit_code": ours["exit_code"],
        }
        if ne is None:
            row = {"case": case, "skipped": f"{NODE_EXPORTER} missing: install the {NODE_EXPORTER_PACKAGE} package "
                                            "(./install.sh --dev)", "details": details}
        else:
            details.update({
                "node_exporter_core_percent": ne["core_percent"],
                "node_exporter_rss_steady_mb": ne["rss_steady_bytes"] / MB,
                "node_exporter_rss_peak_mb": ne["rss_peak_bytes"] / MB,
                "rss_steady_ratio_node_exporter_over_ours": ne["rss_steady_bytes"] / ours["rss_steady_bytes"],
                "rss_peak_ratio_node_exporter_over_ours": ne["rss_peak_bytes"] / ours["rss_peak_bytes"],
                "node_exporter_series_per_scrape": ne["series_per_scrape"],
                "node_exporter_version": ne["version"],
            })
            row = {"case": case, "baseline": BASELINE, "metric": "CPU-s per minute, steady state (user+sys)",
                   "ours": ours["cpu_s_per_min"], "theirs": ne["cpu_s_per_min"],
                   "ratio": ne["cpu_s_per_min"] / ours["cpu_s_per_min"] if ours["cpu_s_per_min"] else float("inf"),
                   "details": details}
        out.append(row)
    return out


def print_table(m: dict) -> None:
    procs = m["processes"]
    print(f"\n{m['cpus']} CPUs, kernel {m['kernel']}; window {m['window_s']:.0f}s = {m['collections']} collections "
          f"every {m['interval_s']:.0f}s; probes loaded {m['probes_loaded_after_s']:.1f}s after start"
          + ("   ** --quick: one interval, NOT representative **" if m["quick"] else ""))
    print(f"host: {m['host_busy_cores'] * 100:.1f}% of one core busy in all, {m['background_cores'] * 100:.1f}% "
          f"besides these processes; load average (1 min) median {m['load_avg_1m_median']:.2f}")
    ne = procs.get("node_exporter")
    print(f"\n{'process':<30}{'CPU-s/min':>10}{'% core':>8}{'RSS MB':>8}{'peak MB':>9}{'PSS MB':>8}"
          f"{'points or series':>18}{'vs node_exporter':>18}")
    for name, r in procs.items():
        label = name if name == "node_exporter" else f"hostagent {name}"
        size = r.get("points_per_collection", r.get("series_per_scrape"))
        size = f"{size:.0f}" if size is not None else "-"
        ratio = f"{ne['cpu_s_per_min'] / r['cpu_s_per_min']:.2f}x" if ne and r is not ne and r["cpu_s_per_min"] else ""
        print(f"{label:<30}{r['cpu_s_per_min']:>10.3f}{r['core_percent']:>8.2f}{r['rss_steady_bytes'] / MB:>8.1f}"
              f"{r['rss_peak_bytes'] / MB:>9.1f}{(r['pss_end_bytes'] or 0) / MB:>8.1f}"
              f"{size:>18}{ratio:>18}")
    for name, r in procs.items():
        if r.get("kernel_bpf_cpu_s_per_min") is not None:
            print(f"hostagent {name}: its BPF programs ran {r['kernel_bpf_cpu_s_per_min']:.3f} CPU-s/min in the kernel "
                  f"(probes on: {r['probes_on']})")
    for name, r in procs.items():
        if name != "node_exporter" and r.get("rss_by_mapping_end"):
            print(f"hostagent {name}: RSS by mapping at the end: " + ", ".join(
                f"{os.path.basename(k) or k} {v / MB:.1f}" for k, v in r["rss_by_mapping_end"].items()))
    if ne is None:
        print(f"node_exporter: skipped, {NODE_EXPORTER} missing (package {NODE_EXPORTER_PACKAGE})")
    for case, _ in AGENTS:
        r = procs[case]
        cpu_ok = r["core_percent"] <= TARGET_CORE_PERCENT
        rss_ok = r["rss_steady_bytes"] / MB <= TARGET_RSS_MB
        peak_ok = r["rss_peak_bytes"] / MB <= TARGET_PEAK_MB
        print(f"target {case}: CPU {r['core_percent']:.2f}% of a core (<= {TARGET_CORE_PERCENT}%: "
              f"{'met' if cpu_ok else 'NOT met'}), steady RSS {r['rss_steady_bytes'] / MB:.1f} MB "
              f"(<= {TARGET_RSS_MB:.0f} MB: {'met' if rss_ok else 'NOT met'}), peak RSS "
              f"{r['rss_peak_bytes'] / MB:.1f} MB (<= {TARGET_PEAK_MB:.0f} MB: {'met' if peak_ok else 'NOT met'})")
        if r["exit_code"] != 0:
            print(f"  {case} exited with {r['exit_code']}:\n{r.get('log_tail', '')}")


def main(argv=None) -> int:
    ap = parser(__doc__, "one collection interval (not representative)")
    ap.add_argument("--minutes", type=float, default=FULL_MINUTES, help="length of the window (default 3)")
    ap.add_argument("--serve", nargs=2, metavar=("STATUS_FILE", "PORTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    why = unavailable()
    if why:
        print(f"bench/agent.py: {why}", file=sys.stderr)
        return 2
    m = measure(args.minutes, args.quick)
    print_table(m)
    if args.json:
        write_json(args.json, {"measurement": m, "rows": rows(m)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
