/* vmc_shard.c -- a shard's index and LRU heap (shard lock held throughout).
 *
 * The index is open addressing with linear probing over 64-bit slots
 * (hash tag << 32 | head unit); deletion shifts later slots back, so there are
 * no tombstones and a probe ends at the first empty slot. A slot's home is
 * derived from its tag, which is what backward shifting needs.
 *
 * The LRU heap (see vmc_format.h) orders the shard's entries by access time,
 * lazily: a hit stores the entry's atime and nothing else; an item is re-keyed
 * when it reaches the top. The shard's top_atime lets eviction find
 * the least recently used entry of the whole cache by looking at one number
 * per shard.
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

/* ---- the index ---- */

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

/* ---- the LRU heap ---- */

static struct vmc_heap_item *heap_of(vmc_cache *c, uint32_t shard)
{
    return c->heaps + (uint64_t)shard * c->slots;
}

static bool before(const struct vmc_heap_item *a, const struct vmc_heap_item *b)
{
    return a->key < b->key || (a->key == b->key && a->unit < b->unit);
}

/* The heap is 4-ary (half the depth of a binary one) and every item's
 * position is kept in its entry (link_prev), so that an entry leaving the
 * cache takes its item out at once: the heap never holds dead items. */
#define ARITY 4

/* place -- put item at position i and tell its entry where it is. */
static void place(vmc_cache *c, struct vmc_heap_item *h, uint32_t i, struct vmc_heap_item item)
{
    h[i] = item;
    struct vmc_entry *e = vmc_head(c, item.unit);
    if (e)
        e->link_prev = i;
    else
        vmc_mark_damaged(c);
}

static void sift_up(vmc_cache *c, struct vmc_heap_item *h, uint32_t i)
{
    struct vmc_heap_item item = h[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / ARITY;
        if (!before(&item, &h[parent]))
            break;
        place(c, h, i, h[parent]);
        i = parent;
    }
    place(c, h, i, item);
}

static void sift_down(vmc_cache *c, struct vmc_heap_item *h, uint32_t len, uint32_t i)
{
    struct vmc_heap_item item = h[i];
    for (;;) {
        uint64_t first = (uint64_t)i * ARITY + 1;
        if (first >= len)
            break;
        uint32_t best = (uint32_t)first;
        for (uint32_t k = best + 1; k < first + ARITY && k < len; k++)
            if (before(&h[k], &h[best]))
                best = k;
        if (!before(&h[best], &item))
            break;
        place(c, h, i, h[best]);
        i = best;
    }
    place(c, h, i, item);
}

static void publish_top(vmc_cache *c, struct vmc_shard *sh, const struct vmc_heap_item *h)
{
    VMC_STORE(sh->top_atime, sh->heap_len ? h[0].key : UINT64_MAX);
}

/* live -- the entry an item stands for, if it is still that entry. */
static struct vmc_entry *live(vmc_cache *c, const struct vmc_heap_item *item)
{
    struct vmc_entry *e = vmc_head(c, item->unit);
    if (e && e->state == VMC_PUBLISHED && (uint32_t)e->stamp == item->gen)
        return e;
    return NULL;
}

/* remove_at -- take the item at position i out of the heap. */
static void remove_at(vmc_cache *c, uint32_t shard, uint32_t i)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    uint32_t last = --sh->heap_len;
    if (i < last) {
        h[i] = h[last];
        if (i > 0 && before(&h[i], &h[(i - 1) / ARITY]))
            sift_up(c, h, i);
        else
            sift_down(c, h, last, i);
    }
    publish_top(c, sh, h);
}

/* vmc_lru_heapify -- rebuild a shard's heap from the items appended by
 * recovery: drop those whose entry is not (or no longer) published, restore
 * heap order (Floyd: linear time) and record every position. */
void vmc_lru_heapify(vmc_cache *c, uint32_t shard)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    uint32_t len = 0;
    for (uint32_t i = 0; i < sh->heap_len && i < c->slots; i++)
        if (live(c, &h[i]))
            h[len++] = h[i];
    sh->heap_len = len;
    for (uint32_t i = 0; i < len; i++)
        place(c, h, i, h[i]);
    for (uint32_t i = len / ARITY + 1; i-- > 0;)
        if (i < len)
            sift_down(c, h, len, i);
    publish_top(c, sh, h);
}

/* vmc_lru_insert -- a newly published entry joins its shard's heap. Its key
 * is the newest access time, so it usually stays where it lands. */
void vmc_lru_insert(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    struct vmc_entry *e = vmc_unit(c, unit);
    if (sh->heap_len >= c->slots) {
        vmc_mark_damaged(c); /* more items than the index has slots: repair rebuilds */
        return;
    }
    h[sh->heap_len] = (struct vmc_heap_item){e->atime_ns, unit, (uint32_t)e->stamp};
    sift_up(c, h, sh->heap_len++);
    publish_top(c, sh, h);
}

/* vmc_lru_remove -- an entry leaves its shard: its item goes too. */
void vmc_lru_remove(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_entry *e = vmc_unit(c, unit);
    uint32_t i = e->link_prev;
    if (i >= c->shards[shard].heap_len || heap_of(c, shard)[i].unit != unit) {
        vmc_mark_damaged(c);
        return;
    }
    remove_at(c, shard, i);
}

/* vmc_lru_settle -- bring the shard's least recently used entry to the top
 * of its heap: re-key the top while a get has touched its entry since it was
 * keyed. Returns that entry's unit (0 if the shard is empty); top_atime is
 * then its exact access time. Each re-key is paid for by an earlier get. */
uint32_t vmc_lru_settle(vmc_cache *c, uint32_t shard)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    if (sh->heap_len > c->slots) {
        vmc_mark_damaged(c);
        sh->heap_len = 0;
    }
    for (uint64_t steps = 0; sh->heap_len > 0 && steps <= 2ull * c->slots; steps++) {
        struct vmc_entry *e = live(c, &h[0]);
        if (e == NULL) { /* damage: drop it, repair will follow */
            vmc_mark_damaged(c);
            remove_at(c, shard, 0);
        } else if (e->atime_ns != h[0].key) {
            h[0].key = e->atime_ns;
            sift_down(c, h, sh->heap_len, 0);
        } else {
            publish_top(c, sh, h);
            return h[0].unit;
        }
    }
    publish_top(c, sh, h);
    return 0;
}

/* vmc_lru_pop -- remove the settled top item (its entry is being evicted). */
void vmc_lru_pop(vmc_cache *c, uint32_t shard)
{
    if (c->shards[shard].heap_len > 0)
        remove_at(c, shard, 0);
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
    vmc_lru_remove(c, shard, unit);
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
