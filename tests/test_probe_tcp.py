"""tcp on the real kernel, in a network namespace of its own with packets dropped by nftables:
retransmits equal the namespace's TcpRetransSegs, opens and lifetimes match the connections
made, a connection refused is one reset each way."""
import ctypes as ct
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from agent.model import MetricKind
from agent.sources.ebpf.loader import tracepoint_available, tracepoint_fields
from agent.sources.ebpf.tcp import TcpKey, TcpProbe
from tests.ebpf_helpers import attached, misses

CONNECTIONS, MESSAGES = 8, 20

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


@pytest.fixture
def netns():
    """A fresh network namespace with lo up; deleted (with its nft rules) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    name = f"hostagent-tcp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def port():
    return random.randrange(20000, 30000)


@pytest.fixture
def probe(port):
    """The probe limited to `port`, compiled, attached and set up by the loader."""
    with attached(TcpProbe(target_port=port)) as p:
        yield p


def in_ns(ns, *cmd, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                          text=True, **kw)


def snmp_tcp(ns) -> dict:
    """The Tcp: counters of /proc/net/snmp in the namespace."""
    lines = [l.split() for l in in_ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if l.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def read(p):
    ms = {m.name: m for m in p.collect(time.time_ns(), 0)}
    for name in (TcpProbe.RETRANSMITS, TcpProbe.RESETS, TcpProbe.OPENED):
        assert ms[name].kind == MetricKind.SUM and ms[name].monotonic

    def by_attr(name):      # {value of the one attribute: count}
        return {pt.attributes[0][1]: pt.value for pt in ms[name].points}
    lifetimes = {}
    if TcpProbe.DURATION in ms:
        assert ms[TcpProbe.DURATION].unit == "ns"
        lifetimes = {dict(pt.attributes)["direction"]: pt for pt in ms[TcpProbe.DURATION].points}
    return {"retransmits": ms[TcpProbe.RETRANSMITS].points[0].value,
            "resets": by_attr(TcpProbe.RESETS), "opened": by_attr(TcpProbe.OPENED),
            "lifetimes": lifetimes}


def test_key_layout_matches_bpf(probe):
    key = probe.lifetime.Key
    assert ct.sizeof(key) == ct.sizeof(TcpKey)
    assert [(n, getattr(key, n).offset) for n, _ in key._fields_] == \
        [(n, getattr(TcpKey, n).offset) for n, _ in TcpKey._fields_]


def test_refused_connection_is_one_reset_each_way(probe, netns, port):
    mib0 = snmp_tcp(netns)
    before = read(probe)
    skipped0 = misses(probe, "tcp_send_reset", "tcp_receive_reset")
    assert in_ns(netns, sys.executable, "-c", WORKLOAD, "refused", str(port), timeout=30).stdout.strip() == "refused"
    after = read(probe)
    mib1 = snmp_tcp(netns)
    sent = after["resets"]["transmit"] - before["resets"]["transmit"]
    received = after["resets"]["receive"] - before["resets"]["receive"]
    skipped = misses(probe, "tcp_send_reset", "tcp_receive_reset") - skipped0
    assert sent + received + skipped == 2 and sent <= 1 and received <= 1
    assert sent <= mib1["OutRsts"] - mib0["OutRsts"] == 1
    assert after["opened"] == before["opened"]


def test_lossy_connections_retransmits_opens_and_lifetimes(probe, netns, port):
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (nft)")
    in_ns(netns, "nft", "-f", "-", input=DROP_RULES)
    before = read(probe)
    mib0 = snmp_tcp(netns)
    skipped0 = misses(probe, "tcp_retransmit_skb", "tcp_retransmit_synack")
    lost0 = misses(probe, "inet_sock_set_state")
    out = in_ns(netns, sys.executable, "-c", WORKLOAD, "traffic", str(port), str(CONNECTIONS),
                str(MESSAGES), timeout=300)
    assert out.stdout.strip() == "ok"
    # both ends of every connection reach CLOSE (the last FINs may still be retransmitted)
    deadline = time.monotonic() + 120
    while True:
        now = read(probe)
        closed = sum(pt.count for pt in now["lifetimes"].values()) - \
            sum(pt.count for pt in before["lifetimes"].values())
        lost = misses(probe, "inet_sock_set_state") - lost0
        if closed + lost >= 2 * CONNECTIONS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    mib1 = snmp_tcp(netns)
    after = read(probe)
    # events the kernel skipped (another BPF program was running on the CPU) are counted apart
    skipped = misses(probe, "tcp_retransmit_skb", "tcp_retransmit_synack") - skipped0
    lost = misses(probe, "inet_sock_set_state") - lost0

    retransmits = after["retransmits"] - before["retransmits"]
    assert retransmits + skipped == mib1["RetransSegs"] - mib0["RetransSegs"]
    assert retransmits > 0
    for direction in ("active", "passive"):
        assert CONNECTIONS - lost <= after["opened"][direction] - before["opened"][direction] <= CONNECTIONS
        pt = after["lifetimes"][direction]
        n0 = before["lifetimes"][direction].count if direction in before["lifetimes"] else 0
        assert CONNECTIONS - lost <= pt.count - n0 <= CONNECTIONS
        assert sum(pt.positive_counts) + pt.zero_count == pt.count
        # each connection sent MESSAGES messages 5 ms apart: lives at least 100 ms
        assert 2 ** (pt.positive_offset + len(pt.positive_counts)) >= 100_000_000


def test_cflags_follow_the_tracepoint_formats():
    if not tracepoint_available("tcp:tcp_send_reset"):
        pytest.skip("no tcp tracepoints")
    flags = TcpProbe(target_port=8080).cflags(TcpProbe.tracepoints)
    assert "-DTARGET_PORT=8080" in flags
    assert ("-DTCP_RETRANSMIT_HAS_ERR" in flags) == ("err" in tracepoint_fields("tcp:tcp_retransmit_skb"))
    assert ("-DTCP_SEND_RESET_SOCKADDR" in flags) == ("sport" not in tracepoint_fields("tcp:tcp_send_reset"))
    assert TcpProbe().cflags(TcpProbe.tracepoints) == [f for f in flags if not f.startswith("-DTARGET_PORT")]
