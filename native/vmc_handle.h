/* vmc_handle.h -- the process-local handle and checked access to the mapping.
 *
 * Every module of the core works on a `vmc_cache`: the geometry copied from
 * the validated header at open (never re-read from the file), and pointers
 * into the caller's mapping. The inline accessors here turn unit numbers into
 * addresses; those taking a unit read from the file check it first.
 *
 * Call graph of the core (each module calls only those listed after it):
 *   vmc_file    -- open, attach, fork, close        -> cache, recover, repair, pool, flight, mutex
 *   vmc_cache   -- the operations of vmc.h          -> repair, entry, pool, index, lru, mutex
 *   vmc_repair  -- stop-the-world repair, outer locks -> recover, mutex
 *   vmc_recover -- rebuild derived state from the pool -> entry, pool, index, lru, flight, mutex
 *   vmc_index, vmc_lru, vmc_entry                    -> mutex
 *   vmc_pool    -- the allocator, reserved list, spare slots -> entry, flight, mutex
 *   vmc_flight  -- owner ids and locks, the flight table -> mutex
 *   vmc_mutex   -- robust process-shared locks, the damage flag
 *   vmc_error   -- failure messages, debug assertions
 */
#ifndef VMC_HANDLE_H
#define VMC_HANDLE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>

#include "vmc.h"
#include "vmc_error.h"
#include "vmc_format.h"
#include "vmc_hash.h"

/* Internal status: a nested lock found a dead owner; unwind and start again
 * (the outer lock then runs the repair). Never returned to Python. */
#define VMC_RETRY (-100)
/* vmc_get_sink: the answer needs a wait (a lock taken, a repair, an expired
 * entry to remove); nothing was counted. */
#define VMC_BUSY (-101)

/* The handle: one per Cache object, private to its process. */
struct vmc_cache {
    char *base;                   /* the mapping, owned by the caller (Python's mmap) */
    struct vmc_header *hdr;
    struct vmc_shard *shards;
    uint64_t *index;              /* n_shards * slots_per_shard slots */
    struct vmc_heap_item *heaps;  /* n_shards * slots_per_shard items */
    char *pool;                   /* address of unit 1 */
    uint64_t file_size;
    uint64_t shards_off, index_off, heap_off, pool_off; /* from the validated header copy */
    uint64_t seed;
    uint32_t spare_mark;          /* vmc_spare_mark(seed): a spare's nonce in this file */
    uint32_t shift;               /* log2(unit_size) */
    uint32_t unit_size;
    uint32_t pool_units;
    uint32_t n_shards;
    uint32_t slots;               /* per shard */
    uint32_t n_flights;           /* slots in the flight table (a power of two) */
    uint32_t max_load;            /* entries a shard may hold before it must evict */
    uint32_t max_entries;         /* the pool's entry budget (vmc_entry_budget) */
    uint32_t policy;
    uint64_t default_ttl_ns;
    int fd;
    uint64_t owner;               /* this handle's owner id (vmc_flight.h); 0 until attached */
    char *path;                   /* for messages */
    uint64_t pid;                 /* the process whose liveness lock `fd` holds: a
                                     handle inherited by fork() is usable in the
                                     child only once vmc_after_fork gave it its own */
    uint64_t purge_cursor;        /* where the next bounded purge starts (atomic) */
    uint32_t spare;               /* a put's reservation kept for the next put (atomic
                                     exchange; 0 = none): see vmc_cache.c, "spare" */
    uint32_t naming;              /* 1 while a thread of this handle renames its spare
                                     slot and makes the named entry its spare (from
                                     name_spare to make_spare): one thread at a time
                                     (compare-and-swap), see vmc_cache.c, "the spare" */
    uint32_t spare_slot;          /* this handle's slot in hdr->spares, plus 1; 0 = none
                                     claimed yet, UINT32_MAX = none free (no spare is
                                     kept, no optimistic get). Claimed by compare-and-
                                     swap (vmc_pool.c) */
    atomic_int active;            /* calls in flight on this handle */
    atomic_int closed;
    pthread_mutex_t rids_lock;    /* guards the next three (process-local) */
    uint64_t *rids;               /* reservations open on this handle: vmc_close */
    uint32_t n_rids, cap_rids;    /* cancels those the caller did not */
};

/* Added to this process's clock: 0 except in tests (vmc_set_clock_offset). */
extern int64_t vmc_clock_offset_ns;

/* vmc_now_ns -- CLOCK_REALTIME in nanoseconds (expiry deadlines, access times). */
static inline uint64_t vmc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec +
           (uint64_t)__atomic_load_n(&vmc_clock_offset_ns, __ATOMIC_RELAXED);
}

#define VMC_LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* Reads that race with writers by design (a seqlock's read side: optimistic
 * gets, unlocked copies), validated afterwards, and the one write that does
 * (an optimistic get's access-time compare-and-swap, after the validation,
 * which the room's next owner may overwrite with no lock in between: see
 * vmc_cache.c, "optimistic reads"): under the thread sanitizer they are
 * annotated as such, and only they are. */
#ifdef __SANITIZE_THREAD__ /* the thread sanitizer's annotations (libtsan) */
void AnnotateIgnoreReadsBegin(const char *file, int line);
void AnnotateIgnoreReadsEnd(const char *file, int line);
void AnnotateIgnoreWritesBegin(const char *file, int line);
void AnnotateIgnoreWritesEnd(const char *file, int line);
#define VMC_IGNORE_READS_BEGIN() AnnotateIgnoreReadsBegin(__FILE__, __LINE__)
#define VMC_IGNORE_READS_END() AnnotateIgnoreReadsEnd(__FILE__, __LINE__)
#define VMC_IGNORE_WRITES_BEGIN() AnnotateIgnoreWritesBegin(__FILE__, __LINE__)
#define VMC_IGNORE_WRITES_END() AnnotateIgnoreWritesEnd(__FILE__, __LINE__)
#else
#define VMC_IGNORE_READS_BEGIN() ((void)0)
#define VMC_IGNORE_READS_END() ((void)0)
#define VMC_IGNORE_WRITES_BEGIN() ((void)0)
#define VMC_IGNORE_WRITES_END() ((void)0)
#endif
/* A memory fence: the seqlock's (vmc_mutex.c, vmc_cache.c). The thread
 * sanitizer does not model fences (gcc refuses them there); its build relies
 * on the atomic operations next to each fence, and ignores the reads the
 * fences order (above). */
#ifdef __SANITIZE_THREAD__
#define VMC_FENCE(order) ((void)0)
#else
#define VMC_FENCE(order) __atomic_thread_fence(order)
#endif
/* Tags are stored with release order: the walk's invariant depends on the
 * order of the stores surviving a crash between any two of them. */
#define VMC_STORE_TAG(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define VMC_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define VMC_COUNT(x) VMC_STORE((x), (x) + 1)
#define VMC_UNCOUNT(x) VMC_STORE((x), (x) - 1)

/* vmc_unit_ok -- unit names a unit of the pool (1..pool_units). */
static inline bool vmc_unit_ok(const vmc_cache *c, uint32_t unit)
{
    return unit >= 1 && unit <= c->pool_units;
}

/* vmc_unit -- address of a unit that the caller has checked to be in the pool. */
static inline void *vmc_unit(const vmc_cache *c, uint32_t unit)
{
    VMC_ASSERT(vmc_unit_ok(c, unit), "unit %u outside 1..%u", unit, c->pool_units);
    return c->pool + ((uint64_t)(unit - 1) << c->shift);
}

/* vmc_tag_at -- the tag at the start of a (checked) unit. */
static inline uint64_t vmc_tag_at(const vmc_cache *c, uint32_t unit)
{
    return VMC_LOAD(*(uint64_t *)vmc_unit(c, unit));
}

/* vmc_extent -- the extent starting at `unit` if it is of `kind` and lies
 * inside the pool, else NULL. */
static inline void *vmc_extent(const vmc_cache *c, uint32_t unit, uint32_t kind)
{
    if (!vmc_unit_ok(c, unit))
        return NULL;
    uint64_t tag = vmc_tag_at(c, unit);
    uint32_t n = VMC_TAG_UNITS(tag);
    if (VMC_TAG_KIND(tag) != kind || n == 0 || n > c->pool_units - unit + 1)
        return NULL;
    return vmc_unit(c, unit);
}

/* vmc_extent_bytes -- the size in bytes of an extent with this tag. */
static inline uint64_t vmc_extent_bytes(const vmc_cache *c, uint64_t tag)
{
    return (uint64_t)VMC_TAG_UNITS(tag) << c->shift;
}

/* vmc_hash_key -- the key's hash under this file's seed. */
static inline uint64_t vmc_hash_key(const vmc_cache *c, const void *key, size_t klen)
{
    return vmc_hash(key, klen, c->seed);
}

/* vmc_spare_mark -- the spare mark of a file of this hash seed (vmc_format.h,
 * VMC_SPARE_BIT): the seed is drawn from getrandom() at creation and read by
 * nobody but the handles of the file. */
static inline uint32_t vmc_spare_mark(uint64_t hash_seed)
{
    return VMC_SPARE_BIT | (uint32_t)(vmc_hash("spare mark", 10, hash_seed) >> 33);
}

/* vmc_shard_of -- the shard a key hash belongs to. */
static inline uint32_t vmc_shard_of(const vmc_cache *c, uint64_t hash)
{
    return (uint32_t)hash & (c->n_shards - 1);
}

#endif
