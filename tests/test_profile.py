"""`hostagent run --profile FILE` / HOSTAGENT_PROFILE=FILE: one cProfile profile of all threads,
written at exit; a path that cannot be written is a user error before the agent starts."""
import os
import pstats
import signal
import time

from tests.helpers import ROOT, agent_log, base_config, clean_env, hostagent


def wait_for_lines(path, n, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return True
        time.sleep(0.1)
    return False


def functions(stats: pstats.Stats) -> set:
    """{(file relative to the checkout, function name)} of every function that was called."""
    out = set()
    for (filename, _line, name), (_cc, ncalls, *_rest) in stats.stats.items():
        if ncalls:
            out.add((os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else filename, name))
    return out


def run_profiled(start_agent, tmp_path, args=(), env=None) -> pstats.Stats:
    profile = tmp_path / "agent.prof"
    cfg = base_config(tmp_path)
    proc = start_agent(cfg, env=env, args=args)
    assert wait_for_lines(cfg["exporter"]["file"]["path"], 3), agent_log(proc)
    assert not profile.exists(), "the profile is written at exit, not before"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, agent_log(proc)
    assert "profile_written" in agent_log(proc)
    assert [p.name for p in tmp_path.iterdir() if ".prof.tmp" in p.name] == []
    return pstats.Stats(str(profile))


def test_profile_holds_every_thread(start_agent, tmp_path):
    profile = tmp_path / "agent.prof"
    found = functions(run_profiled(start_agent, tmp_path, args=["--profile", str(profile)]))
    # one function that only each thread runs
    assert ("agent/pipeline/batcher.py", "run") in found            # batcher thread: its run() itself
    assert ("agent/pipeline/batcher.py", "_flush") in found
    assert ("agent/runtime.py", "collect_once") in found            # scheduler thread
    assert ("agent/sources/host.py", "collect") in found            # a host scraper, on the scheduler
    assert ("agent/pipeline/__init__.py", "_send_loop") in found    # exporter-0
    assert ("agent/export/file.py", "send") in found                # the exporter, from exporter-0
    assert ("agent/runtime.py", "stop") in found                    # main thread, at SIGTERM


def test_profile_from_environment(start_agent, tmp_path):
    profile = tmp_path / "agent.prof"
    found = functions(run_profiled(start_agent, tmp_path, env=clean_env(HOSTAGENT_PROFILE=str(profile))))
    assert ("agent/pipeline/batcher.py", "run") in found
    assert ("agent/sources/host.py", "collect") in found


def test_profile_bad_path_is_a_user_error(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("ebpf: {enabled: false}\n")
    cases = [
        (["--profile", str(tmp_path / "missing" / "agent.prof")], None, "does not exist"),
        (["--profile", str(tmp_path)], None, "is a directory"),
        ([], clean_env(HOSTAGENT_PROFILE=str(tmp_path / "missing" / "agent.prof")), "HOSTAGENT_PROFILE"),
    ]
    for args, env, message in cases:
        r = hostagent("run", "--config", str(config), *args, env=env, timeout=30)  # refused, not run
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.yaml"]
