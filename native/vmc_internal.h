/* vmc_internal.h -- the process-local handle and helpers shared by the core's files. */
#ifndef VMC_INTERNAL_H
#define VMC_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>

#include "vmc.h"
#include "vmc_flight.h"
#include "vmc_format.h"
#include "vmc_hash.h"

/* Internal status: a nested lock found a dead owner; unwind and start again
 * (the outer lock then runs the repair). Never returned to Python. */
#define VMC_RETRY (-100)

/* The handle: one per Cache object, private to its process. */
struct vmc_cache {
    char *base;                   /* the mapping, owned by the caller (Python's mmap) */
    struct vmc_header *hdr;
    struct vmc_shard *shards;
    uint64_t *index;              /* n_shards * slots_per_shard slots */
    struct vmc_heap_item *heaps;  /* n_shards * slots_per_shard items */
    char *pool;                   /* address of unit 1 */
    uint64_t file_size;
    uint64_t seed;
    uint32_t shift;               /* log2(unit_size) */
    uint32_t unit_size;
    uint32_t pool_units;
    uint32_t n_shards;
    uint32_t slots;               /* per shard */
    uint32_t n_flights;           /* slots in the flight table (a power of two) */
    uint32_t max_load;            /* entries a shard may hold before it must evict */
    uint32_t policy;
    uint64_t default_ttl_ns;
    int fd;
    uint64_t owner;               /* this handle's owner id (vmc_flight.h), 0 before attach */
    char *path;                   /* for messages */
    atomic_int active;            /* calls in flight on this handle */
    atomic_int closed;
};

/* ---- errors (vmc_error.c) ---- */
int vmc_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int vmc_fail_errno(const char *what, const char *path);

/* ---- locks (vmc_lock.c) ---- */
int vmc_mutex_init(pthread_mutex_t *m);
int vmc_shard_lock(vmc_cache *c, uint32_t shard);
void vmc_shard_unlock(vmc_cache *c, uint32_t shard);
int vmc_pool_lock(vmc_cache *c);           /* outermost */
int vmc_pool_lock_nested(vmc_cache *c);    /* while holding a shard lock: may return VMC_RETRY */
void vmc_pool_unlock(vmc_cache *c);
void vmc_mark_damaged(vmc_cache *c);

/* ---- allocator (vmc_pool.c), pool lock held ---- */
int vmc_alloc_entry(vmc_cache *c, uint64_t key_len, uint64_t value_len, bool contiguous,
                    uint32_t *head);
void vmc_release_entry(vmc_cache *c, uint32_t head);
void vmc_free_run(vmc_cache *c, uint32_t unit, uint32_t units);
void vmc_reserved_push(vmc_cache *c, uint32_t head);
void vmc_reserved_unlink(vmc_cache *c, uint32_t head);
uint64_t vmc_reclaim_dead(vmc_cache *c, bool force);
bool vmc_pid_alive(uint64_t pid);

/* ---- shards (vmc_shard.c), shard lock held ---- */
uint32_t vmc_index_find(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                        size_t klen, uint32_t *slot);
void vmc_index_set(vmc_cache *c, uint32_t shard, uint32_t slot, uint64_t hash, uint32_t unit);
int vmc_index_insert(vmc_cache *c, uint32_t shard, uint64_t hash, uint32_t unit);
void vmc_index_delete(vmc_cache *c, uint32_t shard, uint32_t slot);
uint32_t vmc_index_slot_of(vmc_cache *c, uint32_t shard, uint32_t unit);
void vmc_lru_insert(vmc_cache *c, uint32_t shard, uint32_t unit);
uint32_t vmc_lru_settle(vmc_cache *c, uint32_t shard);
void vmc_lru_pop(vmc_cache *c, uint32_t shard);
void vmc_lru_remove(vmc_cache *c, uint32_t shard, uint32_t unit);
void vmc_lru_heapify(vmc_cache *c, uint32_t shard);
int vmc_remove_locked(vmc_cache *c, uint32_t shard, uint32_t unit, uint32_t slot);

/* ---- recovery (vmc_recover.c) ---- */
enum vmc_rebuild_mode {
    VMC_REBUILD_RECOVER,          /* sole user at open: re-init locks, verify checksums */
    VMC_REBUILD_LIVE              /* under every lock, others alive: keep their reservations */
};
int vmc_rebuild(vmc_cache *c, enum vmc_rebuild_mode mode, uint64_t *kept, uint64_t *dropped);

/* ---- entries ---- */
uint64_t vmc_entry_checksum(vmc_cache *c, uint32_t head);  /* 0 if the chain is damaged */

/* ---- small inline helpers ---- */


static inline uint64_t vmc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define VMC_LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
/* Tags are stored with release order: the walk's invariant depends on the
 * order of the stores surviving a crash between any two of them. */
#define VMC_STORE_TAG(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define VMC_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define VMC_COUNT(x) VMC_STORE((x), (x) + 1)
#define VMC_UNCOUNT(x) VMC_STORE((x), (x) - 1)

/* Address of a unit that the caller has checked to be in 1..pool_units. */
static inline void *vmc_unit(const vmc_cache *c, uint32_t unit)
{
    return c->pool + ((uint64_t)(unit - 1) << c->shift);
}

static inline bool vmc_unit_ok(const vmc_cache *c, uint32_t unit)
{
    return unit >= 1 && unit <= c->pool_units;
}

static inline uint64_t vmc_tag_at(const vmc_cache *c, uint32_t unit)
{
    return VMC_LOAD(*(uint64_t *)vmc_unit(c, unit));
}

/* The extent starting at `unit` if it is of `kind` and lies inside the pool. */
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

/* A HEAD whose key fits its extent; NULL (damage) otherwise. */
static inline struct vmc_entry *vmc_head(const vmc_cache *c, uint32_t unit)
{
    struct vmc_entry *e = vmc_extent(c, unit, VMC_KIND_HEAD);
    if (e == NULL)
        return NULL;
    uint64_t bytes = (uint64_t)VMC_TAG_UNITS(e->tag) << c->shift;
    if (sizeof *e + (uint64_t)e->key_len > bytes)
        return NULL;
    return e;
}

static inline char *vmc_entry_key(struct vmc_entry *e) { return (char *)(e + 1); }

static inline uint64_t vmc_extent_bytes(const vmc_cache *c, uint64_t tag)
{
    return (uint64_t)VMC_TAG_UNITS(tag) << c->shift;
}

static inline uint64_t vmc_hash_key(const vmc_cache *c, const void *key, size_t klen)
{
    return vmc_hash(key, klen, c->seed);
}

static inline uint32_t vmc_shard_of(const vmc_cache *c, uint64_t hash)
{
    return (uint32_t)hash & (c->n_shards - 1);
}

static inline bool vmc_expired(const struct vmc_entry *e, uint64_t now)
{
    return e->expires_ns != 0 && now >= e->expires_ns;
}

#endif
