/* vmc_shard.c -- a shard's index and LRU list (shard lock held throughout).
 *
 * The index is open addressing with linear probing over 64-bit slots
 * (hash tag << 32 | head unit); deletion shifts later slots back, so there are
 * no tombstones and a probe ends at the first empty slot. A slot's home is
 * derived from its tag, which is what backward shifting needs.
 *
 * The LRU list is doubly linked through the entries, most recent first. The
 * shard's tail_atime lets eviction find the least recently used entry of the
 * whole cache by looking at one number per shard.
 */
#include "vmc_internal.h"

static uint64_t *slots_of(vmc_cache *c, uint32_t shard)
{
    return c->index + (uint64_t)shard * c->slots;
}

static uint32_t home_of(const vmc_cache *c, uint32_t tag)
{
    return (uint32_t)(((uint64_t)tag * c->slots) >> 32);
}

/* vmc_index_find -- the head unit of `key` in `shard` (and its slot), or 0;
 * on a miss *slot is the empty slot where the key belongs (UINT32_MAX if the
 * shard's index is full), valid until the index changes. */
uint32_t vmc_index_find(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                        size_t klen, uint32_t *slot)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t tag = (uint32_t)(hash >> 32);
    uint32_t i = home_of(c, tag);
    for (uint32_t probes = 0; probes < c->slots; probes++) {
        uint64_t v = s[i];
        if (v == 0) {
            *slot = i;
            return 0;
        }
        if (VMC_SLOT_TAG(v) == tag) {
            uint32_t u = VMC_SLOT_UNIT(v);
            struct vmc_entry *e = vmc_head(c, u);
            if (e == NULL || e->state != VMC_PUBLISHED) {
                vmc_mark_damaged(c);
            } else if (e->key_len == klen && memcmp(vmc_entry_key(e), key, klen) == 0) {
                *slot = i;
                return u;
            }
        }
        if (++i == c->slots)
            i = 0;
    }
    *slot = UINT32_MAX;
    return 0;
}

/* vmc_index_set -- point a slot at a head: an occupied slot at a new head of
 * the same key, or the empty slot a miss of vmc_index_find returned. */
void vmc_index_set(vmc_cache *c, uint32_t shard, uint32_t slot, uint64_t hash, uint32_t unit)
{
    slots_of(c, shard)[slot] = VMC_SLOT((uint32_t)(hash >> 32), unit);
}

/* vmc_index_insert -- add a key known to be absent. -1 if the shard is full. */
int vmc_index_insert(vmc_cache *c, uint32_t shard, uint64_t hash, uint32_t unit)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t tag = (uint32_t)(hash >> 32);
    uint32_t i = home_of(c, tag);
    for (uint32_t probes = 0; probes < c->slots; probes++) {
        if (s[i] == 0) {
            s[i] = VMC_SLOT(tag, unit);
            return 0;
        }
        if (++i == c->slots)
            i = 0;
    }
    return -1;
}

/* vmc_index_delete -- empty `slot`, shifting back the run that follows it. */
void vmc_index_delete(vmc_cache *c, uint32_t shard, uint32_t slot)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t n = c->slots, hole = slot, j = slot;
    s[hole] = 0;
    for (uint32_t probes = 0; probes < n; probes++) {
        if (++j == n)
            j = 0;
        uint64_t v = s[j];
        if (v == 0)
            return;
        uint32_t home = home_of(c, VMC_SLOT_TAG(v));
        /* v may fill the hole unless its home lies cyclically in (hole, j]. */
        bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays)
            continue;
        s[hole] = v;
        s[j] = 0;
        hole = j;
    }
}

static struct vmc_entry *linked(vmc_cache *c, uint32_t unit)
{
    struct vmc_entry *e = vmc_head(c, unit);
    if (e == NULL)
        vmc_mark_damaged(c);
    return e;
}

static void set_tail(vmc_cache *c, struct vmc_shard *sh, uint32_t unit)
{
    struct vmc_entry *t = unit ? linked(c, unit) : NULL;
    sh->lru_tail = unit;
    VMC_STORE(sh->tail_atime, t ? t->atime_ns : UINT64_MAX);
}

void vmc_lru_push_front(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_entry *e = vmc_unit(c, unit);
    struct vmc_entry *h = sh->lru_head ? linked(c, sh->lru_head) : NULL;
    e->lru_prev = 0;
    e->lru_next = h ? sh->lru_head : 0;
    if (h)
        h->lru_prev = unit;
    sh->lru_head = unit;
    if (sh->lru_tail == 0 || h == NULL)
        set_tail(c, sh, unit);
}

void vmc_lru_unlink(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_entry *e = vmc_unit(c, unit);
    struct vmc_entry *p = e->lru_prev ? linked(c, e->lru_prev) : NULL;
    struct vmc_entry *n = e->lru_next ? linked(c, e->lru_next) : NULL;
    if (p)
        p->lru_next = e->lru_next;
    else
        sh->lru_head = e->lru_next;
    if (n)
        n->lru_prev = e->lru_prev;
    else
        set_tail(c, sh, p ? e->lru_prev : 0);
    e->lru_prev = e->lru_next = 0;
}

/* vmc_lru_touch -- make `unit` the most recently used entry of its shard. */
void vmc_lru_touch(vmc_cache *c, uint32_t shard, uint32_t unit, uint64_t now)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_entry *e = vmc_unit(c, unit);
    e->atime_ns = now;
    if (sh->lru_head == unit) {
        if (sh->lru_tail == unit)
            VMC_STORE(sh->tail_atime, now);
        return;
    }
    vmc_lru_unlink(c, shard, unit);
    vmc_lru_push_front(c, shard, unit);
}

/* vmc_remove_locked -- unlink a PUBLISHED entry found at `slot` and free it.
 * The pool lock is taken before anything changes, so VMC_RETRY leaves the
 * shard as it was. */
int vmc_remove_locked(vmc_cache *c, uint32_t shard, uint32_t unit, uint32_t slot)
{
    int rc = vmc_pool_lock_nested(c);
    if (rc < 0)
        return rc;
    vmc_index_delete(c, shard, slot);
    vmc_lru_unlink(c, shard, unit);
    VMC_UNCOUNT(c->shards[shard].count);
    vmc_release_entry(c, unit);
    vmc_pool_unlock(c);
    return VMC_OK;
}

/* vmc_index_slot_of -- the slot holding head `unit`, or UINT32_MAX. */
uint32_t vmc_index_slot_of(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_entry *e = vmc_head(c, unit);
    if (e == NULL)
        return UINT32_MAX;
    uint64_t hash = vmc_hash_key(c, vmc_entry_key(e), e->key_len);
    uint32_t slot;
    if (vmc_index_find(c, shard, hash, vmc_entry_key(e), e->key_len, &slot) != unit)
        return UINT32_MAX;
    return slot;
}
