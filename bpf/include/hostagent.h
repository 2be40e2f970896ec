/* Shared by hostagent's event probes (process, oom, signals): common typedefs, the ring-buffer
 * drop counter and wakeup policy.
 *
 * Include it first, before any map is declared; it includes compat.h (CO-RE or bcc).
 *
 * Record structs are laid out by hand with explicit padding fields, widest members first, so the
 * C compiler inserts no padding of its own and the numpy dtype (which never pads) has the same
 * offsets. Ring buffer records are always 8-byte aligned by the kernel. Each is declared with
 * HA_RECORD(name) so that the CO-RE object's BTF has it, and the loader checks the probe's numpy
 * dtype against it member by member (loader.layout_problems).
 */
#ifndef HOSTAGENT_H
#define HOSTAGENT_H

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

/* How a record is committed: without asking for a wakeup, so the kernel wakes the reader only by
 * its own rule -- a record committed when the reader has read everything before it, the first
 * after an idle spell: the reader sleeps with no timer while nothing comes -- and at every
 * `every`-th record a CPU commits to a ring, so a burst while the reader reads on its timer wakes
 * it well before the ring is full (a wakeup per record would cost far more, docs/performance.md).
 * The agent passes `every` as a parameter: a quarter of the ring's records divided by the CPUs.
 *
 *     HA_RINGBUF_SUBMIT(exec_events, e, ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), EVERY));
 */
HA_PERCPU_ARRAY(ha_ringbuf_unwoken, u64, HA_MAX_RINGS);

static __always_inline u64 ha_submit_flags(u64 *unwoken, u64 every)
{
    if (!unwoken || ++*unwoken < every)
        return 0;               /* the kernel wakes the reader if it had caught up */
    *unwoken = 0;
    return BPF_RB_FORCE_WAKEUP;
}

/* A ring record's struct in the CO-RE object's BTF: clang emits the types of globals and maps
 * only, so each record type gets a global, a const pointer in .rodata that nothing reads. bcc's
 * BTF keeps its maps' types only: nothing to add there.   HA_RECORD(exec_event); */
#ifdef HA_CORE
#define HA_RECORD(name) struct name *const ha_record_##name = 0
#else
#define HA_RECORD(name) struct name
#endif

/* A ring's slot in ha_ringbuf_dropped and ha_ringbuf_unwoken is a parameter, HA_RING_<param>,
 * from the probe's Python ring spec (RingProbe.params: the ring's index in its `rings`), never
 * written here. CO-RE: a .rodata global the loader sets (the default, HA_MAX_RINGS, is no slot
 * and counts nothing); bcc: -DHA_RING_<param>=slot, required.   HA_RING_SLOT(EXEC); */
#ifdef HA_CORE
#define HA_RING_SLOT(param) const volatile u32 HA_RING_##param = HA_MAX_RINGS
#else
#define HA_RING_SLOT(param) _Static_assert(HA_RING_##param < HA_MAX_RINGS, "ring slot out of range")
#endif

#endif /* HOSTAGENT_H */
