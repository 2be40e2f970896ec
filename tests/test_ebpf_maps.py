"""The map layer (agent/sources/ebpf/maps.py): BPF maps read and written by fd through bpf(2),
the same for both loaders, on maps made here in the kernel."""
from __future__ import annotations

import ctypes as ct
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sources.ebpf import maps
from agent.sources.ebpf.maps import BPF_EXIST, BPF_NOEXIST
from tests.helpers import new_map

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates BPF maps")

HASH, ARRAY = 1, 2


class Pair(ct.Structure):
    _fields_ = [("a", ct.c_uint32), ("b", ct.c_uint32)]


@pytest.fixture
def made():
    opened = []

    def make(*args):
        m = new_map(*args)
        opened.append(m.fd)
        return m
    yield make
    for fd in opened:
        os.close(fd)


def test_info_lookup_update_delete(made):
    m = made(HASH, 8, 16, 64)
    assert (m.type, m.key_size, m.value_size, m.max_entries, m.percpu) == (HASH, 8, 16, 64, False)
    key = Pair(1, 2)
    assert m.lookup(key) is None
    m.update(key, b"x" * 16, BPF_NOEXIST)
    assert m.lookup(key) == b"x" * 16
    with pytest.raises(OSError):
        m.update(key, b"y" * 16, BPF_NOEXIST)          # EEXIST: the kernel's answer comes through
    m.update(key, b"y" * 16, BPF_EXIST)
    assert list(m.keys()) == [bytes(key)]
    assert m.delete(key) and not m.delete(key)
    with pytest.raises(ValueError):
        m.lookup(b"\0" * 4)                            # a key of the wrong size never reaches the kernel


def test_per_cpu_values_are_summed(made):
    m = made(maps.PERCPU_ARRAY, 4, 16, 2)
    cpus = maps.possible_cpus()
    assert m.percpu and m.cpus == cpus and m.buffer_size == 16 * cpus
    words = np.arange(2 * cpus, dtype=np.uint64).reshape(cpus, 2)
    m.update(1, words.tobytes())
    assert m.sum(1) == int(words[:, 0].sum()) and m.sum(0) == 0
    keys, values = m.read(np.uint32)
    assert keys.tolist() == [0, 1]
    assert values.tolist() == [[0, 0], words.sum(axis=0).tolist()]


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                       st.integers(0, 2**64 - 1), max_size=300))
def test_batch_and_key_by_key_reads_give_every_entry(entries):
    m = new_map(HASH, 8, 8, 512)
    try:
        for (a, b), v in entries.items():
            m.update(Pair(a, b), v)
        for read in (lambda: m.read(Pair, chunk=3), lambda: m._read_iter(np.dtype(Pair), 1)):
            keys, values = read()
            assert dict(zip(map(tuple, keys.tolist()), values[:, 0].tolist())) == entries
    finally:
        os.close(m.fd)


def test_values_not_whole_words_are_refused(made):
    m = made(HASH, 4, 12, 4)
    with pytest.raises(ValueError):
        m.read(np.uint32)
