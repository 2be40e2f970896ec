/* runqlat: how long runnable threads wait on a CPU run queue before they run.
 *
 * A thread is queued when it is woken (sched_wakeup, sched_wakeup_new) or preempted while still
 * runnable (sched_switch with prev_state "R"); it stops waiting when sched_switch switches it in.
 * The wait, in nanoseconds, goes into a log2 histogram (bpf/include/maps.h).
 *
 * With BY_CGROUP the histogram is keyed by the cgroup of the thread that waited. That cgroup is
 * captured when the thread is queued and kept with the queue time, because neither end of the
 * wait runs in the thread's own context: a wakeup runs in the waker's (or an interrupt's), and
 * sched_switch runs in the thread being switched out. So:
 *   - woken threads: the wakeup tracepoints' argument is the woken task, and its
 *     task->cgroups->dfl_cgrp->kn->id is read. CO-RE: BTF-typed tracepoints (tp_btf), where that
 *     is a chain of direct loads relocated by libbpf, no helper call per hop; bcc: raw
 *     tracepoints and bpf_probe_read_kernel() at the member offsets from the kernel's BTF
 *     (RUNQ_TASK_* below, -D parameters);
 *   - preempted threads: sched_switch runs in them (`current` is prev), so their own cgroup.
 * Capturing at queue time rather than at switch-in costs the same one read per wait, and is what
 * the wait belongs to: a thread moved to another cgroup while queued is counted where it waited.
 * Without BY_CGROUP the wakeups stay plain tracepoints and only pids are read, as before.
 */
#include "maps.h"

#ifndef RUNQ_MAX_THREADS
#define RUNQ_MAX_THREADS 16384     /* threads waiting at once; least recently queued evicted first */
#endif
#ifndef RUNQ_MAX_KEYS
#define RUNQ_MAX_KEYS (256 * EXP2_SLOTS)   /* {cgroup, slot} pairs; the loader sets it (CO-RE) */
#endif

/* prev_state is the reported task state bit (S=1, D=2, ...), 0 for runnable, with
 * TASK_REPORT_MAX (0x100) or'ed in when the switch was a preemption: runnable = no state bit. */
#define TASK_REPORT_STATE_MASK 0xff

struct runq_key {
    u64 cgroup;
    u32 slot;
    u32 pad;
};

struct runq_wait {
    u64 at;         /* queued at, ns */
    u64 cgroup;     /* the waiting thread's cgroup (BY_CGROUP), else 0 */
};

HA_LRU_HASH(runq_queued, u32, struct runq_wait, RUNQ_MAX_THREADS);   /* tid -> wait */
EXP2_KEYED_HISTOGRAM(runq_latency, struct runq_key, RUNQ_MAX_KEYS, EXP2_SLOTS);

#ifndef HA_CORE
HA_MAP_FN struct runq_wait *runq_queued_lookup(u32 *tid) { return runq_queued.lookup(tid); }
HA_MAP_FN int runq_queued_update(u32 *tid, struct runq_wait *w) { return runq_queued.update(tid, w); }
HA_MAP_FN int runq_queued_delete(u32 *tid) { return runq_queued.delete(tid); }
HA_MAP_FN struct exp2_bucket *runq_latency_lookup_or_try_init(struct runq_key *key,
                                                               struct exp2_bucket *zero)
{
    return runq_latency.lookup_or_try_init(key, zero);
}
HA_MAP_FN struct exp2_bucket *runq_latency_overflow_lookup_or_try_init(struct runq_key *key,
                                                                        struct exp2_bucket *zero)
{
    return runq_latency_overflow.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *ha_events_lookup(u32 *i) { return ha_events.lookup(i); }
#endif

static __always_inline void queued(u32 tid, u64 cgroup)
{
    if (tid == 0)               /* the idle task */
        return;
    struct runq_wait w = {.at = bpf_ktime_get_ns(), .cgroup = cgroup};
    HA_UPDATE(runq_queued, &tid, &w);
}

HA_TRACEPOINT(sched, sched_switch, sched_switch)
{
    if (!(args->prev_state & TASK_REPORT_STATE_MASK))
        queued(args->prev_pid, HA_CGROUP_CURRENT());       /* current is prev */

    u32 tid = args->next_pid;
    struct runq_wait *w = HA_LOOKUP(runq_queued, &tid);
    if (!w)
        return 0;
    u64 delta = bpf_ktime_get_ns() - w->at;
    struct runq_key key = {.cgroup = w->cgroup, .slot = exp2_slot(delta)};
    HA_DELETE(runq_queued, &tid);

    struct exp2_bucket zero = {};
    exp2_add(HA_KEYED_LOOKUP_OR_TRY_INIT(runq_latency, &key, &zero), delta);
    return 0;
}

/* host-wide: the tracepoints, pids only */
#if defined(HA_CORE) || !defined(BY_CGROUP)
HA_TRACEPOINT(sched, sched_wakeup, sched_wakeup_template)
{
    queued(args->pid, 0);
    return 0;
}

HA_TRACEPOINT(sched, sched_wakeup_new, sched_wakeup_template)
{
    queued(args->pid, 0);
    return 0;
}
#endif

/* by cgroup: sched_wakeup(struct task_struct *p), sched_wakeup_new(p) */
#ifdef HA_CORE
static __always_inline void woken(struct task_struct *p)
{
    queued(p->pid, p->cgroups->dfl_cgrp->kn->id);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(tp_btf__sched_wakeup, struct task_struct *p)
{
    woken(p);
    return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(tp_btf__sched_wakeup_new, struct task_struct *p)
{
    woken(p);
    return 0;
}
#elif defined(BY_CGROUP)
/* RUNQ_TASK_PID, RUNQ_TASK_CGROUPS, RUNQ_CSS_SET_DFL_CGRP, RUNQ_CGROUP_KN, RUNQ_KERNFS_NODE_ID:
 * member offsets from the kernel's BTF (agent/sources/ebpf/runqlat.py) */
static __always_inline void woken(void *p)
{
    u32 pid = 0;
    void *cset = 0, *cgrp = 0, *kn = 0;
    u64 id = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), p + RUNQ_TASK_PID);
    if (!bpf_probe_read_kernel(&cset, sizeof(cset), p + RUNQ_TASK_CGROUPS) &&
        !bpf_probe_read_kernel(&cgrp, sizeof(cgrp), cset + RUNQ_CSS_SET_DFL_CGRP) &&
        !bpf_probe_read_kernel(&kn, sizeof(kn), cgrp + RUNQ_CGROUP_KN))
        bpf_probe_read_kernel(&id, sizeof(id), kn + RUNQ_KERNFS_NODE_ID);
    queued(pid, id);
}

HA_RAW_TRACEPOINT(sched_wakeup)
{
    woken((void *)ctx->args[0]);
    return 0;
}

HA_RAW_TRACEPOINT(sched_wakeup_new)
{
    woken((void *)ctx->args[0]);
    return 0;
}
#endif
