/* tcp: retransmitted segments, resets sent and received, connections opened (active/passive),
 * and a log2 histogram of connection lifetimes (ESTABLISHED to CLOSE, ns) per open direction.
 *
 * Tracepoint arguments only. A connection is identified by the skaddr argument of
 * sock:inet_sock_set_state between ESTABLISHED and CLOSE; it is only an identity, never read.
 * Parameters (set by agent/sources/ebpf/tcp.py; -D under bcc, .rodata under CO-RE):
 *   TARGET_PORT=n             count only traffic with local or remote port n (CO-RE: 0 = all)
 *   BY_CGROUP                 key every count by the cgroup of the socket's owner (below); off,
 *                             the cgroup of every key is 0 and the counts are host-wide. Keyed
 *                             maps and their `<map>_overflow` companions: bpf/include/maps.h
 *   ERR_EBUSY, ERR_EINVAL, ERR_ENOMEM, ERR_EHOSTUNREACH, ERR_EAGAIN   errno values (CO-RE:
 *                             constants, the same on every architecture we build for)
 * Kernel facts, from the tracepoints' format files and BTF under bcc (-D), asked of the running
 * kernel's BTF by CO-RE relocations otherwise:
 *   TCP_RETRANSMIT_HAS_ERR    tcp_retransmit_skb has `err` (6.12+: it fires on failures too)
 *   TCP_SEND_RESET_SOCKADDR   tcp_send_reset carries sockaddrs (6.10+), not sport/dport
 *   TCP_SKB_GSO_SEGS_OFFSET=n offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb,
 *                             tcp_gso_segs) in the running kernel (BTF): tcp_skb_pcount(skb);
 *                             without it each skb counts as one segment (TCP_UNSIZED)
 *   TCP_SK_CGROUP_OFFSET=n, TCP_CGROUP_KN_OFFSET=n, TCP_KN_ID_OFFSET=n   offsetof(struct sock,
 *                             sk_cgrp_data.cgroup), (struct cgroup, kn), (struct kernfs_node, id):
 *                             the socket's cgroup id; without them no owner is known (TCP_UNOWNED)
 *
 * Retransmitted segments are TcpRetransSegs: __tcp_retransmit_skb() adds tcp_skb_pcount(skb)
 * once the skb has been trimmed, fragmented to what may be sent and re-segmented, just before
 * handing it to IP, whether or not IP then sends it; nothing changes the skb's segment count
 * between there and the tracepoint, which fires on the way out (6.12+: on every way out, with
 * `err`). The exits before the counter return -EBUSY, -EINVAL, -ENOMEM, -EHOSTUNREACH or
 * -EAGAIN; any other err is a failure after it (a qdisc or netfilter drop), counted like the
 * kernel does. tcp_rtx_synack() adds 1 and fires its tracepoint only when the SYN-ACK was sent.
 *
 * The owner of a socket (BY_CGROUP). Retransmit timers, incoming resets and most state changes
 * run in softirq, where `current` is whichever task was interrupted, so the owner is never taken
 * from `current`. It is the cgroup the kernel keeps in the socket itself, sk->sk_cgrp_data: set
 * in process context when the socket is created (cgroup_sk_alloc(), the creating task's cgroup
 * v2), copied from the listener to every socket accept() returns, held until the socket is freed.
 * That is per-socket storage the kernel maintains for cgroup BPF programs and net_cls: nothing to
 * remember, bound or evict here, and sockets opened before the probe loaded have it too. (Socket
 * storage maps of our own need a BTF socket pointer, which tracepoint programs do not get.)
 * Events with no owner socket -- a reset answering a segment no socket matches, sent from a
 * TIME_WAIT or request socket -- or whose socket's cgroup cannot be read (bcc without BTF) are
 * counted under cgroup 0, exported as the host's, and counted apart (TCP_UNOWNED).
 */
#ifdef HA_CORE
#define tcp_key vmlinux_tcp_key     /* vmlinux.h has a struct tcp_key of its own (TCP-AO) */
#endif
#include "maps.h"
#undef tcp_key

#ifdef HA_CORE
const volatile u16 TARGET_PORT = 0;
/* asm-generic/errno*.h, the values of every architecture build.sh knows */
#define ERR_EBUSY 16
#define ERR_EINVAL 22
#define ERR_ENOMEM 12
#define ERR_EHOSTUNREACH 113
#define ERR_EAGAIN 11

/* Before 6.12 tcp_retransmit_skb, and before 6.10 tcp_send_reset, were events of the class
 * tcp_event_sk_skb; libbpf matches this flavour (the part before ___) on those kernels. */
struct trace_event_raw_tcp_event_sk_skb___old {
    const void *skbaddr;
    const void *skaddr;
    int state;
    __u16 sport;
    __u16 dport;
} __attribute__((preserve_access_index));

/* dst = the record's `field`, from the old layout with a helper read: plain loads from both
 * layouts would be merged by the compiler into one load through a selected pointer, which the
 * verifier refuses for a context */
#define OLD_SK_SKB(dst, args, field) \
    bpf_core_read(&(dst), sizeof(dst), &((struct trace_event_raw_tcp_event_sk_skb___old *)(args))->field)
/* dst = `field` of a record that is the event's own type on newer kernels, tcp_event_sk_skb before */
#define SK_SKB(dst, args, field)                   \
    do {                                           \
        if (bpf_core_type_exists(typeof(*(args)))) \
            (dst) = (args)->field;                 \
        else                                       \
            OLD_SK_SKB(dst, args, field);          \
    } while (0)
#else
#define OLD_SK_SKB(dst, args, field) ((dst) = (args)->field)
#define SK_SKB(dst, args, field) ((dst) = (args)->field)

/* tcp_send_reset (6.10+) has an `enum sk_rst_reason reason` field, and bcc declares the
 * tracepoint's argument struct from its format file, but no header here declares the enum. The
 * field is never read, so an int-sized stand-in under a name of our own is enough. */
#define sk_rst_reason hostagent_sk_rst_reason
enum hostagent_sk_rst_reason { HOSTAGENT_SK_RST_REASON_UNREAD };
#endif

#ifndef TCP_MAX_CONNECTIONS
#define TCP_MAX_CONNECTIONS 262144   /* established connections tracked for their lifetime */
#endif

#ifndef TCP_MAX_KEYS
#define TCP_MAX_KEYS 16384          /* {cgroup, event} counters: 3,000 cgroups' worth and more */
#endif
#ifndef TCP_MAX_LIFETIME_KEYS
#define TCP_MAX_LIFETIME_KEYS 32768 /* {cgroup, direction, slot} buckets */
#endif

/* the events of tcp_counts; agent/sources/ebpf/tcp.py names them */
#define TCP_RETRANSMITS 0           /* retransmitted segments, SYN-ACKs included */
#define TCP_RESETS_SENT 1
#define TCP_RESETS_RECEIVED 2
#define TCP_OPENS_ACTIVE 3          /* SYN_SENT -> ESTABLISHED */
#define TCP_OPENS_PASSIVE 4         /* SYN_RECV -> ESTABLISHED */
#define TCP_EVENTS 5

/* indexes of tcp_misses: what the probe could not measure as it should */
#define TCP_UNTRACKED 0             /* opens not tracked for lifetime: the table was full */
#define TCP_UNSIZED 1               /* retransmitted skbs whose segment count was unreadable:
                                       counted as one segment each */
#define TCP_UNOWNED 2               /* events with no owner known (BY_CGROUP): counted as cgroup 0 */
#define TCP_MISSES 3

#define DIRECTION_ACTIVE 0
#define DIRECTION_PASSIVE 1
#define TCP_DIRECTIONS 2

/* include/net/tcp_states.h */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_NEW_SYN_RECV 12
#define PROTO_TCP 6

struct tcp_connection {
    u64 established_at;     /* ns */
    u64 direction;
};

struct tcp_event_key {
    u64 cgroup;             /* the owner's cgroup v2 id; 0: host-wide (or no owner known) */
    u32 event;
    u32 pad;
};

struct tcp_key {
    u64 cgroup;
    u32 direction;
    u32 slot;
};

HA_PERCPU_HASH(tcp_counts, struct tcp_event_key, u64, TCP_MAX_KEYS);
HA_PERCPU_HASH(tcp_counts_overflow, struct tcp_event_key, u64, TCP_EVENTS);
HA_PERCPU_ARRAY(tcp_misses, u64, TCP_MISSES);
HA_HASH(tcp_connections, u64, struct tcp_connection, TCP_MAX_CONNECTIONS);
EXP2_KEYED_HISTOGRAM(tcp_lifetime, struct tcp_key, TCP_MAX_LIFETIME_KEYS, TCP_DIRECTIONS * EXP2_SLOTS);

#ifndef HA_CORE
HA_MAP_FN u64 *tcp_counts_lookup_or_try_init(struct tcp_event_key *key, u64 *zero)
{
    return tcp_counts.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *tcp_counts_overflow_lookup_or_try_init(struct tcp_event_key *key, u64 *zero)
{
    return tcp_counts_overflow.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *tcp_misses_lookup(u32 *index) { return tcp_misses.lookup(index); }
HA_MAP_FN struct tcp_connection *tcp_connections_lookup(u64 *sk) { return tcp_connections.lookup(sk); }
HA_MAP_FN int tcp_connections_update(u64 *sk, struct tcp_connection *c) { return tcp_connections.update(sk, c); }
HA_MAP_FN int tcp_connections_delete(u64 *sk) { return tcp_connections.delete(sk); }
HA_MAP_FN struct exp2_bucket *tcp_lifetime_lookup_or_try_init(struct tcp_key *key,
                                                              struct exp2_bucket *zero)
{
    return tcp_lifetime.lookup_or_try_init(key, zero);
}
HA_MAP_FN struct exp2_bucket *tcp_lifetime_overflow_lookup_or_try_init(struct tcp_key *key,
                                                                       struct exp2_bucket *zero)
{
    return tcp_lifetime_overflow.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *ha_events_lookup(u32 *i) { return ha_events.lookup(i); }
#endif

static __always_inline void miss(u32 index)
{
    u64 *total = HA_LOOKUP(tcp_misses, &index);
    if (total)
        *total += 1;
}

/* The cgroup v2 id of the socket at `skaddr` (a full socket), 0 when it cannot be read. */
static __always_inline u64 socket_cgroup(const void *skaddr)
{
    u64 id = 0;
#ifdef HA_CORE
    struct sock *sk = (struct sock *)skaddr;
    if (bpf_core_field_exists(sk->sk_cgrp_data.cgroup))    /* 5.15+; before, a tagged union */
        id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
#elif defined(TCP_SK_CGROUP_OFFSET)
    void *cgroup = 0, *kn = 0;
    bpf_probe_read_kernel(&cgroup, sizeof(cgroup), (void *)skaddr + TCP_SK_CGROUP_OFFSET);
    if (cgroup)
        bpf_probe_read_kernel(&kn, sizeof(kn), cgroup + TCP_CGROUP_KN_OFFSET);
    if (kn)
        bpf_probe_read_kernel(&id, sizeof(id), kn + TCP_KN_ID_OFFSET);
#endif
    return id;
}

/* The cgroup an event on the socket at `skaddr` counts under: 0 host-wide; else the owner's,
 * 0 when unknown (counted in TCP_UNOWNED). `full`: skaddr is a full socket (not a request or
 * TIME_WAIT socket, which carry no cgroup). */
static __always_inline u64 owner(const void *skaddr, int full)
{
    if (!HA_BY_CGROUP)
        return 0;
    u64 id = skaddr && full ? socket_cgroup(skaddr) : 0;
    if (!id)
        miss(TCP_UNOWNED);
    return id;
}

static __always_inline void count_n(u64 cgroup, u32 event, u64 n)
{
    struct tcp_event_key key = {.cgroup = cgroup, .event = event};
    u64 zero = 0;
    u64 *total = HA_KEYED_LOOKUP_OR_TRY_INIT(tcp_counts, &key, &zero);
    if (total)
        *total += n;
}

static __always_inline void count(u64 cgroup, u32 event)
{
    count_n(cgroup, event, 1);
}

static __always_inline int other_port(u16 sport, u16 dport)
{
#if defined(HA_CORE) || defined(TARGET_PORT)
    return TARGET_PORT && sport != TARGET_PORT && dport != TARGET_PORT;
#else
    return 0;
#endif
}

HA_TRACEPOINT(tcp, tcp_retransmit_skb, tcp_retransmit_skb)
{
    u16 sport = 0, dport = 0;
    const void *skbaddr = 0;
    SK_SKB(sport, args, sport);
    SK_SKB(dport, args, dport);
    SK_SKB(skbaddr, args, skbaddr);
    if (other_port(sport, dport))
        return 0;
#if defined(HA_CORE) || defined(TCP_RETRANSMIT_HAS_ERR)
    if (HA_TP_HAS(err)) {
        int err = args->err;
        if (err == -ERR_EBUSY || err == -ERR_EINVAL || err == -ERR_ENOMEM ||
            err == -ERR_EHOSTUNREACH || err == -ERR_EAGAIN)
            return 0;       /* left before the kernel counted the segments */
    }
#endif
    u16 segs = 0;
#ifdef HA_CORE
    struct tcp_skb_cb *cb = (void *)((struct sk_buff *)skbaddr)->cb;
    bpf_core_read(&segs, sizeof(segs), &cb->tcp_gso_segs);
#elif defined(TCP_SKB_GSO_SEGS_OFFSET)
    bpf_probe_read_kernel(&segs, sizeof(segs), (void *)skbaddr + TCP_SKB_GSO_SEGS_OFFSET);
#endif
    if (!segs) {
        miss(TCP_UNSIZED);
        segs = 1;
    }
    const void *skaddr = 0;
    SK_SKB(skaddr, args, skaddr);
    count_n(owner(skaddr, 1), TCP_RETRANSMITS, segs);
    return 0;
}

HA_TRACEPOINT(tcp, tcp_retransmit_synack, tcp_retransmit_synack)
{
    if (other_port(args->sport, args->dport))
        return 0;
    count(owner(args->skaddr, 1), TCP_RETRANSMITS);     /* skaddr: the listener */
    return 0;
}

HA_TRACEPOINT(tcp, tcp_send_reset, tcp_send_reset)
{
#if defined(HA_CORE) || defined(TARGET_PORT)
    u16 sport = 0, dport = 0;
#ifdef HA_CORE
    int sockaddr = HA_TP_HAS(saddr);
#elif defined(TCP_SEND_RESET_SOCKADDR)
    int sockaddr = 1;
#else
    int sockaddr = 0;
#endif
    if (sockaddr) {
#if defined(HA_CORE) || defined(TCP_SEND_RESET_SOCKADDR)
        /* struct sockaddr_in / sockaddr_in6: the port, big-endian, at byte 2 */
        sport = (u16)args->saddr[2] << 8 | args->saddr[3];
        dport = (u16)args->daddr[2] << 8 | args->daddr[3];
#endif
    } else {
#if defined(HA_CORE) || !defined(TCP_SEND_RESET_SOCKADDR)
        OLD_SK_SKB(sport, args, sport);
        OLD_SK_SKB(dport, args, dport);
#endif
    }
    if (other_port(sport, dport))
        return 0;
#endif
    const void *skaddr = 0;
    int state = 0;
    SK_SKB(skaddr, args, skaddr);
    SK_SKB(state, args, state);
    /* no socket (nothing matched the segment), or one that carries no cgroup */
    count(owner(skaddr, state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV), TCP_RESETS_SENT);
    return 0;
}

HA_TRACEPOINT(tcp, tcp_receive_reset, tcp_event_sk)
{
    if (other_port(args->sport, args->dport))
        return 0;
    count(owner(args->skaddr, 1), TCP_RESETS_RECEIVED);
    return 0;
}

HA_TRACEPOINT(sock, inet_sock_set_state, inet_sock_set_state)
{
    if (args->protocol != PROTO_TCP || other_port(args->sport, args->dport))
        return 0;
    u64 sk = (u64)args->skaddr;
    int old = args->oldstate, new = args->newstate;

    if (new == TCP_ESTABLISHED && (old == TCP_SYN_SENT || old == TCP_SYN_RECV)) {
        struct tcp_connection c = {
            .established_at = bpf_ktime_get_ns(),
            .direction = old == TCP_SYN_SENT ? DIRECTION_ACTIVE : DIRECTION_PASSIVE,
        };
        count(owner(args->skaddr, 1), old == TCP_SYN_SENT ? TCP_OPENS_ACTIVE : TCP_OPENS_PASSIVE);
        if (HA_UPDATE(tcp_connections, &sk, &c))
            miss(TCP_UNTRACKED);
        return 0;
    }
    if (new != TCP_CLOSE)
        return 0;
    struct tcp_connection *c = HA_LOOKUP(tcp_connections, &sk);
    if (!c)
        return 0;           /* never established, or established before the probe loaded */
    u64 lifetime = bpf_ktime_get_ns() - c->established_at;
    struct tcp_key key = {.direction = (u32)c->direction, .slot = exp2_slot(lifetime)};
    HA_DELETE(tcp_connections, &sk);
    key.cgroup = owner(args->skaddr, 1);

    struct exp2_bucket zero = {};
    exp2_add(HA_KEYED_LOOKUP_OR_TRY_INIT(tcp_lifetime, &key, &zero), lifetime);
    return 0;
}
