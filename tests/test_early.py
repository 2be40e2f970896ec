"""`hostagent run` attaches the CO-RE probes of its last start before it imports the agent
(agent/sources/ebpf/early.py), and the agent then takes over exactly what it would have loaded:
the real agent, the real kernel, a real state directory under tmp_path."""
import collections
import datetime
import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import STATE_DIR, main
from agent.cli import parser
from agent.sources.ebpf import corebtf, early
from tests.ebpf_helpers import LOADER, ebpf_config
from tests.helpers import HOSTAGENT, ROOT, agent_log, base_config, clean_env, wait_for_log

pytestmark = pytest.mark.skipif(LOADER == "bcc", reason="early attach is for CO-RE objects; bcc compiles at start")


def bpf_fds(pid: int) -> collections.Counter:
    """The agent's BPF programs, links and maps, by what the kernel says of its fds."""
    kinds = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        for kind in ("link_type", "prog_type", "map_type"):
            if f"\n{kind}:" in info:
                kinds[kind] += 1
    return kinds


def ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def start(start_agent, cfg, env=None):
    """An agent on `cfg`, once its probes are on: (proc, its `ebpf_probes on=` line, BPF fds)."""
    proc = start_agent(cfg, env=env)
    wait_for_log(proc, "ebpf_probes on=")
    line = next(l for l in agent_log(proc).splitlines() if "ebpf_probes on=" in l)
    time.sleep(0.3)
    return proc, line, bpf_fds(proc.pid)


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, agent_log(proc)[-2000:]


def field(line: str, name: str) -> str:
    m = re.search(rf"(?:^| ){name}=(\S+)", line)
    return m.group(1) if m else ""


def kernel_dir(state: str) -> str:
    return corebtf.Cache(state, "").dir


@pytest.fixture
def cfg(tmp_path):
    return base_config(tmp_path, ebpf=ebpf_config(enabled=True))


def test_the_second_start_attaches_before_the_agent_is_imported_and_the_agent_takes_every_probe_over(
        start_agent, cfg, tmp_path):
    first, line1, fds1 = start(start_agent, cfg)
    stop(first)
    assert field(line1, "early") == "", line1            # nothing kept yet
    on = field(line1, "on")
    assert on and os.path.exists(os.path.join(kernel_dir(cfg["state_dir"]), "plan.json"))

    second, line2, fds2 = start(start_agent, cfg)
    started = next(l for l in agent_log(second).splitlines() if " started version=" in l)
    assert field(line2, "on") == on
    assert int(field(line2, "early")) == len(on.split(",")), line2
    # attached before the agent logged anything: before its modules were imported
    first_line = agent_log(second).splitlines()[0]
    assert ts(field(line2, "attached")) <= ts(field(first_line, "ts")) <= ts(field(started, "ts"))
    # the same programs and links as a start that loaded them itself: none twice, none left over
    assert fds2["prog_type"] == fds1["prog_type"] > 0 and fds2["link_type"] == fds1["link_type"] > 0, (fds1, fds2)
    # and they work: an exec after the start reaches the exporter through the early process probe
    subprocess.run(["/bin/true", "early-attach-marker"], check=True)
    logs = tmp_path / "out" / "logs.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "early-attach-marker" not in (logs.read_text() if logs.exists() else ""):
        time.sleep(0.2)
    assert "early-attach-marker" in logs.read_text()
    stop(second)


def test_a_changed_config_attaches_nothing_early(start_agent, cfg):
    stop(start(start_agent, cfg)[0])
    cfg["ebpf"]["probes"] = {"tcp": {"enabled": False}}
    proc, line, _ = start(start_agent, cfg)
    assert field(line, "early") == "" and "tcp" in field(line, "off"), line
    stop(proc)
    # that start kept its own plan: the next start of this config attaches early, tcp not among them
    proc, line, _ = start(start_agent, cfg)
    assert int(field(line, "early")) == len(field(line, "on").split(",")) and "tcp" not in field(line, "on")
    stop(proc)


def test_an_early_object_the_agent_would_load_otherwise_is_closed_and_loaded_again(start_agent, cfg):
    first, _, fds1 = start(start_agent, cfg)
    stop(first)
    path = os.path.join(kernel_dir(cfg["state_dir"]), "plan.json")
    with open(path) as f:
        plan = json.load(f)
    plan["probes"]["tcp"]["params"]["COUNT_EVENTS"] = 1      # a recipe this config does not make
    with open(path, "w") as f:
        json.dump(plan, f)
    proc, line, fds = start(start_agent, cfg)
    on = field(line, "on").split(",")
    assert "tcp" in on and int(field(line, "early")) == len(on) - 1, line
    assert "ebpf_early_unused probes=tcp" in agent_log(proc)
    assert fds["prog_type"] == fds1["prog_type"] and fds["link_type"] == fds1["link_type"], (fds1, fds)
    stop(proc)


@pytest.mark.parametrize("how", ["writable by others", "a symbolic link", "a stranger's"])
def test_a_plan_others_could_have_written_is_not_used(start_agent, cfg, tmp_path, how):
    stop(start(start_agent, cfg)[0])
    path = os.path.join(kernel_dir(cfg["state_dir"]), "plan.json")
    if how == "writable by others":
        os.chmod(path, 0o666)
    elif how == "a symbolic link":
        os.rename(path, tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", path)
    else:
        os.chown(path, 65534, 65534)
    proc, line, _ = start(start_agent, cfg)
    assert field(line, "early") == "" and field(line, "on"), line
    stop(proc)


# --- what the early start reads before the config loader runs ----------------------------------

def _argparse_view(argv):
    """(command, its --config) as the agent's own parser reads `argv`, or None if it refuses it."""
    try:
        args = parser().parse_args(argv)
    except SystemExit:
        return None
    return args.command, getattr(args, "config", None)


ARGS = st.lists(st.sampled_from(["run", "probes", "--config", "-c", "--conf", "--profile", "--json", "-cX",
                                 "--config=Y", "-c=Z", "-cX=Y", "--profile=P", "a.yaml", "-", "--", "-x", "--config=", "-1"]),
                max_size=5)


@given(ARGS)
@settings(max_examples=300, deadline=None)
def test_the_early_start_reads_a_command_line_as_the_agent_does_or_not_at_all(argv):
    is_run, config = main.run_config(argv)
    if is_run:
        assert _argparse_view(argv) == ("run", config), argv


@pytest.mark.parametrize("argv, expected", [
    (["run"], (True, None)), (["run", "--config", "a"], (True, "a")), (["run", "-c", "a"], (True, "a")),
    (["run", "-ca"], (True, "a")), (["run", "--config=a"], (True, "a")), (["run", "-c=a"], (True, "a")),
    (["run", "--profile", "p", "-c", "a"], (True, "a")),
    (["run", "--conf", "a"], (False, None)), (["probes"], (False, None)), ([], (False, None))])
def test_run_config(argv, expected):
    assert main.run_config(argv) == expected


PATHS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20).map(lambda s: "/" + s)


@given(st.one_of(st.none(), PATHS, st.integers(), st.text(max_size=10)), st.booleans(), st.sampled_from([None, "'", '"']),
       st.dictionaries(st.sampled_from(["collection_interval", "ebpf", "exporter"]),
                       st.text(max_size=5) | st.dictionaries(st.just("state_dir"), PATHS), max_size=2))
@settings(max_examples=300, deadline=None)
def test_the_state_dir_the_early_start_finds_is_the_configs_or_none(state_dir, flow, quotes, other):
    doc = dict(other)
    if state_dir is not None:
        doc["state_dir"] = state_dir
    text = yaml.safe_dump(doc, default_flow_style=flow, default_style=quotes)
    found = early.state_dir_of(text.encode())
    if found is not None:
        assert found == yaml.safe_load(text).get("state_dir", STATE_DIR), text


@pytest.mark.parametrize("text, expected", [
    (b"state_dir: /var/lib/x\n", "/var/lib/x"), (b"a: 1\nstate_dir:   /s/t-u_v.w  # kept here\n", "/s/t-u_v.w"),
    (b"exporter: {type: file}\n", STATE_DIR), (b"", STATE_DIR),
    (b"state_dir: '/q'\n", None), (b"state_dir: ${env:S}\n", None), (b"{state_dir: /f}\n", None),
    (b"state_dir: relative\n", None), (b"state_dir: /a\nstate_dir: /b\n", None), (b"x:\n  state_dir: /n\n", None)])
def test_state_dir_of(text, expected):
    assert early.state_dir_of(text) == expected


def test_the_config_digest_names_the_file_and_the_variables_it_refers_to(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("exporter: {otlp: {endpoint: '${env:EP:-localhost:4317}'}}\n")
    a = early.config_digest(str(path), {"EP": "a:1", "OTHER": "x"})
    assert a == early.config_digest(str(path), {"EP": "a:1", "OTHER": "y"})     # not referred to
    assert a != early.config_digest(str(path), {"EP": "b:1"}) != early.config_digest(str(path), {})
    path.write_text("# another file\n" + path.read_text())
    assert a != early.config_digest(str(path), {"EP": "a:1"})
    assert early.config_digest(str(tmp_path / "missing.yaml"), {}) == ""


# --- the plan file is outside data -------------------------------------------------------------

RECIPE_KEYS = ["object", "kernel_btf", "programs", "params", "max_entries", "unused_maps"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
RECIPES = st.fixed_dictionaries({
    "object": st.sampled_from(["/objects/tcp.bpf.o", "/elsewhere/tcp.bpf.o", "/objects/../tcp.bpf.o"]) | JSON,
    "kernel_btf": st.text(max_size=8) | JSON, "programs": st.lists(st.text(max_size=8)) | JSON,
    "params": st.dictionaries(st.text(max_size=8), st.integers() | st.booleans()) | JSON,
    "max_entries": st.dictionaries(st.text(max_size=8), st.integers()) | JSON,
    "unused_maps": st.lists(st.text(max_size=8)) | JSON})


@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["tcp", "x y", "", "runqlat"]), RECIPES | JSON, max_size=3).map(
                     lambda p: json.dumps({"config": "c", "object_dir": "/objects", "probes": p}).encode())))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_kept_plan_yields_only_well_formed_recipes_of_the_object_dir(tmp_path, data):
    cache = corebtf.Cache(str(tmp_path), "/objects")
    os.makedirs(cache.dir, exist_ok=True)
    with open(cache.plan_path, "wb") as f:
        f.write(data)
    plan = cache.plan()
    if plan is None:
        return
    for name, r in plan["probes"].items():
        assert sorted(r) == sorted(RECIPE_KEYS) and r["object"] == f"/objects/{name}.bpf.o"
        assert all(type(v) is int and -(1 << 63) <= v < 1 << 64 for v in r["params"].values())
        assert all(type(v) is int and 0 < v < 1 << 32 for v in r["max_entries"].values())
        assert all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n)
                   for n in [*r["programs"], *r["unused_maps"], *r["params"], *r["max_entries"]])


def test_an_early_load_that_fails_costs_only_its_probe(tmp_path, cfg, start_agent):
    """A kept recipe that cannot load (a program its object lacks): that probe is left to the
    agent's loader, the others are attached early."""
    stop(start(start_agent, cfg)[0])
    path = os.path.join(kernel_dir(cfg["state_dir"]), "plan.json")
    with open(path) as f:
        plan = json.load(f)
    plan["probes"]["process"]["programs"].append("no_such_program")
    with open(path, "w") as f:
        json.dump(plan, f)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o022 == 0
    found = early.attach(str(next(tmp_path.glob("agent-*.yaml"))), os.environ)
    try:
        assert "process" in found.note and found.take("process", plan["probes"]["process"]) is None
        taken = found.take("tcp", plan["probes"]["tcp"])
        assert taken is not None
        taken.close()
    finally:
        found.close()


def test_kept_files_nested_too_deep_for_json_are_absent_not_fatal(tmp_path):
    cache = corebtf.Cache(str(tmp_path), "/objects")
    os.makedirs(cache.dir)
    for name in ("plan.json", "facts.json"):
        with open(os.path.join(cache.dir, name), "w") as f:
            f.write("[" * 200_000)
    assert cache.plan() is None and cache.facts() == {}
    cache.save_plan("c", {})
    assert cache.plan() == {"config": "c", "object_dir": "/objects", "probes": {}}


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing", "huge"])
def test_a_config_path_that_is_no_regular_file_stops_neither_the_early_start_nor_the_error(tmp_path, kind):
    """The early start reads the config file before the config loader does: a FIFO must not block
    it, a directory or device must not crash it; the loader's one-line error follows (exit 2)."""
    path = tmp_path / "agent.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = "/dev/zero"
    elif kind == "huge":
        path.write_bytes(b"#" * (early.MAX_CONFIG + 1))
    found = early.attach(str(path), os.environ)
    assert found.close() == [] and found.note
    p = subprocess.run([*HOSTAGENT, "run", "--config", str(path)], cwd=ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
