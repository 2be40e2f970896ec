"""Log2 histograms: the BPF helper in bpf/include/maps.h puts every value in the bucket OTLP says,
and agent/sources/ebpf/histogram.py turns the map into the exact exponential histogram."""
import ctypes as ct
import os
import shutil
import subprocess

import numpy as np
import pytest

from agent.sources.ebpf import histogram as h
from agent.sources.ebpf.maps import BpfMap
from agent.sources.ebpf.probe import BPF_DIR

INCLUDE = os.path.join(BPF_DIR, "include")


# --- the slot rule, in Python ----------------------------------------------------------------

def otlp_index(v: int) -> int:
    """Scale-0 bucket index by OTLP's definition: the i with 2^i < v <= 2^(i+1)."""
    i = -1
    while not (2 ** i < v <= 2 ** (i + 1)):
        i += 1
    return i


def boundary_values():
    vals = {0, 1, 2, 3, 2 ** 64 - 1}
    for k in range(1, 64):
        vals.update({2 ** k - 1, 2 ** k, 2 ** k + 1})
    return sorted(v for v in vals if v < 2 ** 64)


def test_slot_matches_otlp_bucket_at_and_around_powers_of_two():
    for v in boundary_values():
        slot = h.value_slot(v)
        if v == 0:
            assert slot == h.ZERO_SLOT
            continue
        assert slot + h.SLOT_TO_INDEX == otlp_index(v), v
        lo, hi = h.slot_bounds(slot)
        assert lo < v <= hi, (v, slot)
    assert h.value_slot(2 ** 64 - 1) == h.MAX_SLOT


def test_point_from_slots():
    # values 0, 1, 2, 3, 4, 5 and 1000: slots 0, 1, 2, 3, 3, 4, 11
    values = [0, 1, 2, 3, 4, 5, 1000]
    buckets = {}
    for v in values:
        b = buckets.setdefault(h.value_slot(v), [0, 0])
        b[0] += 1
        b[1] += v
    p = h.exp2_point(buckets, (("a", "b"),), 10, 20)
    assert (p.scale, p.zero_count, p.count, p.sum) == (0, 1, 7, float(sum(values)))
    assert p.positive_offset == -1            # the value 1 is in (0.5, 1]
    assert p.positive_counts == [1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 1]
    assert sum(p.positive_counts) + p.zero_count == p.count
    assert (p.start_time_ns, p.time_ns, p.attributes) == (10, 20, (("a", "b"),))
    # every value is inside the bucket the point says
    for v in values[1:]:
        i = otlp_index(v) - p.positive_offset
        assert p.positive_counts[i] >= 1
    empty = h.exp2_point({}, (), 1, 2)
    assert (empty.count, empty.sum, empty.positive_counts, empty.zero_count) == (0, 0.0, [], 0)


def test_points_merge_raw_keys_with_same_attributes():
    groups = {(1,): {2: [3, 6]}, (2,): {2: [1, 2], 5: [1, 10]}, (3,): {1: [1, 1]}}
    decode = {1: (("k", "x"),), 2: (("k", "x"),), 3: None}
    pts = h.exp2_points(groups, lambda raw: decode[raw[0]], 0, 1)
    assert len(pts) == 1
    p = pts[0]
    assert (p.count, p.sum, p.positive_offset, p.positive_counts) == (5, 18.0, 0, [4, 0, 0, 1])


# --- the shared C layout ---------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_exp2_bucket_layout_matches_c(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        "typedef uint32_t u32;\ntypedef uint64_t u64;\n#define __always_inline inline\n"
        "static inline unsigned int bpf_log2l(unsigned long v) { return 0; }\n"
        '#include "maps.h"\n'
        "int main(void) {\n"
        '  printf("%zu %zu %zu %d\\n", sizeof(struct exp2_bucket), offsetof(struct exp2_bucket, count),\n'
        "         offsetof(struct exp2_bucket, sum), EXP2_MAX_SLOT);\n"
        "  return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", INCLUDE, "-o", str(exe), str(src)], check=True)
    size, off_count, off_sum, max_slot = map(int, subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.split())
    assert size == ct.sizeof(h.Exp2Bucket)
    assert off_count == h.Exp2Bucket.count.offset
    assert off_sum == h.Exp2Bucket.sum.offset
    assert max_slot == h.MAX_SLOT


# --- the helper in the kernel ----------------------------------------------------------------

# Records the second argument of lseek(MAGIC_FD, value, 0) made by TARGET_TGID: which slot
# exp2_slot() gives it, and into a {slot} histogram through exp2_add().
PROBE_SRC = r"""
#include "maps.h"
struct key { u32 slot; };
EXP2_HISTOGRAM(values, struct key, EXP2_SLOTS);
BPF_HASH(slots, u64, u32, 1024);
TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET_TGID || args->id != __NR_lseek)
        return 0;
    if ((int)args->args[0] != MAGIC_FD)
        return 0;
    u64 v = args->args[1];
    struct key key = {.slot = exp2_slot(v)};
    struct exp2_bucket zero = {};
    exp2_add(values.lookup_or_try_init(&key, &zero), v);
    slots.update(&v, &key.slot);
    return 0;
}
"""
MAGIC_FD = -7


class Key(ct.Structure):
    _fields_ = [("slot", ct.c_uint32)]


@pytest.fixture
def bpf_values():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bcc = pytest.importorskip("bcc")
    b = bcc.BPF(text=PROBE_SRC.encode(), cflags=[f"-I{INCLUDE}", f"-DTARGET_TGID={os.getpid()}",
                                        f"-DMAGIC_FD={MAGIC_FD}", "-include", "asm/unistd.h"])
    try:
        yield b
    finally:
        b.cleanup()


def test_kernel_helper_buckets_exactly(bpf_values):
    libc = ct.CDLL(None, use_errno=True)
    libc.lseek.argtypes = [ct.c_int, ct.c_int64, ct.c_int]
    values = boundary_values()
    for v in values:
        libc.lseek(MAGIC_FD, ct.c_int64(v - 2 ** 64 if v >= 2 ** 63 else v), 0)
    slots = {k.value: v.value for k, v in bpf_values[b"slots"].items()}
    assert set(slots) == set(values)
    for v in values:
        assert slots[v] == h.value_slot(v), v

    groups = h.read_exp2(BpfMap.from_fd(bpf_values[b"values"].map_fd, "values"), Key)
    assert list(groups) == [()]
    p = h.exp2_point(groups[()], (), 0, 1)
    assert p.count == len(values)
    assert p.zero_count == 1
    per_slot = {}
    for v in values:
        per_slot[h.value_slot(v)] = (per_slot.get(h.value_slot(v), 0) + v) % 2 ** 64  # u64 sums
    assert p.sum == float(sum(per_slot.values()))
    assert p.positive_offset == -1
    expected = [0] * h.MAX_SLOT                       # slots 1..65: indexes -1..63
    for v in values[1:]:
        expected[otlp_index(v) + 1] += 1
    assert p.positive_counts == expected


def test_batch_and_iteration_read_the_same(bpf_values):
    libc = ct.CDLL(None, use_errno=True)
    libc.lseek.argtypes = [ct.c_int, ct.c_int64, ct.c_int]
    for v in range(0, 5000, 7):
        libc.lseek(MAGIC_FD, v, 0)
    table = BpfMap.from_fd(bpf_values[b"values"].map_fd, "values")
    k1, v1 = table._read_batch(np.dtype(Key), table.words(), chunk=4)   # many small chunks
    k2, v2 = table._read_iter(np.dtype(Key), table.words())
    assert sorted(zip(k1["slot"].tolist(), map(tuple, v1.tolist()))) == \
        sorted(zip(k2["slot"].tolist(), map(tuple, v2.tolist())))
    assert int(v1[:, 0].sum()) == len(range(0, 5000, 7))
