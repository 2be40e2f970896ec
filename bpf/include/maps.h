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
 * Key structs have no padding bytes that could make equal keys differ: the u64 cgroup first, then
 * u32 fields (slot last), then an explicit u32 pad if needed; each has a ctypes mirror whose size
 * and offsets are tested.
 *
 * Keyed by cgroup (workload attribution, docs/probes.md)
 *   BY_CGROUP (bool parameter: -D under bcc, a `const volatile` global under CO-RE) says whether
 *   keys carry the cgroup v2 id of the task an event belongs to; off, the cgroup field of every
 *   key is 0 and the series are host-wide. HA_CGROUP_CURRENT() is the current task's cgroup (0
 *   when off); a probe whose event runs in another task's context captures the right one itself.
 *   Keyed maps stay bounded (max_entries). An event whose entry cannot be created because the
 *   map is full goes, with its key's cgroup set to HA_CGROUP_OVERFLOW, to the map's companion
 *   `<map>_overflow`: same key type, sized for the host-wide key space (the cgroup being fixed),
 *   so it is always insertable and nothing is lost. HA_KEYED_LOOKUP_OR_TRY_INIT(map, &key, &zero)
 *   does both; under bcc the probe file defines <map>_lookup_or_try_init and
 *   <map>_overflow_lookup_or_try_init (compat.h) and ha_events_lookup (below).
 *   User space (agent/sources/ebpf/histogram.py) reads both maps, exports the overflow as its own
 *   series (otel.metric.overflow=true) and deletes the entries of cgroups that are gone after
 *   folding them into their workload's totals.
 *   COUNT_EVENTS (bool parameter, tests only): every keyed event is also counted host-wide in
 *   ha_events[0] (per CPU), so a test can check that the keyed maps lost nothing.
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

/* --- keyed by cgroup ------------------------------------------------------------------------ */

#define HA_CGROUP_OVERFLOW (~0ULL)   /* agent/procfs/workload.py CGROUP_OVERFLOW */

#ifdef HA_CORE
const volatile bool BY_CGROUP = false;
const volatile bool COUNT_EVENTS = false;
#define HA_BY_CGROUP BY_CGROUP
#define HA_COUNT_EVENTS COUNT_EVENTS
#else
#ifdef BY_CGROUP
#define HA_BY_CGROUP 1
#else
#define HA_BY_CGROUP 0
#endif
#ifdef COUNT_EVENTS
#define HA_COUNT_EVENTS 1
#else
#define HA_COUNT_EVENTS 0
#endif
#endif

#define HA_CGROUP_CURRENT() (HA_BY_CGROUP ? bpf_get_current_cgroup_id() : 0)

#if defined(HA_CORE) || defined(BPF_PERCPU_ARRAY)    /* a plain C compiler checking layouts: no maps */
HA_PERCPU_ARRAY(ha_events, u64, 1);
#endif

static __always_inline void ha_count_event(u64 *counter)
{
    if (counter)
        *counter += 1;
}

/* The value of `key` ({u64 cgroup, ...}) in `map`, created from `zero` if new; when `map` is full,
 * the key with cgroup HA_CGROUP_OVERFLOW in map##_overflow. NULL only if that one is full too
 * (sized for the host-wide keys, as the host-wide map was). */
#define HA_KEYED_LOOKUP_OR_TRY_INIT(map, key, zero)                                   \
    ({                                                                              \
        typeof(HA_LOOKUP_OR_TRY_INIT(map, key, zero)) ha_value_ =                   \
            HA_LOOKUP_OR_TRY_INIT(map, key, zero);                                  \
        if (!ha_value_) {                                                           \
            (key)->cgroup = HA_CGROUP_OVERFLOW;                                     \
            ha_value_ = HA_LOOKUP_OR_TRY_INIT(map##_overflow, key, zero);           \
        }                                                                           \
        if (HA_COUNT_EVENTS) {                                                      \
            u32 ha_index_ = 0;                                                      \
            ha_count_event(HA_LOOKUP(ha_events, &ha_index_));                       \
        }                                                                           \
        ha_value_;                                                                  \
    })

/* A cgroup-keyed log2 histogram `name` and its overflow companion (see above). */
#define EXP2_KEYED_HISTOGRAM(name, key_type, max_entries, overflow_entries) \
    EXP2_HISTOGRAM(name, key_type, max_entries);                           \
    EXP2_HISTOGRAM(name##_overflow, key_type, overflow_entries)

#endif /* HOSTAGENT_MAPS_H */
