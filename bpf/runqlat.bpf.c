/* runqlat: how long runnable threads wait on a CPU run queue before they run.
 *
 * A thread is queued when it is woken (sched_wakeup, sched_wakeup_new) or preempted while still
 * runnable (sched_switch with prev_state "R"); it stops waiting when sched_switch switches it in.
 * The wait, in nanoseconds, goes into a log2 histogram (bpf/include/maps.h).
 * Tracepoint arguments only: pids and prev_state.
 */
#include "maps.h"

#ifndef RUNQ_MAX_THREADS
#define RUNQ_MAX_THREADS 16384     /* threads waiting at once; least recently queued evicted first */
#endif

/* prev_state is the reported task state bit (S=1, D=2, ...), 0 for runnable, with
 * TASK_REPORT_MAX (0x100) or'ed in when the switch was a preemption: runnable = no state bit. */
#define TASK_REPORT_STATE_MASK 0xff

struct runq_key {
    u32 slot;
};

HA_LRU_HASH(runq_queued, u32, u64, RUNQ_MAX_THREADS);   /* tid -> queued at, ns */
EXP2_HISTOGRAM(runq_latency, struct runq_key, EXP2_SLOTS);

#ifndef HA_CORE
HA_MAP_FN u64 *runq_queued_lookup(u32 *tid) { return runq_queued.lookup(tid); }
HA_MAP_FN int runq_queued_update(u32 *tid, u64 *at) { return runq_queued.update(tid, at); }
HA_MAP_FN int runq_queued_delete(u32 *tid) { return runq_queued.delete(tid); }
HA_MAP_FN struct exp2_bucket *runq_latency_lookup_or_try_init(struct runq_key *key,
                                                               struct exp2_bucket *zero)
{
    return runq_latency.lookup_or_try_init(key, zero);
}
#endif

static __always_inline void queued(u32 tid)
{
    if (tid == 0)               /* the idle task */
        return;
    u64 now = bpf_ktime_get_ns();
    HA_UPDATE(runq_queued, &tid, &now);
}

HA_TRACEPOINT(sched, sched_wakeup, sched_wakeup_template)
{
    queued(args->pid);
    return 0;
}

HA_TRACEPOINT(sched, sched_wakeup_new, sched_wakeup_template)
{
    queued(args->pid);
    return 0;
}

HA_TRACEPOINT(sched, sched_switch, sched_switch)
{
    if (!(args->prev_state & TASK_REPORT_STATE_MASK))
        queued(args->prev_pid);

    u32 tid = args->next_pid;
    u64 *at = HA_LOOKUP(runq_queued, &tid);
    if (!at)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *at;
    HA_DELETE(runq_queued, &tid);

    struct runq_key key = {.slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(HA_LOOKUP_OR_TRY_INIT(runq_latency, &key, &zero), delta);
    return 0;
}
