/* biolatency: block I/O latency per device and operation, as log2 histograms in nanoseconds.
 *
 * With -DBIO_ACCOUNTING (block_io_start/block_io_done, Linux 6.5+): from when a request is
 * accounted to when it is done, the time iostat's await measures (I/O scheduler queueing
 * included). Without: from block_rq_issue (handed to the driver) to block_rq_complete, the
 * device's service time.
 * A request is identified by the tracepoint's {dev, sector}; the operation comes from rwbs at
 * completion. Flushes carry no sector (0 at start, 0 or -1 at completion), so they are keyed by
 * sector 0; an fsync's empty preflush write then pairs with the flush it turned into.
 */
#include "maps.h"

#ifndef BIO_MAX_INFLIGHT
#define BIO_MAX_INFLIGHT 16384     /* requests in flight at once, all devices; a start whose
                                      completion was never seen is evicted (LRU) */
#endif
#ifndef BIO_MAX_KEYS
#define BIO_MAX_KEYS (1024 * EXP2_SLOTS)   /* {device, operation} pairs x slots */
#endif

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
    u32 dev;        /* kernel dev_t: major << 20 | minor */
    u32 op;
    u32 slot;
};

BPF_TABLE("lru_hash", struct bio_request, u64, bio_started, BIO_MAX_INFLIGHT);  /* -> start, ns */
EXP2_HISTOGRAM(bio_latency, struct bio_key, BIO_MAX_KEYS);

/* rwbs as blk_fill_rwbs() writes it: an optional 'F' (preflush), then the operation letter
 * (R, W, D, N; a lone 'F' is a flush), then flags. */
static __always_inline u32 rwbs_op(const char *rwbs)
{
    char c = rwbs[0];
    if (c == 'F') {
        char next = rwbs[1];
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

static __always_inline void started(u32 dev, u64 sector, const char *rwbs)
{
    struct bio_request req = {.dev = dev, .sector = rwbs_op(rwbs) == BIO_OP_FLUSH ? 0 : sector};
    u64 now = bpf_ktime_get_ns();
    bio_started.update(&req, &now);
}

static __always_inline void finished(u32 dev, u64 sector, const char *rwbs)
{
    u32 op = rwbs_op(rwbs);
    struct bio_request req = {.dev = dev, .sector = op == BIO_OP_FLUSH ? 0 : sector};
    u64 *at = bio_started.lookup(&req);
    if (!at)
        return;
    u64 delta = bpf_ktime_get_ns() - *at;
    bio_started.delete(&req);

    struct bio_key key = {.dev = dev, .op = op, .slot = exp2_slot(delta)};
    struct exp2_bucket zero = {};
    exp2_add(bio_latency.lookup_or_try_init(&key, &zero), delta);
}

#ifdef BIO_ACCOUNTING
TRACEPOINT_PROBE(block, block_io_start)
{
    started(args->dev, args->sector, args->rwbs);
    return 0;
}

TRACEPOINT_PROBE(block, block_io_done)
{
    finished(args->dev, args->sector, args->rwbs);
    return 0;
}
#else
TRACEPOINT_PROBE(block, block_rq_issue)
{
    started(args->dev, args->sector, args->rwbs);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    finished(args->dev, args->sector, args->rwbs);
    return 0;
}
#endif
