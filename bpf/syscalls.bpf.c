/* syscalls: system calls per syscall number, failed ones per errno, and (with -DSYSCALL_LATENCY)
 * a log2 latency histogram per syscall in nanoseconds.
 *
 * Any program on raw_syscalls taxes every system call on the host, so this probe keeps the work
 * small (docs/performance-kernel.md has the measured figures):
 *  - counting: one program on sys_exit, a per-CPU array indexed by syscall number; the errno
 *    hash is touched only by failing calls.
 *  - latency: raw tracepoints on sys_enter and sys_exit (no argument record is built), the start
 *    time and number kept in task-local storage (no shared hash); the histogram's counts are
 *    the call counts.
 * Tracepoint arguments only: the syscall number (sys_enter's id, sys_exit's id) and the return
 * value; the pt_regs argument of the raw tracepoints is never read.
 * -DTARGET_TGID=n limits the probe to one process.
 */
#include "maps.h"

#define SYSCALL_SLOTS 1024                 /* per-CPU counters; numbers >= this count as OTHER */
#define SYSCALL_OTHER (SYSCALL_SLOTS - 1)  /* out of range (x32 ABI, -1 for a skipped call) */
#define MAX_ERRNO 4095                     /* -4095..-1 are errors, as IS_ERR_VALUE() says */
#ifndef SYSCALL_MAX_ERRORS
#define SYSCALL_MAX_ERRORS 8192            /* {syscall, errno} pairs */
#endif

struct syscall_key {
    u32 nr;
    u32 slot;
};

struct syscall_error {
    u32 nr;
    u32 err;       /* errno, positive */
};

BPF_F_TABLE("percpu_hash", struct syscall_error, u64, syscall_errors, SYSCALL_MAX_ERRORS,
            BPF_F_NO_PREALLOC);

static __always_inline u32 syscall_index(u64 nr)
{
    return nr < SYSCALL_OTHER ? (u32)nr : SYSCALL_OTHER;
}

static __always_inline void count_error(u32 nr, long ret)
{
    if (ret >= 0 || ret < -MAX_ERRNO)
        return;
    struct syscall_error key = {.nr = nr, .err = (u32)-ret};
    u64 zero = 0, *n = syscall_errors.lookup_or_try_init(&key, &zero);
    if (n)
        *n += 1;
}

static __always_inline int other_process(void)
{
#ifdef TARGET_TGID
    return (bpf_get_current_pid_tgid() >> 32) != TARGET_TGID;
#else
    return 0;
#endif
}

#ifndef SYSCALL_LATENCY

BPF_PERCPU_ARRAY(syscall_counts, u64, SYSCALL_SLOTS);

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    if (other_process())
        return 0;
    u32 nr = syscall_index(args->id);
    u64 *n = syscall_counts.lookup(&nr);
    if (n)
        *n += 1;
    count_error(nr, args->ret);
    return 0;
}

#else

struct syscall_start {
    u64 at;        /* ns; 0 once consumed */
    u64 nr;
};

BPF_TASK_STORAGE(syscall_starts, struct syscall_start);
EXP2_HISTOGRAM(syscall_latency, struct syscall_key, SYSCALL_SLOTS * EXP2_SLOTS);

/* raw tracepoint arguments: sys_enter(struct pt_regs *regs, long id), sys_exit(regs, long ret) */
RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (other_process())
        return 0;
    struct syscall_start *s = syscall_starts.task_storage_get(bpf_get_current_task_btf(), 0,
                                                              BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!s)
        return 0;
    s->nr = ctx->args[1];
    s->at = bpf_ktime_get_ns();
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    if (other_process())
        return 0;
    struct syscall_start *s = syscall_starts.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!s || !s->at)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->at;
    s->at = 0;
    u32 nr = syscall_index(s->nr);

    struct syscall_key key = {.nr = nr, .slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(syscall_latency.lookup_or_try_init(&key, &zero), delta);
    count_error(nr, (long)ctx->args[1]);
    return 0;
}

#endif
