/* vmc_pool.c -- the extent allocator (pool lock held throughout).
 *
 * Free extents sit in size-segregated lists (class k holds extents of
 * [2^k, 2^(k+1)) units). A put may scatter its value over several extents, so
 * every free unit is usable without compaction; a reservation needs one
 * contiguous extent.
 */
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

#include "vmc_pool.h"

#include "vmc_entry.h"
#include "vmc_flight.h"
#include "vmc_mutex.h"

#define FIRST_FIT_PROBES 16

static void free_chain(vmc_cache *c, uint32_t head);

static uint32_t size_class(uint32_t units)
{
    return 31u - (uint32_t)__builtin_clz(units);
}

static struct vmc_free *free_at(vmc_cache *c, uint32_t unit)
{
    return vmc_extent(c, unit, VMC_KIND_FREE);
}

static void set_footer(vmc_cache *c, uint32_t unit, uint32_t units)
{
    char *end = (char *)vmc_unit(c, unit) + ((uint64_t)units << c->shift);
    VMC_STORE_TAG(*(uint64_t *)(end - 8), VMC_TAG(units, VMC_KIND_FOOT));
}

/* set_prev_free -- record in the tag of the extent at `unit` (if any)
 * whether the extent before it is free. */
static void set_prev_free(vmc_cache *c, uint32_t unit, bool prev_free)
{
    if (unit > c->pool_units)
        return;
    uint64_t *tag = vmc_unit(c, unit);
    uint64_t old = VMC_LOAD(*tag);
    uint64_t new = prev_free ? old | VMC_PREV_FREE : old & ~VMC_PREV_FREE;
    if (new != old)
        VMC_STORE_TAG(*tag, new);
}

static void list_remove(vmc_cache *c, uint32_t unit, struct vmc_free *f)
{
    uint32_t k = size_class(VMC_TAG_UNITS(f->tag));
    struct vmc_free *p = f->prev ? free_at(c, f->prev) : NULL;
    struct vmc_free *n = f->next ? free_at(c, f->next) : NULL;
    if (p)
        VMC_STORE(p->next, f->next);
    else if (c->hdr->pool.free_head[k] == unit)
        c->hdr->pool.free_head[k] = f->next;
    else
        vmc_mark_damaged(c);
    if (n)
        VMC_STORE(n->prev, f->prev);
    else if (f->next)
        vmc_mark_damaged(c);
    VMC_STORE(c->hdr->pool.free_units, c->hdr->pool.free_units - VMC_TAG_UNITS(f->tag));
}

/* list_add -- make [unit, unit+units) a free extent (whose left neighbour is
 * not free) and list it. */
static void list_add(vmc_cache *c, uint32_t unit, uint32_t units)
{
    struct vmc_free *f = vmc_unit(c, unit);
    uint32_t k = size_class(units);
    uint32_t head = c->hdr->pool.free_head[k];
    struct vmc_free *h = head ? free_at(c, head) : NULL;
    set_footer(c, unit, units);
    /* relaxed stores: these words were an entry's, which a reader copying
     * without a lock may still be reading */
    VMC_STORE(f->prev, 0);
    VMC_STORE(f->next, h ? head : 0);
    VMC_STORE_TAG(f->tag, VMC_TAG(units, VMC_KIND_FREE));
    set_prev_free(c, unit + units, true);
    if (h)
        VMC_STORE(h->prev, unit);
    c->hdr->pool.free_head[k] = unit;
    VMC_STORE(c->hdr->pool.free_units, c->hdr->pool.free_units + units);
}

/* take -- carve the first `units` units of free extent `unit` as `kind`; the
 * rest stays free. */
static void take(vmc_cache *c, uint32_t unit, struct vmc_free *f, uint32_t units, uint32_t kind)
{
    uint32_t have = VMC_TAG_UNITS(f->tag);
    list_remove(c, unit, f);
    if (have > units) {
        /* The remainder's tag lands inside the free extent first, then the
         * single store below shortens the extent: the walk never breaks. */
        list_add(c, unit + units, have - units);
    }
    if (kind == VMC_KIND_HEAD) { /* no stale state byte may outlive the tag store */
        VMC_STORE(((struct vmc_entry *)f)->state, VMC_DEAD);
        c->hdr->pool.heads++;
    }
    VMC_STORE_TAG(f->tag, VMC_TAG(units, kind));
    if (have == units)
        set_prev_free(c, unit + units, false);
}

/* alloc_contiguous -- one extent of exactly `units` units, or 0. */
static uint32_t alloc_contiguous(vmc_cache *c, uint32_t units, uint32_t kind)
{
    if (units == 0 || units > c->pool_units)
        return 0;
    uint32_t k = size_class(units);
    uint32_t u = c->hdr->pool.free_head[k];
    for (int probes = 0; u && probes < FIRST_FIT_PROBES; probes++) {
        struct vmc_free *f = free_at(c, u);
        if (f == NULL) {
            vmc_mark_damaged(c);
            return 0;
        }
        if (VMC_TAG_UNITS(f->tag) >= units) {
            take(c, u, f, units, kind);
            return u;
        }
        u = f->next;
    }
    for (k++; k < VMC_NCLASSES; k++) {
        u = c->hdr->pool.free_head[k];
        if (u == 0)
            continue;
        struct vmc_free *f = free_at(c, u);
        if (f == NULL || VMC_TAG_UNITS(f->tag) < units) {
            vmc_mark_damaged(c);
            return 0;
        }
        take(c, u, f, units, kind);
        return u;
    }
    return 0;
}

/* largest_free -- the head of the highest non-empty class (a large extent). */
static uint32_t largest_free(vmc_cache *c)
{
    for (int k = VMC_NCLASSES - 1; k >= 0; k--)
        if (c->hdr->pool.free_head[k])
            return c->hdr->pool.free_head[k];
    return 0;
}

static uint32_t units_for(const vmc_cache *c, uint64_t bytes)
{
    uint64_t units = (bytes + c->unit_size - 1) >> c->shift;
    if (units == 0)
        units = 1;
    return units > UINT32_MAX ? UINT32_MAX : (uint32_t)units;
}

int vmc_alloc_entry(vmc_cache *c, uint64_t key_len, uint64_t value_len, bool contiguous,
                    uint32_t *head_out)
{
    if (c->hdr->pool.heads >= c->max_entries)
        return VMC_E_NEED_ROOM; /* the entry budget: evict as for room */
    uint64_t need = sizeof(struct vmc_entry) + key_len + value_len;
    uint32_t units = units_for(c, need);
    uint32_t head = alloc_contiguous(c, units, VMC_KIND_HEAD);
    if (head) {
        struct vmc_entry *e = vmc_unit(c, head);
        VMC_STORE(e->next, 0);
        *head_out = head;
        return VMC_OK;
    }
    if (contiguous || c->hdr->pool.free_units < units)
        return VMC_E_NEED_ROOM;

    /* Scatter: the HEAD takes the largest free extent (it must hold the key),
     * then BODY extents, largest first, until the value fits. */
    uint32_t first = largest_free(c);
    struct vmc_free *f = first ? free_at(c, first) : NULL;
    if (f == NULL || vmc_extent_bytes(c, f->tag) < sizeof(struct vmc_entry) + key_len)
        return VMC_E_NEED_ROOM;
    uint32_t hunits = VMC_TAG_UNITS(f->tag);
    if (hunits > units)
        hunits = units; /* a fit the bounded first-fit probe missed */
    take(c, first, f, hunits, VMC_KIND_HEAD);
    struct vmc_entry *e = vmc_unit(c, first);
    VMC_STORE(e->next, 0);
    uint64_t have = ((uint64_t)hunits << c->shift) - sizeof *e - key_len;
    uint32_t *link = &e->next;
    while (have < value_len) {
        uint32_t u = largest_free(c);
        struct vmc_free *b = u ? free_at(c, u) : NULL;
        if (b == NULL) {
            free_chain(c, first);
            return VMC_E_NEED_ROOM;
        }
        uint32_t bunits = VMC_TAG_UNITS(b->tag);
        uint32_t fit = units_for(c, value_len - have + sizeof(struct vmc_body));
        if (fit < bunits)
            bunits = fit;
        take(c, u, b, bunits, VMC_KIND_BODY);
        struct vmc_body *body = vmc_unit(c, u);
        VMC_STORE(body->next, 0);
        VMC_STORE(body->head, first);
        VMC_STORE(*link, u);
        link = &body->next;
        have += ((uint64_t)bunits << c->shift) - sizeof *body;
    }
    *head_out = first;
    return VMC_OK;
}

/* Recovery builds maximal runs itself: no merging. */
void vmc_free_run(vmc_cache *c, uint32_t unit, uint32_t units)
{
    list_add(c, unit, units);
}

/* free_extent -- return an extent to the pool, merging free neighbours. */
static void free_extent(vmc_cache *c, uint32_t unit, uint32_t units)
{
    uint32_t right = unit + units;
    if (right <= c->pool_units) {
        struct vmc_free *r = free_at(c, right);
        if (r) {
            list_remove(c, right, r);
            units += VMC_TAG_UNITS(r->tag);
        }
    }
    if (unit > 1 && (vmc_tag_at(c, unit) & VMC_PREV_FREE)) {
        uint64_t foot = VMC_LOAD(*(uint64_t *)((char *)vmc_unit(c, unit) - 8));
        uint32_t lunits = VMC_TAG_UNITS(foot);
        if (VMC_TAG_KIND(foot) == VMC_KIND_FOOT && lunits > 0 && lunits < unit) {
            uint32_t left = unit - lunits;
            struct vmc_free *l = free_at(c, left);
            if (l && VMC_TAG_UNITS(l->tag) == lunits) {
                list_remove(c, left, l);
                unit = left;
                units += lunits;
            }
        }
    }
    list_add(c, unit, units);
}

/* free_chain -- free a HEAD and its BODY extents. Damage stops the walk
 * and marks the file; repair reclaims what was not freed. */
static void free_chain(vmc_cache *c, uint32_t head)
{
    struct vmc_entry *e = vmc_extent(c, head, VMC_KIND_HEAD);
    if (e == NULL) {
        vmc_mark_damaged(c);
        return;
    }
    uint32_t next = e->next;
    free_extent(c, head, VMC_TAG_UNITS(e->tag));
    if (c->hdr->pool.heads > 0)
        c->hdr->pool.heads--;
    else
        vmc_mark_damaged(c); /* a head nobody counted: repair recounts */
    for (uint32_t steps = 0; next; steps++) {
        struct vmc_body *b = vmc_extent(c, next, VMC_KIND_BODY);
        if (b == NULL || b->head != head || steps > c->pool_units) {
            vmc_mark_damaged(c);
            return;
        }
        uint32_t u = next;
        next = b->next;
        free_extent(c, u, VMC_TAG_UNITS(b->tag));
    }
}

/* An entry leaves the cache: REMOVED tells readers copying it without a lock. */
void vmc_release_entry(vmc_cache *c, uint32_t head)
{
    VMC_STORE(((struct vmc_entry *)vmc_unit(c, head))->state, VMC_REMOVED);
    free_chain(c, head);
}

/* The reserved list links RESERVED heads through link_prev/link_next. */
void vmc_reserved_push(vmc_cache *c, uint32_t head)
{
    struct vmc_pool *p = &c->hdr->pool;
    struct vmc_entry *e = vmc_unit(c, head);
    struct vmc_entry *h = p->reserved_head ? vmc_head(c, p->reserved_head) : NULL;
    e->link_prev = 0;
    e->link_next = h ? p->reserved_head : 0;
    if (h)
        h->link_prev = head;
    p->reserved_head = head;
}

void vmc_reserved_unlink(vmc_cache *c, uint32_t head)
{
    struct vmc_pool *p = &c->hdr->pool;
    struct vmc_entry *e = vmc_unit(c, head);
    struct vmc_entry *prev = e->link_prev ? vmc_head(c, e->link_prev) : NULL;
    struct vmc_entry *next = e->link_next ? vmc_head(c, e->link_next) : NULL;
    if (prev)
        prev->link_next = e->link_next;
    else if (p->reserved_head == head)
        p->reserved_head = e->link_next;
    else
        vmc_mark_damaged(c);
    if (next)
        next->link_prev = e->link_prev;
    e->link_prev = e->link_next = 0;
}

static uint64_t self_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void refresh_pid(void)
{
    __atomic_store_n(&self_pid, (uint64_t)getpid(), __ATOMIC_RELAXED);
}

static void pid_init(void)
{
    refresh_pid();
    pthread_atfork(NULL, NULL, refresh_pid);
}

uint64_t vmc_self_pid(void)
{
    pthread_once(&pid_once, pid_init);
    return __atomic_load_n(&self_pid, __ATOMIC_RELAXED);
}

/* ---- spare slots (vmc_format.h): where a handle's spare is named ---- */

struct vmc_spare_slot *vmc_spare_slot(vmc_cache *c)
{
    uint32_t i = __atomic_load_n(&c->spare_slot, __ATOMIC_ACQUIRE);
    return i && i <= VMC_SPARE_SLOTS ? &c->hdr->spares[i - 1] : NULL;
}

/* clear_slot -- free a slot held by `owner`, read once by the caller.
 * `owner` goes last, by compare-and-swap from the owner that was checked
 * (release): a claimer that takes the slot from 0 finds `unit` at 0, and a
 * slot taken meanwhile is left to its new owner. */
static void clear_slot(struct vmc_spare_slot *slot, uint64_t owner)
{
    VMC_STORE(slot->unit, 0);
    __atomic_compare_exchange_n(&slot->owner, &owner, 0, false, __ATOMIC_RELEASE,
                                __ATOMIC_RELAXED);
}

/* free_slot -- free the slot of a dead owner, and the spare it names if that
 * is still one of the owner's (the slot is all that names it). */
static void free_slot(vmc_cache *c, struct vmc_spare_slot *slot, uint64_t owner)
{
    uint32_t u = VMC_LOAD(slot->unit);
    struct vmc_entry *e = u ? vmc_head(c, u) : NULL;
    if (e && e->state == VMC_RESERVED && e->atime_ns == owner &&
        e->checksum == c->spare_mark)
        vmc_release_entry(c, u);
    clear_slot(slot, owner);
}

/* slot_owner -- the owner id a slot names, read once (claims change it with
 * no lock). */
static uint64_t slot_owner(const struct vmc_spare_slot *slot)
{
    return __atomic_load_n(&slot->owner, __ATOMIC_ACQUIRE);
}

struct vmc_spare_slot *vmc_spare_slot_take_free(vmc_cache *c)
{
    struct vmc_spare_slot *slots = c->hdr->spares;
    for (uint32_t i = 0; i < VMC_SPARE_SLOTS; i++) {
        uint64_t none = 0;
        if (slot_owner(&slots[i]) != 0 ||
            !__atomic_compare_exchange_n(&slots[i].owner, &none, c->owner, false,
                                         __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue;
        uint32_t unclaimed = 0;
        if (__atomic_compare_exchange_n(&c->spare_slot, &unclaimed, i + 1, false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return &slots[i];
        /* another thread of this handle claimed one meanwhile: keep that one */
        __atomic_store_n(&slots[i].owner, 0, __ATOMIC_RELEASE);
        return vmc_spare_slot(c);
    }
    return NULL;
}

struct vmc_spare_slot *vmc_spare_slot_claim(vmc_cache *c)
{
    if (__atomic_load_n(&c->spare_slot, __ATOMIC_ACQUIRE))
        return vmc_spare_slot(c);
    struct vmc_spare_slot *slots = c->hdr->spares;
    struct vmc_spare_slot *slot = vmc_spare_slot_take_free(c);
    for (uint32_t j = 0; slot == NULL && j < VMC_SPARE_SLOTS; j++) {
        uint64_t owner = slot_owner(&slots[j]);
        if (owner != 0 && !vmc_owner_alive(c, owner)) { /* a dead owner's: free it for us */
            free_slot(c, &slots[j], owner);
            slot = vmc_spare_slot_take_free(c);
        }
    }
    uint32_t unclaimed = 0;
    if (slot == NULL && /* every slot held by a live handle: this one keeps no spare */
        !__atomic_compare_exchange_n(&c->spare_slot, &unclaimed, UINT32_MAX, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        slot = vmc_spare_slot(c); /* another thread of this handle took one meanwhile */
    return slot;
}

void vmc_spare_slot_release(vmc_cache *c)
{
    struct vmc_spare_slot *slot = vmc_spare_slot(c);
    if (slot && slot_owner(slot) == c->owner)
        clear_slot(slot, c->owner);
    __atomic_store_n(&c->spare_slot, 0, __ATOMIC_RELEASE);
}

void vmc_spare_slots_reset(vmc_cache *c, bool all)
{
    for (uint32_t i = 0; i < VMC_SPARE_SLOTS; i++) {
        struct vmc_spare_slot *slot = &c->hdr->spares[i];
        uint64_t owner = slot_owner(slot);
        if (all || (owner != 0 && !vmc_owner_alive(c, owner)))
            clear_slot(slot, owner); /* the spare itself: the sweep frees it */
    }
}

#define RECLAIM_INTERVAL_NS 100000000u /* look for dead owners at most every 100 ms */

/* Bounded by the number of open reservations and the spare slots. The
 * interval spaces the searches of failing allocations; a forced search
 * neither waits for it nor counts as one (an attach's must not delay the
 * search of a put that finds a dead owner's room a moment later). */
uint64_t vmc_reclaim_dead(vmc_cache *c, bool force)
{
    struct vmc_pool *p = &c->hdr->pool;
    if (!force) {
        uint64_t now = vmc_now_ns();
        if (now - p->last_reclaim_ns < RECLAIM_INTERVAL_NS)
            return 0;
        p->last_reclaim_ns = now;
    }
    uint64_t before = p->free_units;
    for (uint32_t i = 0; i < VMC_SPARE_SLOTS; i++) {
        struct vmc_spare_slot *slot = &c->hdr->spares[i];
        uint64_t owner = slot_owner(slot);
        if (owner != 0 && !vmc_owner_alive(c, owner))
            free_slot(c, slot, owner);
    }
    uint32_t u = p->reserved_head;
    for (uint32_t steps = 0; u && steps <= c->pool_units; steps++) {
        struct vmc_entry *e = vmc_head(c, u);
        if (e == NULL || e->state != VMC_RESERVED) {
            vmc_mark_damaged(c);
            break;
        }
        uint32_t next = e->link_next;
        if (!vmc_owner_alive(c, e->atime_ns)) {
            vmc_reserved_unlink(c, u);
            vmc_release_entry(c, u);
        }
        u = next;
    }
    return p->free_units - before;
}

/* ---- where to evict for a contiguous need ---- */

struct span {
    uint32_t units;
    uint32_t head; /* 0: free; else the HEAD of the entry owning the extent */
};

/* scan_spans -- the extents from `unit` on, up to `limit` units (and at most
 * `max` extents), as spans; UINT32_MAX as head marks what cannot be evicted
 * (a reservation's, or damage). Returns how many. */
static uint32_t scan_spans(vmc_cache *c, uint32_t unit, uint64_t limit, struct span *out,
                           uint32_t max)
{
    uint32_t n = 0;
    for (uint64_t seen = 0; unit <= c->pool_units && seen < limit && n < max;) {
        uint64_t tag = vmc_tag_at(c, unit);
        uint32_t units = VMC_TAG_UNITS(tag), kind = VMC_TAG_KIND(tag), head = UINT32_MAX;
        if (units == 0 || units > c->pool_units - unit + 1) {
            vmc_mark_damaged(c);
            break;
        }
        if (kind == VMC_KIND_FREE) {
            head = 0;
        } else if (kind == VMC_KIND_HEAD) {
            struct vmc_entry *e = vmc_head(c, unit);
            head = e && e->state == VMC_PUBLISHED ? unit : UINT32_MAX;
        } else if (kind == VMC_KIND_BODY) {
            struct vmc_entry *e = vmc_head(c, ((struct vmc_body *)vmc_unit(c, unit))->head);
            head = e && e->state == VMC_PUBLISHED ? ((struct vmc_body *)vmc_unit(c, unit))->head
                                                  : UINT32_MAX;
        }
        out[n++] = (struct span){units, head};
        seen += units;
        unit += units;
    }
    return n;
}

uint32_t vmc_pool_window(vmc_cache *c, uint32_t units, uint32_t *victims, uint32_t max)
{
    /* Start where a free extent starts (a known extent boundary, and free room
     * is what a window wants), the largest one, and look at a bounded stretch:
     * a few times the room needed, at least 64 Ki units. */
    uint32_t start = 0;
    for (int k = VMC_NCLASSES - 1; k >= 0 && start == 0; k--)
        start = c->hdr->pool.free_head[k];
    if (free_at(c, start) == NULL)
        start = 1;
    uint64_t limit = (uint64_t)units * 8 < 65536 ? 65536 : (uint64_t)units * 8;
    uint32_t cap = limit > c->pool_units ? c->pool_units : (uint32_t)limit;
    struct span *s = malloc((size_t)cap * sizeof *s);
    if (s == NULL)
        return 0;
    uint32_t n = 0, found = 0;
    for (int pass = 0; pass < 2 && found == 0; pass++) {
        if (pass == 1) {
            if (start == 1)
                break;
            start = 1; /* the stretch ran into the end of the pool: from the start */
        }
        n = scan_spans(c, start, limit, s, cap);
        /* the window [l, r] holding `units` units with the fewest owned extents */
        uint64_t have = 0, best_cost = UINT64_MAX;
        uint32_t cost = 0, l = 0, best_l = 0, best_r = 0;
        for (uint32_t r = 0; r < n; r++) {
            if (s[r].head == UINT32_MAX) { /* a wall: start after it */
                l = r + 1;
                have = cost = 0;
                continue;
            }
            have += s[r].units;
            cost += s[r].head != 0;
            while (l < r && have - s[l].units >= units) {
                have -= s[l].units;
                cost -= s[l].head != 0;
                l++;
            }
            if (have >= units && cost < best_cost) {
                best_cost = cost;
                best_l = l;
                best_r = r;
            }
        }
        if (best_cost == UINT64_MAX)
            continue;
        for (uint32_t i = best_l; i <= best_r && found < max; i++) {
            uint32_t h = s[i].head;
            bool seen = h == 0;
            for (uint32_t j = 0; j < found && !seen; j++)
                seen = victims[j] == h;
            if (!seen)
                victims[found++] = h;
        }
        if (found == 0) /* the room is free already: nothing to evict */
            victims[found++] = 0;
    }
    free(s);
    return found;
}
