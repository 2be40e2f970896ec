"""Command-line redaction under hostile input: secrets planted anywhere in arbitrary command lines
stay hidden; configured patterns run on RE2 (a pattern that backtracks in Python's re cannot
freeze the agent) and bad ones are config errors; a huge command line read from /proc is capped.
The real command lines (processes run for real, the agent's exported bytes) are in
test_enrichment.py; the linear cost is shown by bench/redaction.py (durations here are reported
as hypothesis notes, never asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from agent.procfs.identity import CMDLINE_MAX, TRUNCATED_MARK, RedactionConfig, Redactor
from tests.helpers import HOSTAGENT, ROOT, base_config, clean_env, hostagent
from tests.otlp_receiver import HttpReceiver

REDACT = Redactor(RedactionConfig())

# how a secret S is given on a command line, in each family the rules cover
PLANTED = [
    lambda s: ["--password", s], lambda s: [f"--db-password={s}"], lambda s: [f"--secretKey:{s}"],
    lambda s: [f"API_KEY={s}"], lambda s: [f"https://u:{s}@host/x"], lambda s: [f"https://{s}@host/x"],
    lambda s: ["curl", "-u", f"u:{s}"], lambda s: ["mysql", f"-p{s}"], lambda s: ["sh", "-c", f"timeout 5 mysql -p{s}"],
    lambda s: ["-H", f"Authorization: Bearer {s}"], lambda s: ["-H", f"X-API-Key: {s}"],
    lambda s: [f"jdbc:sqlserver://h;user=sa;password={s};x=y"], lambda s: ["-passin", f"pass:{s}"],
    lambda s: ["docker", "login", "-p", s], lambda s: [f"https://h/p?a=1&token={s}"],
]
_words = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["--password", "-p", "mysql", "Authorization:", "sh", "-c", "=", ":", "://", "@", "--", "a=b", "x y"]),
    max_size=6)
_secret = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=8, max_size=16)


@settings(max_examples=400, deadline=None)
@given(before=_words, after=_words, secret=_secret, family=st.sampled_from(range(len(PLANTED))))
def test_a_planted_secret_never_appears_whatever_surrounds_it(before, after, secret, family):
    assume(not any(secret in w for w in before + after))
    out = REDACT(before + PLANTED[family](secret) + after)
    assert secret not in out


# shapes that made the previous rules backtrack, repeated up to ~1 MiB
_FRAGMENTS = ["n", "a=", "=", "://", "a://", ":", "@", "-", "--password", "key", "Authorization:", " ", "x;", "&",
              "\u00e9", "\ufffd", "*"]


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=8), times=st.integers(1, 1 << 17),
       words=st.integers(1, 4))
def test_any_input_is_redacted_without_error_and_its_duration_is_reported(parts, times, words):
    arg = "".join(parts) * times
    assume(len(arg) <= 1 << 20)
    argv = ["app"] + [arg] * words
    t0 = time.process_time_ns()
    out = REDACT(argv)
    ns_per_kib = (time.process_time_ns() - t0) / max(1, sum(map(len, argv)) / 1024)
    event(f"ns per KiB: {'<100k' if ns_per_kib < 1e5 else '<1M' if ns_per_kib < 1e6 else '>=1M'}")
    assert isinstance(out, str)


def test_a_pattern_that_backtracks_in_python_re_runs_in_linear_time():
    """`(a+)+$` on "aaa...a!" never finishes in Python's re; on RE2 it is a scan. Run in a child
    process so that a hang is a failure (at a deadline far above the expected milliseconds)."""
    code = ("from agent.procfs.identity import RedactionConfig, Redactor; "
            "r = Redactor(RedactionConfig(patterns=('(?P<secret>(a+)+)!x', '(a+)+$'))); "
            "print(r(['app', 'a' * 100000 + '!', 'b' + 'a' * 40 + '!x']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "app " + "a" * 100000 + "! b***!x"


BAD_PATTERNS = [
    ("a{4294967296}", "repetition"),
    ("(" * 2000 + "a" + ")" * 2000, "longer than"),
    ("(" * 40 + "a" + ")" * 40, "nested"),
    (r"(a)\1", "invalid"),
    ("(?<=a)b", "invalid"),
    ("[", "missing ]"),
]


@pytest.mark.parametrize("pattern,words", BAD_PATTERNS, ids=[w for _, w in BAD_PATTERNS])
def test_a_pattern_re2_cannot_run_boundedly_is_one_config_error_line(tmp_path, pattern, words):
    for raw, key in (({"enrichment": {"redaction": {"patterns": [pattern]}}}, "enrichment.redaction.patterns[0]"),
                     ({"scrapers": {"process": {"exclude": ["ok", pattern]}}}, "scrapers.process.exclude[1]")):
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(raw))
        res = hostagent("check-config", str(path))
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
        assert key in res.stderr and words in res.stderr, res.stderr


@pytest.mark.parametrize("redaction,key", [
    ({"password_options": {"mysql": "p"}}, "enrichment.redaction.password_options.mysql"),
    ({"password_options": {"curl": "-u user"}}, "enrichment.redaction.password_options.curl"),
    ({"secret_names": ["pass", ""]}, "enrichment.redaction.secret_names[1]"),
    ({"secret_suffixes": [" "]}, "enrichment.redaction.secret_suffixes[0]"),
])
def test_bad_redaction_rules_are_one_config_error_line(tmp_path, redaction, key):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"enrichment": {"redaction": redaction}}))
    res = hostagent("check-config", str(path))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert key in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the agent with the process scraper on every process")
def test_a_huge_command_line_is_capped_and_freezes_nothing(tmp_path):
    """A process with a 120 KiB argument (the previous rules took minutes on it): the process
    scraper's resource for it arrives, its command line cut at CMDLINE_MAX with a last word
    `...`, and the host's other metrics keep coming."""
    receiver = HttpReceiver().start()
    marker = uuid.uuid4().hex
    cfg = base_config(tmp_path, scrapers={"process": {"enabled": True, "include": ["sh"]}},
                      exporter={"type": "otlp", "otlp": {"endpoint": receiver.endpoint,
                                                         "protocol": "http/protobuf"}})
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    huge = subprocess.Popen(["sh", "-c", "sleep 600; :", marker, "--x=" + "n" * (120 * 1024)])
    log = open(tmp_path / "agent.log", "w+")
    agent = subprocess.Popen([*HOSTAGENT, "run", "--config", str(tmp_path / "agent.yaml")], cwd=ROOT,
                             env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        def mine(rec):
            return [res for res, _, _ in rec.all_metrics() if res.get("process.pid") == huge.pid]
        assert receiver.wait_for(lambda rec: mine(rec), 60), open(tmp_path / "agent.log").read()[-2000:]
        seen = len(receiver.metrics)
        assert receiver.wait_for(lambda rec: len(rec.metrics) >= seen + 3, 30)   # and more collections after
    finally:
        huge.kill()
        huge.wait()
        agent.terminate()
        agent.wait(30)
        log.close()
        receiver.stop()
    line = mine(receiver)[0]["process.command_line"]
    assert line.startswith(f"sh -c sleep 600; : {marker} ") and line.endswith(" " + TRUNCATED_MARK), line[:200]
    assert len(line.encode()) <= CMDLINE_MAX + len(TRUNCATED_MARK)
