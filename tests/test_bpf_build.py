"""bpf/build.sh: every probe compiles to a CO-RE object with BTF, its programs and maps; the objects
load and attach on this kernel through the system libbpf (no agent code), and count what they see."""
import ctypes as ct
import os
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPF_DIR = os.path.join(REPO, "bpf")
BUILD = os.path.join(BPF_DIR, "build.sh")

# probe -> (programs {name: section}, maps); the loader relies on these names (bpf/README.md)
RING_MAPS = {"ha_ringbuf_dropped", "ha_ringbuf_unwoken"}


def KEYED_MAPS(*names) -> set:
    """Maps keyed by cgroup with their overflow companions, and maps.h's event counter."""
    return {"ha_events"} | set(names) | {f"{n}_overflow" for n in names}


EXPECTED = {
    "runqlat": ({"sched__sched_wakeup": "tp/sched/sched_wakeup",
                 "sched__sched_wakeup_new": "tp/sched/sched_wakeup_new",
                 "sched__sched_switch": "tp/sched/sched_switch",
                 "tp_btf__sched_wakeup": "tp_btf/sched_wakeup",
                 "tp_btf__sched_wakeup_new": "tp_btf/sched_wakeup_new"},
                {"runq_queued", "runq_latency"} | KEYED_MAPS("runq_latency")),
    "signals": ({"signal__signal_generate": "tp/signal/signal_generate"},
                {"fatal_signals"} | RING_MAPS),
    "oom": ({"oom__mark_victim": "tp/oom/mark_victim"}, {"oom_events"} | RING_MAPS),
    "cgroups": ({"cgroup__cgroup_mkdir": "tp/cgroup/cgroup_mkdir"}, {"cgroup_events"} | RING_MAPS),
    "process": ({"task__task_newtask": "tp/task/task_newtask",
                 "sched__sched_process_exec": "tp/sched/sched_process_exec",
                 "sched__sched_process_exit": "tp/sched/sched_process_exit",
                 "syscalls__sys_enter_execve": "tp/syscalls/sys_enter_execve",
                 "syscalls__sys_enter_execveat": "tp/syscalls/sys_enter_execveat"},
                {"exec_events", "exit_events", "procs", "forks", "args_scratch", "pending_args"} | RING_MAPS),
    "syscalls": ({"raw_syscalls__sys_exit": "tp/raw_syscalls/sys_exit",
                  "raw_tp__sys_enter": "raw_tp/sys_enter",
                  "raw_tp__sys_exit": "raw_tp/sys_exit"},
                 {"syscall_counts", "syscall_starts"}
                 | KEYED_MAPS("syscall_errors", "syscall_calls", "syscall_latency")),
    "biolatency": ({"raw_tp__block_io_done": "raw_tp/block_io_done",
                    "raw_tp__block_rq_complete": "raw_tp/block_rq_complete",
                    "block__block_rq_issue": "tp/block/block_rq_issue",
                    "block__block_rq_complete": "tp/block/block_rq_complete",
                    "raw_tp__block_io_start": "raw_tp/block_io_start"},
                   {"bio_started", "bio_owners"} | KEYED_MAPS("bio_latency")),
    "tcp": ({"tcp__tcp_retransmit_skb": "tp/tcp/tcp_retransmit_skb",
             "tcp__tcp_retransmit_synack": "tp/tcp/tcp_retransmit_synack",
             "tcp__tcp_send_reset": "tp/tcp/tcp_send_reset",
             "tcp__tcp_receive_reset": "tp/tcp/tcp_receive_reset",
             "sock__inet_sock_set_state": "tp/sock/inet_sock_set_state"},
            {"tcp_counts", "tcp_misses", "tcp_connections", "tcp_lifetime"} | KEYED_MAPS("tcp_counts", "tcp_lifetime")),
}

TOOLS = ("clang-14", "bpftool")
needs_tools = pytest.mark.skipif(not all(map(shutil.which, TOOLS)) or not os.path.exists("/sys/kernel/btf/vmlinux"),
                                 reason="needs " + ", ".join(TOOLS) + " and /sys/kernel/btf/vmlinux")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")


def build(outdir, bpf_dir=BPF_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(bpf_dir, "build.sh"), str(outdir)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpf-build")
    start = time.monotonic()
    result = build(out)
    print(f"bpf/build.sh: {time.monotonic() - start:.2f} s for {len(EXPECTED)} objects")
    assert result.returncode == 0, result.stderr
    return out


def elf_sections(path) -> set:
    """Section names of a 64-bit little-endian ELF file (BPF objects are)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]

    def name(offset):
        start = strtab_offset + offset
        return data[start:data.index(b"\0", start)].decode()
    return {name(h[0]) for h in headers}


# --- a minimal libbpf binding, enough to open, load and attach an object ---------------------------------

class Libbpf:
    def __init__(self):
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        p = ct.c_void_p
        for fn, res, args in [
            ("bpf_object__open_file", p, [ct.c_char_p, p]),
            ("bpf_object__load", ct.c_int, [p]),
            ("bpf_object__close", None, [p]),
            ("bpf_object__next_program", p, [p, p]),
            ("bpf_object__next_map", p, [p, p]),
            ("bpf_program__name", ct.c_char_p, [p]),
            ("bpf_program__section_name", ct.c_char_p, [p]),
            ("bpf_program__attach", p, [p]),
            ("bpf_link__destroy", ct.c_int, [p]),
            ("bpf_map__name", ct.c_char_p, [p]),
            ("bpf_map__fd", ct.c_int, [p]),
            ("bpf_map__initial_value", p, [p, ct.POINTER(ct.c_size_t)]),
            ("bpf_map_lookup_elem", ct.c_int, [ct.c_int, p, p]),
            ("bpf_map_get_next_key", ct.c_int, [ct.c_int, p, p]),
            ("libbpf_num_possible_cpus", ct.c_int, []),
        ]:
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib = lib

    def _walk(self, next_fn, obj):
        item = next_fn(obj, None)
        while item:
            yield item
            item = next_fn(obj, item)

    def programs(self, obj) -> dict:
        return {self.lib.bpf_program__name(p).decode(): p for p in self._walk(self.lib.bpf_object__next_program, obj)}

    def maps(self, obj) -> dict:
        return {self.lib.bpf_map__name(m).decode(): m for m in self._walk(self.lib.bpf_object__next_map, obj)}


@pytest.fixture(scope="module")
def libbpf():
    return Libbpf()


class Opened:
    """An object opened (not loaded) through libbpf; closed (programs detached) on exit."""

    def __init__(self, libbpf, path):
        self.libbpf, self.lib = libbpf, libbpf.lib
        self.obj = self.lib.bpf_object__open_file(str(path).encode(), None)
        assert self.obj, f"{path}: {os.strerror(ct.get_errno())}"
        self.links = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for link in self.links:
            self.lib.bpf_link__destroy(link)
        self.lib.bpf_object__close(self.obj)

    def load_and_attach(self):
        assert self.lib.bpf_object__load(self.obj) == 0, f"load: {os.strerror(ct.get_errno())}"
        for name, prog in self.libbpf.programs(self.obj).items():
            link = self.lib.bpf_program__attach(prog)
            assert link, f"{name} did not attach: {os.strerror(ct.get_errno())}"
            self.links.append(link)

    def map_fd(self, name) -> int:
        return self.lib.bpf_map__fd(self.libbpf.maps(self.obj)[name])

    def percpu_sum(self, name, key) -> int:
        """The u64 at `key` (a u32 index, or the key's bytes) summed over CPUs; 0 if absent."""
        ncpus = self.lib.libbpf_num_possible_cpus()
        values = (ct.c_uint64 * ncpus)()
        k = ct.create_string_buffer(key, len(key)) if isinstance(key, bytes) else ct.c_uint32(key)
        if self.lib.bpf_map_lookup_elem(self.map_fd(name), ct.byref(k), values) != 0:
            return 0
        return sum(values)

    def has_keys(self, name, key_size) -> bool:
        key = ct.create_string_buffer(key_size)
        return self.lib.bpf_map_get_next_key(self.map_fd(name), None, key) == 0

    def rodata(self) -> ct.c_void_p:
        [rodata] = [m for n, m in self.libbpf.maps(self.obj).items() if n.endswith(".rodata")]
        size = ct.c_size_t()
        return self.lib.bpf_map__initial_value(rodata, ct.byref(size))


def poll(check, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not seen within {timeout:.0f} s: {what}"
        time.sleep(0.05)


# --- the build ----------------------------------------------------------------------------------------

def test_every_probe_has_an_expected_entry():
    sources = {f[:-len(".bpf.c")] for f in os.listdir(BPF_DIR) if f.endswith(".bpf.c")}
    assert sources == set(EXPECTED)


@needs_tools
@pytest.mark.parametrize("probe", sorted(EXPECTED))
def test_object_has_btf_programs_and_maps(objects, libbpf, probe):
    path = objects / f"{probe}.bpf.o"
    sections = elf_sections(path)
    assert {".BTF", ".BTF.ext", ".maps", "license"} <= sections
    assert not any(s.startswith(".debug_") for s in sections), "DWARF left in the object"
    programs, maps = EXPECTED[probe]
    with Opened(libbpf, path) as o:
        found = {name: libbpf.lib.bpf_program__section_name(p).decode()
                 for name, p in libbpf.programs(o.obj).items()}
        assert found == programs
        assert {m for m in libbpf.maps(o.obj) if "." not in m} == maps


@needs_tools
def test_build_fails_naming_the_broken_file(tmp_path):
    copy = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, copy, ignore=shutil.ignore_patterns("build"))
    (copy / "broken.bpf.c").write_text('#include "maps.h"\nthis is not C;\n')
    result = build(tmp_path / "out", copy)
    assert result.returncode != 0
    assert "broken.bpf.c" in result.stderr
    assert (tmp_path / "out" / "runqlat.bpf.o").exists(), "one broken file stopped the others"


# --- on this kernel, without the agent's loader -----------------------------------------------------

@needs_tools
@needs_root
@pytest.mark.parametrize("probe", sorted(EXPECTED))
def test_object_loads_and_attaches(objects, libbpf, probe):
    with Opened(libbpf, objects / f"{probe}.bpf.o") as o:
        o.load_and_attach()
        assert len(o.links) == len(EXPECTED[probe][0])


@needs_tools
@needs_root
def test_signals_parameter_set_before_load(objects, libbpf):
    """HA_FATAL_SIGNALS lives in .rodata: set to SIGUSR2 only, a SIGKILL is not counted."""
    with Opened(libbpf, objects / "signals.bpf.o") as o:
        ct.c_uint64.from_address(o.rodata()).value = 1 << signal.SIGUSR2
        o.load_and_attach()
        for sig in (signal.SIGUSR2, signal.SIGKILL):
            child = subprocess.Popen(["sleep", "60"])
            child.send_signal(sig)
            child.wait()
        poll(lambda: o.percpu_sum("fatal_signals", signal.SIGUSR2) >= 1, "SIGUSR2 counted")
        assert o.percpu_sum("fatal_signals", signal.SIGKILL) == 0


@needs_tools
@needs_root
def test_process_and_runqlat_count_a_child(objects, libbpf):
    with Opened(libbpf, objects / "process.bpf.o") as proc, Opened(libbpf, objects / "runqlat.bpf.o") as runq:
        proc.load_and_attach()
        runq.load_and_attach()
        subprocess.run(["true"], check=True)
        poll(lambda: proc.percpu_sum("forks", 0) >= 1, "a fork counted")
        poll(lambda: runq.has_keys("runq_latency", 4), "a run-queue wait recorded")


@needs_tools
@needs_root
def test_syscalls_counts_and_times(objects, libbpf):
    getppid = 110       # x86_64
    if os.uname().machine != "x86_64":
        pytest.skip("syscall number of getppid is x86_64's")
    with Opened(libbpf, objects / "syscalls.bpf.o") as o:
        o.load_and_attach()
        for _ in range(10):
            os.getppid()
        poll(lambda: o.percpu_sum("syscall_counts", getppid) >= 10, "getppid counted")
        assert o.has_keys("syscall_latency", 8)


@needs_tools
@needs_root
def test_tcp_counts_opens_and_resets(objects, libbpf):
    with Opened(libbpf, objects / "tcp.bpf.o") as o:
        o.load_and_attach()
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port = srv.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port)) as c:
                s, _ = srv.accept()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()       # linger 0: an RST
                with pytest.raises(OSError):
                    c.recv(1)
        def host(event):        # struct tcp_event_key {cgroup 0: host-wide, event}
            return struct.pack("<QII", 0, event, 0)
        poll(lambda: o.percpu_sum("tcp_counts", host(3)) >= 1, "an active open")       # TCP_OPENS_ACTIVE
        poll(lambda: o.percpu_sum("tcp_counts", host(4)) >= 1, "a passive open")      # TCP_OPENS_PASSIVE
        poll(lambda: o.percpu_sum("tcp_counts", host(1)) >= 1, "a reset sent")        # TCP_RESETS_SENT
        poll(lambda: o.percpu_sum("tcp_counts", host(2)) >= 1, "a reset received")    # TCP_RESETS_RECEIVED
