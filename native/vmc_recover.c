/* vmc_recover.c -- rebuild every derived structure from the pool.
 *
 * The pool is the truth: extents with walkable tags, entries with their key,
 * value, state, timestamp and checksum. The shard indexes, LRU lists, free
 * lists, reserved list, spare slots and counts of entries (per shard, and the
 * pool's count of heads) are derived, and rebuilt here by mark and sweep:
 *   1. walk the tags; where a tag cannot be valid (a new file's zeroed pool,
 *      pages torn by an OS crash, hostile bytes), skip unit by unit to the next
 *      plausible tag and make the gap one free extent;
 *   2. keep each sound PUBLISHED head (chain intact, unexpired, checksum
 *      right) and each RESERVED head whose owner is alive (LIVE mode only),
 *      marking its extents; of two heads with the same key the newer
 *      timestamp wins;
 *   3. sweep: every unmarked run of extents becomes one free extent;
 *   4. heapify each shard's LRU heap (its items were appended as entries were
 *      kept: linear time, no sort).
 * RECOVER runs at open when the opener is the file's only user (it also
 * re-initialises the locks: their previous owners may be gone, even across a
 * reboot). LIVE runs under every lock after a lock owner died.
 */
#include <stdlib.h>

#include "vmc_recover.h"

#include "vmc_entry.h"
#include "vmc_flight.h"
#include "vmc_index.h"
#include "vmc_lru.h"
#include "vmc_mutex.h"
#include "vmc_pool.h"

struct marks {
    uint64_t *start;    /* unit begins an extent */
    uint64_t *claimed;  /* extent belongs to a kept entry */
};

static bool bit(const uint64_t *b, uint32_t u) { return (b[u >> 6] >> (u & 63)) & 1; }
static void set_bit(uint64_t *b, uint32_t u) { b[u >> 6] |= 1ull << (u & 63); }
static void clear_bit(uint64_t *b, uint32_t u) { b[u >> 6] &= ~(1ull << (u & 63)); }

/* chain -- claim (or release) the extents of head's value. Claiming stops at
 * the first unsound link and releases what it took; returns success. */
static bool chain(vmc_cache *c, struct marks *m, uint32_t head, bool claim)
{
    struct vmc_entry *e = vmc_unit(c, head);
    uint64_t vlen = e->value_len;
    uint64_t room = vmc_extent_bytes(c, e->tag) - sizeof *e - e->key_len;
    uint64_t have = room < vlen ? room : vlen;
    uint32_t next = e->next, taken = 0;
    if (claim && bit(m->claimed, head))
        return false;
    if (claim)
        set_bit(m->claimed, head);
    else
        clear_bit(m->claimed, head);
    while (have < vlen) {
        struct vmc_body *b = vmc_extent(c, next, VMC_KIND_BODY);
        bool sound = b && bit(m->start, next) && b->head == head && taken < c->pool_units &&
                     bit(m->claimed, next) != claim;
        if (!sound) {
            if (claim)
                for (uint32_t u = e->next, i = 0; i < taken; i++) {
                    clear_bit(m->claimed, u);
                    u = ((struct vmc_body *)vmc_unit(c, u))->next;
                }
            if (claim)
                clear_bit(m->claimed, head);
            return !claim;
        }
        if (claim)
            set_bit(m->claimed, next);
        else
            clear_bit(m->claimed, next);
        taken++;
        have += vmc_extent_bytes(c, b->tag) - sizeof *b;
        next = b->next;
    }
    return true;
}

static bool plausible(const vmc_cache *c, uint32_t unit, uint64_t tag)
{
    uint32_t n = VMC_TAG_UNITS(tag), kind = VMC_TAG_KIND(tag);
    bool known = kind == VMC_KIND_FREE || kind == VMC_KIND_HEAD || kind == VMC_KIND_BODY;
    return known && n >= 1 && n <= c->pool_units - unit + 1;
}

static void reset_derived(vmc_cache *c, enum vmc_rebuild_mode mode)
{
    for (uint32_t s = 0; s < c->n_shards; s++) {
        struct vmc_shard *sh = &c->shards[s];
        if (mode == VMC_REBUILD_RECOVER) { /* else the repair's own write section is open */
            vmc_mutex_init(&sh->lock);
            VMC_STORE(sh->seq, 0); /* a writer that died in a section left it odd */
        }
        VMC_STORE(sh->heap_len, 0);
        VMC_STORE(sh->count, 0);
        VMC_STORE(sh->top_atime, UINT64_MAX);
    }
    memset(c->index, 0, (uint64_t)c->n_shards * c->slots * 8);
    struct vmc_pool *p = &c->hdr->pool;
    if (mode == VMC_REBUILD_RECOVER)
        vmc_mutex_init(&p->lock);
    memset(p->free_head, 0, sizeof p->free_head);
    p->reserved_head = 0;
    p->heads = 0; /* recounted: the kept reservations, then the indexed entries */
    VMC_STORE(p->free_units, 0);
    p->last_reclaim_ns = 0;
    vmc_spare_slots_reset(c, mode == VMC_REBUILD_RECOVER);
}

/* keep_published -- index a sound PUBLISHED head and give it a heap item;
 * false if it must go. */
static bool keep_published(vmc_cache *c, struct marks *m, uint32_t u, uint64_t now)
{
    struct vmc_entry *e = vmc_head(c, u);
    if (e == NULL || vmc_expired(e, now) || !chain(c, m, u, true))
        return false;
    if (e->checksum != vmc_entry_checksum(c, u)) {
        chain(c, m, u, false);
        return false;
    }
    uint64_t hash = vmc_hash_key(c, vmc_entry_key(e), e->key_len);
    uint32_t s = vmc_shard_of(c, hash), slot;
    struct vmc_shard *sh = &c->shards[s];
    uint32_t old = vmc_index_find(c, s, hash, vmc_entry_key(e), e->key_len, &slot);
    if (old) {
        struct vmc_entry *oe = vmc_unit(c, old);
        if (oe->stamp >= e->stamp) {
            chain(c, m, u, false);
            return false;
        }
        chain(c, m, old, false);
        VMC_STORE(oe->state, VMC_DEAD);
        VMC_UNCOUNT(sh->count);
    } else if (sh->count >= c->max_load || slot == UINT32_MAX) {
        chain(c, m, u, false);
        return false;
    }
    vmc_index_set(c, s, slot, hash, u);
    VMC_COUNT(sh->count);
    vmc_lru_append(c, s, u);
    return true;
}

/* next_start -- the first extent start after u (units + 1 if none), from the
 * bitmap: the sweep needs no second walk over the pool. */
static uint32_t next_start(const struct marks *m, uint32_t u, uint32_t units)
{
    for (uint64_t v = (uint64_t)u + 1; v <= units; v = (v | 63) + 1) { /* 64-bit: no wrap */
        uint64_t w = m->start[v >> 6] >> (v & 63);
        if (w) {
            uint64_t found = v + (uint64_t)__builtin_ctzll(w);
            return found <= units ? (uint32_t)found : units + 1;
        }
    }
    return units + 1;
}

/* keep_head -- decide a HEAD's fate: index it, keep it reserved, or let the
 * sweep free it. */
static void keep_head(vmc_cache *c, struct marks *m, uint32_t u, enum vmc_rebuild_mode mode,
                      uint64_t now, uint64_t *newest, uint64_t *dropped)
{
    struct vmc_entry *e = vmc_unit(c, u);
    if (e->state == VMC_PUBLISHED) {
        if (keep_published(c, m, u, now)) {
            if (e->stamp > *newest)
                *newest = e->stamp;
            return;
        }
        (*dropped)++;
    } else if (e->state == VMC_RESERVED && mode == VMC_REBUILD_LIVE &&
               vmc_owner_alive(c, e->atime_ns) && vmc_head(c, u) && chain(c, m, u, true)) {
        if (e->checksum != c->spare_mark) /* a spare is on no list: its slot names it */
            vmc_reserved_push(c, u);
        c->hdr->pool.heads++;
        return;
    }
    /* the sweep frees it; its header may outlive it in a free extent */
    VMC_STORE(e->state, VMC_DEAD);
}

int vmc_rebuild(vmc_cache *c, enum vmc_rebuild_mode mode, uint64_t *kept, uint64_t *dropped)
{
    uint32_t units = c->pool_units;
    size_t words = (size_t)units / 64 + 1;
    struct marks m = {calloc(words, 8), calloc(words, 8)};
    uint32_t *deferred = NULL;
    size_t n_deferred = 0, deferred_cap = 0;
    bool oom = false;
    *kept = *dropped = 0;
    if (m.start == NULL || m.claimed == NULL) {
        free(m.start);
        free(m.claimed);
        return vmc_fail(VMC_E_OS, "out of memory while recovering %s", c->path);
    }
    reset_derived(c, mode);

    /* 1. One walk over the tags: mark extent starts, clear PREV_FREE (the
     * sweep sets it again where true), resynchronise over damage. A
     * single-extent head is judged at once, while its line is in cache;
     * heads with a chain wait until every extent start is known. Checksums
     * are verified in both modes: a repair follows a crash, and a crash may
     * leave any half-written entry behind. */
    uint64_t now = vmc_now_ns(), newest = 0;
    /* `fresh` is believed only where it can be true: at the first recovery of
     * a file no publication ever reached (a live repair, or a clock that has
     * moved, means the flag was damaged, and the pool holds entries). */
    if (c->hdr->fresh && mode == VMC_REBUILD_RECOVER && VMC_LOAD(c->hdr->clock) == 0)
        VMC_STORE_TAG(*(uint64_t *)vmc_unit(c, 1), VMC_TAG(units, VMC_KIND_FREE));
    c->hdr->fresh = 0;
    for (uint32_t u = 1; u <= units;) {
        uint64_t tag = vmc_tag_at(c, u);
        set_bit(m.start, u);
        if (!plausible(c, u, tag)) {
            if (tag != 0)
                (*dropped)++;
            uint32_t next = u + 1;
            while (next <= units && !plausible(c, next, vmc_tag_at(c, next)))
                next++;
            VMC_STORE_TAG(*(uint64_t *)vmc_unit(c, u), VMC_TAG(next - u, VMC_KIND_FREE));
            u = next;
            continue;
        }
        if (tag & VMC_PREV_FREE)
            VMC_STORE_TAG(*(uint64_t *)vmc_unit(c, u), tag & ~VMC_PREV_FREE);
        if (VMC_TAG_KIND(tag) == VMC_KIND_HEAD) {
            struct vmc_entry *e = vmc_unit(c, u);
            if (e->next == 0) {
                keep_head(c, &m, u, mode, now, &newest, dropped);
            } else {
                if (n_deferred == deferred_cap) {
                    size_t cap = deferred_cap ? deferred_cap * 2 : 1024;
                    uint32_t *more = realloc(deferred, cap * sizeof *more);
                    if (more == NULL) {
                        oom = true;
                        break;
                    }
                    deferred = more;
                    deferred_cap = cap;
                }
                deferred[n_deferred++] = u;
            }
        }
        u += VMC_TAG_UNITS(tag);
    }

    /* 2. the heads that waited */
    for (size_t i = 0; i < n_deferred && !oom; i++)
        keep_head(c, &m, deferred[i], mode, now, &newest, dropped);
    free(deferred);

    /* 3. sweep: every run of unclaimed extents becomes one free extent */
    uint32_t run = 0, run_units = 0;
    for (uint32_t u = 1; u <= units && !oom;) {
        uint32_t next = next_start(&m, u, units);
        if (!bit(m.claimed, u)) {
            if (run_units == 0)
                run = u;
            run_units += next - u;
        } else if (run_units) {
            vmc_free_run(c, run, run_units); /* and sets PREV_FREE on u */
            run_units = 0;
        }
        u = next;
    }
    if (run_units)
        vmc_free_run(c, run, run_units);
    free(m.start);
    free(m.claimed);

    /* 4. LRU heaps */
    int rc = oom ? vmc_fail(VMC_E_OS, "out of memory while recovering %s", c->path) : VMC_OK;
    for (uint32_t s = 0; s < c->n_shards; s++)
        vmc_lru_heapify(c, s);
    for (uint32_t s = 0; s < c->n_shards; s++)
        *kept += c->shards[s].count;
    c->hdr->pool.heads += (uint32_t)*kept;
    uint64_t clock = __atomic_load_n(&c->hdr->clock, __ATOMIC_ACQUIRE);
    if (clock >= VMC_MAX_CLOCK) /* damaged: no publication could have got there */
        __atomic_store_n(&c->hdr->clock, clock = newest, __ATOMIC_RELEASE);
    if (newest > clock)
        __atomic_store_n(&c->hdr->clock, clock = newest, __ATOMIC_RELEASE);
    if (__atomic_load_n(&c->hdr->persisted, __ATOMIC_ACQUIRE) > clock)
        __atomic_store_n(&c->hdr->persisted, clock, __ATOMIC_RELEASE);
    return rc;
}
