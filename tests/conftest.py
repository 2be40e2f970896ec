import os
import signal
import subprocess

import pytest
import yaml

from tests.helpers import HOSTAGENT, ROOT, Pki, clean_env
from tests.otlp_receiver import GrpcReceiver, HttpReceiver


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


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


