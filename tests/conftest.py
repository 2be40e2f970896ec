import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.otlp_receiver import GrpcReceiver, HttpReceiver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTAGENT = [sys.executable, "-m", "agent"]


def clean_env(**extra) -> dict:
    """The test process's environment without OTEL_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def hostagent(*args, env=None, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*HOSTAGENT, *args], cwd=ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def hostagent_deb(tmp_path_factory) -> str:
    """The checkout's .deb (packaging/build-deb.sh), built once for every test that installs it."""
    out = tmp_path_factory.mktemp("deb")
    p = subprocess.run([os.path.join(ROOT, "packaging", "build-deb.sh"), "--out", str(out)], capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL, env=clean_env())
    assert p.returncode == 0, f"packaging/build-deb.sh exited {p.returncode}:\n{p.stderr}"
    return p.stdout.strip().splitlines()[-1]


@pytest.fixture
def grpc_receiver():
    rec = GrpcReceiver().start()
    yield rec
    rec.stop()


@pytest.fixture
def http_receiver():
    rec = HttpReceiver().start()
    yield rec
    rec.stop()


def base_config(tmp_path, **overrides) -> dict:
    """A config writing only under tmp_path, without eBPF (its tests enable it themselves)."""
    cfg = {
        "collection_interval": "1s",
        "state_dir": str(tmp_path / "state"),  # the persistent export queue lives under it
        "ebpf": {"enabled": False},
        "health": {"endpoint": "127.0.0.1:0"},
        "batch": {"timeout": "200ms"},
        "exporter": {"file": {"path": str(tmp_path / "out" / "metrics.jsonl"),
                              "logs_path": str(tmp_path / "out" / "logs.jsonl")},
                     "retry": {"initial_interval": "200ms", "max_interval": "1s"}},
    }
    return _merge(cfg, overrides)


def _merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for k, v in high.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def start_agent(tmp_path):
    """start_agent(config_dict, env=None) -> Popen of `hostagent run`; always stopped afterwards."""
    procs = []

    def start(config=None, env=None, args=()):
        cmd = [*HOSTAGENT, "run", *args]
        if config is not None:
            path = tmp_path / f"agent-{len(procs)}.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd += ["--config", str(path)]
        log = open(tmp_path / f"agent-{len(procs)}.log", "w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or clean_env(), stdout=log, stderr=subprocess.STDOUT)
        proc.log_file = log
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc.log_file.close()


def agent_log(proc) -> str:
    proc.log_file.seek(0)
    return proc.log_file.read()
