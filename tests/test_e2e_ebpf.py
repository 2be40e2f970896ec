"""The eBPF probes through the whole agent: kernel events become OTLP log records and counters at
a real gRPC receiver; without privileges the agent still exports its psutil metrics."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from agent.sources.ebpf.registry import PROBES
from tests.ebpf_helpers import ebpf_config
from tests.helpers import ROOT, agent_log, base_config, clean_env, wait_for_log
from tests.otlp_receiver import attributes

N = 20


def test_exec_exit_and_signals_reach_the_receiver(tmp_path, start_agent, grpc_receiver):
    probes = {name: {"enabled": name in ("syscalls", "process", "signals")} for name in PROBES}
    cfg = base_config(tmp_path, ebpf=ebpf_config(enabled=True, probes=probes),
                      exporter={"type": "otlp", "otlp": {"endpoint": grpc_receiver.endpoint}})
    proc = start_agent(cfg)
    wait_for_log(proc, "ebpf_probes on=")
    assert "ebpf_probes on=syscalls,process,signals" in agent_log(proc), agent_log(proc)

    codes = {}
    for k in range(N):
        child = subprocess.Popen(["/bin/sh", "-c", f"exit {k * 7 % 256}"])
        child.wait()
        codes[child.pid] = k * 7 % 256
    victim = subprocess.Popen(["/bin/sleep", "60"])
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    def records(r, event):
        return {attributes(rec)["process.pid"]: attributes(rec) for _, _, rec in r.all_logs()
                if rec.event_name == event and attributes(rec)["process.pid"] in codes.keys() | {victim.pid}}

    def fatal_sigkills(r):
        return max((p.as_int for _, _, m in r.all_metrics() if m.name == "system.linux.signals.fatal"
                    for p in m.sum.data_points if attributes(p).get("signal") == "SIGKILL"), default=0)

    def has_syscall_latency(r):  # the syscalls probe, once switched on, includes its latency histogram
        return any(m.name == "system.linux.syscall.duration" and m.exponential_histogram.data_points
                   for _, _, m in r.all_metrics())

    assert grpc_receiver.wait_for(lambda r: len(records(r, "process.exit")) == N + 1
                                  and len(records(r, "process.exec")) >= N + 1
                                  and fatal_sigkills(r) >= 1 and has_syscall_latency(r), timeout=30), agent_log(proc)
    exits = records(grpc_receiver, "process.exit")
    execs = records(grpc_receiver, "process.exec")
    assert {pid: a["process.exit.code"] for pid, a in exits.items() if pid in codes} == codes
    assert exits[victim.pid]["linux.process.exit.signal"] == "SIGKILL"
    assert all(execs[pid]["process.executable.path"] == "/bin/sh" for pid in codes)
    # exactly one record per spawned process, none twice
    all_exits = [attributes(rec)["process.pid"] for _, _, rec in grpc_receiver.all_logs()
                 if rec.event_name == "process.exit"]
    assert all(all_exits.count(pid) == 1 for pid in codes)
    # what the kernel skipped is exported per probe (zero or more, never silent)
    skipped = {attributes(p)["probe"] for _, _, m in grpc_receiver.all_metrics()
               if m.name == "hostagent.ebpf.skipped_events" for p in m.sum.data_points}
    assert skipped == {"syscalls", "process", "signals"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)


def test_unprivileged_agent_exports_host_metrics_and_says_which_probes_are_off():
    out = tempfile.mkdtemp(prefix="hostagent-nobody-", dir="/tmp")
    os.chmod(out, 0o777)
    try:
        cfg = base_config(__import__("pathlib").Path(out), ebpf={"enabled": True},
                          collection_interval="500ms")
        cfg["exporter"]["file"] = {"path": f"{out}/m.jsonl", "logs_path": f"{out}/l.jsonl"}
        with open(f"{out}/agent.yaml", "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        res = subprocess.run([*drop, sys.executable, "-m", "agent", "probes", "--json"], cwd=ROOT,
                             env=clean_env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        statuses = json.loads(res.stdout)
        assert len(statuses) == len(PROBES) and all(s["state"] == "off" and s["reason"] for s in statuses)
        log = open(f"{out}/agent.log", "w+")
        proc = subprocess.Popen([*drop, sys.executable, "-m", "agent", "run", "--config", f"{out}/agent.yaml"],
                                cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not (os.path.exists(f"{out}/m.jsonl") and open(f"{out}/m.jsonl").read().count("\n") >= 2):
                assert proc.poll() is None and time.monotonic() < deadline, open(f"{out}/agent.log").read()
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = open(f"{out}/agent.log").read()
        assert text.count("ebpf_probes_off") == 1, text  # said once, with the reasons
        assert "system.cpu.time" in open(f"{out}/m.jsonl").read()
    finally:
        shutil.rmtree(out)
