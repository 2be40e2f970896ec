/* A tiny CO-RE program for the loader's tests (tests/test_ebpf_loader.py): a per-CPU counter, a
 * hash keyed by pid, a ring buffer whose record carries a BPF_CORE_READ of the parent's tgid, a
 * .rodata parameter set by the loader, and a second program the loader can leave out. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

const volatile u32 target_tgid = 0;
const volatile u64 tag = 0;

struct core_test_event {
    u64 tag;
    u32 pid;
    u32 ppid;
};
/* clang's BTF names only the types globals and maps use: this puts the ring record in the object's
 * BTF, where the loader checks the Python dtype against it */
struct core_test_event *unused_core_test_event __attribute__((unused));

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 2);
    __type(key, u32);
    __type(value, u64);
} calls SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u64);
} by_pid SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
} events SEC(".maps");

SEC("tp/syscalls/sys_enter_getppid")
int syscalls__sys_enter_getppid(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, key = 0;
    if (tgid != target_tgid)
        return 0;
    u64 *n = bpf_map_lookup_elem(&calls, &key);
    if (n)
        *n += 1;
    u64 one = 1, *seen = bpf_map_lookup_elem(&by_pid, &tgid);
    if (seen)
        __sync_fetch_and_add(seen, 1);
    else
        bpf_map_update_elem(&by_pid, &tgid, &one, BPF_NOEXIST);
    struct core_test_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return 0;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    e->tag = tag;
    e->pid = tgid;
    e->ppid = BPF_CORE_READ(task, real_parent, tgid);
    bpf_ringbuf_submit(e, 0);
    return 0;
}

SEC("tp/syscalls/sys_enter_getpgid")
int syscalls__sys_enter_getpgid(void *ctx)
{
    u32 key = 1;
    if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
        return 0;
    u64 *n = bpf_map_lookup_elem(&calls, &key);
    if (n)
        *n += 1;
    return 0;
}
