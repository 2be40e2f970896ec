/* A CO-RE program the verifier rejects: it writes through a map lookup it never checked for NULL
 * (tests/test_ebpf_loader.py: the verifier's log reaches the logs and the probe's reason). The
 * unrolled loop before it makes the verifier's log longer than any one buffer a print takes. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
} hits SEC(".maps");

SEC("tp/sched/sched_process_exec")
int sched__sched_process_exec(void *ctx)
{
    u32 key = 0;
    u64 sum = 0;
#pragma unroll
    for (int i = 0; i < 200; i++)
        sum += bpf_get_prandom_u32() & i;
    u64 *n = bpf_map_lookup_elem(&hits, &key);
    *n += sum;
    return 0;
}
