"""Hostile data from the host: values the encoder cannot send as they are (names with invalid bytes,
huge integers, nested values) never cost a batch; they are replaced and counted. A real cgroup and a
real binary named with invalid bytes, a real agent, a real receiver: everything else still arrives."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.export.encoding import MAX_DEPTH, EncodingCounters, encode
from agent.model import Batch, LogGroup, LogRecord, Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.registry import PROBES
from tests.helpers import HOSTAGENT, ROOT, base_config, clean_env, remove_cgroups
from tests.otlp_receiver import HttpReceiver, attributes

INT64 = (-(1 << 63), (1 << 63) - 1)

# any str (lone surrogates included), any bytes, any int, any float, nested lists and dicts
_text = st.text(st.characters(blacklist_categories=()), max_size=20)
_scalar = (_text | st.binary(max_size=20) | st.booleans() | st.integers()
           | st.integers(min_value=-(1 << 2000), max_value=1 << 2000) | st.floats() | st.none())
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(_text, inner, max_size=4), max_leaves=20)


def _unicode(text: str) -> str:
    """What a receiver reads for `text`: each lone surrogate replaced by U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def _check(sent, got, depth: int = 0) -> None:
    """`got` (an AnyValue the official parser read) is what `sent` should have become."""
    kind = got.WhichOneof("value")
    if isinstance(sent, (bool, int, float)) and kind in ("bool_value", "int_value", "double_value") \
            and getattr(got, kind) == sent and type(sent) is not {"bool_value": bool, "int_value": int}.get(kind, float):
        return      # attribute sets are cached by Python equality: (k, 0) and (k, False) share one encoding
    if sent is None:
        assert kind is None
    elif isinstance(sent, str):
        assert kind == "string_value" and got.string_value == _unicode(sent)
    elif isinstance(sent, bool):
        assert kind == "bool_value" and got.bool_value is sent
    elif isinstance(sent, int):
        if INT64[0] <= sent <= INT64[1]:
            assert kind == "int_value" and got.int_value == sent
        else:                                     # outside int64: the nearest double (inf beyond)
            assert kind == "double_value" and (math.isinf(got.double_value) or got.double_value == float(sent))
            assert (got.double_value > 0) == (sent > 0)
    elif isinstance(sent, float):
        assert kind == "double_value"
        assert got.double_value == sent or (math.isnan(sent) and math.isnan(got.double_value))
    elif isinstance(sent, bytes):
        assert kind == "bytes_value" and got.bytes_value == sent
    elif depth >= MAX_DEPTH:
        assert kind == "string_value"
    elif isinstance(sent, dict):
        assert kind == "kvlist_value"
        pairs = got.kvlist_value.values
        assert [kv.key for kv in pairs] == [_unicode(k) for k in sent]
        for (_, v), kv in zip(sent.items(), pairs):
            _check(v, kv.value, depth + 1)
    else:
        assert kind == "array_value" and len(got.array_value.values) == len(sent)
        for v, g in zip(sent, got.array_value.values):
            _check(v, g, depth + 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_value, min_size=1, max_size=4), body=_text, name=_text)
def test_the_encoder_never_raises_and_the_official_parser_reads_every_value(values, body, name):
    attrs = tuple((f"k{i}", v) for i, v in enumerate(values))
    resource = Resource((("host.name", name),))
    scope = Scope("hostile", "1")
    batch = Batch(metrics=[MetricGroup(resource, scope, [
        Metric("m", "", "1", MetricKind.GAUGE, [NumberPoint(attrs, 1, 1, 2), NumberPoint((("big", 1),), 1 << 70, 1, 2)])])],
        logs=[LogGroup(resource, scope, [LogRecord(3, body, attrs)])])
    payloads = {p.signal: p for p in encode(batch)}
    metrics = ExportMetricsServiceRequest.FromString(payloads["metrics"].body)
    logs = ExportLogsServiceRequest.FromString(payloads["logs"].body)
    assert payloads["metrics"].items == 2 and payloads["logs"].items == 1
    points = metrics.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points
    assert points[1].as_double == float(1 << 70)
    record = logs.resource_logs[0].scope_logs[0].log_records[0]
    assert record.body.string_value == _unicode(body)
    assert logs.resource_logs[0].resource.attributes[0].value.string_value == _unicode(name)
    for got in (points[0].attributes, record.attributes):
        assert [kv.key for kv in got] == [k for k, _ in attrs]
        for (_, sent), kv in zip(attrs, got):
            _check(sent, kv.value)


def test_a_name_with_invalid_bytes_is_replaced_and_counted():
    counters = EncodingCounters(SelfMetrics())
    bad = os.fsdecode(b"/bad\xff\xfecg")           # what os.listdir/readlink give for such a name
    batch = Batch(logs=[LogGroup(Resource(()), Scope("s"), [
        LogRecord(1, "ok", (("process.linux.cgroup", bad),)), LogRecord(2, "fine", (("a", "b"),))])])
    (payload,) = encode(batch, counters)
    records = ExportLogsServiceRequest.FromString(payload.body).resource_logs[0].scope_logs[0].log_records
    assert [attributes(r) for r in records] == [{"process.linux.cgroup": "/bad\ufffd\ufffdcg"}, {"a": "b"}]
    assert counters.replaced.value((("reason", "invalid_unicode"),)) > 0


def test_a_group_no_replacement_can_encode_is_left_out_and_counted_the_rest_is_sent():
    counters = EncodingCounters(SelfMetrics())
    scope = Scope("s")
    bad = MetricGroup(Resource((("host.name", "bad"),)), scope, [   # a time before 1970: no fixed64 holds it
        Metric("m", "", "1", MetricKind.GAUGE, [NumberPoint((), 1.5, -1, -1), NumberPoint((), 2.5, -1, -1)])])
    good = MetricGroup(Resource((("host.name", "good"),)), scope, [
        Metric("m", "", "1", MetricKind.GAUGE, [NumberPoint((), 3.5, 1, 2)])])
    (payload,) = encode(Batch(metrics=[bad, good]), counters)
    request = ExportMetricsServiceRequest.FromString(payload.body)
    assert payload.items == 1 and len(request.resource_metrics) == 1
    assert request.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0].as_double == 3.5
    assert counters.dropped.value((("signal", "metrics"),)) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups")
def test_a_v1_cgroup_named_with_invalid_bytes_is_read_with_replacement():
    """On cgroup v1 (and hybrid) hosts a process's cgroup is read from /proc/<pid>/cgroup: a v1
    path with invalid bytes (here above a container's directory, so it is the line reported)
    arrives with U+FFFD instead of being lost."""
    from agent.procfs.identity import proc_cgroup_attributes
    root = b"/sys/fs/cgroup/pids"
    if not os.path.isdir(root):
        pytest.skip("no cgroup v1 pids hierarchy")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    top = os.path.join(root, b"hostagent-test-" + uuid.uuid4().hex[:8].encode())
    cgroup = os.path.join(top, BAD, cid.encode())
    os.makedirs(cgroup)
    try:
        def enter():
            with open(os.path.join(cgroup, b"cgroup.procs"), "w") as f:
                f.write("0")
        p = subprocess.Popen(["sleep", "30"], preexec_fn=enter)
        try:
            attrs = dict(proc_cgroup_attributes(p.pid))
        finally:
            p.kill()
            p.wait()
    finally:
        remove_cgroups(cgroup, os.path.dirname(cgroup), top)
    assert attrs.get("container.id") == cid, attrs
    assert attrs["process.linux.cgroup"].endswith(f"/bad\ufffd\ufffdcg/{cid}"), attrs


# --- the real agent ------------------------------------------------------------------------------

BAD = b"bad\xff\xfecg"


def _cgroup_v2_root() -> str:
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if mounts.get(root) == "cgroup2":
            return root
    pytest.skip("no cgroup2 mount")


@pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs, creates cgroups")
def test_a_cgroup_and_a_binary_named_with_invalid_bytes_cost_no_other_data(tmp_path):
    """A process in a cgroup named bad\\xff\\xfecg, and a binary of that name picked up by the
    process scraper: the host's other metrics and logs still arrive, and those names arrive with
    U+FFFD in place of the bad bytes."""
    import yaml
    receiver = HttpReceiver().start()
    cgroup = os.path.join(os.fsencode(_cgroup_v2_root()), b"hostagent-test-" + uuid.uuid4().hex[:8].encode(), BAD)
    tag = uuid.uuid4().hex[:4]          # this run's binary alone (the name stays within comm's 15 bytes)
    shown = "bad\ufffd\ufffdcg-" + tag
    binary = os.path.join(os.fsencode(str(tmp_path)), BAD + b"-" + tag.encode())
    shutil.copy("/bin/sleep", binary)
    cfg = base_config(tmp_path, ebpf={"enabled": True, "probes": {
        name: {"enabled": name == "process"} for name in PROBES}},
        scrapers={"process": {"enabled": True, "include": [f"bad.*-{tag}"]}},
        exporter={"type": "otlp", "otlp": {"endpoint": receiver.endpoint, "protocol": "http/protobuf"}})
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "agent.log", "w+")
    agent = subprocess.Popen([*HOSTAGENT, "run", "--config", str(tmp_path / "agent.yaml")], cwd=ROOT,
                             env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    os.makedirs(cgroup)
    sleeper = None
    try:
        deadline = time.monotonic() + 120
        while "ebpf_probes on=process" not in open(tmp_path / "agent.log").read():
            assert agent.poll() is None and time.monotonic() < deadline, open(tmp_path / "agent.log").read()
            time.sleep(0.2)

        def enter():
            with open(os.path.join(cgroup, b"cgroup.procs"), "w") as f:
                f.write("0")
        sleeper = subprocess.Popen([binary, "600"], preexec_fn=enter)

        def arrived(rec) -> bool:
            logs = [attributes(r) for _, _, r in rec.all_logs()]
            scraped = [res for res, _, _ in rec.all_metrics()]
            return (any(a.get("process.pid") == sleeper.pid and a.get("process.linux.cgroup") for a in logs
                        if a.get("process.executable.name"))
                    and any(a.get("process.pid") == sleeper.pid for a in scraped)
                    and {"system.cpu.time", "system.memory.usage"} <= rec.metric_names())
        assert receiver.wait_for(arrived, 60), open(tmp_path / "agent.log").read()[-3000:]
        time.sleep(1.5)                             # a few more batches, with both names in them
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        agent.terminate()
        agent.wait(30)
        log.close()
        receiver.stop()
        remove_cgroups(cgroup, os.path.dirname(cgroup))
    text = open(tmp_path / "agent.log").read()
    assert "encode_failed" not in text, text[-3000:]
    execs = [attributes(r) for _, _, r in receiver.all_logs()
             if r.event_name == "process.exec" and attributes(r)["process.pid"] == sleeper.pid]
    assert execs and execs[0]["process.linux.cgroup"].endswith("/bad\ufffd\ufffdcg"), execs
    assert execs[0]["process.executable.path"].endswith("/" + shown), execs
    resources = [res for res, _, _ in receiver.all_metrics()]
    mine = [a for a in resources if a.get("process.pid") == sleeper.pid]
    assert mine and all(a["process.executable.name"] == shown for a in mine), mine
    assert all(a["process.linux.cgroup"].endswith("/bad\ufffd\ufffdcg") for a in mine), mine
    assert all(a["process.command_line"].endswith(shown + " 600") for a in mine), mine
    assert "\ufffd" not in repr([a for a in resources if a.get("process.pid") != sleeper.pid])
