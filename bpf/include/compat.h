/* One source, two compilers: each bpf/<name>.bpf.c builds
 *   - as a CO-RE object (bpf/build.sh: clang -target bpf -DHA_CORE, vmlinux.h and libbpf's
 *     headers), relocated by libbpf against the running kernel's BTF; and
 *   - with bcc (the fallback where the kernel has no BTF), as before.
 * hostagent.h and maps.h include this first; probe files include one of those.
 *
 * Programs
 *   HA_TRACEPOINT(cat, event, record)  tracepoint cat:event; `args` points at its record.
 *       CO-RE: SEC("tp/cat/event"), program cat__event, record struct trace_event_raw_<record>
 *       (vmlinux.h names it after the event class, e.g. sched_wakeup_template).
 *       bcc: TRACEPOINT_PROBE(cat, event), the record declared from the format file.
 *   HA_RAW_TRACEPOINT(event)           raw tracepoint `event`; `ctx->args[i]` are its arguments.
 *       CO-RE: SEC("raw_tp/event"), program raw_tp__event. bcc: RAW_TRACEPOINT_PROBE(event).
 *   A probe whose variants attach the same tracepoint differently has one program per variant;
 *   the loader turns autoload off for the programs of the variant it did not choose.
 *
 * Tracepoint record fields
 *   HA_TP_STR(dst, field)   copy the __data_loc string `field` (bcc: data_loc_<field>,
 *                           vmlinux.h: __data_loc_<field>) into the char array dst,
 *                           NUL-terminated and truncated to sizeof(dst); the low 16 bits of a
 *                           data_loc are the string's offset from the start of the record.
 *   HA_TP_HAS(field)        CO-RE: whether this kernel's record has `field`
 *                           (bpf_core_field_exists); bcc: 1, the probe tests its -D flag first.
 *
 * Maps (names are the map names, the same under both)
 *   HA_ARRAY(name, value, n), HA_PERCPU_ARRAY(name, value, n), HA_HASH(name, key, value, n) (grows with use),
 *   HA_PERCPU_HASH(name, key, value, n) (grows with use), HA_LRU_HASH(name, key, value, n),
 *   HA_RINGBUF(name, pages), HA_TASK_STORAGE(name, value).
 *   Under CO-RE the sizes are defaults: the loader sets max_entries before load.
 *
 * Map operations
 *   HA_LOOKUP(map, key), HA_UPDATE(map, key, value), HA_DELETE(map, key),
 *   HA_LOOKUP_OR_TRY_INIT(map, key, zero), HA_RINGBUF_RESERVE(map, size),
 *   HA_RINGBUF_SUBMIT(map, record, flags), HA_TASK_STORAGE_GET(map, task, flags).
 *   CO-RE: the bpf_map_* helpers. bcc rewrites `map.op(...)` only where it is written out in
 *   the probe's own file and never inside a macro, so under bcc these call map##_op(...),
 *   one-line functions (HA_MAP_FN) the probe file defines in its `#ifndef HA_CORE` block.
 *
 * Parameters: what bcc gets as -D NAME=value is, under CO-RE, a `const volatile` global of the
 * same name in .rodata, set by the loader before load; each probe declares its own.
 */
#ifndef HOSTAGENT_COMPAT_H
#define HOSTAGENT_COMPAT_H

#ifdef HA_CORE

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define HA_TRACEPOINT(cat, event, record) \
    SEC("tp/" #cat "/" #event) int cat##__##event(struct trace_event_raw_##record *args)
/* the syscalls:sys_enter_* tracepoints have no record type of their own in BTF: their record is
 * struct syscall_trace_enter, the arguments in args[] (HA_TRACEPOINT(..., syscall_trace_enter)) */
#define trace_event_raw_syscall_trace_enter syscall_trace_enter
#define HA_RAW_TRACEPOINT(event) \
    SEC("raw_tp/" #event) int raw_tp__##event(struct bpf_raw_tracepoint_args *ctx)

#define HA_TP_STR(dst, field) \
    bpf_probe_read_kernel_str((dst), sizeof(dst), (void *)args + (args->__data_loc_##field & 0xFFFF))
#define HA_TP_HAS(field) bpf_core_field_exists(args->field)

#define HA_MAP(kind, name, key_type, value_type, entries, flags) \
    struct {                                                     \
        __uint(type, kind);                                      \
        __uint(max_entries, entries);                            \
        __type(key, key_type);                                   \
        __type(value, value_type);                               \
        __uint(map_flags, flags);                                \
    } name SEC(".maps")

#define HA_ARRAY(name, value, n) HA_MAP(BPF_MAP_TYPE_ARRAY, name, u32, value, n, 0)
#define HA_PERCPU_ARRAY(name, value, n) HA_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, name, u32, value, n, 0)
#define HA_HASH(name, key, value, n) HA_MAP(BPF_MAP_TYPE_HASH, name, key, value, n, BPF_F_NO_PREALLOC)
#define HA_PERCPU_HASH(name, key, value, n) \
    HA_MAP(BPF_MAP_TYPE_PERCPU_HASH, name, key, value, n, BPF_F_NO_PREALLOC)
#define HA_LRU_HASH(name, key, value, n) HA_MAP(BPF_MAP_TYPE_LRU_HASH, name, key, value, n, 0)
#define HA_TASK_STORAGE(name, value) \
    HA_MAP(BPF_MAP_TYPE_TASK_STORAGE, name, int, value, 0, BPF_F_NO_PREALLOC)
/* bcc counts a ring buffer in pages; 4 KiB pages here, the loader sets the real size */
#define HA_RINGBUF(name, pages)              \
    struct {                                 \
        __uint(type, BPF_MAP_TYPE_RINGBUF);  \
        __uint(max_entries, (pages) * 4096); \
    } name SEC(".maps")

#define HA_LOOKUP(map, key) bpf_map_lookup_elem(&map, key)
#define HA_UPDATE(map, key, value) bpf_map_update_elem(&map, key, value, BPF_ANY)
#define HA_DELETE(map, key) bpf_map_delete_elem(&map, key)
#define HA_LOOKUP_OR_TRY_INIT(map, key, zero) ha_lookup_or_try_init(&map, key, zero)
#define HA_RINGBUF_RESERVE(map, size) bpf_ringbuf_reserve(&map, size, 0)
#define HA_RINGBUF_SUBMIT(map, record, flags) bpf_ringbuf_submit(record, flags)
#define HA_TASK_STORAGE_GET(map, task, flags) bpf_task_storage_get(&map, task, 0, flags)

/* bcc's map.lookup_or_try_init(): insert zero if the key is new (a racing insert wins), then
 * look up again; NULL when the map is full. */
static __always_inline void *ha_lookup_or_try_init(void *map, const void *key, const void *zero)
{
    void *value = bpf_map_lookup_elem(map, key);
    if (value)
        return value;
    bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
    return bpf_map_lookup_elem(map, key);
}

/* bcc's bpf_log2l(): floor(log2(v)) + 1 for v >= 1, and 1 for 0 */
static __always_inline u32 ha_log2(u32 v)
{
    u32 r, shift;
    r = (v > 0xFFFF) << 4; v >>= r;
    shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
    shift = (v > 0xF) << 2; v >>= shift; r |= shift;
    shift = (v > 0x3) << 1; v >>= shift; r |= shift;
    r |= (v >> 1);
    return r;
}

static __always_inline u32 bpf_log2l(u64 v)
{
    u32 hi = v >> 32;
    return hi ? ha_log2(hi) + 32 + 1 : ha_log2(v) + 1;
}

#else /* bcc */

#define HA_TRACEPOINT(cat, event, record) TRACEPOINT_PROBE(cat, event)
#define HA_RAW_TRACEPOINT(event) RAW_TRACEPOINT_PROBE(event)

#define HA_TP_STR(dst, field) \
    bpf_probe_read_kernel_str((dst), sizeof(dst), (void *)args + (args->data_loc_##field & 0xFFFF))
#define HA_TP_HAS(field) 1

#define HA_ARRAY(name, value, n) BPF_ARRAY(name, value, n)
#define HA_PERCPU_ARRAY(name, value, n) BPF_PERCPU_ARRAY(name, value, n)
#define HA_HASH(name, key, value, n) BPF_F_TABLE("hash", key, value, name, n, BPF_F_NO_PREALLOC)
#define HA_PERCPU_HASH(name, key, value, n) \
    BPF_F_TABLE("percpu_hash", key, value, name, n, BPF_F_NO_PREALLOC)
#define HA_LRU_HASH(name, key, value, n) BPF_TABLE("lru_hash", key, value, name, n)
#define HA_TASK_STORAGE(name, value) BPF_TASK_STORAGE(name, value)
#define HA_RINGBUF(name, pages) BPF_RINGBUF_OUTPUT(name, pages)

/* how the probe files' one-line map functions are declared */
#define HA_MAP_FN static __always_inline

#define HA_LOOKUP(map, key) map##_lookup(key)
#define HA_UPDATE(map, key, value) map##_update(key, value)
#define HA_DELETE(map, key) map##_delete(key)
#define HA_LOOKUP_OR_TRY_INIT(map, key, zero) map##_lookup_or_try_init(key, zero)
#define HA_RINGBUF_RESERVE(map, size) map##_ringbuf_reserve(size)
#define HA_RINGBUF_SUBMIT(map, record, flags) map##_ringbuf_submit(record, flags)
#define HA_TASK_STORAGE_GET(map, task, flags) map##_task_storage_get(task, flags)

#endif /* HA_CORE */

#endif /* HOSTAGENT_COMPAT_H */
