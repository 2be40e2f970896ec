"""Code shared by several test modules: running the agent and reading its output, checking what a
receiver got, servers and certificates for the exporters, eBPF event collectors. Fixtures are in
conftest.py; a test module imports from here, never from another test module."""
import collections
import ctypes
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.config import merge
from agent.export.encoding import Payload, encode_metrics
from agent.model import Metric, MetricGroup, MetricKind, NumberPoint, Resource, Scope
from agent.procfs.cgroupfs import v1_mounts
from agent.procfs.identity import cgroup2_mount, container_id
from agent.sources.ebpf import maps
from agent.sources.ebpf.maps import BpfMap
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, attributes

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
    return merge(cfg, overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_log(proc) -> str:
    proc.log_file.seek(0)
    return proc.log_file.read()


def wait_for_log(proc, text, count=1, timeout=60):
    """Until the agent's log holds `text` `count` times; fails with the log if the agent exits or
    the time runs out first."""
    deadline = time.monotonic() + timeout
    while agent_log(proc).count(text) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent_log(proc).count(text) >= count, f"no {text!r} (x{count}) in the log:\n{agent_log(proc)[-3000:]}"


def doc_rows() -> dict:
    """docs/configuration.md's key table: {key: (default, meaning)}."""
    rows = {}
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if line.startswith("| `") and len(cells) == 3:
                rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


# --- end-to-end delivery: what the receivers got ---------------------------------------------------

CPU_SCOPE = "hostagent/scrapers/cpu"


def delivery_config(tmp_path, endpoint, exporter=None, **over) -> dict:
    """An agent sending to `endpoint` over gRPC with its persistent queue under tmp_path."""
    exp = {"type": "otlp", "otlp": {"endpoint": endpoint},
           "retry": {"initial_interval": "200ms", "max_interval": "1s"}}
    for k, v in (exporter or {}).items():
        exp[k] = {**exp.get(k, {}), **v} if isinstance(v, dict) else v
    over.setdefault("state_dir", str(tmp_path / "state"))
    return base_config(tmp_path, exporter=exp, **over)


def wait_until(predicate, timeout: float, proc=None, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None:
            assert proc.poll() is None, agent_log(proc)
        time.sleep(step)
    return predicate()


def cpu_points(receivers) -> collections.Counter:
    """How often each system.cpu.time point (attributes, time) arrived, over all receivers."""
    seen = collections.Counter()
    for rec in receivers:
        with rec._cond:
            metrics = list(rec.all_metrics())
        for _, _, m in metrics:
            if m.name == "system.cpu.time":
                for p in m.sum.data_points:
                    seen[(tuple(sorted(attributes(p).items())), p.time_unix_nano)] += 1
    return seen


def self_metric(receivers, name: str, window=None, **attrs) -> float:
    """The largest value the agent exported for one of its own counters (cumulative: the last),
    among points with a time in `window` (start, end ns) if given."""
    return self_metric_point(receivers, name, window, **attrs)[0]


def self_metric_point(receivers, name: str, window=None, **attrs) -> tuple:
    """(value, time) of the point with the largest value of one of the agent's own counters."""
    best = (0, 0)
    for rec in receivers:
        with rec._cond:
            metrics = list(rec.all_metrics())
        for _, _, m in metrics:
            if m.name == name:
                kind = m.WhichOneof("data")
                for p in getattr(m, kind).data_points:
                    a = attributes(p)
                    if window and not window[0] <= p.time_unix_nano <= window[1]:
                        continue
                    if all(a.get(k) == v for k, v in attrs.items()):
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        best = max(best, (value, p.time_unix_nano))
    return best


def check_exact(seen, receivers, run, whole: bool) -> int:
    """In one agent run (start, end ns): the agent's own count of the cpu points it collected, as
    of its last exported count, equals the distinct system.cpu.time points that arrived up to
    then. `whole`: the run ended cleanly, so that count came after its last collection."""
    produced, at = self_metric_point(receivers, "hostagent.pipeline.incoming_items", run, scope=CPU_SCOPE)
    assert produced, f"run {run}: no count of collected points arrived"
    arrived = sum(1 for _, t in seen if run[0] <= t <= at)
    assert arrived == produced, f"run {run}: {produced} cpu points collected, {arrived} distinct arrived"
    if whole:
        later = sum(1 for _, t in seen if at < t <= run[1])
        assert not later, f"run {run}: {later} cpu points collected after the agent's last count"
    return produced


def check_complete(receivers, runs=((0, 2**63),)) -> dict:
    """Every collection's full set of system.cpu.time points arrived, and for each agent run
    (start, end ns; each ended cleanly) exactly as many distinct points as the agent says its cpu
    scraper produced in it. Returns figures for the caller's asserts."""
    seen = cpu_points(receivers)
    by_time = collections.defaultdict(set)
    for attrs, t in seen:
        by_time[t].add(attrs)
    times = sorted(by_time)
    series = by_time[times[0]]
    missing = {t: len(series - s) for t, s in by_time.items() if s != series}
    assert not missing, f"incomplete collections (timestamp: missing series): {missing}"
    for run in runs:
        check_exact(seen, receivers, run, whole=True)
    return {"collections": len(times), "points": len(seen), "duplicates": sum(seen.values()) - len(seen),
            "times": times}


# --- waits, hangs, cgroups ---------------------------------------------------------------------

# How long a call may run before a test calls it hung. Tests never assert how long something took:
# they make the wrong behaviour take far longer than this (an hour's wait, a server that never
# answers), so a busy machine cannot fail them and a regression cannot hang the suite.
HANG_LIMIT = 60.0


def finishes(fn, *args, **kwargs):
    """fn(*args, **kwargs)'s result; an AssertionError if it is still running after HANG_LIMIT."""
    result, error = [], []

    def call():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            error.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(HANG_LIMIT)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {HANG_LIMIT:.0f} s"
    if error:
        raise error[0]
    return result[0]


def remove_cgroups(*paths) -> None:
    """Remove cgroup directories in the order given (innermost first). A cgroup stays busy until its
    last process is reaped, so each removal is tried again for up to 5 s; one already gone is fine."""
    for path in paths:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


class OwnCgroups:
    """cgroups a test makes under the cgroup v2 mount, with the same paths in the v1 hierarchies
    named in `v1` (cpuacct, memory, blkio), as systemd makes them on hybrid hosts; and processes
    started in them. close() kills the processes and removes the cgroups, innermost first."""

    def __init__(self, v1=()):
        self.v2 = cgroup2_mount()
        assert self.v2, "no cgroup2 mount"
        mounts = v1_mounts()
        self.roots = [self.v2] + [mounts[c] for c in v1 if c in mounts]
        self.made: list = []
        self.procs: list = []

    def make(self, rel, v1: bool = True):
        """mkdir every level of `rel` (str or bytes, from the v2 root) that is not there yet."""
        rel = os.fsencode(rel)
        for root in self.roots if v1 else self.roots[:1]:
            path = os.fsencode(root)
            for part in rel.strip(b"/").split(b"/"):
                path += b"/" + part
                if not os.path.isdir(path):
                    os.mkdir(path)
                    self.made.append(path)
        return rel

    def move(self, rel, pid: int) -> None:
        rel = os.fsencode(rel)
        for root in self.roots:
            if os.path.isdir(os.fsencode(root) + rel):
                with open(os.fsencode(root) + rel + b"/cgroup.procs", "w") as f:
                    f.write(str(pid))

    def start(self, rel, code: str) -> subprocess.Popen:
        """A Python child running `code`, moved into `rel` before it reads its first stdin line
        (code that must run inside the cgroup waits for it: `sys.stdin.readline()`)."""
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        self.move(rel, proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        remove_cgroups(*reversed(self.made))


class RecordingEvent(threading.Event):
    """An abort event that is never set and records each wait asked of it, returning at once: the
    waits a sender chose, without spending them."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return False


# --- OTLP servers scripted by a test ------------------------------------------------------------

def point_ids(requests) -> list:
    return sorted(p.as_int for req in requests for rm in req.resource_metrics for sm in rm.scope_metrics
                  for m in sm.metrics for p in m.sum.data_points)


class ScriptedGrpcServer:
    """An OTLP metrics service answering from `script`: each call takes the next answer
    (code, details, retry delay or None, partial-success response or None); OK once it is empty."""

    def __init__(self, max_receive: int = -1):
        self.script: list = []
        self.calls: list = []  # (monotonic time, ExportMetricsServiceRequest or None)
        self.lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export, request_deserializer=None,
                                                           response_serializer=None)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler],
                                  options=[("grpc.max_receive_message_length", max_receive)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server.start()

    def _export(self, body: bytes, context):
        with self.lock:
            self.calls.append((time.monotonic(), ExportMetricsServiceRequest.FromString(body)))
            answer = self.script.pop(0) if self.script else None
        if answer is None:
            return b""
        code, details, delay, response = answer
        if code is None:
            return response.SerializeToString()
        if delay is not None:
            info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                seconds=int(delay), nanos=int((delay % 1) * 1e9)))
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(code=code.value[0], message=details, details=[detail])
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        context.abort(code, details)

    def stop(self):
        self.server.stop(None)


# --- certificates and TLS receivers -------------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signer, ca=False, names=(), ips=(), client=False):
    now = datetime.datetime.utcnow()
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(signer, hashes.SHA256())


class Pki:
    """A CA with a server certificate for 127.0.0.1/localhost, one for collector.test only, and a
    client certificate; plus an unrelated CA. Files under `path`."""

    def __init__(self, path):
        self.path = path
        ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._write("ca.pem", _cert("test ca", "test ca", ca_key, ca_key, ca=True))
        other_key = ec.generate_private_key(ec.SECP256R1())
        self.other_ca = self._write("other-ca.pem", _cert("other ca", "other ca", other_key, other_key, ca=True))
        for name, kw in (("server", dict(names=["localhost"], ips=["127.0.0.1"])),
                         ("named", dict(names=["collector.test"])),
                         ("client", dict(client=True))):
            key = ec.generate_private_key(ec.SECP256R1())
            setattr(self, name, (self._write(f"{name}.pem", _cert(name, "test ca", key, ca_key, **kw)),
                                 self._write(f"{name}.key", key)))

    def _write(self, name, obj):
        if isinstance(obj, x509.Certificate):
            data = obj.public_bytes(serialization.Encoding.PEM)
        else:
            data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        (self.path / name).write_bytes(data)
        return str(self.path / name)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def grpc_tls_receiver(pki, which="server", mtls=False) -> tuple:
    rec = GrpcReceiver()
    cert, key = getattr(pki, which)
    creds = grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(pki.ca) if mtls else None,
                                        require_client_auth=mtls)
    port = rec.server.add_secure_port("127.0.0.1:0", creds)
    return rec.start(), f"https://127.0.0.1:{port}"


def https_receiver(pki, which="server", mtls=False) -> tuple:
    rec = HttpReceiver()
    cert, key = getattr(pki, which)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if mtls:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    rec.server.socket = ctx.wrap_socket(rec.server.socket, server_side=True, do_handshake_on_connect=False)
    rec.server.handle_error = lambda request, address: None  # failed handshakes are the point here
    return rec.start(), f"https://127.0.0.1:{rec.port}"


def payload() -> Payload:
    """A metrics payload of one gauge point."""
    m = Metric("tls.test", "", "1", MetricKind.GAUGE, [NumberPoint((), 1, 1, 2)])
    return Payload("metrics", encode_metrics([MetricGroup(Resource((("host.name", "t"),)), Scope("t"), [m])]), 1)


# --- system calls a test makes and counts -------------------------------------------------------

SYSCALLS_FAILING, SYSCALLS_SUCCEEDING = 1000, 300
# Python code making SYSCALLS_FAILING fchdir() on a closed fd (EBADF) and SYSCALLS_SUCCEEDING
# getppid() calls; Python itself makes neither
SYSCALL_LOOP = f"""
import os
for _ in range({SYSCALLS_FAILING}):
    try:
        os.fchdir(999_999)
    except OSError:
        pass
for _ in range({SYSCALLS_SUCCEEDING}):
    os.getppid()
"""


def scrape_points(source) -> dict:
    """{(metric, attributes): value} of one scrape of a scraper."""
    return {(m.name, p.attributes): p.value for g in source.collect() for m in g.metrics for p in m.points}


# --- eBPF: events a source emits ------------------------------------------------------------------

class Events:
    """Collects what the source emits; waits for records about given pids."""

    def __init__(self):
        self.records = []
        self.cond = threading.Condition()

    def emit(self, batch):
        with self.cond:
            for group in batch.logs:
                self.records.extend(group.records)
            self.cond.notify_all()

    def of(self, event_name: str, pids) -> list:
        pids = set(pids)
        with self.cond:
            return [r for r in self.records
                    if r.event_name == event_name and dict(r.attributes).get("process.pid") in pids]

    def wait_for(self, event_name: str, pids, count: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.of(event_name, pids)) < count and time.monotonic() < deadline:
                self.cond.wait(0.1)
        time.sleep(0.5)               # anything extra would have arrived by now (polls <= 0.2 s apart)
        return self.of(event_name, pids)


# --- cgroups: short-lived ones, and what the file exporter wrote --------------------------------

def v2_cgroup_root() -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on a hybrid host)."""
    root = cgroup2_mount()
    assert root, "no cgroup2 mount"
    return root


def _enter_cgroup(directory: str):
    def enter():
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write("0")
    return enter


# cgroup layouts as container runtimes and systemd make them; {run} is unique to the test run,
# {id} a fresh 64-hex container id
CGROUP_LAYOUTS = (
    "hostagent-test-{run}.slice/docker-{id}.scope",                        # docker, systemd driver
    "hostagent-test-{run}/docker/{id}",                                    # docker, cgroupfs driver
    "hostagent-test-{run}.slice/pod{run}/cri-containerd-{id}.scope",       # kubelet, systemd driver
    "hostagent-test-{run}.slice/libpod-{id}.scope/container",              # podman
    "hostagent-test-{run}.slice/hostagent-test-{run}.service",             # a systemd service
)


def short_lived_cgroups(n: int, layouts=CGROUP_LAYOUTS, command=("/bin/true",), lifetime: float = 0.05) -> list:
    """Create n cgroups one after the other under the v2 mount, each for about `lifetime`
    seconds: make its directory chain, run `command` inside and wait for it, then remove the
    chain. Returns one dict per cgroup: pid (of the command), path (relative to the v2 root), id
    (its cgroup id: the directory's inode), container_id (or None)."""
    root = v2_cgroup_root()
    out = []
    for i in range(n):
        relative = "/" + layouts[i % len(layouts)].format(run=f"wl{os.getpid()}-{i}-{uuid.uuid4().hex[:6]}",
                                                            id=uuid.uuid4().hex + uuid.uuid4().hex)
        path = root + relative
        born = time.monotonic()
        try:
            os.makedirs(path)
            cid = os.stat(path).st_ino
            child = subprocess.Popen(list(command), preexec_fn=_enter_cgroup(path))
            child.wait()
            time.sleep(max(0.0, lifetime - (time.monotonic() - born)))
        finally:
            chain = []
            while path != root:
                chain.append(path)
                path = os.path.dirname(path)
            remove_cgroups(*chain)
        out.append({"pid": child.pid, "path": relative, "id": cid, "container_id": container_id(relative)})
    return out


def file_requests(path: str, kind):
    """The export requests (`kind`: ExportLogsServiceRequest or ExportMetricsServiceRequest) the
    file exporter wrote to `path` (its rotated files included), oldest first."""
    out = []
    for name in [f"{path}.{i}" for i in range(9, 0, -1)] + [path]:
        if os.path.exists(name):
            with open(name) as f:
                for line in f:
                    if line.endswith("\n"):             # a last line may be being written
                        out.append(json_format.Parse(line, kind()))
    return out


# --- block devices and BPF maps of the tests' own -----------------------------------------------

def diskstats(disk: str) -> dict:
    """{operation: (completed, milliseconds)} of `disk` in /proc/diskstats."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                v = list(map(int, fields[3:]))
                return {"read": (v[0], v[3]), "write": (v[4], v[7]), "discard": (v[11], v[14]),
                        "flush": (v[15], v[16])}
    raise AssertionError(f"{disk} not in /proc/diskstats")


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 16 MiB file, ours alone; its I/O scheduler put back and the device
    detached afterwards."""
    if shutil.which("losetup") is None:
        pytest.skip("needs losetup")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    scheduler = f"/sys/block/{os.path.basename(dev)}/queue/scheduler"
    with open(scheduler) as f:
        chosen = f.read().split("[", 1)[-1].split("]", 1)[0]
    try:
        subprocess.run(["udevadm", "settle"], capture_output=True, timeout=10) \
            if shutil.which("udevadm") else None
        yield dev
    finally:
        with open(scheduler, "w") as f:
            f.write(chosen)
        subprocess.run(["losetup", "-d", dev], check=True)


BPF_MAP_CREATE = 0


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


def new_map(map_type: int, key_size: int, value_size: int, max_entries: int) -> BpfMap:
    """A BPF map made here in the kernel (the caller closes its fd)."""
    fd = maps.bpf(BPF_MAP_CREATE, _CreateAttr(map_type, key_size, value_size, max_entries, 0))
    return BpfMap.from_fd(fd)


# --- TCP traffic in network namespaces (tests/test_probe_tcp.py, tests/test_attribution_tcp.py) ---

# Run inside the namespace: "refused PORT" connects to a closed port; "traffic PORT N M" serves N
# connections and makes them, each sending M small messages, then closing.
WORKLOAD = r"""
import socket, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
if mode == "refused":
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        print("refused")
    sys.exit(0)
n, msgs = int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
def serve(conn):
    while conn.recv(4096):
        pass
    conn.close()
def accept_all():
    servers = []
    for _ in range(n):
        conn, _ = srv.accept()
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        servers.append(t)
    for t in servers:
        t.join()
def client():
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    for _ in range(msgs):
        c.sendall(b"x" * 100)
        time.sleep(0.005)
    c.close()
acceptor = threading.Thread(target=accept_all)
acceptor.start()
clients = [threading.Thread(target=client) for _ in range(n)]
for t in clients:
    t.start()
for t in clients + [acceptor]:
    t.join()
print("ok")
"""

DROP_RULES = """
table inet hostagent_test {
    chain pre {
        type filter hook prerouting priority 0;
        meta l4proto tcp numgen random mod 100 < 25 drop
    }
}
"""


def in_ns(ns, *cmd, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                          text=True, **kw)


def snmp_tcp(ns) -> dict:
    """The Tcp: counters of /proc/net/snmp in the namespace."""
    lines = [l.split() for l in in_ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if l.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def open_sockets(ns, port) -> int:
    """TCP sockets of `port` in the namespace that may still retransmit (TIME_WAIT cannot)."""
    out = in_ns(ns, "ss", "-Htan", "exclude", "time-wait", f"( sport = :{port} or dport = :{port} )").stdout
    return len(out.splitlines())
