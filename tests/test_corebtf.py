"""What the probes need of the kernel's BTF, kept in the state directory (agent/sources/ebpf/
corebtf.py): libbpf relocates every program of every probe from the kept subset exactly as from
the kernel's whole BTF; the next start uses it and the kept facts and parses no kernel BTF for
them; a damaged cache or one libbpf rejects is never what a probe is left with; hostile bytes in
its files fail cleanly."""
from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import Resource
from agent.selfmetrics import SelfMetrics
from agent.sources.ebpf import corebtf, libbpf, loader
from agent.sources.ebpf.source import EbpfSource
from agent.sources.ebpf.btf import STRUCT, UNION, Btf, BtfError
from agent.sources.ebpf.config import EbpfConfig
from tests.ebpf_helpers import core_objects
from tests.helpers import ROOT

VMLINUX = "/sys/kernel/btf/vmlinux"
needs_core = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(VMLINUX),
                                reason="loads BPF programs against the kernel's BTF")
HOSTILE = (corebtf.SubsetError, BtfError, struct.error, ValueError)


def objects() -> str:
    if not core_objects():
        pytest.skip("no bpf/build.sh in this checkout")
    return core_objects()


def tags(path: str, kernel_btf: str):
    """{program: the kernel's tag of it} with every program of the object loaded against
    `kernel_btf`, or None when libbpf fails. The tag is a hash of the program's instructions as
    relocated (map fds aside): two loads with equal tags were relocated alike."""
    try:
        obj = libbpf.BpfObject.open(path, kernel_btf=kernel_btf)
    except libbpf.LibbpfError:
        return None
    try:
        obj.load()
        out = {}
        for name, fd in obj.program_fds().items():
            with open(f"/proc/self/fdinfo/{fd}") as f:
                out[name] = next(line.split()[1] for line in f if line.startswith("prog_tag:"))
        return out
    except libbpf.LibbpfError:
        return None
    finally:
        obj.close()


def moved_members(data: bytes) -> bytes:
    """`data` (BTF) with every struct and union member 8 bytes further on."""
    btf, out = Btf(data), bytearray(data)
    for pos in btf.offsets[1:]:
        _, info, _ = struct.unpack_from("<III", data, pos)
        if (info >> 24) & 0x1F in (STRUCT, UNION):
            for i in range(info & 0xFFFF):
                at = pos + 12 + 12 * i + 8
                struct.pack_into("<I", out, at, struct.unpack_from("<I", data, at)[0] + 64)
    return bytes(out)


@needs_core
def test_the_subset_relocates_every_program_as_the_kernels_whole_btf(tmp_path):
    cache = corebtf.Cache(str(tmp_path), objects())
    path = cache.build_core_btf()
    assert os.path.getsize(path) < os.path.getsize(VMLINUX) // 100
    assert len(cache.objects()) >= 8
    for obj in cache.objects():
        whole = tags(obj, VMLINUX)
        assert whole, obj
        assert tags(obj, path) == whole, os.path.basename(obj)
    # the comparison sees a relocation that differs: the same subset with its members moved
    moved = tmp_path / "moved.btf"
    moved.write_bytes(moved_members(open(path, "rb").read()))
    assert [obj for obj in cache.objects() if tags(obj, str(moved)) != tags(obj, VMLINUX)]


def start(state_dir, caplog) -> tuple[list, str]:
    """A source with the default probes and a state directory: (probes on, its ebpf_probes line)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hostagent.ebpf"):
        src = EbpfSource(EbpfConfig(loader="core", object_dir=objects()), SelfMetrics(), Resource(()),
                         state_dir=str(state_dir))
        src.close()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ebpf_probes on="))
    return sorted(s.name for s in src.statuses if s.on), line


@needs_core
def test_the_next_start_relocates_against_the_kept_subset_and_parses_no_kernel_btf(tmp_path, caplog, monkeypatch):
    on, line = start(tmp_path, caplog)
    assert on and " btf=kernel " in line + " "
    assert any(r.getMessage().startswith("ebpf_btf_subset_saved") for r in caplog.records)
    cache = corebtf.Cache(str(tmp_path), objects())
    facts = cache.facts()
    assert facts and cache.core_btf()
    kernel = libbpf.KernelBtf.open(VMLINUX)
    try:        # what was kept is what the kernel says
        for (kind, a, b), value in facts.items():
            assert value == (kernel.member_offset(a, b) if kind == "member" else kernel.enumerator(b, a)), (a, b)
    finally:
        kernel.close()

    parses = []
    real = loader._kernel_btf
    monkeypatch.setattr(loader, "_kernel_btf", lambda path: parses.append(path) or real(path))
    again, line = start(tmp_path, caplog)
    assert again == on
    assert " btf=subset " in line + " "
    assert parses == []


@needs_core
def test_a_damaged_subset_is_not_used_and_is_made_again(tmp_path, caplog):
    on, _ = start(tmp_path, caplog)
    path = corebtf.Cache(str(tmp_path), objects()).core_btf()
    with open(path, "r+b") as f:
        f.truncate(30)
    again, line = start(tmp_path, caplog)
    assert again == on and " btf=kernel " in line + " "
    assert corebtf.Cache(str(tmp_path), objects()).core_btf() == path     # whole again


def without_members(data: bytes) -> bytes:
    """`data` (BTF) with every struct and union emptied of its members."""
    btf = Btf(data)
    hdr = struct.unpack_from("<HBBIIIII", data, 0)
    types = bytearray()
    ends = btf.offsets[2:] + [24 + hdr[4] + hdr[5]]
    for pos, end in zip(btf.offsets[1:], ends):
        name_off, info, ref = struct.unpack_from("<III", data, pos)
        if (info >> 24) & 0x1F in (STRUCT, UNION):
            types += struct.pack("<III", name_off, info & ~0xFFFF, ref)
        else:
            types += data[pos:end]
    strings = data[24 + hdr[6]:24 + hdr[6] + hdr[7]]
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


@needs_core
def test_a_subset_libbpf_cannot_relocate_from_leaves_every_probe_loaded_against_the_kernel(tmp_path, caplog):
    """A kept subset that is well-formed but wrong (every struct without members): each probe
    whose load fails with it loads against the kernel's BTF, with a warning, and the subset is
    made again."""
    on, _ = start(tmp_path, caplog)
    path = corebtf.Cache(str(tmp_path), objects()).core_btf()
    emptied = without_members(open(path, "rb").read())
    corebtf.check(emptied)
    with open(path, "wb") as f:
        f.write(emptied)
    again, line = start(tmp_path, caplog)
    assert again == on and " btf=subset " in line + " "
    assert any(r.getMessage().startswith("ebpf_btf_subset_failed") for r in caplog.records)
    rebuilt = corebtf.Cache(str(tmp_path), objects()).core_btf()
    assert rebuilt and open(rebuilt, "rb").read() != emptied


LOAD_AGAINST = r"""
import sys
from agent.sources.ebpf import libbpf
for btf in sys.argv[2:]:
    try:
        obj = libbpf.BpfObject.open(sys.argv[1], kernel_btf=btf)
    except libbpf.LibbpfError:
        continue
    try:
        obj.load()
    except libbpf.LibbpfError:
        pass
    obj.close()
print("survived")
"""


@pytest.fixture(scope="module")
def kept_subset(tmp_path_factory):
    if os.geteuid() != 0 or not os.path.exists(VMLINUX):
        pytest.skip("loads BPF programs against the kernel's BTF")
    return open(corebtf.Cache(str(tmp_path_factory.mktemp("state")), objects()).build_core_btf(), "rb").read()


@needs_core
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
                min_size=25, max_size=25))
def test_a_damaged_subset_is_refused_or_harmless_to_libbpf(tmp_path, kept_subset, damages):
    """Bytes of a kept subset changed at random: check() refuses them, or libbpf relocating an
    object against them fails or loads, and never crashes the process."""
    passed = []
    for i, changes in enumerate(damages):
        data = bytearray(kept_subset)
        for where, byte in changes:
            data[int(where * len(data))] = byte
        try:
            corebtf.check(bytes(data))
        except (corebtf.SubsetError, struct.error):
            continue
        path = tmp_path / f"{i}.btf"
        path.write_bytes(bytes(data))
        passed.append(str(path))
    if not passed:
        return
    proc = subprocess.run([sys.executable, "-c", LOAD_AGAINST, os.path.join(objects(), "tcp.bpf.o"), *passed],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


@needs_core
def test_only_the_running_kernels_entry_and_the_objects_subset_are_kept(tmp_path, caplog):
    other_kernel = tmp_path / "kernel-btf" / "0123456789abcdef"
    other_kernel.mkdir(parents=True)
    (other_kernel / "facts.json").write_text("[]")
    cache = corebtf.Cache(str(tmp_path), objects())
    os.makedirs(cache.dir)
    stale = os.path.join(cache.dir, "core-0000000000000000.btf")
    open(stale, "wb").write(b"x")
    start(tmp_path, caplog)
    assert sorted(os.listdir(tmp_path / "kernel-btf")) == [os.path.basename(cache.dir)]
    assert sorted(os.listdir(cache.dir)) == sorted(["facts.json", os.path.basename(cache.core_path)])


def test_an_unwritable_state_directory_costs_a_warning_not_the_probes(tmp_path, caplog):
    if os.geteuid() != 0 or not os.path.exists(VMLINUX):
        pytest.skip("loads BPF programs")
    (tmp_path / "kernel-btf").write_text("a file where the cache directory would be")
    on, line = start(tmp_path, caplog)
    assert on and " btf=kernel " in line + " "
    assert any(r.getMessage().startswith("ebpf_btf_cache_failed") for r in caplog.records)


# --- hostile bytes -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                                           max_size=5),
                              max_leaves=30).map(lambda v: json.dumps(v).encode())))
def test_any_facts_file_gives_only_well_formed_facts(tmp_path, data):
    if not os.path.exists(VMLINUX):
        pytest.skip("the kernel has no BTF")
    cache = corebtf.Cache(str(tmp_path), str(tmp_path))
    os.makedirs(cache.dir, exist_ok=True)
    with open(os.path.join(cache.dir, "facts.json"), "wb") as f:
        f.write(data)
    for (kind, a, b), value in cache.facts().items():
        assert kind in ("member", "enumerator") and isinstance(a, str) and isinstance(b, str)
        assert value is None or (type(value) is int and -(1 << 63) <= value < 1 << 64)


def test_a_facts_file_kept_and_read_back_is_the_same():
    if not os.path.exists(VMLINUX):
        pytest.skip("the kernel has no BTF")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cache = corebtf.Cache(tmp, tmp)
        facts = {("member", "task_struct", "pid"): 1234, ("enumerator", "req_op", "REQ_OP_FLUSH"): None}
        cache.save_facts(facts)
        assert cache.facts() == facts
        cache.save_facts({**facts, ("member", "a", "huge"): 10 ** 30, ("member", "a", "float"): 1.5})
        assert cache.facts() == facts           # what BTF cannot hold is not a fact


@pytest.fixture(scope="module")
def kernel_btf():
    if not os.path.exists(VMLINUX):
        pytest.skip("the kernel has no BTF")
    return Btf.from_file(VMLINUX)


@pytest.fixture(scope="module")
def object_bytes():
    return [open(os.path.join(objects(), n), "rb").read()
            for n in sorted(os.listdir(objects())) if n.endswith(".bpf.o")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 7), changes=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                  min_size=1, max_size=8))
def test_a_damaged_object_file_fails_the_subset_cleanly(kernel_btf, object_bytes, which, changes):
    data = bytearray(object_bytes[which % len(object_bytes)])
    for where, byte in changes:
        data[int(where * len(data))] = byte
    try:
        out = corebtf.subset(kernel_btf, [bytes(data)])
    except HOSTILE:
        return
    Btf(out)                # what it makes is BTF


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_an_object_file_fail_cleanly(data):
    kernel = Btf(struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 0, 0, 1) + b"\0")
    for blob in (data, b"\x7fELF\x02\x01" + data):
        try:
            corebtf.subset(kernel, [blob])
        except HOSTILE:
            pass


def btf_blob(types: list, strings: bytes = b"\0a\0") -> bytes:
    """BTF of `types`: (kind, name offset, vlen, size or type, body)."""
    data = b"".join(struct.pack("<III", name, (kind << 24) | vlen, ref) + body for kind, name, vlen, ref, body in types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(data), len(data), len(strings)) + data + strings


def test_check_refuses_what_libbpf_would_follow_forever_or_off_the_end():
    TYPEDEF, PTR, INT = 8, 2, 1
    a_struct = (STRUCT, 1, 1, 8, struct.pack("<III", 1, 2, 0))                      # struct a { a *a; }
    corebtf.check(btf_blob([a_struct, (PTR, 0, 0, 1, b"")]))                       # through a pointer: fine
    with pytest.raises(corebtf.SubsetError, match="made of itself"):                # typedef a -> typedef -> a
        corebtf.check(btf_blob([(TYPEDEF, 1, 0, 2, b""), (TYPEDEF, 1, 0, 1, b"")]))
    with pytest.raises(corebtf.SubsetError, match="reference to type 9"):
        corebtf.check(btf_blob([(STRUCT, 1, 1, 8, struct.pack("<III", 1, 9, 0))]))
    with pytest.raises(corebtf.SubsetError, match="name past"):
        corebtf.check(btf_blob([(INT, 99, 0, 4, struct.pack("<I", 32))]))
