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

BPF_TABLE("lru_hash", u32, u64, runq_queued, RUNQ_MAX_THREADS);   /* tid -> queued at, ns */
EXP2_HISTOGRAM(runq_latency, struct runq_key, EXP2_SLOTS);

static __always_inline void queued(u32 tid)
{
    if (tid == 0)               /* the idle task */
        return;
    u64 now = bpf_ktime_get_ns();
    runq_queued.update(&tid, &now);
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    queued(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    queued(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    if (!(args->prev_state & TASK_REPORT_STATE_MASK))
        queued(args->prev_pid);

    u32 tid = args->next_pid;
    u64 *at = runq_queued.lookup(&tid);
    if (!at)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *at;
    runq_queued.delete(&tid);

    struct runq_key key = {.slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(runq_latency.lookup_or_try_init(&key, &zero), delta);
    return 0;
}
