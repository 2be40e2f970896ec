/* Map helpers shared by hostagent's aggregating probes (runqlat, biolatency, syscalls, tcp).
 *
 * Log2 histograms are kept so that they ARE OTLP exponential histograms at scale 0, with no
 * re-bucketing: OTLP bucket index i covers (2^i, 2^(i+1)], upper bound inclusive, so a value lands
 * in bucket ceil(log2(v)) - 1. A histogram is a per-CPU hash map keyed by {attributes..., slot}
 * whose value is a struct exp2_bucket; agent/sources/ebpf/histogram.py reads it.
 *
 *   slot 0        the value 0                  OTLP zero_count
 *   slot s >= 1   2^(s-2) < v <= 2^(s-1)       OTLP bucket index s - 2
 *
 *   slot 1: 1   slot 2: 2   slot 3: 3..4   slot 4: 5..8   slot 5: 9..16 ...   slot 65: 2^63+1..2^64-1
 *
 * Every bucket also sums the values it received, so the histogram's sum is exact (and a bucket
 * holding one value tells that value). Nothing is reset: histograms are cumulative from load.
 *
 * Key structs use only u32 fields (slot last), so they have no padding bytes that could make
 * equal keys differ; each has a ctypes mirror whose size and offsets are tested.
 */
#ifndef HOSTAGENT_MAPS_H
#define HOSTAGENT_MAPS_H

#include "compat.h"

/* The last slot: (2^63, 2^64). It spans the whole u64 range, so the clamp in exp2_slot() never
 * moves a value to a wrong bucket; it bounds the key space for the verifier and for map sizing. */
#define EXP2_MAX_SLOT 65
#define EXP2_SLOTS (EXP2_MAX_SLOT + 1)

struct exp2_bucket {
    u64 count;
    u64 sum;
};

/* The slot of value v. bpf_log2l(x) (bcc's; compat.h's under CO-RE) is floor(log2(x)) + 1 for
 * x >= 1, so for v >= 2, bpf_log2l(v - 1) + 1 = ceil(log2(v)) + 1 = OTLP index + 2.
 * (bpf_log2l(0) is 1, not 0, which is why 0 and 1 are handled apart.) */
static __always_inline u32 exp2_slot(u64 v)
{
    u32 slot = v <= 1 ? (u32)v : bpf_log2l(v - 1) + 1;
    return slot > EXP2_MAX_SLOT ? EXP2_MAX_SLOT : slot;
}

/* Add one value to the bucket that `HA_LOOKUP_OR_TRY_INIT(map, &key, &zero)` returned for
 * {attributes, exp2_slot(value)}; a NULL bucket (map full) is ignored. Plain adds are safe because
 * histograms are per-CPU maps written by one program, and a BPF program never runs nested on one
 * CPU (the kernel skips the inner run instead). */
static __always_inline void exp2_add(struct exp2_bucket *bucket, u64 value)
{
    if (!bucket)
        return;
    bucket->count += 1;
    bucket->sum += value;
}

/* A log2 histogram map: keys are `key_type` ({attributes..., u32 slot}), memory grows with the
 * keys actually used (no preallocation), max_entries bounds it. */
#define EXP2_HISTOGRAM(name, key_type, max_entries) \
    HA_PERCPU_HASH(name, key_type, struct exp2_bucket, max_entries)

#endif /* HOSTAGENT_MAPS_H */
