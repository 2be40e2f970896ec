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
 * TARGET_TGID=n limits the probe to one process (-D under bcc; under CO-RE a .rodata parameter,
 * 0 for every process).
 * The two ways are variants: bcc compiles one (-DSYSCALL_LATENCY or not); a CO-RE object holds
 * both, the counting program raw_syscalls__sys_exit and the latency programs raw_tp__sys_enter
 * and raw_tp__sys_exit, and the loader loads one way's programs.
 * With BY_CGROUP (bpf/include/maps.h) every key also carries the calling task's cgroup (sys_exit
 * runs in the caller); counting then uses the per-CPU hash syscall_calls {cgroup, nr} instead of
 * the array, and every keyed map has its overflow companion.
 */
#include "maps.h"

#define SYSCALL_SLOTS 1024                 /* per-CPU counters; numbers >= this count as OTHER */
#define SYSCALL_OTHER (SYSCALL_SLOTS - 1)  /* out of range (x32 ABI, -1 for a skipped call) */
#define MAX_ERRNO 4095                     /* -4095..-1 are errors, as IS_ERR_VALUE() says */
#define SYSCALL_HOST_ERRORS 8192           /* {syscall, errno} pairs: the overflow's key space */
#ifndef SYSCALL_MAX_ERRORS
#define SYSCALL_MAX_ERRORS 8192            /* {cgroup, syscall, errno}; the loader sets it (CO-RE) */
#endif
#ifndef SYSCALL_MAX_KEYS
#define SYSCALL_MAX_KEYS 131072            /* {cgroup, syscall, slot} or {cgroup, syscall}; the
                                              loader sets it (CO-RE) */
#endif

struct syscall_key {
    u64 cgroup;
    u32 nr;
    u32 slot;
};

struct syscall_call {
    u64 cgroup;
    u32 nr;
    u32 pad;
};

struct syscall_error {
    u64 cgroup;
    u32 nr;
    u32 err;       /* errno, positive */
};

HA_PERCPU_HASH(syscall_errors, struct syscall_error, u64, SYSCALL_MAX_ERRORS);
HA_PERCPU_HASH(syscall_errors_overflow, struct syscall_error, u64, SYSCALL_HOST_ERRORS);

#ifndef HA_CORE
HA_MAP_FN u64 *syscall_errors_lookup_or_try_init(struct syscall_error *key, u64 *zero)
{
    return syscall_errors.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *syscall_errors_overflow_lookup_or_try_init(struct syscall_error *key, u64 *zero)
{
    return syscall_errors_overflow.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *ha_events_lookup(u32 *i) { return ha_events.lookup(i); }
#endif

static __always_inline u32 syscall_index(u64 nr)
{
    return nr < SYSCALL_OTHER ? (u32)nr : SYSCALL_OTHER;
}

static __always_inline void count_error(u64 cgroup, u32 nr, long ret)
{
    if (ret >= 0 || ret < -MAX_ERRNO)
        return;
    struct syscall_error key = {.cgroup = cgroup, .nr = nr, .err = (u32)-ret};
    u64 zero = 0, *n = HA_KEYED_LOOKUP_OR_TRY_INIT(syscall_errors, &key, &zero);
    if (n)
        *n += 1;
}

#ifdef HA_CORE
const volatile u32 TARGET_TGID = 0;
#endif

static __always_inline int other_process(void)
{
#if defined(HA_CORE) || defined(TARGET_TGID)
    return TARGET_TGID && (bpf_get_current_pid_tgid() >> 32) != TARGET_TGID;
#else
    return 0;
#endif
}

#if defined(HA_CORE) || !defined(SYSCALL_LATENCY)

HA_PERCPU_ARRAY(syscall_counts, u64, SYSCALL_SLOTS);                  /* host-wide */
HA_PERCPU_HASH(syscall_calls, struct syscall_call, u64, SYSCALL_MAX_KEYS);   /* BY_CGROUP */
HA_PERCPU_HASH(syscall_calls_overflow, struct syscall_call, u64, SYSCALL_SLOTS);

#ifndef HA_CORE
HA_MAP_FN u64 *syscall_counts_lookup(u32 *nr) { return syscall_counts.lookup(nr); }
HA_MAP_FN u64 *syscall_calls_lookup_or_try_init(struct syscall_call *key, u64 *zero)
{
    return syscall_calls.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *syscall_calls_overflow_lookup_or_try_init(struct syscall_call *key, u64 *zero)
{
    return syscall_calls_overflow.lookup_or_try_init(key, zero);
}
#endif

HA_TRACEPOINT(raw_syscalls, sys_exit, sys_exit)
{
    if (other_process())
        return 0;
    u32 nr = syscall_index(args->id);
    u64 *n, zero = 0, cgroup = HA_CGROUP_CURRENT();
    if (HA_BY_CGROUP) {
        struct syscall_call key = {.cgroup = cgroup, .nr = nr};
        n = HA_KEYED_LOOKUP_OR_TRY_INIT(syscall_calls, &key, &zero);
    } else {
        n = HA_LOOKUP(syscall_counts, &nr);
    }
    if (n)
        *n += 1;
    count_error(cgroup, nr, args->ret);
    return 0;
}

#endif

#if defined(HA_CORE) || defined(SYSCALL_LATENCY)

struct syscall_start {
    u64 at;        /* ns; 0 once consumed */
    u64 nr;
};

HA_TASK_STORAGE(syscall_starts, struct syscall_start);
EXP2_KEYED_HISTOGRAM(syscall_latency, struct syscall_key, SYSCALL_MAX_KEYS, SYSCALL_SLOTS * EXP2_SLOTS);

#ifndef HA_CORE
HA_MAP_FN struct syscall_start *syscall_starts_task_storage_get(void *task, u64 flags)
{
    return syscall_starts.task_storage_get(task, 0, flags);
}
HA_MAP_FN struct exp2_bucket *syscall_latency_lookup_or_try_init(struct syscall_key *key,
                                                                 struct exp2_bucket *zero)
{
    return syscall_latency.lookup_or_try_init(key, zero);
}
HA_MAP_FN struct exp2_bucket *syscall_latency_overflow_lookup_or_try_init(struct syscall_key *key,
                                                                          struct exp2_bucket *zero)
{
    return syscall_latency_overflow.lookup_or_try_init(key, zero);
}
#endif

/* raw tracepoint arguments: sys_enter(struct pt_regs *regs, long id), sys_exit(regs, long ret) */
HA_RAW_TRACEPOINT(sys_enter)
{
    if (other_process())
        return 0;
    struct syscall_start *s = HA_TASK_STORAGE_GET(syscall_starts, bpf_get_current_task_btf(),
                                                  BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!s)
        return 0;
    s->nr = ctx->args[1];
    s->at = bpf_ktime_get_ns();
    return 0;
}

HA_RAW_TRACEPOINT(sys_exit)
{
    if (other_process())
        return 0;
    struct syscall_start *s = HA_TASK_STORAGE_GET(syscall_starts, bpf_get_current_task_btf(), 0);
    if (!s || !s->at)
        return 0;
    u64 delta = bpf_ktime_get_ns() - s->at;
    s->at = 0;
    u32 nr = syscall_index(s->nr);
    u64 cgroup = HA_CGROUP_CURRENT();

    struct syscall_key key = {.cgroup = cgroup, .nr = nr, .slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(HA_KEYED_LOOKUP_OR_TRY_INIT(syscall_latency, &key, &zero), delta);
    count_error(cgroup, nr, (long)ctx->args[1]);
    return 0;
}

#endif
