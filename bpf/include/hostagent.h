/* Shared by hostagent's event probes (process, oom, signals): common typedefs, the ring-buffer
 * drop counter and wakeup policy.
 *
 * Include it first, before any map is declared. Compilation modes:
 *   - CO-RE (HA_CORE) or bcc (the default), compat.h: the BPF helpers and maps below;
 *   - HA_LAYOUT_ONLY: a plain C compiler sees only the fixed-width types, so a probe's record
 *     structs can be compiled on the host to check their size and offsets against the numpy
 *     dtypes that decode them (tests/test_ringbuf.py). Probe files wrap their maps and programs
 *     in #ifndef HA_LAYOUT_ONLY.
 *
 * Record structs are laid out by hand with explicit padding fields, widest members first, so the
 * C compiler inserts no padding of its own and the numpy dtype (which never pads) has the same
 * offsets. Ring buffer records are always 8-byte aligned by the kernel.
 */
#ifndef HOSTAGENT_H
#define HOSTAGENT_H

#ifdef HA_LAYOUT_ONLY

#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int16_t s16;
typedef int32_t s32;
typedef int64_t s64;

#else

#include "compat.h"

/* Records a probe could not reserve because its ring buffer was full, per ring (slot = the
 * ring's index in the probe's Python `rings` table) and per CPU; the agent sums the CPUs and
 * exports hostagent.ebpf.ringbuf.dropped {probe, ring}. */
#define HA_MAX_RINGS 4
HA_PERCPU_ARRAY(ha_ringbuf_dropped, u64, HA_MAX_RINGS);

/* The reserve-or-count pattern. The lookup is written at the call site (under bcc it is one of
 * the probe file's own map functions, compat.h) and the increment lives here:
 *
 *     u32 slot = HA_RING_EXEC;
 *     struct exec_event *e = HA_RINGBUF_RESERVE(exec_events, sizeof(*e));
 *     if (!e)
 *         return ha_count_drop(HA_LOOKUP(ha_ringbuf_dropped, &slot));
 *     ...
 *
 * A plain add is enough: the counter is per-CPU and a BPF program never runs nested on a CPU. */
static __always_inline int ha_count_drop(u64 *counter)
{
    if (counter)
        *counter += 1;
    return 0;
}

/* How a record is committed: without waking the reader, which polls its rings on a timer (far
 * cheaper than a wakeup per record, docs/performance.md), except that every `every`-th record a
 * CPU commits to a ring wakes it, so a burst between two polls wakes the reader well before the
 * ring is full.
 * The agent passes `every` as a parameter: a quarter of the ring's records divided by the CPUs.
 *
 *     HA_RINGBUF_SUBMIT(exec_events, e, ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), EVERY));
 */
HA_PERCPU_ARRAY(ha_ringbuf_unwoken, u64, HA_MAX_RINGS);

static __always_inline u64 ha_submit_flags(u64 *unwoken, u64 every)
{
    if (!unwoken || ++*unwoken < every)
        return BPF_RB_NO_WAKEUP;
    *unwoken = 0;
    return BPF_RB_FORCE_WAKEUP;
}

#endif /* HA_LAYOUT_ONLY */

#endif /* HOSTAGENT_H */
