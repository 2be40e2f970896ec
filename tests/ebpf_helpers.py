"""Loading one probe in a test the way the agent's loader does, under the loader the run asks
for, and reading what the kernel skipped.

HOSTAGENT_TEST_EBPF_LOADER (auto, core or bcc; default auto) picks the loader for every probe test
and for the agents the end-to-end tests start, so CI runs the suite once per loader. CO-RE
objects come from bpf/build.sh, built once per test session into a temporary directory.
"""
import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile

import numpy as np

from agent.sources.ebpf import libbpf
from agent.sources.ebpf.loader import (INCLUDE_DIR, ON, CoreObject, HostCheck, Plan, ProbeStatus, layout_problems, load_one,
                                       recursion_misses, tracepoint_available, unload)
from agent.sources.ebpf.probe import BPF_DIR
from agent.sources.ebpf.ringbuf import Ring, RingProbe

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LOADER = os.environ.get("HOSTAGENT_TEST_EBPF_LOADER", "auto")
CLANG = shutil.which("clang-14") or shutil.which("clang")
BPFTOOL = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")


def _tmpdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def vmlinux_dir() -> str:
    """A directory holding vmlinux.h of the running kernel (bpftool), made once per session."""
    assert BPFTOOL, "bpftool is missing (install.sh --dev installs it)"
    path = _tmpdir("hostagent-vmlinux-")
    with open(os.path.join(path, "vmlinux.h"), "wb") as f:
        subprocess.run([BPFTOOL, "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                       stdout=f, check=True, timeout=120)
    return path


def compile_core(source: str, out_dir: str, name: str = "") -> str:
    """`source` compiled as a CO-RE object `out_dir/<name>.bpf.o` the way bpf/build.sh does."""
    assert CLANG, "clang is missing (install.sh --dev installs clang-14)"
    name = name or os.path.basename(source).split(".")[0]
    out = os.path.join(out_dir, f"{name}.bpf.o")
    p = subprocess.run([CLANG, "-target", "bpf", "-g", "-O2", "-D__TARGET_ARCH_x86", f"-I{INCLUDE_DIR}",
                        f"-I{vmlinux_dir()}", "-c", source, "-o", out], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return out


@functools.lru_cache(maxsize=None)
def core_objects() -> str:
    """The registry's probes built by bpf/build.sh into a session directory ("" when the checkout
    has no bpf/build.sh yet); objects that do not build are missing, so `auto` falls back to bcc."""
    script = os.path.join(BPF_DIR, "build.sh")
    if not os.path.exists(script):
        return ""
    path = _tmpdir("hostagent-bpf-")
    subprocess.run([script, path], capture_output=True, timeout=600)
    return path


def object_layout_problems(probe) -> list:
    """layout_problems() of `probe` against its CO-RE object (bpf/build.sh's), opened, not loaded:
    its structs, ring records included, as the object's BTF has them."""
    import pytest
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    obj = libbpf.BpfObject.open(probe.object_file(core_objects()))
    try:
        return layout_problems(probe, CoreObject(obj, recipe={}, attached_at=0.0))
    finally:
        obj.close()


def ebpf_config(**section) -> dict:
    """An `ebpf` config section under the run's loader, e.g. ebpf_config(enabled=True, probes=...)."""
    return {"loader": LOADER, "object_dir": core_objects() if LOADER != "bcc" else "", **section}


@contextlib.contextmanager
def attached(probe, available=tracepoint_available, loader=None):
    """`probe` loaded, attached and set up by the loader (`loader`, default the run's), on the
    tracepoints `available` allows; always unloaded afterwards."""
    loader = loader or LOADER
    tps = probe.select_tracepoints(available)
    assert tps is not None, f"{probe.name}: its tracepoints are missing on this kernel"
    object_dir = core_objects() if loader != "bcc" else ""
    kind, reason, _ = HostCheck().loader(loader, probe, object_dir)
    assert reason is None, f"{probe.name} cannot load with {loader}: {reason}"
    status = ProbeStatus(probe.name, tps, ON, "", probe.description, kind)
    loaded, status = load_one(Plan(probe, status, tps, object_dir))
    assert loaded is not None, f"{probe.name} did not load: {status.reason}"
    try:
        yield probe
    finally:
        unload([loaded])


def misses(p, *programs) -> int:
    """Events the kernel skipped for the named programs of probe `p` (another BPF program was running)."""
    return recursion_misses(p.obj, programs)


def checked_structs(probe) -> set:
    """The structs of `probe.structs` the loaded object's BTF has, after checking that each equals
    its Python mirror (member names, offsets and sizes)."""
    assert layout_problems(probe, probe.obj) == []
    found = probe.obj.btf()
    return {name for name in probe.structs if found is not None and found.find(name) is not None}


# --- a small CO-RE program of the tests' own: tests/data/core_test.bpf.c ----------------------

CORE_EVENT = np.dtype([("tag", "<u8"), ("pid", "<u4"), ("ppid", "<u4")])    # struct core_test_event


class CoreTestProbe(RingProbe):
    """tests/data/core_test.bpf.c: this process's getppid calls, counted and sent as records."""
    name = "core_test"
    tracepoints = ("syscalls:sys_enter_getppid",)
    rings = (Ring("events", CORE_EVENT, 2, "EVENTS"),)

    def params(self, tracepoints):
        # the ring's and SOME_STRUCT_OFFSET are parameters the object does not declare: a CO-RE
        # load leaves them out
        return {**super().params(tracepoints), "target_tgid": os.getpid(), "tag": 77, "SOME_STRUCT_OFFSET": 12}

    def setup(self, obj):
        super().setup(obj)
        self.calls, self.by_pid = obj.map("calls"), obj.map("by_pid")
