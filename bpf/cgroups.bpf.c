/* cgroups: every cgroup created on the cgroup v2 hierarchy, with its id and path
 * (agent/sources/ebpf/cgroups.py), so that a cgroup id captured in the kernel by another probe
 * still names its workload after the cgroup is gone.
 *
 *   cgroup:cgroup_mkdir   one cgroup_event per cgroup created on the default (v2) hierarchy
 *
 * Tracepoint arguments only. The kernel builds the path for the tracepoint (cgroup_path(), at
 * most 1024 bytes, relative to the hierarchy's root) only while something is attached to it. The
 * default hierarchy's id (`root`) is 0: the v1 hierarchies of a hybrid host are left out. A path
 * longer than HA_CGROUP_PATH_LEN - 1 bytes is cut there; path_size keeps the length the kernel
 * had (the high 16 bits of the __data_loc), so the agent knows the record's path is cut and asks
 * the kernel for that cgroup instead (open_by_handle_at while it lives).
 *
 * Parameters: HA_CGROUP_WAKEUP_EVERY (ha_submit_flags in hostagent.h; -D under bcc, .rodata
 * under CO-RE). Map size (-D under bcc, set by the loader under CO-RE): HA_CGROUP_RING_PAGES.
 */
#include "hostagent.h"

#define HA_CGROUP_PATH_LEN 512       /* path bytes kept, NUL included */

struct cgroup_event {
    u64 id;                          /* the cgroup's id: the inode of its directory under the v2 mount */
    u32 level;                       /* its depth: 1 for a cgroup right under the root */
    u32 path_size;                   /* length of the kernel's path, NUL included; more than
                                        HA_CGROUP_PATH_LEN: `path` is cut */
    char path[HA_CGROUP_PATH_LEN];   /* relative to the v2 root ("/system.slice/x.service"), NUL-terminated */
};

HA_RECORD(cgroup_event);

#ifndef HA_CGROUP_RING_PAGES
#define HA_CGROUP_RING_PAGES 256     /* 1 MiB: 1956 records */
#endif
#ifdef HA_CORE
const volatile u64 HA_CGROUP_WAKEUP_EVERY = 64;
#define HA_PATH_LOC(args) ((args)->__data_loc_path)
#else
#ifndef HA_CGROUP_WAKEUP_EVERY
#define HA_CGROUP_WAKEUP_EVERY 64
#endif
#define HA_PATH_LOC(args) ((args)->data_loc_path)
#endif

HA_RING_SLOT(CGROUP);

HA_RINGBUF(cgroup_events, HA_CGROUP_RING_PAGES);

#ifndef HA_CORE
HA_MAP_FN void *cgroup_events_ringbuf_reserve(u64 size) { return cgroup_events.ringbuf_reserve(size); }
HA_MAP_FN void cgroup_events_ringbuf_submit(void *e, u64 flags) { cgroup_events.ringbuf_submit(e, flags); }
HA_MAP_FN u64 *ha_ringbuf_dropped_lookup(u32 *slot) { return ha_ringbuf_dropped.lookup(slot); }
HA_MAP_FN u64 *ha_ringbuf_unwoken_lookup(u32 *slot) { return ha_ringbuf_unwoken.lookup(slot); }
#endif

HA_TRACEPOINT(cgroup, cgroup_mkdir, cgroup)
{
    if (args->root != 0)             /* a cgroup v1 hierarchy */
        return 0;
    u32 slot = HA_RING_CGROUP;
    struct cgroup_event *e = HA_RINGBUF_RESERVE(cgroup_events, sizeof(*e));
    if (!e)
        return ha_count_drop(HA_LOOKUP(ha_ringbuf_dropped, &slot));
    e->id = args->id;
    e->level = args->level;
    e->path_size = HA_PATH_LOC(args) >> 16;
    e->path[0] = 0;
    HA_TP_STR(e->path, path);
    HA_RINGBUF_SUBMIT(cgroup_events, e,
                      ha_submit_flags(HA_LOOKUP(ha_ringbuf_unwoken, &slot), HA_CGROUP_WAKEUP_EVERY));
    return 0;
}

