"""Enrichment and cardinality limits: the process cache, who-did-it attributes on the process
probe's records (real kernel, real agent, real OTLP receiver), pid reuse under pid_max pressure,
container ids from cgroup paths, secrets kept out of every exported byte, and the overflow series."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid

import pytest

from agent import config
from agent.components import Config
from agent.export.factory import build_exporter
from agent.model import (Batch, ExponentialHistogramPoint, LogGroup, LogRecord, Metric, MetricGroup, MetricKind,
                         NumberPoint, Resource, Scope)
from agent.pipeline import build_pipeline
from agent.pipeline.enrich import CardinalityLimiter, ProcessEnricher, merge
from agent.procfs.cache import TwoLevelCache
from agent.procfs.identity import (CLOCK_TICK_NS, EnrichmentConfig, boot_to_wall_ns, container_id, proc_cgroup,
                                   proc_stat, systemd_unit)
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf.config import EbpfConfig, ProbeConfig
from agent.sources.ebpf.process import iso8601
from agent.sources.ebpf.registry import PROBES
from agent.sources.process import ProcessScraperConfig
from tests.helpers import HOSTAGENT, ROOT, Events, base_config, clean_env, remove_cgroups
from tests.otlp_receiver import HttpReceiver, attributes

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs, writes cgroups and sysctls")


# --- the two-level cache -------------------------------------------------------------------------

def test_cache_promotes_on_repeated_hits_and_demotes_to_l2():
    c = TwoLevelCache("t", l1_size=2, l2_size=3, telemetry=SelfMetrics(), promote_hits=2)
    for k in "abc":
        c.put(k, k.upper())
    assert c.keys(1) == [] and c.keys(2) == ["a", "b", "c"]
    assert c.get("a") == "A"                     # one hit: still in L2, now most recent there
    assert c.keys(1) == [] and c.keys(2) == ["b", "c", "a"]
    assert c.get("a") == "A"                     # the second hit promotes
    assert c.keys(1) == ["a"] and c.keys(2) == ["b", "c"]
    c.get("b"), c.get("b")
    assert c.keys(1) == ["a", "b"]
    c.get("a")                                   # an L1 hit makes it L1's most recent
    assert c.keys(1) == ["b", "a"]
    c.get("c"), c.get("c")                       # L1 full: its least recent (b) goes back to L2's front
    assert c.keys(1) == ["a", "c"] and c.keys(2) == ["b"]
    assert (c.promotions, c.demotions, c.evictions) == (3, 1, 0)
    assert (c.l1_hits, c.l2_hits, c.misses) == (1, 6, 0)


def test_cache_evicts_l2_least_recent_first_and_keeps_l1_through_a_scan():
    c = TwoLevelCache("t", l1_size=2, l2_size=3, telemetry=SelfMetrics())
    c.put("hot", 1)
    c.get("hot"), c.get("hot")
    for i in range(10):                          # a burst of one-off keys
        c.put(i, i)
    assert c.keys(2) == [7, 8, 9] and c.evictions == 7
    assert c.get("hot") == 1 and c.keys(1) == ["hot"]
    assert c.get(0) is None and c.misses == 1
    c.put(10, 10)                                # evicts 7, the least recently used
    assert c.keys(2) == [8, 9, 10]
    c.get(8)
    c.put(11, 11)                                # 8 was used: 9 goes
    assert c.keys(2) == [10, 8, 11]


def test_cache_invalidation_and_replacement():
    c = TwoLevelCache("t", l1_size=2, l2_size=2, telemetry=SelfMetrics())
    c.put(1, "old")
    c.get(1), c.get(1)
    c.put(1, "new")                              # replaced in place, stays in L1
    assert c.keys(1) == [1] and c.get(1) == "new"
    c.put(2, "x")
    assert c.invalidate(1) and c.invalidate(2) and not c.invalidate(3)
    assert len(c) == 0 and 1 not in c and c.get(1) is None
    assert c.invalidations == 2


def test_cache_counts_reach_self_metrics():
    telemetry = SelfMetrics()
    c = TwoLevelCache("published", l1_size=1, l2_size=1, telemetry=telemetry)
    c.put(1, 1)
    c.get(1), c.get(1), c.get(2)
    c.put(2, 2)                                  # evicts nothing: 1 is in L1
    c.put(3, 3)                                  # evicts 2
    c.invalidate(1)
    c.publish()
    lookups = telemetry.counter("hostagent.cache.lookups", "", "")
    cache = ("cache", "published")
    assert lookups.value((cache, ("result", "l2_hit"))) == 2
    assert lookups.value((cache, ("result", "miss"))) == 1
    assert telemetry.counter("hostagent.cache.evictions", "", "").value((cache,)) == 1
    assert telemetry.counter("hostagent.cache.invalidations", "", "").value((cache,)) == 1
    assert telemetry.counter("hostagent.cache.promotions", "", "").value((cache,)) == 1


# --- the enricher, record by record --------------------------------------------------------------

def _record(event, pid, created=None, **attrs):
    a = [("process.pid", pid)] + ([("process.creation.time", created)] if created else [])
    return LogRecord(time.time_ns(), event, tuple(a) + tuple(attrs.items()), event_name=event)


def _enrich(enricher, *records):
    batch = Batch(logs=[LogGroup(Resource(()), Scope("t"), list(records))])
    enricher(batch)
    return [dict(r.attributes) for r in batch.logs[0].records]


def _enricher():
    return ProcessEnricher(EnrichmentConfig(cache_l1_size=4, cache_l2_size=16), SelfMetrics())


def test_exit_takes_the_identity_of_its_exec_and_removes_it():
    e = _enricher()
    exec_attrs = {"process.executable.path": "/usr/bin/a", "process.command_line": "a --x",
                  "container.id": "c" * 64}
    out = _enrich(e, _record("process.exec", 999999, "2026-01-01T00:00:00.000Z", **exec_attrs),
                  _record("process.exit", 999999, "2026-01-01T00:00:00.000Z"))
    assert {k: out[1][k] for k in exec_attrs} == exec_attrs
    assert 999999 not in e.cache


def test_an_identity_with_another_creation_time_is_never_used():
    e = _enricher()
    _enrich(e, _record("process.exec", 999998, "2026-01-01T00:00:00.000Z", **{"process.command_line": "first"}))
    # the pid's next owner exits (its exec record was lost): not the first process's command line
    out = _enrich(e, _record("process.exit", 999998, "2026-01-01T00:00:05.000Z"))
    assert "process.command_line" not in out[0]
    assert 999998 in e.cache                     # and the entry, not this process's, is left alone


def test_a_miss_is_answered_from_proc_only_for_the_same_process():
    e = _enricher()
    ticks = proc_stat(os.getpid())[2]
    boot_to_wall = boot_to_wall_ns()
    created = iso8601(ticks * CLOCK_TICK_NS + boot_to_wall)
    same = _enrich(e, _record("linux.oom.kill", os.getpid(), created))[0]
    assert same["process.executable.path"] == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert "process.command_line" in same and "process.linux.cgroup" in same
    e.cache.invalidate(os.getpid())
    later = iso8601(ticks * CLOCK_TICK_NS + boot_to_wall + 5 * 10**9)
    other = _enrich(e, _record("linux.oom.kill", os.getpid(), later))[0]
    assert "process.executable.path" not in other


# --- cgroup paths --------------------------------------------------------------------------------

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize("path, cid, unit", [
    (f"/docker/{HEX}", HEX, None),                                               # docker, cgroup v1
    (f"/system.slice/docker-{HEX}.scope", HEX, f"docker-{HEX}.scope"),           # docker, systemd driver
    (f"/kubepods/burstable/pod1f2e/{HEX}", HEX, None),                           # containerd, cgroupfs
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e.slice/cri-containerd-{HEX}.scope",
     HEX, f"cri-containerd-{HEX}.scope"),
    (f"/kubepods.slice/kubepods-pod9.slice/crio-{HEX}.scope", HEX, f"crio-{HEX}.scope"),        # cri-o
    (f"/kubepods/besteffort/pod9/crio-{HEX}", HEX, None),
    (f"/machine.slice/libpod-{HEX}.scope/container", HEX, f"libpod-{HEX}.scope"),  # podman
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope", HEX, f"libpod-{HEX}.scope"),
    (f"/machine.slice/libpod-conmon-{HEX}.scope", None, f"libpod-conmon-{HEX}.scope"),   # conmon: not the container
    (f"/nerdctl.slice/nerdctl-{HEX}.scope", HEX, f"nerdctl-{HEX}.scope"),
    ("/system.slice/nginx.service", None, "nginx.service"),
    ("/user.slice/user-1000.slice/session-3.scope", None, "session-3.scope"),
    ("/", None, None),
])
def test_container_id_and_unit_from_cgroup_paths(path, cid, unit):
    assert container_id(path) == cid
    assert systemd_unit(path) == unit


def test_proc_cgroup_prefers_the_line_that_names_a_container():
    v1 = f"12:pids:/docker/{HEX}\n1:name=systemd:/docker/{HEX}\n0::/\n"
    assert proc_cgroup(v1) == ("12:pids:", f"/docker/{HEX}")
    assert proc_cgroup("1:name=systemd:/user.slice/x.scope\n0::/\n") == ("1:name=systemd:", "/user.slice/x.scope")
    assert proc_cgroup("0::/system.slice/cron.service\n") == ("0::", "/system.slice/cron.service")


# --- cardinality ---------------------------------------------------------------------------------

def test_ten_thousand_attribute_sets_become_the_limit_plus_one_overflow_series(tmp_path, grpc_receiver):
    cfg = config.build(Config, base_config(tmp_path, exporter={
        "type": "otlp", "otlp": {"endpoint": grpc_receiver.endpoint, "insecure": True},
        "queue": {"type": "memory"}}))
    assert cfg.cardinality_limit == 2000
    telemetry = SelfMetrics()
    overflow = telemetry.counter("hostagent.pipeline.cardinality_overflow", "", "")
    attrs = (("metric", "test.cardinality"),)
    pipeline = build_pipeline(cfg, build_exporter(cfg.exporter, telemetry), telemetry)
    pipeline.start()
    now = time.time_ns()
    points = [NumberPoint((("user", f"u{i}"),), 1, now, now) for i in range(10_000)]
    pipeline.emit(Batch(metrics=[MetricGroup(Resource((("host.name", "t"),)), Scope("t"), [
        Metric("test.cardinality", "", "1", MetricKind.SUM, points, monotonic=True)])]))
    assert pipeline.shutdown(10)
    received = [p for _, _, m in grpc_receiver.all_metrics() if m.name == "test.cardinality" for p in m.sum.data_points]
    series = {tuple(sorted(attributes(p).items())): p for p in received}
    assert len(received) == len(series) == 2001
    over = series[(("otel.metric.overflow", True),)]
    assert over.as_int == 8000
    assert overflow.value(attrs) == 8000


def test_overflow_merges_every_kind_of_point():
    n = [NumberPoint((("k", i),), i, 10 + i, 20 + i) for i in range(4)]
    assert merge(MetricKind.SUM, n).value == 6 and merge(MetricKind.GAUGE, n).value == 3
    assert (merge(MetricKind.SUM, n).start_time_ns, merge(MetricKind.SUM, n).time_ns) == (10, 23)
    e1 = ExponentialHistogramPoint((), 0, 1, 3, 30.0, 0, 1, 2, [1, 1])
    e2 = ExponentialHistogramPoint((), 0, 1, 2, 20.0, 0, 0, 4, [2])
    m = merge(MetricKind.EXPONENTIAL_HISTOGRAM, [e1, e2])
    assert (m.count, m.sum, m.zero_count, m.positive_offset, m.positive_counts) == (5, 50.0, 1, 2, [1, 1, 2])
    limiter = CardinalityLimiter(2, SelfMetrics())
    metric = Metric("x", "", "1", MetricKind.SUM, list(n))
    limiter(Batch(metrics=[MetricGroup(Resource(()), Scope("t"), [metric])]))
    assert [p.attributes for p in metric.points] == [(("k", 0),), (("k", 1),), (("otel.metric.overflow", True),)]


# --- the real agent, the real kernel -------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """hostagent with the process probe only, exporting OTLP/HTTP (gzip) to a receiver that keeps
    the raw bytes of every request."""
    if os.geteuid() != 0:
        pytest.skip("loads BPF programs")
    import yaml
    tmp = tmp_path_factory.mktemp("enrich")
    receiver = HttpReceiver().start()
    cfg = base_config(tmp, ebpf={"enabled": True, "probes": {
        name: {"enabled": name == "process"} for name in PROBES}},
        exporter={"type": "otlp", "otlp": {"endpoint": receiver.endpoint, "protocol": "http/protobuf",
                                           "compression": "gzip"}})
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / "agent.log", "w+")
    proc = subprocess.Popen([*HOSTAGENT, "run", "--config", str(path)], cwd=ROOT, env=clean_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "ebpf_probes on=process" not in open(tmp / "agent.log").read():
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp / "agent.log").read()
            time.sleep(0.2)
        proc.receiver = receiver
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        receiver.stop()


def _records(receiver, event, pids=None):
    return [attributes(r) for _, _, r in receiver.all_logs()
            if r.event_name == event and (pids is None or attributes(r)["process.pid"] in pids)]


def _wait_records(receiver, event, pids, count, timeout=30, mine=lambda a: True):
    """The `event` records of `pids`, once `count` of them satisfy `mine` (or at the timeout)."""
    receiver.wait_for(lambda rec: sum(bool(mine(a)) for a in _records(rec, event, pids)) >= count, timeout)
    return _records(receiver, event, pids)


@contextlib.contextmanager
def pid_pressure(free: int):
    """Lower kernel.pid_max so that only about `free` pids are left to hand out: new processes
    soon get pids that others had a moment ago. Restored on exit."""
    with open("/proc/sys/kernel/pid_max") as f:
        saved = f.read().strip()
    used = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                used.update(int(t) for t in os.listdir(f"/proc/{p}/task"))
    top, left = 300, free                       # pids below 300 are never handed out again
    while left:
        top += 1
        left -= top not in used
    try:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(str(top + 1))
        yield
    finally:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(saved)


@needs_root
def test_recycled_pids_never_get_a_previous_owners_identity(agent):
    """Under pid_max pressure each pid is handed out several times within seconds. Every exec and
    exit record is checked against what this test spawned: the command line (each process has its
    own token) must be the one of the process that had that pid then, with its own exit status."""
    run = uuid.uuid4().hex[:8]
    spawned = []                                  # (pid, token, exit code), in spawn order
    with pid_pressure(free=250):
        for i in range(1200):
            token = f"tok-{run}-{i}"
            p = subprocess.Popen(["/bin/sh", "-c", f"exit {i % 200}", token])
            spawned.append((p.pid, token, i % 200))
            p.wait()
    pids = {pid for pid, _, _ in spawned}
    assert len(pids) < len(spawned) / 3, "pids were not reused: no pressure"
    by_token = {token: (pid, code) for pid, token, code in spawned}

    def token_of(a):
        words = [w for w in a.get("process.command_line", "").split() if w.startswith(f"tok-{run}-")]
        assert len(words) <= 1, a
        return words[0] if words else None

    execs = _wait_records(agent.receiver, "process.exec", pids, len(spawned), 60, token_of)
    exits = _wait_records(agent.receiver, "process.exit", pids, len(spawned), 60,
                          lambda a: a.get("process.parent_pid") == os.getpid())
    execs = [a for a in execs if token_of(a)]
    assert len(execs) == len(spawned)
    creation = {}
    for a in execs:
        pid, _ = by_token[token_of(a)]
        assert a["process.pid"] == pid, a
        creation[token_of(a)] = a["process.creation.time"]
    ours = [a for a in exits if a.get("process.parent_pid") == os.getpid() and a["process.pid"] in pids]
    assert len(ours) >= len(spawned)
    enriched = [a for a in ours if token_of(a)]
    for a in enriched:
        pid, code = by_token[token_of(a)]
        assert (a["process.pid"], a["process.exit.code"]) == (pid, code), a
        assert a["process.creation.time"] == creation[token_of(a)], a
    assert len(enriched) == len(spawned), f"{len(spawned) - len(enriched)} exit records without their identity"


def _in_cgroup(directory: str):
    def enter():
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write("0")
    return enter


@contextlib.contextmanager
def cgroup_dir(path: str):
    os.makedirs(path)
    try:
        yield path
    finally:
        chain = []
        while path.count("/") > 4:                # up to the one below the hierarchy's root
            chain.append(path)
            path = os.path.dirname(path)
        remove_cgroups(*chain)


def _cgroup_root(kind: str) -> str:
    root = {"v2": "/sys/fs/cgroup/unified", "v1": "/sys/fs/cgroup/pids"}[kind]
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f}
    if root not in mounts and kind == "v2" and "/sys/fs/cgroup" in mounts:
        root = "/sys/fs/cgroup"                   # a pure cgroup v2 host
    if root not in mounts:
        pytest.skip(f"no {kind} cgroup mount at {root}")
    return root


@needs_root
@pytest.mark.parametrize("kind, layout", [
    ("v2", "hostagent-test-{run}.slice/cri-containerd-{id}.scope"),
    ("v2", "hostagent-test-{run}.slice/libpod-{id}.scope/container"),
    ("v1", "hostagent-test-{run}/docker/{id}"),
])
def test_records_of_a_process_in_a_container_cgroup_carry_its_container_id(agent, kind, layout):
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    path = os.path.join(_cgroup_root(kind), layout.format(run=uuid.uuid4().hex[:8], id=cid))
    marker = uuid.uuid4().hex                     # pids are recycled: find our records by it
    with cgroup_dir(path):
        p = subprocess.Popen(["/bin/sh", "-c", "sleep 0.5", marker], preexec_fn=_in_cgroup(path))
        assert p.wait() == 0
        mine = lambda a: marker in a.get("process.command_line", "")  # noqa: E731
        execs = [a for a in _wait_records(agent.receiver, "process.exec", {p.pid}, 1, mine=mine) if mine(a)]
        exits = [a for a in _wait_records(agent.receiver, "process.exit", {p.pid}, 1, mine=mine) if mine(a)]
    assert len(execs) == len(exits) == 1
    for a in execs + exits:
        assert a.get("container.id") == cid, a
        assert cid in a["process.linux.cgroup"], a


SECRETS = [  # (argv, the secret values that must not leave the host)
    # a command's password options
    (["mysql", "-uroot", "-pMy5qlPa55"], ["My5qlPa55"]),
    (["mysqldump", "--password=DumpPa55", "db"], ["DumpPa55"]),
    (["mariadb", "-u", "app", "-pMaria77x"], ["Maria77x"]),
    (["redis-cli", "-a", "RedisPa55", "ping"], ["RedisPa55"]),
    (["sshpass", "-pSshPa55w0rd", "ssh", "host"], ["SshPa55w0rd"]),
    (["mongosh", "-u", "root", "-p", "MongoPa55"], ["MongoPa55"]),
    (["curl", "-u", "alice:CurlUserPa55", "https://example.com"], ["CurlUserPa55"]),
    (["curl", "--user", "alice:CurlUser2Pa55", "https://example.com"], ["CurlUser2Pa55"]),
    (["curl", "--user=bob:CurlUser3Pa55", "https://example.com"], ["CurlUser3Pa55"]),
    (["curl", "-x", "proxy:3128", "--proxy-user", "p:ProxyPa55", "https://x"], ["ProxyPa55"]),
    (["docker", "login", "-u", "me", "-p", "DockerLoginPa55", "registry.example.com"], ["DockerLoginPa55"]),
    (["podman", "login", "-p", "PodmanPa55", "quay.io"], ["PodmanPa55"]),
    (["ssh-keygen", "-t", "ed25519", "-N", "KeygenPhrase1", "-f", "/tmp/k"], ["KeygenPhrase1"]),
    (["sqlcmd", "-S", "db", "-U", "sa", "-P", "SqlCmdPa55"], ["SqlCmdPa55"]),
    (["ldapsearch", "-x", "-D", "cn=admin", "-w", "LdapBindPa55", "-b", "dc=x"], ["LdapBindPa55"]),
    (["zip", "-P", "ZipPa55", "out.zip", "f"], ["ZipPa55"]),
    (["7z", "a", "-pSevenZipPa55", "out.7z", "f"], ["SevenZipPa55"]),
    (["smbclient", "//srv/share", "-U", "user%SmbPa55"], ["SmbPa55"]),
    # wrappers hide nothing
    (["timeout", "5", "mysql", "-pTimeoutPa55"], ["TimeoutPa55"]),
    (["sh", "-c", "mysql -uroot -pShellMysqlPa55 -e 'select 1'"], ["ShellMysqlPa55"]),
    (["bash", "-c", "exec mysql -pBashMysqlPa55"], ["BashMysqlPa55"]),
    (["env", "LANG=C", "mysql", "-pEnvMysqlPa55"], ["EnvMysqlPa55"]),
    (["sudo", "-u", "mysql", "mysql", "-pSudoMysqlPa55"], ["SudoMysqlPa55"]),
    (["nice", "-n", "10", "mysqldump", "-pNiceMysqlPa55", "db"], ["NiceMysqlPa55"]),
    (["nohup", "redis-cli", "-a", "NohupRed1sPa55"], ["NohupRed1sPa55"]),
    (["xargs", "-n1", "mysql", "-pXargsMysqlPa55"], ["XargsMysqlPa55"]),
    (["/usr/bin/timeout", "-s", "KILL", "30", "/usr/bin/mysql", "-pAbsPathPa55"], ["AbsPathPa55"]),
    (["sh", "-c", "curl -u ops:ShellCurlPa55 https://x | jq ."], ["ShellCurlPa55"]),
    (["sh", "-c", "docker login -u ci -p ShellDockerPa55 reg"], ["ShellDockerPa55"]),
    (["sh", "-c", "DB_PASSWORD=ShellPa55 ./run"], ["ShellPa55"]),
    (["ssh", "host", "mysql -pRemoteMysqlPa55"], ["RemoteMysqlPa55"]),
    # options and keys with a secret name, any spelling
    (["app", "--password", "SepPa55"], ["SepPa55"]),
    (["app", "--db-password=GluedPa55"], ["GluedPa55"]),
    (["app", "--db-password:ColonPa55"], ["ColonPa55"]),
    (["app", "--token", "ghp_T0kenValue1"], ["ghp_T0kenValue1"]),
    (["app", "--api-token=T0kenValue2"], ["T0kenValue2"]),
    (["app", "--client-secret", "Cl1entSecret"], ["Cl1entSecret"]),
    (["app", "--passwd", "PasswdValue"], ["PasswdValue"]),
    (["app", "--apikey=ApiKeyValue"], ["ApiKeyValue"]),
    (["app", "--pass", "ShortPassValue"], ["ShortPassValue"]),
    (["redis-cli", "--pass", "RedisLongPa55"], ["RedisLongPa55"]),
    (["mysql", "--password", "-DashValuePa55"], ["-DashValuePa55"]),
    (["app", "--secretKey=CamelSecretKey1"], ["CamelSecretKey1"]),
    (["app", "--accessKey", "CamelAccessKey2"], ["CamelAccessKey2"]),
    (["app", "--credentials=CredValue1"], ["CredValue1"]),
    (["app", "--creds", "CredValue2"], ["CredValue2"]),
    (["app", "--auth", "AuthValue1"], ["AuthValue1"]),
    (["app", "--auth-token=AuthValue2"], ["AuthValue2"]),
    (["app", "-password", "SingleDashPa55"], ["SingleDashPa55"]),
    (["app", "--DB_PASS=UpperPa55"], ["UpperPa55"]),
    (["app", "--private-key", "PrivKeyValue1"], ["PrivKeyValue1"]),
    (["app", "--ssh_key=SshKeyValue1"], ["SshKeyValue1"]),
    (["app", "--session-cookie", "CookieValue1"], ["CookieValue1"]),
    (["openssl", "rsa", "-in", "k.pem", "-passin", "pass:OpensslPa55"], ["OpensslPa55"]),
    (["openssl", "enc", "-aes256", "-pass", "pass:OpensslEncPa55"], ["OpensslEncPa55"]),
    (["openssl", "pkcs12", "-export", "-passout", "pass:OpensslOutPa55"], ["OpensslOutPa55"]),
    (["wget", "--http-password=WgetPa55", "https://x"], ["WgetPa55"]),
    (["vault", "login", "-method=userpass", "password=VaultPa55"], ["VaultPa55"]),
    # environment variables
    (["env", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "true"], ["wJalrXUtnFEMI"]),
    (["env", "STRIPE_API_KEY=sk_live_abc123", "true"], ["sk_live_abc123"]),
    (["env", "APP_SECRET=AppS3cr3t", "DB_PASSWORD=DbPa55", "true"], ["AppS3cr3t", "DbPa55"]),
    (["env", "PGPASSWORD=PgEnvPa55", "psql"], ["PgEnvPa55"]),
    (["env", "GITHUB_TOKEN=ghp_EnvT0ken", "gh"], ["ghp_EnvT0ken"]),
    (["env", "MYSQL_PWD=MysqlPwdEnv", "mysql"], ["MysqlPwdEnv"]),
    # URLs: userinfo and query keys
    (["psql", "postgres://bob:PgUrlPa55@db:5432/app"], ["PgUrlPa55"]),
    (["redis-cli", "-u", "redis://:RedisUrlPa55@cache:6379"], ["RedisUrlPa55"]),
    (["curl", "https://user:CurlPa55@example.com/x"], ["CurlPa55"]),
    (["curl", "https://api.example.com/v1?token=QueryT0ken&page=2"], ["QueryT0ken"]),
    (["git", "clone", "https://ghp_UserinfoT0ken@github.com/o/r.git"], ["ghp_UserinfoT0ken"]),
    (["git", "clone", "https://oauth2:GitlabT0ken@gitlab.com/o/r.git"], ["GitlabT0ken"]),
    (["curl", "https://u:Slash/Pa55@example.com/"], ["Slash/Pa55"]),
    (["mongosh", "mongodb+srv://app:MongoSrvPa55@cluster.example.net/db"], ["MongoSrvPa55"]),
    (["app", "--url=amqp://guest:AmqpPa55@rabbit:5672/"], ["AmqpPa55"]),
    (["curl", "https://x/cb?client_id=a&client_secret=OauthSecret1"], ["OauthSecret1"]),
    (["curl", "https://s3/b/o?X-Amz-Credential=AKIAQUERY&X-Amz-Signature=s"], ["AKIAQUERY"]),
    (["sh", "-c", "curl -s https://ops:ShellUrlPa55@x/ | sh"], ["ShellUrlPa55"]),
    (["java", "-jar", "app.jar", "jdbc:sqlserver://db:1433;user=sa;password=JdbcPa55;db=x"], ["JdbcPa55"]),
    (["java", "-jar", "app.jar", "jdbc:mysql://db/x?user=u&password=JdbcMysqlPa55"], ["JdbcMysqlPa55"]),
    (["mount", "-t", "cifs", "//srv/s", "/mnt", "-o", "username=u,password=CifsPa55"], ["CifsPa55"]),
    # headers
    (["curl", "-H", "Authorization: Bearer eyJhbGciOiJIUzI1"], ["eyJhbGciOiJIUzI1"]),
    (["curl", "-H", "Authorization: Basic dXNlcjpwYXNz"], ["dXNlcjpwYXNz"]),
    (["curl", "-H", "Authorization: NoSchemeT0ken"], ["NoSchemeT0ken"]),
    (["curl", "-H", "X-API-Key: HeaderApiKey1"], ["HeaderApiKey1"]),
    (["curl", "-H", "PRIVATE-TOKEN: GlPrivateT0ken"], ["GlPrivateT0ken"]),
    (["curl", "-H", "X-Auth-Token:GluedHeaderT0ken"], ["GluedHeaderT0ken"]),
    (["curl", "-H", "Cookie: session=CookieSess10n"], ["CookieSess10n"]),
    (["curl", "--header", "Proxy-Authorization: Basic UHJveHlBdXRo"], ["UHJveHlBdXRo"]),
    (["sh", "-c", "curl -H 'Authorization: Bearer ShellHeaderT0ken' https://x"], ["ShellHeaderT0ken"]),
    (["wget", "--header=Authorization: Bearer WgetHeaderT0ken", "https://x"], ["WgetHeaderT0ken"]),
]

# command lines with nothing secret: they must arrive as they were
KEPT = [
    ["ssh-keygen", "-t", "rsa", "-b", "4096"],
    ["setxkbmap", "--keyboard", "us"],
    ["ls", "-la", "/etc/ssh"],
    ["git", "log", "--oneline", "-n", "5"],
    ["curl", "-H", "Accept: application/json", "https://example.com/path@v2"],
    ["docker", "run", "-p", "8080:80", "nginx"],
    ["psql", "-h", "db", "-U", "app", "-c", "select 1"],
]


@needs_root
def test_no_secret_from_a_command_line_appears_in_any_exported_byte(agent):
    """Each command line runs for real (as /bin/true with those arguments); the process probe
    captures it, and not one secret is in the bytes the receiver got; the ones with nothing to
    hide arrive whole."""
    assert len(SECRETS) >= 80
    marker = uuid.uuid4().hex
    pids = set()
    for argv in [a for a, _ in SECRETS] + KEPT:
        p = subprocess.Popen([*argv, marker], executable="/bin/true")
        pids.add(p.pid)
        assert p.wait() == 0
    count = len(SECRETS) + len(KEPT)
    mine = lambda a: marker in a.get("process.command_line", "")  # noqa: E731  (pids are recycled)
    execs = _wait_records(agent.receiver, "process.exec", pids, count, mine=mine)
    _wait_records(agent.receiver, "process.exit", pids, count, mine=mine)
    lines = [a["process.command_line"] for a in execs if marker in a.get("process.command_line", "")]
    assert len(lines) == count, lines                 # every command line was recorded (redacted)
    time.sleep(1.5)                                   # the agent's own metrics and later batches too
    wire = b"".join(agent.receiver.bodies)
    assert marker.encode() in wire
    leaked = [secret for _, secrets in SECRETS for secret in secrets if secret.encode() in wire]
    assert not leaked, f"{len(leaked)} of {len(SECRETS)} leaked: {leaked}"
    assert sum("***" in line for line in lines) == len(SECRETS), lines
    for argv in KEPT:
        assert " ".join([*argv, marker]) in lines, (argv, lines)


@needs_root
def test_process_scraper_resources_carry_the_container_of_their_cgroup():
    from agent.sources.process import ProcessScraper
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    path = os.path.join(_cgroup_root("v2"), f"hostagent-test-{uuid.uuid4().hex[:8]}.slice/docker-{cid}.scope")
    cfg = ProcessScraperConfig(enabled=True, include=("sleep",))
    with cgroup_dir(path):
        p = subprocess.Popen(["sleep", "30"], preexec_fn=_in_cgroup(path))
        try:
            scraper = ProcessScraper(cfg, SelfMetrics(), Resource((("host.name", "t"),)), EnrichmentConfig())
            mine = [dict(g.resource.attributes) for g in scraper.collect()
                    if dict(g.resource.attributes)["process.pid"] == p.pid]
            again = [dict(g.resource.attributes) for g in scraper.collect()   # from its cache
                     if dict(g.resource.attributes)["process.pid"] == p.pid]
        finally:
            p.kill()
            p.wait()
    assert len(mine) == len(again) == 1
    for a in mine + again:
        assert a["container.id"] == cid and a["linux.systemd.unit"] == f"docker-{cid}.scope"
        assert a["process.command_line"] == "sleep 30"
    assert scraper._static.l1_hits + scraper._static.l2_hits >= 1


@needs_root
def test_command_lines_can_be_switched_off_entirely():
    from agent.sources.ebpf.source import EbpfSource
    from agent.sources.ebpf.registry import PROBES
    off = EnrichmentConfig(command_line=False)
    only_process = EbpfConfig(probes={name: ProbeConfig(enabled=name == "process") for name in PROBES})
    src = EbpfSource(only_process, SelfMetrics(), Resource(()), enrichment=off)
    try:
        process = [s for s in src.statuses if s.name == "process"][0]
        assert process.on and not any(tp.startswith("syscalls:") for tp in process.tracepoints)
        events = Events()
        src.start(events.emit)
        marker = uuid.uuid4().hex
        p = subprocess.Popen(["/bin/true", "--password", marker])
        p.wait()
        records = events.wait_for("process.exec", {p.pid}, 1) + events.wait_for("process.exit", {p.pid}, 1)
    finally:
        src.close()
    assert len(records) == 2
    enricher = ProcessEnricher(off, SelfMetrics())
    out = _enrich(enricher, *records)
    assert not any("process.command_line" in a for a in out)
    assert marker not in repr(out)
