"""BTF as the agent reads it (agent/sources/ebpf/btf.py): the running kernel's answers, and any
bytes in place of /sys/kernel/btf/vmlinux giving BtfError, never a hang or another error."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sources.ebpf.btf import Btf, BtfError

VMLINUX = "/sys/kernel/btf/vmlinux"
HEADER = struct.Struct("<HBBIIIII")
ALLOWED = (BtfError, struct.error, ValueError, UnicodeDecodeError)


@pytest.mark.skipif(not os.path.exists(VMLINUX), reason="the kernel has no BTF")
def test_the_running_kernels_types():
    btf = Btf.from_file(VMLINUX)
    pid, tgid = btf.member_offset("task_struct", "pid"), btf.member_offset("task_struct", "tgid")
    assert tgid == pid + 4
    assert btf.member_offset("task_struct", "no_such_member") is None
    assert btf.find("no_such_struct") is None
    assert btf.enumerator("REQ_OP_FLUSH") == 2 and btf.enumerator("NO_SUCH_ENUMERATOR") is None
    layout = dict((name, (off, size)) for name, off, size in btf.layout("list_head"))
    assert layout == {"next": (0, 8), "prev": (8, 8)}


def _blob(types: bytes, strings: bytes) -> bytes:
    return HEADER.pack(0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def _queries(btf: Btf) -> None:
    btf.member_offset("a", "b")
    btf.enumerator("a")
    for tid in range(1, min(len(btf.offsets), 20)):
        try:
            btf.size(tid)
            btf.layout(tid)
        except ALLOWED:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=64))
def test_arbitrary_types_parse_or_fail_cleanly(types, strings):
    try:
        btf = Btf(_blob(types, b"\0a\0b\0" + strings))
    except ALLOWED:
        return
    try:
        _queries(btf)
    except ALLOWED:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_files_are_not_btf(data):
    try:
        Btf(data)
    except ALLOWED:
        pass


def test_a_self_referencing_anonymous_member_is_refused():
    # [1] struct "a" { <anonymous>: [1] } -- a cycle no compiler emits
    types = struct.pack("<III", 1, (4 << 24) | 1, 4) + struct.pack("<III", 0, 1, 0)
    btf = Btf(_blob(types, b"\0a\0"))
    with pytest.raises(BtfError):
        btf.member_offset("a", "x")


@pytest.mark.skipif(not os.path.exists(VMLINUX), reason="the kernel has no BTF")
def test_libbpf_reads_the_running_kernels_btf_as_btf_py_does():
    """The kernel facts probes ask before loading come from libbpf's parse (in C); they are the
    same as btf.py's, members of anonymous structs and unions and enum constants included."""
    from agent.sources.ebpf.biolatency import BTF_ENUMERATORS, BTF_MEMBERS
    from agent.sources.ebpf.libbpf import KernelBtf
    ours, theirs = KernelBtf.open(VMLINUX), Btf.from_file(VMLINUX)
    try:
        members = [*BTF_MEMBERS.values(), ("task_struct", "exit_code"), ("task_struct", "pid"), ("sk_buff", "cb"),
                   ("tcp_skb_cb", "tcp_gso_segs"), ("sk_buff", "tstamp"), ("sk_buff", "len"),
                   ("task_struct", "no_such_member"), ("no_such_struct", "pid")]
        assert [ours.member_offset(*m) for m in members] == [theirs.member_offset(*m) for m in members]
        assert ours.member_offset("sk_buff", "tstamp") is not None       # inside an anonymous union
        enums = [*BTF_ENUMERATORS.values(), ("req_op", "NO_SUCH_ENUMERATOR"), ("no_such_enum", "REQ_OP_FLUSH")]
        assert [ours.enumerator(name, enum) for enum, name in enums] == \
            [theirs.enumerator(name, enum) for enum, name in enums]
        assert ours.enumerator("REQ_OP_FLUSH", "req_op") == 2
        assert theirs.enumerator("REQ_OP_FLUSH", "no_such_enum") is None
    finally:
        ours.close()
