/* process: process creation, exec and exit (agent/sources/ebpf/process.py).
 *
 *   task:task_newtask         a new process (clone without CLONE_THREAD): counted in `forks`,
 *                             remembered in `procs` (its parent and start time)
 *   sched:sched_process_exec  one exec_event per successful execve
 *   sched:sched_process_exit  one exit_event when the last thread of a process exits
 *   syscalls:sys_enter_execve, syscalls:sys_enter_execveat (with HA_CAPTURE_ARGS)
 *                             the arguments of the execve about to run, kept per thread in
 *                             `pending_args` until sched_process_exec reports it succeeded
 *
 * The arguments are read from the caller's memory through the tracepoint's argv pointer while
 * it still exists, so a process that exits a millisecond later still has its command line.
 * Tracepoint arguments and BPF helpers only, with one exception: the exit status is not an
 * argument of sched_process_exit, so it is read from the exiting task's task_struct.exit_code:
 * under CO-RE with BPF_CORE_READ, relocated by libbpf against the running kernel's BTF; under
 * bcc at the offset the agent takes from that BTF (/sys/kernel/btf/vmlinux) and passes as
 * HA_TASK_EXIT_CODE_OFFSET. The offset never comes from the installed headers, which may belong
 * to another kernel. Without BTF the offset is not defined and exit records carry no status
 * (HA_EXIT_CODE_KNOWN unset).
 *
 * Parameters: HA_EXEC_WAKEUP_EVERY, HA_EXIT_WAKEUP_EVERY (see ha_submit_flags in hostagent.h;
 * -D under bcc, .rodata under CO-RE). Map sizes (-D under bcc, max_entries set by the loader
 * under CO-RE): HA_EXEC_RING_PAGES, HA_EXIT_RING_PAGES, HA_PROCS_MAX. bcc only, from the
 * tracepoints' formats (CO-RE asks BTF): HA_EXIT_HAS_GROUP_DEAD (sched_process_exit has the
 * group_dead argument, as on 6.18), HA_TASK_EXIT_CODE_OFFSET, HA_CAPTURE_ARGS (the syscalls
 * tracepoints exist and command lines are wanted; under CO-RE the loader leaves the argv
 * programs syscalls__sys_enter_execve and syscalls__sys_enter_execveat unloaded instead).
 */
#include "hostagent.h"

#define HA_FILENAME_LEN 256          /* execve path, truncated */
#define HA_ARGS_LEN 1024             /* argv, NUL-separated, truncated (power of two) */
#define HA_MAX_ARGS 64               /* arguments read; more set HA_EXEC_ARGS_TRUNCATED */

/* exec_event.flags */
#define HA_EXEC_ARGS_KNOWN     1     /* args holds the argv of this exec */
#define HA_EXEC_ARGS_TRUNCATED 2     /* ... cut at HA_ARGS_LEN bytes or HA_MAX_ARGS arguments */

/* exit_event.flags */
#define HA_EXIT_CODE_KNOWN  1        /* exit_code was read */
#define HA_EXIT_START_KNOWN 2        /* start_ns and ppid come from `procs` */

struct exec_event {
    u64 time_ns;                     /* bpf_ktime_get_boot_ns() */
    u64 start_ns;                    /* when the process was created, boot-time ns; 0 if not known */
    u64 cgroup_id;                   /* its cgroup v2 id (bpf_get_current_cgroup_id) */
    u32 pid;                         /* the process (thread group) id after exec */
    u32 old_pid;                     /* the thread that called execve; differs from pid when it
                                        was not the group leader */
    u32 ppid;                        /* the process that created it, 0 if not known */
    u32 uid;                         /* real user id, after exec (setuid binaries included) */
    u32 flags;                       /* HA_EXEC_* */
    u32 args_size;                   /* bytes of args in use */
    char comm[16];                   /* the new command name */
    char filename[HA_FILENAME_LEN];  /* the path given to execve, NUL-terminated */
    char args[HA_ARGS_LEN];          /* argv[0] NUL argv[1] NUL ... */
};

/* pending_args value, and the per-CPU scratch it is built in: twice HA_ARGS_LEN, so that a read
 * of up to HA_ARGS_LEN bytes at any offset below HA_ARGS_LEN stays in bounds */
struct exec_args {
    u32 size;
    u32 flags;
    char buf[2 * HA_ARGS_LEN];
};

struct exit_event {
    u64 time_ns;                     /* bpf_ktime_get_boot_ns() */
    u64 start_ns;                    /* when the process was created, boot-time ns */
    u64 cgroup_id;                   /* its cgroup v2 id */
    u32 pid;                         /* the process (thread group) id */
    u32 tid;                         /* its last thread */
    u32 ppid;                        /* the process that created it, 0 if not known */
    s32 exit_code;                   /* wait status: (status << 8) | signal | 0x80 if core dumped */
    u32 flags;                       /* HA_EXIT_* */
    u32 _pad;
    char comm[16];                   /* the last thread's command name */
};

/* procs value: what task_newtask learned about a process */
struct proc_info {
    u64 start_ns;                    /* bpf_ktime_get_boot_ns() at creation */
    u32 ppid;                        /* the creating process */
    u32 _pad;
};

HA_RECORD(exec_event);
HA_RECORD(exit_event);

#ifndef HA_EXEC_RING_PAGES
#define HA_EXEC_RING_PAGES 256       /* 1 MiB: 775 exec records */
#endif
#ifndef HA_EXIT_RING_PAGES
#define HA_EXIT_RING_PAGES 128       /* 512 KiB: 8191 exit records */
#endif
#ifdef HA_CORE
const volatile u64 HA_EXEC_WAKEUP_EVERY = 256;
const volatile u64 HA_EXIT_WAKEUP_EVERY = 256;
/* the argv programs are always in the object; the loader leaves them unloaded when command
 * lines are not wanted, and pending_args stays empty */
#define HA_CAPTURE_ARGS
#else
#ifndef HA_EXEC_WAKEUP_EVERY
#define HA_EXEC_WAKEUP_EVERY 256
#endif
#ifndef HA_EXIT_WAKEUP_EVERY
#define HA_EXIT_WAKEUP_EVERY 256
#endif
#endif
#ifndef HA_PROCS_MAX
#define HA_PROCS_MAX 65536           /* live processes remembered */
#endif

#define HA_CLONE_THREAD 0x00010000ULL

HA_RING_SLOT(EXEC);
HA_RING_SLOT(EXIT);

HA_RINGBUF(exec_events, HA_EXEC_RING_PAGES);
HA_RINGBUF(exit_events, HA_EXIT_RING_PAGES);
/* pid -> parent, start. Entries are removed when the process exits; memory grows with the
 * processes alive (no preallocation). When it is full, new processes are reported without their
 * parent and start time. */
HA_HASH(procs, u32, struct proc_info, HA_PROCS_MAX);
HA_PERCPU_ARRAY(forks, u64, 1);                                     /* processes created */

#ifdef HA_CAPTURE_ARGS
HA_PERCPU_ARRAY(args_scratch, struct exec_args, 1);
/* thread id -> the arguments of its execve in flight; a failed execve leaves its entry behind
 * until the thread's next execve or LRU eviction */
HA_LRU_HASH(pending_args, u32, struct exec_args, 1024);
#endif

#ifndef HA_CORE
HA_MAP_FN void *exec_events_ringbuf_reserve(u64 size) { return exec_events.ringbuf_reserve(size); }
HA_MAP_FN void exec_events_ringbuf_submit(void *e, u64 flags) { exec_events.ringbuf_submit(e, flags); }
HA_MAP_FN void *exit_events_ringbuf_reserve(u64 size) { return exit_events.ringbuf_reserve(size); }
HA_MAP_FN void exit_events_ringbuf_submit(void *e, u64 flags) { exit_events.ringbuf_submit(e, flags); }
HA_MAP_FN u64 *ha_ringbuf_dropped_lookup(u32 *slot) { return ha_ringbuf_dropped.lookup(slot); }
HA_MAP_FN u64 *ha_ringbuf_unwoken_lookup(u32 *slot) { return ha_ringbuf_unwoken.lookup(slot); }
HA_MAP_FN struct proc_info *procs_lookup(u32 *pid) { return procs.lookup(pid); }
HA_MAP_FN int procs_update(u32 *pid, struct proc_info *info) { return procs.update(pid, info); }
HA_MAP_FN int procs_delete(u32 *pid) { return procs.delete(pid); }
HA_MAP_FN u64 *forks_lookup(u32 *i) { return forks.lookup(i); }
#ifdef HA_CAPTURE_ARGS
HA_MAP_FN struct exec_args *args_scratch_lookup(u32 *i) { return args_scratch.lookup(i); }
HA_MAP_FN struct exec_args *pending_args_lookup(u32 *tid) { return pending_args.lookup(tid); }
HA_MAP_FN int pending_args_update(u32 *tid, struct exec_args *a) { return pending_args.update(tid, a); }
HA_MAP_FN int pending_args_delete(u32 *tid) { return pending_args.delete(tid); }
#endif
#endif

#ifdef HA_CAPTURE_ARGS

static __always_inline int ha_capture_args(const char *const *argv)
{
    u32 zero = 0;
    struct exec_args *a = HA_LOOKUP(args_scratch, &zero);
    if (!a)
        return 0;
    u32 size = 0, flags = HA_EXEC_ARGS_KNOWN;
    int i;
    for (i = 0; i < HA_MAX_ARGS; i++) {
        const char *arg = NULL;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) != 0) {
            flags |= HA_EXEC_ARGS_TRUNCATED;    /* argv not readable now: keep what we have */
            break;
        }
        if (!arg)
            break;
        if (size >= HA_ARGS_LEN) {
            flags |= HA_EXEC_ARGS_TRUNCATED;
            break;
        }
        long n = bpf_probe_read_user_str(&a->buf[size & (HA_ARGS_LEN - 1)], HA_ARGS_LEN, arg);
        if (n <= 0) {
            flags |= HA_EXEC_ARGS_TRUNCATED;
            break;
        }
        size += n;
    }
    if (i == HA_MAX_ARGS)
        flags |= HA_EXEC_ARGS_TRUNCATED;
    if (size > HA_ARGS_LEN) {
        size = HA_ARGS_LEN;
        flags |= HA_EXEC_ARGS_TRUNCATED;
    }
    a->size = size;
    a->flags = flags;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    HA_UPDATE(pending_args, &tid, a);
    return 0;
}

/* under CO-RE the record is struct syscall_trace_enter (compat.h), the arguments in order:
 * execve(filename, argv, envp), execveat(dfd, filename, argv, envp, flags) */
#ifdef HA_CORE
#define HA_EXECVE_ARGV ((const char *const *)args->args[1])
#define HA_EXECVEAT_ARGV ((const char *const *)args->args[2])
#else
#define HA_EXECVE_ARGV args->argv
#define HA_EXECVEAT_ARGV args->argv
#endif

HA_TRACEPOINT(syscalls, sys_enter_execve, syscall_trace_enter)
{
    return ha_capture_args(HA_EXECVE_ARGV);
}

HA_TRACEPOINT(syscalls, sys_enter_execveat, syscall_trace_enter)
{
    return ha_capture_args(HA_EXECVEAT_ARGV);
}
#endif

HA_TRACEPOINT(task, task_newtask, task_newtask)
{
    if (args->clone_flags & HA_CLONE_THREAD)
        return 0;
    u32 zero = 0;
    u64 *count = HA_LOOKUP(forks, &zero);
    if (count)
        *count += 1;
    u32 pid = args->pid;
    struct proc_info info = {
        .start_ns = bpf_ktime_get_boot_ns(),
        .ppid = bpf_get_current_pid_tgid() >> 32,   /* current is the parent */
    };
    HA_UPDATE(procs, &pid, &info);
    return 0;
}

HA_TRACEPOINT(sched, sched_process_exec, sched_process_exec)
{
    u32 slot = HA_RING_EXEC;
    struct exec_event *e = HA_RINGBUF_RESERVE(exec_events, sizeof(*e));
    if (!e)
        return ha_count_drop(HA_LOOKUP(ha_ringbuf_dropped, &slot));
    u32 pid = args->pid;
    struct proc_info *info = HA_LOOKUP(procs, &pid);
    e->time_ns = bpf_ktime_get_boot_ns();
    e->start_ns = info ? info->start_ns : 0;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->pid = pid;
    e->old_pid = args->old_pid;
    e->ppid = info ? info->ppid : 0;
    e->uid = (u32)bpf_get_current_uid_gid();
    e->flags = 0;
    e->args_size = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    HA_TP_STR(e->filename, filename);
#ifdef HA_CAPTURE_ARGS
    u32 old_pid = args->old_pid;     /* the thread that called execve */
    struct exec_args *a = HA_LOOKUP(pending_args, &old_pid);
    if (a) {
        if (bpf_probe_read_kernel(e->args, HA_ARGS_LEN, a->buf) == 0) {
            e->args_size = a->size;
            e->flags = a->flags;
        }
        HA_DELETE(pending_args, &old_pid);
    }
#endif
    HA_RINGBUF_SUBMIT(exec_events, e,
                      ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), HA_EXEC_WAKEUP_EVERY));
    return 0;
}

HA_TRACEPOINT(sched, sched_process_exit, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32;
    int last;                        /* the last thread of its process */
#if defined(HA_CORE) || defined(HA_EXIT_HAS_GROUP_DEAD)
    if (HA_TP_HAS(group_dead))
        last = args->group_dead;
    else
#endif
        last = (u32)pid_tgid == pid; /* older kernels: report when the group leader exits */
    if (!last)
        return 0;
    u32 slot = HA_RING_EXIT;
    struct exit_event *e = HA_RINGBUF_RESERVE(exit_events, sizeof(*e));
    if (!e) {
        HA_DELETE(procs, &pid);
        return ha_count_drop(HA_LOOKUP(ha_ringbuf_dropped, &slot));
    }
    e->time_ns = bpf_ktime_get_boot_ns();
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->pid = pid;
    e->tid = (u32)pid_tgid;
    e->flags = 0;
    e->_pad = 0;
    e->exit_code = 0;
    /* do_exit() stores the status in current->exit_code before this tracepoint fires */
#ifdef HA_CORE
    struct task_struct *task = (void *)bpf_get_current_task();
    if (bpf_core_read(&e->exit_code, sizeof(e->exit_code), &task->exit_code) == 0)
        e->flags |= HA_EXIT_CODE_KNOWN;
#elif defined(HA_TASK_EXIT_CODE_OFFSET)
    u64 task = bpf_get_current_task();
    if (bpf_probe_read_kernel(&e->exit_code, sizeof(e->exit_code),
                              (void *)(task + HA_TASK_EXIT_CODE_OFFSET)) == 0)
        e->flags |= HA_EXIT_CODE_KNOWN;
#endif
    struct proc_info *info = HA_LOOKUP(procs, &pid);
    if (info) {
        e->start_ns = info->start_ns;
        e->ppid = info->ppid;
        e->flags |= HA_EXIT_START_KNOWN;
    } else {
        e->start_ns = 0;
        e->ppid = 0;
    }
    bpf_get_current_comm(&e->comm, sizeof(e->comm));   /* the tracepoint's comm: current's */
    HA_RINGBUF_SUBMIT(exit_events, e,
                      ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), HA_EXIT_WAKEUP_EVERY));
    HA_DELETE(procs, &pid);
    return 0;
}

