/* biolatency: block I/O latency per device and operation, as log2 histograms in nanoseconds.
 *
 * With -DBIO_ACCOUNTING (Linux 6.5+, and the running kernel's BTF): what /proc/diskstats counts,
 * request by request. The raw tracepoint block_io_done fires in blk_account_io_done() just before
 * the kernel adds a completed request to the disk's counters, which it does when the request has
 * RQF_IO_STAT and not RQF_FLUSH_SEQ: a request in a flush sequence completes twice (its data,
 * then the whole sequence), and only the second completion counts. The operation is the kernel's
 * op_stat_group(): discard, else write when the op is odd, else read. The latency is what the
 * kernel adds to the same counter's time: from rq->start_time_ns (set when the request was
 * accounted, before the I/O scheduler) to completion. Flushes are the flush machinery's own
 * requests (REQ_OP_FLUSH with RQF_FLUSH_SEQ); the kernel counts one at each completion of such a
 * request (flush_end_io), which block_rq_complete marks; their latency runs from when the
 * flush machinery issued the flush (blk_rq_init sets start_time_ns) to its completion.
 * Offsets and flag values come from the running kernel's BTF, never from headers: under CO-RE
 * libbpf relocates the struct reads and enum values below; under bcc the agent passes them
 * (agent/sources/ebpf/biolatency.py):
 *   BIO_RQ_Q, BIO_RQ_CMD_FLAGS, BIO_RQ_RQ_FLAGS, BIO_RQ_START_TIME_NS   struct request members
 *   BIO_Q_DISK, BIO_DISK_MAJOR, BIO_DISK_FIRST_MINOR                    request_queue, gendisk
 *   BIO_RQF_IO_STAT, BIO_RQF_FLUSH_SEQ                                  bits of enum rqf_flags
 *   BIO_REQ_OP_BITS, BIO_REQ_OP_FLUSH, BIO_REQ_OP_DISCARD, BIO_REQ_OP_SECURE_ERASE
 *
 * Without: from block_rq_issue (handed to the driver) to block_rq_complete, the device's service
 * time of each command it was sent, paired by the tracepoint's {dev, sector}. Flushes carry no
 * sector (0 at start, 0 or -1 at completion), so they are keyed by sector 0.
 *
 * The two ways are variants: bcc compiles one (-DBIO_ACCOUNTING or not); a CO-RE object holds
 * both, raw_tp__block_io_done and raw_tp__block_rq_complete (accounting) and
 * block__block_rq_issue and block__block_rq_complete (driver), and the loader loads one pair.
 *
 * With BY_CGROUP (bpf/include/maps.h) the histogram is also keyed by the cgroup of the task that
 * issued the I/O. Completion runs in interrupt context, where `current` is whoever was running,
 * so the cgroup is taken in process context and remembered per request until completion:
 *   - accounting: at block_io_start (blk_account_io_start(), called by the task submitting the
 *     bio while it becomes a request), in bio_owners (below); the flush
 *     machinery's own flush requests belong to no one task and go to the root cgroup (the host);
 *   - driver: at block_rq_issue, with the start time. A request the block layer hands to the
 *     driver later from a kblockd worker is attributed to that worker's cgroup (the host).
 * A request whose start was not seen (in flight at load, or its slot reused) has cgroup 0: unresolved.
 */
#include "maps.h"

#ifndef BIO_MAX_INFLIGHT
#define BIO_MAX_INFLIGHT 16384     /* requests in flight at once, all devices; a start whose
                                      completion was never seen is evicted (LRU) */
#endif
#ifndef BIO_MAX_KEYS
#define BIO_MAX_KEYS (1024 * EXP2_SLOTS)   /* {cgroup, device, operation} x slots; the loader sets it */
#endif
#define BIO_HOST_KEYS (1024 * EXP2_SLOTS)  /* {device, operation} x slots: the overflow's key space */
#define BIO_ROOT_CGROUP 1                  /* the root cgroup's id (its kernfs node is the first) */

/* operations; agent/sources/ebpf/biolatency.py names them */
#define BIO_OP_READ 0
#define BIO_OP_WRITE 1
#define BIO_OP_FLUSH 2
#define BIO_OP_DISCARD 3
#define BIO_OP_OTHER 4

struct bio_request {
    u64 dev;
    u64 sector;
};

struct bio_key {
    u64 cgroup;     /* the issuing task's (BY_CGROUP), else 0 */
    u32 dev;        /* kernel dev_t: major << 20 | minor */
    u32 op;
    u32 slot;
    u32 pad;
};

EXP2_KEYED_HISTOGRAM(bio_latency, struct bio_key, BIO_MAX_KEYS, BIO_HOST_KEYS);

#ifndef HA_CORE
HA_MAP_FN struct exp2_bucket *bio_latency_lookup_or_try_init(struct bio_key *key,
                                                             struct exp2_bucket *zero)
{
    return bio_latency.lookup_or_try_init(key, zero);
}
HA_MAP_FN struct exp2_bucket *bio_latency_overflow_lookup_or_try_init(struct bio_key *key,
                                                                      struct exp2_bucket *zero)
{
    return bio_latency_overflow.lookup_or_try_init(key, zero);
}
HA_MAP_FN u64 *ha_events_lookup(u32 *i) { return ha_events.lookup(i); }
#endif

static __always_inline void record(u64 cgroup, u32 dev, u32 op, u64 delta)
{
    struct bio_key key = {.cgroup = cgroup, .dev = dev, .op = op, .slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(HA_KEYED_LOOKUP_OR_TRY_INIT(bio_latency, &key, &zero), delta);
}

#ifdef HA_CORE
#define BIO_RQF_IO_STAT bpf_core_enum_value(enum rqf_flags, __RQF_IO_STAT)
#define BIO_RQF_FLUSH_SEQ bpf_core_enum_value(enum rqf_flags, __RQF_FLUSH_SEQ)
#define BIO_REQ_OP_BITS bpf_core_enum_value(enum req_flag_bits, __REQ_FAILFAST_DEV)
#define BIO_REQ_OP_FLUSH bpf_core_enum_value(enum req_op, REQ_OP_FLUSH)
#define BIO_REQ_OP_DISCARD bpf_core_enum_value(enum req_op, REQ_OP_DISCARD)
#define BIO_REQ_OP_SECURE_ERASE bpf_core_enum_value(enum req_op, REQ_OP_SECURE_ERASE)
/* type->member of the kernel object at ptr into dst; nonzero if it could not be read */
#define BIO_READ(dst, ptr, type, member, offset) \
    bpf_core_read(&(dst), sizeof(dst), &((type *)(ptr))->member)
#else
#define BIO_READ(dst, ptr, type, member, offset) \
    bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(ptr) + (offset))
#endif

#if defined(HA_CORE) || defined(BIO_ACCOUNTING)
struct request_facts {
    u64 start_ns;
    u32 dev;            /* the whole disk's dev_t, as the block tracepoints give it */
    u32 op;             /* REQ_OP_* */
    u32 rq_flags;
};

/* The members of `rq` the kernel's accounting reads; 0 if one could not be read. */
static __always_inline int read_request(void *rq, struct request_facts *f)
{
    void *q = 0, *disk = 0;
    u32 opf = 0;
    int major = 0, first_minor = 0;
    if (BIO_READ(f->rq_flags, rq, struct request, rq_flags, BIO_RQ_RQ_FLAGS) ||
        BIO_READ(opf, rq, struct request, cmd_flags, BIO_RQ_CMD_FLAGS) ||
        BIO_READ(f->start_ns, rq, struct request, start_time_ns, BIO_RQ_START_TIME_NS) ||
        BIO_READ(q, rq, struct request, q, BIO_RQ_Q) ||
        BIO_READ(disk, q, struct request_queue, disk, BIO_Q_DISK))
        return 0;
    if (disk && (BIO_READ(major, disk, struct gendisk, major, BIO_DISK_MAJOR) ||
                 BIO_READ(first_minor, disk, struct gendisk, first_minor, BIO_DISK_FIRST_MINOR)))
        return 0;
    f->op = opf & ((1U << BIO_REQ_OP_BITS) - 1);
    f->dev = (u32)major << 20 | (u32)first_minor;
    return 1;
}

/* block/blk.h op_stat_group() */
static __always_inline u32 stat_group(u32 op)
{
    if (op == BIO_REQ_OP_DISCARD || op == BIO_REQ_OP_SECURE_ERASE)
        return BIO_OP_DISCARD;
    return op & 1 ? BIO_OP_WRITE : BIO_OP_READ;
}

#define RQF(bit) (1U << (bit))

/* Who started each request in flight (BY_CGROUP): a table indexed by the request's address, each
 * slot naming the request it holds, so a completion only takes the cgroup of its own request.
 * Not a hash map: an array slot is one inlined address computation and two stores, where a hash
 * update took ~4x this program's other work (docs/performance.md, "Attribution"). Two requests in
 * flight at once on the same slot (requests are preallocated per tag, one cache line or more
 * apart, and 65,536 slots span 4 MiB of them) make the older one's completion unresolved
 * (cgroup 0), never lost; only a start and a completion of two such requests racing on two CPUs
 * could hand one the other's cgroup. */
#define BIO_OWNER_SLOTS 65536      /* a power of two */

struct bio_owner {
    u64 rq;         /* the request's address */
    u64 cgroup;
};

#if defined(HA_CORE) || defined(BY_CGROUP)
HA_ARRAY(bio_owners, struct bio_owner, BIO_OWNER_SLOTS);

#ifndef HA_CORE
HA_MAP_FN struct bio_owner *bio_owners_lookup(u32 *slot) { return bio_owners.lookup(slot); }
#endif

static __always_inline u32 owner_slot(u64 rq)
{
    return (u32)(rq >> 6) & (BIO_OWNER_SLOTS - 1);
}

/* block_io_start(struct request *rq): in the submitting task */
HA_RAW_TRACEPOINT(block_io_start)
{
    u64 rq = ctx->args[0];
    u32 slot = owner_slot(rq);
    struct bio_owner *o = HA_LOOKUP(bio_owners, &slot);
    if (o) {
        o->rq = rq;
        o->cgroup = bpf_get_current_cgroup_id();
    }
    return 0;
}
#endif

/* the issuing task's cgroup, remembered at block_io_start; 0 when not seen */
static __always_inline u64 owner(u64 rq)
{
#if defined(HA_CORE) || defined(BY_CGROUP)
    if (HA_BY_CGROUP) {
        u32 slot = owner_slot(rq);
        struct bio_owner *o = HA_LOOKUP(bio_owners, &slot);
        return o && o->rq == rq ? o->cgroup : 0;
    }
#endif
    return 0;
}

/* block_io_done(struct request *rq) */
HA_RAW_TRACEPOINT(block_io_done)
{
    struct request_facts f = {};
    u64 cgroup = owner(ctx->args[0]);
    if (!read_request((void *)ctx->args[0], &f))
        return 0;
    if ((f.rq_flags & (RQF(BIO_RQF_IO_STAT) | RQF(BIO_RQF_FLUSH_SEQ))) != RQF(BIO_RQF_IO_STAT))
        return 0;       /* not accounted, or a step of a flush sequence */
    record(cgroup, f.dev, stat_group(f.op), bpf_ktime_get_ns() - f.start_ns);
    return 0;
}

/* block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes) */
HA_RAW_TRACEPOINT(block_rq_complete)
{
    struct request_facts f = {};
    if (!read_request((void *)ctx->args[0], &f))
        return 0;
    if (f.op != BIO_REQ_OP_FLUSH || !(f.rq_flags & RQF(BIO_RQF_FLUSH_SEQ)))
        return 0;       /* only the flush machinery's flush requests */
    record(HA_BY_CGROUP ? BIO_ROOT_CGROUP : 0, f.dev, BIO_OP_FLUSH, bpf_ktime_get_ns() - f.start_ns);
    return 0;
}
#endif

#if defined(HA_CORE) || !defined(BIO_ACCOUNTING)
struct bio_start {
    u64 at;         /* ns */
    u64 cgroup;     /* the issuing task's (BY_CGROUP), else 0 */
};

HA_LRU_HASH(bio_started, struct bio_request, struct bio_start, BIO_MAX_INFLIGHT);

#ifndef HA_CORE
HA_MAP_FN struct bio_start *bio_started_lookup(struct bio_request *r) { return bio_started.lookup(r); }
HA_MAP_FN int bio_started_update(struct bio_request *r, struct bio_start *s) { return bio_started.update(r, s); }
HA_MAP_FN int bio_started_delete(struct bio_request *r) { return bio_started.delete(r); }
#endif

/* rwbs as blk_fill_rwbs() writes it: an optional 'F' (preflush), then the operation letter
 * (R, W, D, N; a lone 'F' is a flush), then flags. Its first two characters are passed by value:
 * under CO-RE each is one relocated load from the record (the verifier refuses a load through a
 * pointer moved into it). */
#define RWBS_OP(args) rwbs_op((args)->rwbs[0], (args)->rwbs[1])

static __always_inline u32 rwbs_op(char c, char next)
{
    if (c == 'F') {
        if (next == 'R' || next == 'W' || next == 'D' || next == 'N')
            c = next;
    }
    switch (c) {
    case 'R': return BIO_OP_READ;
    case 'W': return BIO_OP_WRITE;
    case 'F': return BIO_OP_FLUSH;
    case 'D': return BIO_OP_DISCARD;
    default: return BIO_OP_OTHER;
    }
}

HA_TRACEPOINT(block, block_rq_issue, block_rq)
{
    struct bio_request req = {.dev = args->dev,
                              .sector = RWBS_OP(args) == BIO_OP_FLUSH ? 0 : args->sector};
    struct bio_start start = {.at = bpf_ktime_get_ns(), .cgroup = HA_CGROUP_CURRENT()};
    HA_UPDATE(bio_started, &req, &start);
    return 0;
}

HA_TRACEPOINT(block, block_rq_complete, block_rq_completion)
{
    u32 op = RWBS_OP(args), dev = args->dev;
    struct bio_request req = {.dev = dev, .sector = op == BIO_OP_FLUSH ? 0 : args->sector};
    struct bio_start *start = HA_LOOKUP(bio_started, &req);
    if (!start)
        return 0;       /* not sent to the driver: the end of a flush sequence */
    u64 delta = bpf_ktime_get_ns() - start->at, cgroup = start->cgroup;
    HA_DELETE(bio_started, &req);
    record(cgroup, dev, op, delta);
    return 0;
}
#endif
