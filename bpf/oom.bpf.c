/* oom: processes the kernel's OOM killer chose as victims (agent/sources/ebpf/oom.py).
 *
 *   oom:mark_victim   one oom_event per victim, system-wide or in a memory cgroup
 *
 * Tracepoint arguments only. On older kernels mark_victim carries only the pid; under bcc the
 * agent reads the tracepoint's format and defines HA_TP_HAS_<field> for each argument this kernel
 * has, and HA_TP_LOC_comm when comm is a __data_loc string; under CO-RE the kernel's BTF says
 * (HA_TP_HAS, and comm is read only as a __data_loc string). Missing fields stay 0 and the agent leaves
 * their attributes out. The memory figures are the kernel's, in kB.
 */
#include "hostagent.h"

struct oom_event {
    u64 time_ns;                 /* bpf_ktime_get_boot_ns() */
    u64 total_vm_kb;             /* victim's virtual memory */
    u64 anon_rss_kb;             /* resident anonymous memory */
    u64 file_rss_kb;             /* resident file-backed memory */
    u64 shmem_rss_kb;            /* resident shared memory */
    u64 pgtables_kb;             /* page tables */
    u32 pid;                     /* the victim */
    u32 uid;                     /* the victim's real user id */
    u32 trigger_pid;             /* the process whose allocation invoked the OOM killer */
    s32 oom_score_adj;           /* the victim's oom_score_adj */
    char comm[16];               /* the victim's command name */
    char trigger_comm[16];       /* the allocating process's command name */
};

HA_RECORD(oom_event);

#ifndef HA_OOM_RING_PAGES
#define HA_OOM_RING_PAGES 16     /* 64 KiB: 630 records */
#endif

#ifdef HA_CORE
const volatile u64 HA_OOM_WAKEUP_EVERY = 64;
/* vmlinux.h has every field; HA_TP_HAS() asks this kernel's BTF at load */
#define HA_TP_HAS_uid
#define HA_TP_HAS_total_vm
#define HA_TP_HAS_anon_rss
#define HA_TP_HAS_file_rss
#define HA_TP_HAS_shmem_rss
#define HA_TP_HAS_pgtables
#define HA_TP_HAS_oom_score_adj
#elif !defined(HA_OOM_WAKEUP_EVERY)
#define HA_OOM_WAKEUP_EVERY 64
#endif

HA_RING_SLOT(OOM);

HA_RINGBUF(oom_events, HA_OOM_RING_PAGES);

#ifndef HA_CORE
HA_MAP_FN void *oom_events_ringbuf_reserve(u64 size) { return oom_events.ringbuf_reserve(size); }
HA_MAP_FN void oom_events_ringbuf_submit(void *e, u64 flags) { oom_events.ringbuf_submit(e, flags); }
HA_MAP_FN u64 *ha_ringbuf_dropped_lookup(u32 *slot) { return ha_ringbuf_dropped.lookup(slot); }
HA_MAP_FN u64 *ha_ringbuf_unwoken_lookup(u32 *slot) { return ha_ringbuf_unwoken.lookup(slot); }
#endif

HA_TRACEPOINT(oom, mark_victim, mark_victim)
{
    u32 slot = HA_RING_OOM;
    struct oom_event *e = HA_RINGBUF_RESERVE(oom_events, sizeof(*e));
    if (!e)
        return ha_count_drop(HA_LOOKUP(ha_ringbuf_dropped, &slot));
    __builtin_memset(e, 0, sizeof(*e));
    e->time_ns = bpf_ktime_get_boot_ns();
    e->pid = args->pid;
#ifdef HA_TP_HAS_uid
    if (HA_TP_HAS(uid))
        e->uid = args->uid;
#endif
#ifdef HA_TP_HAS_total_vm
    if (HA_TP_HAS(total_vm))
        e->total_vm_kb = args->total_vm;
#endif
#ifdef HA_TP_HAS_anon_rss
    if (HA_TP_HAS(anon_rss))
        e->anon_rss_kb = args->anon_rss;
#endif
#ifdef HA_TP_HAS_file_rss
    if (HA_TP_HAS(file_rss))
        e->file_rss_kb = args->file_rss;
#endif
#ifdef HA_TP_HAS_shmem_rss
    if (HA_TP_HAS(shmem_rss))
        e->shmem_rss_kb = args->shmem_rss;
#endif
#ifdef HA_TP_HAS_pgtables
    if (HA_TP_HAS(pgtables))
        e->pgtables_kb = args->pgtables;
#endif
#ifdef HA_TP_HAS_oom_score_adj
    if (HA_TP_HAS(oom_score_adj))
        e->oom_score_adj = args->oom_score_adj;
#endif
#if defined(HA_CORE)
    if (HA_TP_HAS(__data_loc_comm))
        HA_TP_STR(e->comm, comm);
#elif defined(HA_TP_HAS_comm) && defined(HA_TP_LOC_comm)
    HA_TP_STR(e->comm, comm);
#elif defined(HA_TP_HAS_comm)
    bpf_probe_read_kernel_str(&e->comm, sizeof(e->comm), args->comm);
#endif
    e->trigger_pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&e->trigger_comm, sizeof(e->trigger_comm));
    HA_RINGBUF_SUBMIT(oom_events, e,
                      ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), HA_OOM_WAKEUP_EVERY));
    return 0;
}

