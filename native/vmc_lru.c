/* vmc_lru.c -- a shard's LRU heap (shard lock held throughout).
 *
 * The heap (see vmc_format.h) orders the shard's entries by access time,
 * lazily: a hit stores the entry's atime and nothing else; an item is re-keyed
 * when it reaches the top. The shard's top_atime lets eviction find the least
 * recently used entry of the whole cache by looking at one number per shard.
 */
#include "vmc_lru.h"

#include "vmc_entry.h"
#include "vmc_mutex.h"

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
    uint32_t len = sh->heap_len;
    if (len == 0 || len > c->slots || i >= len) { /* checked at lock time: a writer raced */
        vmc_mark_damaged(c);
        return;
    }
    uint32_t last = len - 1;
    VMC_STORE(sh->heap_len, last);
    if (i < last) {
        h[i] = h[last];
        if (i > 0 && before(&h[i], &h[(i - 1) / ARITY]))
            sift_up(c, h, i);
        else
            sift_down(c, h, last, i);
    }
    publish_top(c, sh, h);
}

void vmc_lru_heapify(vmc_cache *c, uint32_t shard)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    uint32_t len = 0;
    for (uint32_t i = 0; i < sh->heap_len && i < c->slots; i++)
        if (live(c, &h[i]))
            h[len++] = h[i];
    VMC_STORE(sh->heap_len, len);
    for (uint32_t i = 0; i < len; i++)
        place(c, h, i, h[i]);
    for (uint32_t i = len / ARITY + 1; i-- > 0;)
        if (i < len)
            sift_down(c, h, len, i);
    publish_top(c, sh, h);
}

bool vmc_lru_sound(const vmc_cache *c, uint32_t shard)
{
    const struct vmc_shard *sh = &c->shards[shard];
    uint32_t count = VMC_LOAD(sh->count);
    return sh->heap_len == count && count <= c->max_load;
}

void vmc_lru_append(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    struct vmc_entry *e = vmc_unit(c, unit);
    if (sh->heap_len >= c->slots)
        vmc_lru_heapify(c, shard); /* drops the items of replaced duplicates */
    h[sh->heap_len++] = (struct vmc_heap_item){VMC_LOAD(e->atime_ns), unit, (uint32_t)e->stamp};
}

void vmc_lru_insert(vmc_cache *c, uint32_t shard, uint32_t unit)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    struct vmc_entry *e = vmc_unit(c, unit);
    if (sh->heap_len >= c->slots) {
        vmc_mark_damaged(c); /* more items than the index has slots: repair rebuilds */
        return;
    }
    h[sh->heap_len] = (struct vmc_heap_item){VMC_LOAD(e->atime_ns), unit, (uint32_t)e->stamp};
    sift_up(c, h, sh->heap_len++);
    publish_top(c, sh, h);
}

/* The key stays: the item is re-keyed to the new entry's atime when it
 * reaches the top (vmc_lru_settle), like any item whose entry was touched.
 * Only the tie-break on the unit changed, so the item is sifted by it (keys
 * are nanosecond times: it stays where it is). */
void vmc_lru_takeover(vmc_cache *c, uint32_t shard, uint32_t old, uint32_t i, uint32_t unit)
{
    struct vmc_heap_item *h = heap_of(c, shard);
    if (i >= c->shards[shard].heap_len || h[i].unit != old) {
        vmc_mark_damaged(c);
        return;
    }
    h[i].unit = unit;
    h[i].gen = (uint32_t)((struct vmc_entry *)vmc_unit(c, unit))->stamp;
    if (i > 0 && before(&h[i], &h[(i - 1) / ARITY]))
        sift_up(c, h, i);
    else
        sift_down(c, h, c->shards[shard].heap_len, i);
}

void vmc_lru_prefetch(vmc_cache *c, uint32_t shard, uint32_t item)
{
    if (item < c->slots)
        __builtin_prefetch(heap_of(c, shard) + item, 1);
}

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

uint32_t vmc_lru_settle(vmc_cache *c, uint32_t shard)
{
    struct vmc_shard *sh = &c->shards[shard];
    struct vmc_heap_item *h = heap_of(c, shard);
    if (sh->heap_len > c->slots) {
        vmc_mark_damaged(c);
        VMC_STORE(sh->heap_len, 0);
    }
    for (uint64_t steps = 0; sh->heap_len > 0 && steps <= 2ull * c->slots; steps++) {
        struct vmc_entry *e = live(c, &h[0]);
        /* optimistic gets store atime_ns without the lock (vmc_cache.c): one load */
        uint64_t atime = e ? VMC_LOAD(e->atime_ns) : 0;
        if (e == NULL) { /* damage: drop it, repair will follow */
            vmc_mark_damaged(c);
            remove_at(c, shard, 0);
        } else if (atime != h[0].key) {
            h[0].key = atime;
            sift_down(c, h, sh->heap_len, 0);
        } else {
            publish_top(c, sh, h);
            return h[0].unit;
        }
    }
    publish_top(c, sh, h);
    return 0;
}

void vmc_lru_pop(vmc_cache *c, uint32_t shard)
{
    if (c->shards[shard].heap_len > 0)
        remove_at(c, shard, 0);
}
