/* vmc_cache.c -- the cache operations: one call per operation.
 *
 * A put is a reservation filled and published in one call: room is taken
 * under the pool lock (evicting least recently used entries first), the key
 * and value are copied with no lock held, then the entry is linked under its
 * shard lock, which is also where it gets its timestamp. A get hashes, looks
 * up, copies and touches the LRU order in one call: without the shard lock,
 * validated by the shard's read sequence ("optimistic reads"), or under it.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmc_cache.h"
#include "vmc_entry.h"
#include "vmc_index.h"
#include "vmc_lru.h"
#include "vmc_mutex.h"
#include "vmc_pool.h"
#include "vmc_repair.h"

/* Copies of at least this many bytes run without the shard lock (optimistically). */
#define VMC_UNLOCKED_COPY (256u * 1024)

/* ---- calls in flight: vmc_close waits for them ---- */

/* enter -- count a call in flight, unless the handle is closed (or was
 * inherited across fork() and never got a liveness lock of its own). */
static int enter(vmc_cache *c)
{
    atomic_fetch_add(&c->active, 1);
    if (atomic_load(&c->closed)) {
        atomic_fetch_sub(&c->active, 1);
        return vmc_fail(VMC_E_CLOSED, "the cache handle is closed");
    }
    if (c->pid != vmc_self_pid()) {
        atomic_fetch_sub(&c->active, 1);
        return vmc_fail(VMC_E_CLOSED, "the cache handle was opened by process %llu and this "
                                      "process has no liveness lock of its own on it "
                                      "(vmc_after_fork was not called, or failed)",
                        (unsigned long long)c->pid);
    }
    return VMC_OK;
}

static void leave(vmc_cache *c)
{
    atomic_fetch_sub(&c->active, 1);
}

#define ENTER(c)                                                                  \
    do {                                                                          \
        int enter_rc_ = enter(c);                                                 \
        if (enter_rc_ < 0)                                                        \
            return enter_rc_;                                                     \
    } while (0)

/* ENTER_FLAGS -- ENTER a call that takes flags: with VMC_F_NO_REPAIR, this
 * thread defers repairs (vmc_repair.h) until leave_flags. */
#define ENTER_FLAGS(c, flags)                                                     \
    ENTER(c);                                                                     \
    bool no_repair_prev_ = vmc_no_repair_begin(((flags) & VMC_F_NO_REPAIR) != 0)

static void leave_flags(vmc_cache *c, bool no_repair_prev)
{
    vmc_no_repair_end(no_repair_prev);
    leave(c);
}

static int check_key(size_t klen)
{
    if (klen > VMC_MAX_KEY)
        return vmc_fail(VMC_E_KEY_TOO_LARGE, "key of %zu bytes exceeds the maximum of %u bytes",
                        klen, VMC_MAX_KEY);
    return VMC_OK;
}

/* max_value -- the largest value with a key of klen bytes that the pool could hold. */
static uint64_t max_value(const vmc_cache *c, size_t klen)
{
    uint64_t room = ((uint64_t)c->pool_units << c->shift) - sizeof(struct vmc_entry) - klen;
    return room < UINT32_MAX ? room : UINT32_MAX;
}

static int check_value(vmc_cache *c, size_t klen, uint64_t vlen)
{
    uint64_t max = max_value(c, klen);
    if (vlen > max)
        return vmc_fail(VMC_E_VALUE_TOO_LARGE,
                        "value of %llu bytes can never fit this cache (at most %llu bytes "
                        "with a %zu-byte key)",
                        (unsigned long long)vlen, (unsigned long long)max, klen);
    return VMC_OK;
}

static uint64_t expiry(const vmc_cache *c, int64_t ttl_ns, uint64_t now)
{
    if (ttl_ns < 0)
        ttl_ns = (int64_t)c->default_ttl_ns;
    return ttl_ns == 0 ? 0 : now + (uint64_t)ttl_ns;
}

/* miss_unsure -- a lookup missed, but met damage on its way: no answer
 * (the key may sit past the damage). The caller unlocks and looks again;
 * the next lock repairs first. Bounded by `round`. */
static bool miss_unsure(vmc_cache *c, uint32_t u, int round)
{
    return u == 0 && round < 4 && vmc_damaged(c);
}

/* ---- removal and eviction ---- */

static bool still_reserved(vmc_cache *c, uint32_t head, uint32_t nonce);

/* unname_spare -- this handle's spare slot no longer names `head` (a spare
 * freed, or refilled and published); a slot naming another is left alone. */
static void unname_spare(vmc_cache *c, uint32_t head)
{
    struct vmc_spare_slot *slot = vmc_spare_slot(c);
    if (slot && head)
        __atomic_compare_exchange_n(&slot->unit, &head, 0, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_RELAXED);
}

/* unlist -- (pool lock held, or the shard lock for a spare) take a RESERVED
 * head off where it is found: its owner's spare slot for a spare (nonce
 * c->spare_mark), else the reserved list. */
static void unlist(vmc_cache *c, uint32_t head, uint32_t nonce)
{
    if (nonce == c->spare_mark)
        unname_spare(c, head);
    else
        vmc_reserved_unlink(c, head);
}

/* keep_spare -- make `spare`, a spare of this handle taken off it by a call
 * that could neither use nor free it (a lock it must not wait for or repair),
 * the handle's spare again: its slot still names it, and nothing else can
 * become the spare meanwhile (name_spare takes the slot only from a name that
 * is no spare of this handle's). 0 is none. */
static void keep_spare(vmc_cache *c, uint32_t spare)
{
    uint32_t none = 0;
    if (spare)
        __atomic_compare_exchange_n(&c->spare, &none, spare, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_RELAXED);
}

/* free_spare -- (pool lock held) free `spare`, a spare of this handle taken
 * off it (see "the spare" below), if it is still one; 0 is none. */
static void free_spare(vmc_cache *c, uint32_t spare)
{
    if (spare && still_reserved(c, spare, c->spare_mark)) {
        unlist(c, spare, c->spare_mark);
        vmc_release_entry(c, spare);
    }
}

/* take_off_spare -- the handle's spare, now no longer its (0 if none). */
static uint32_t take_off_spare(vmc_cache *c)
{
    return __atomic_exchange_n(&c->spare, 0, __ATOMIC_ACQ_REL);
}

/* remove_locked -- unlink a PUBLISHED entry found at `slot` and free it,
 * and the handle's spare with it (an emptied cache holds no room).
 * The pool lock is taken before anything changes, so VMC_RETRY leaves the
 * shard as it was. */
static int remove_locked(vmc_cache *c, uint32_t shard, uint32_t unit, uint32_t slot)
{
    if (!vmc_lru_sound(c, shard)) { /* counts that cannot be trusted: repair first */
        vmc_mark_damaged(c);
        return VMC_RETRY;
    }
    int rc = vmc_pool_lock_nested(c);
    if (rc < 0)
        return rc;
    vmc_index_delete(c, shard, slot);
    vmc_lru_remove(c, shard, unit);
    VMC_UNCOUNT(c->shards[shard].count);
    vmc_release_entry(c, unit);
    free_spare(c, take_off_spare(c));
    vmc_pool_unlock(c);
    return VMC_OK;
}


/* evict_lru -- remove the least recently used entry of the whole cache: the
 * settled heap top with the smallest access time over all shards. Shards'
 * top_atime are lower bounds read without locks; the chosen shard is settled
 * under its lock and, if its exact least recent access is now later than
 * another shard's bound, the choice is made again (after a bounded number of
 * rounds the settled top is taken: under concurrent use "exact" is best
 * effort anyway). An expired victim counts as an expiration; with
 * `want_live` the search goes on until a live entry is evicted. Returns the
 * evicted key's length (copied to kout when it fits), or VMC_MISS. */
static int evict_lru(vmc_cache *c, char *kout, size_t kcap, bool want_live)
{
    uint64_t now = vmc_now_ns();
    for (uint32_t attempt = 0; attempt < 4 * c->n_shards + 64; attempt++) {
        /* attempt counts rounds without progress */
        uint32_t best = UINT32_MAX;
        uint64_t best_t = UINT64_MAX, second_t = UINT64_MAX;
        for (uint32_t i = 0; i < c->n_shards; i++) {
            uint64_t t = VMC_LOAD(c->shards[i].top_atime);
            if (t < best_t || (best == UINT32_MAX && VMC_LOAD(c->shards[i].count) > 0)) {
                second_t = best_t;
                best_t = t;
                best = i;
            } else if (t < second_t) {
                second_t = t;
            }
        }
        if (best == UINT32_MAX)
            return VMC_MISS;
        int rc = vmc_shard_lock(c, best);
        if (rc < 0)
            return rc;
        struct vmc_shard *sh = &c->shards[best];
        uint32_t u = vmc_lru_settle(c, best);
        bool strict = attempt < 2 * c->n_shards;
        if (u == 0 || (strict && sh->top_atime > second_t)) {
            vmc_shard_unlock(c, best); /* emptied, or no longer the oldest: choose again */
            continue;
        }
        struct vmc_entry *e = vmc_unit(c, u);
        uint32_t slot = vmc_index_slot_of(c, best, u);
        if (slot == UINT32_MAX) {
            vmc_mark_damaged(c);
            vmc_shard_unlock(c, best);
            continue;
        }
        size_t klen = e->key_len;
        if (kout && klen <= kcap)
            memcpy(kout, vmc_entry_key(e), klen);
        bool expired = vmc_expired(e, now);
        rc = remove_locked(c, best, u, slot);
        if (rc == VMC_OK) {
            if (expired)
                VMC_COUNT(sh->expirations);
            else
                VMC_COUNT(sh->evictions);
        }
        vmc_shard_unlock(c, best);
        if (rc == VMC_RETRY)
            continue;
        if (rc < 0)
            return rc;
        if (expired && want_live) {
            attempt = 0; /* progress: expired entries do not use up the budget */
            continue;
        }
        return (int)klen;
    }
    return VMC_MISS;
}

static int64_t purge_some(vmc_cache *c);

/* evict_victim -- evict the entry at head if it is still the one chosen
 * (same stamp), copying its key as a (u16 length, bytes) record to
 * kout[*used..] if kout is given. 1 if evicted, 0 if gone meanwhile, -1 if
 * its record does not fit (nothing done), or a failure. */
static int evict_victim(vmc_cache *c, uint32_t head, uint64_t stamp, uint64_t hash, char *kout,
                        size_t kcap, size_t *used)
{
    uint32_t s = vmc_shard_of(c, hash);
    struct vmc_shard *sh = &c->shards[s];
    for (;;) {
        int rc = vmc_shard_lock(c, s);
        if (rc < 0)
            return rc;
        uint32_t slot = vmc_index_slot_of(c, s, head);
        struct vmc_entry *e = slot == UINT32_MAX ? NULL : vmc_unit(c, head);
        if (e == NULL || e->stamp != stamp) {
            vmc_shard_unlock(c, s);
            return 0;
        }
        size_t klen = e->key_len;
        if (kout && *used + 2 + klen > kcap) {
            vmc_shard_unlock(c, s);
            return -1;
        }
        if (kout) {
            uint16_t k16 = (uint16_t)klen;
            memcpy(kout + *used, &k16, 2);
            memcpy(kout + *used + 2, vmc_entry_key(e), klen);
        }
        bool expired = vmc_expired(e, vmc_now_ns());
        rc = remove_locked(c, s, head, slot);
        if (rc == VMC_OK) {
            if (expired)
                VMC_COUNT(sh->expirations);
            else
                VMC_COUNT(sh->evictions);
        }
        vmc_shard_unlock(c, s);
        if (rc == VMC_RETRY)
            continue;
        if (rc < 0)
            return rc;
        *used += kout ? 2 + klen : 1;
        return 1;
    }
}

#define WINDOW_VICTIMS 4096

/* evict_for -- evict what an entry of klen + vlen bytes still lacks room for.
 * The least recently used entry while the pool holds its entry budget, or,
 * for a put, which may scatter, while it has fewer free units than the entry
 * takes. Otherwise no run is long enough for it
 * (contiguous: the whole entry, a reservation; else its HEAD, which holds the
 * key): the entries of the stretch vmc_pool_window picks -- so what is
 * evicted is about the room needed, not every older entry until a run
 * appears by chance, and a run that open reservations make impossible is
 * reported at once (VMC_MISS) with nothing evicted. Evicted keys
 * go to kout as (u16 length, bytes) records while they fit. Returns the bytes
 * of records written (with kout NULL, the number evicted): 0 when nothing had
 * to be evicted (the room is there), VMC_MISS when nothing evictable is left. */
static int64_t evict_for(vmc_cache *c, size_t klen, uint64_t vlen, bool contiguous, char *kout,
                         size_t kcap)
{
    uint64_t need = sizeof(struct vmc_entry) + klen + (contiguous ? vlen : 0);
    uint64_t total = sizeof(struct vmc_entry) + klen + vlen;
    uint32_t run = (uint32_t)((need + c->unit_size - 1) >> c->shift);
    int rc = vmc_pool_lock(c);
    if (rc < 0)
        return rc;
    bool budget_full = c->hdr->pool.heads >= c->max_entries;
    if (budget_full ||
        (!contiguous && VMC_LOAD(c->hdr->pool.free_units) < (total + c->unit_size - 1) >> c->shift)) {
        vmc_pool_unlock(c);
        rc = evict_lru(c, kout ? kout + 2 : NULL, kout && kcap >= 2 ? kcap - 2 : 0, false);
        if (rc < 0)
            return rc;
        if (kout && (size_t)rc + 2 <= kcap) {
            uint16_t k16 = (uint16_t)rc;
            memcpy(kout, &k16, 2);
            return 2 + rc;
        }
        return kout ? 0 : 1; /* a key longer than kout: evicted, not reported */
    }
    uint32_t *heads = malloc(WINDOW_VICTIMS * (sizeof *heads + 16));
    if (heads == NULL) {
        vmc_pool_unlock(c);
        return vmc_fail(VMC_E_OS, "out of memory while choosing where to evict");
    }
    uint64_t *stamps = (uint64_t *)(heads + WINDOW_VICTIMS), *hashes = stamps + WINDOW_VICTIMS;
    uint32_t n = vmc_pool_window(c, run, heads, WINDOW_VICTIMS);
    /* Noted under the pool lock, but an entry may still go before its
     * eviction (a refill turns a replaced entry into a spare under its shard
     * lock alone, and its owner rewrites it with no lock): evict_victim
     * evicts only what is still indexed under this hash with this stamp. */
    for (uint32_t i = 0; i < n; i++) {
        struct vmc_entry *e = heads[i] ? vmc_head(c, heads[i]) : NULL;
        stamps[i] = e ? e->stamp : 0;
        hashes[i] = e ? vmc_hash_key(c, vmc_entry_key(e), e->key_len) : 0;
    }
    vmc_pool_unlock(c);
    int64_t out = n == 0 ? VMC_MISS : 0;
    size_t used = 0;
    for (uint32_t i = 0; i < n && out >= 0; i++) {
        if (heads[i] == 0)
            continue;
        rc = evict_victim(c, heads[i], stamps[i], hashes[i], kout, kcap, &used);
        if (rc == -1)
            break; /* kout is full: the caller comes back for the rest */
        if (rc < 0 && used == 0)
            out = rc;
        if (rc < 0)
            break; /* what was evicted is reported: the next call meets the failure */
    }
    free(heads);
    return out < 0 ? out : (int64_t)used;
}

int64_t vmc_evict_for(vmc_cache *c, size_t klen, uint64_t vlen, uint32_t flags, char *kout,
                      size_t kcap)
{
    ENTER_FLAGS(c, flags);
    int64_t rc = check_key(klen);
    if (rc == VMC_OK && c->policy == VMC_POLICY_NONE)
        rc = VMC_MISS;
    else if (rc == VMC_OK)
        rc = evict_for(c, klen, vlen, flags & VMC_F_CONTIGUOUS, kout, kcap);
    leave_flags(c, no_repair_prev_);
    return rc;
}


/* make_room -- reserve room for an entry (RESERVED, on the reserved list,
 * owned by this process), evicting as the policy allows; first free `spare`
 * (the handle's spare, which this allocation does not use), if not 0: a
 * spare never makes an allocation of its own handle evict. Everything recovery
 * reads of a reservation is written here, under the pool lock (a spare's
 * sizes excepted: take_spare). */
static int make_room(vmc_cache *c, size_t klen, uint64_t vlen, uint64_t expires, bool contiguous,
                     uint32_t flags, uint32_t nonce, uint32_t spare, uint32_t *head)
{
    bool purged = false;
    int stalled = 0;
    for (;;) {
        int rc = vmc_pool_lock(c);
        if (rc < 0) {
            keep_spare(c, spare);
            return rc;
        }
        free_spare(c, spare);
        spare = 0;
        rc = vmc_alloc_entry(c, klen, vlen, contiguous, head);
        if (rc == VMC_OK) {
            struct vmc_entry *e = vmc_unit(c, *head);
            /* relaxed stores: a reader copying without a lock may read these */
            VMC_STORE(e->key_len, (uint16_t)klen);
            VMC_STORE(e->value_len, (uint32_t)vlen);
            VMC_STORE(e->expires_ns, expires);
            VMC_STORE(e->atime_ns, c->owner);
            VMC_STORE(e->checksum, nonce); /* 0 for a put's own reservation */
            VMC_STORE(e->state, VMC_RESERVED);
            vmc_reserved_push(c, *head);
            vmc_pool_unlock(c);
            return VMC_OK;
        }
        uint64_t reclaimed = vmc_reclaim_dead(c, false);
        vmc_pool_unlock(c);
        if (reclaimed)
            continue;
        if (c->policy == VMC_POLICY_NONE && !purged) {
            /* Never evict, but expired entries are not entries any more: a
             * bounded scan for them, paid only by a put that found no room. */
            purged = true;
            int64_t n = purge_some(c);
            if (n < 0)
                return (int)n;
            if (n > 0)
                continue;
        }
        if (c->policy == VMC_POLICY_NONE && VMC_LOAD(c->hdr->pool.heads) >= c->max_entries)
            return vmc_fail(VMC_E_FULL,
                            "cache full: it holds its maximum of %u entries and the policy is "
                            "\"none\"", c->max_entries);
        if (c->policy == VMC_POLICY_NONE)
            return vmc_fail(VMC_E_FULL,
                            "cache full: no room for a %llu-byte entry and the policy is \"none\"",
                            (unsigned long long)(klen + vlen));
        if (flags & VMC_F_NO_EVICT)
            return VMC_E_NEED_ROOM;
        int64_t evicted = evict_for(c, klen, vlen, contiguous, NULL, 0);
        /* A run the allocator's bounded search does not find, twice: plain LRU. */
        stalled = evicted == 0 ? stalled + 1 : 0;
        rc = stalled > 2 ? evict_lru(c, NULL, 0, false) : (int)(evicted < 0 ? evicted : 0);
        if (rc == VMC_MISS) {
            if ((rc = vmc_pool_lock(c)) < 0)
                return rc;
            reclaimed = vmc_reclaim_dead(c, true);
            vmc_pool_unlock(c);
            if (reclaimed)
                continue;
            return vmc_fail(VMC_E_FULL,
                            "no room for a %llu-byte %s: everything evictable is gone and "
                            "open reservations hold the rest (among them each open handle's "
                            "spare: the last entry of up to 4 KiB it replaced, kept for its "
                            "next put)",
                            (unsigned long long)(klen + vlen),
                            contiguous ? "contiguous reservation" : "entry");
        }
        if (rc < 0)
            return rc;
    }
}

/* A reservation's id: its head unit, and in the high half a nonce kept in the
 * entry's checksum field while it is RESERVED, so that a stale id whose unit
 * now holds another reservation of this process cannot touch that one. */
#define RID(head, nonce) (((uint64_t)(nonce) << 32) | (head))
#define RID_HEAD(rid) ((uint32_t)(rid))
#define RID_NONCE(rid) ((uint32_t)((rid) >> 32))

static uint32_t next_nonce(void)
{
    static uint32_t counter;
    uint32_t n;
    do /* 31 bits, never 0 (puts' own reservations use 0): ids stay positive */
        n = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) & 0x7fffffffu;
    while (n == 0);
    return n;
}

/* still_reserved -- head is still this process's reservation `nonce`
 * (another thread may have published or cancelled it meanwhile). */
static bool still_reserved(vmc_cache *c, uint32_t head, uint32_t nonce)
{
    struct vmc_entry *e = vmc_head(c, head);
    return e && VMC_LOAD(e->state) == VMC_RESERVED && VMC_LOAD(e->atime_ns) == c->owner &&
           VMC_LOAD(e->checksum) == nonce;
}

static bool track_rid(vmc_cache *c, uint64_t rid, bool orphan);

/* drop_reservation -- free a RESERVED head of ours. In a no-repair call
 * that finds the file damaged, the head is left to vmc_repair_file (or
 * vmc_close) to free, after the repair: it never outlives the call's
 * handle. */
static int drop_reservation(vmc_cache *c, uint32_t head, uint32_t nonce)
{
    int rc = vmc_pool_lock(c);
    if (rc == VMC_E_REPAIR && nonce == c->spare_mark) {
        /* A spare taken off the handle: the handle's spare again (a repair
         * keeps a live owner's). The orphan list could not hold it: its
         * nonce is RID_ORPHAN's bit. */
        keep_spare(c, head);
        return rc;
    }
    if (rc == VMC_E_REPAIR && !track_rid(c, RID(head, nonce), true))
        rc = vmc_repair(c) == VMC_OK ? drop_reservation(c, head, nonce) : rc; /* no memory */
    if (rc < 0)
        return rc;
    if (!still_reserved(c, head, nonce)) {
        vmc_pool_unlock(c);
        return vmc_fail(VMC_E_STATE, "reservation %u was published or cancelled meanwhile",
                        head);
    }
    unlist(c, head, nonce);
    vmc_release_entry(c, head); /* REMOVED: a stale id can never match it again */
    vmc_pool_unlock(c);
    return VMC_OK;
}

/* ---- the reservations open on this handle (vmc_close cancels them) ---- */

/* An orphan: a put's own reservation that a no-repair call could not free
 * (its id has this bit set, which no reservation id has: nonces are 31 bits;
 * a spare, whose nonce has it, is never an orphan: see drop_reservation). */
#define RID_ORPHAN (1ull << 63)

/* track_rid -- remember an open reservation (an orphan, to free after the
 * repair); false if out of memory. */
static bool track_rid(vmc_cache *c, uint64_t rid, bool orphan)
{
    if (orphan)
        rid |= RID_ORPHAN;
    bool ok = true;
    pthread_mutex_lock(&c->rids_lock);
    if (c->n_rids == c->cap_rids) {
        uint32_t cap = c->cap_rids ? c->cap_rids * 2 : 16;
        uint64_t *more = cap > c->cap_rids ? realloc(c->rids, (size_t)cap * sizeof *more) : NULL;
        if (more) {
            c->rids = more;
            c->cap_rids = cap;
        } else {
            ok = false;
        }
    }
    if (ok)
        c->rids[c->n_rids++] = rid;
    pthread_mutex_unlock(&c->rids_lock);
    return ok;
}

/* untrack_rid -- forget a reservation (published, cancelled, or never ours). */
static void untrack_rid(vmc_cache *c, uint64_t rid)
{
    pthread_mutex_lock(&c->rids_lock);
    for (uint32_t i = 0; i < c->n_rids; i++)
        if (c->rids[i] == rid) {
            c->rids[i] = c->rids[--c->n_rids];
            break;
        }
    pthread_mutex_unlock(&c->rids_lock);
}

void vmc_cache_drop_reservations(vmc_cache *c)
{
    uint32_t spare = take_off_spare(c);
    if (c->spare_slot && vmc_pool_lock(c) == VMC_OK) { /* else freed as a dead owner's */
        free_spare(c, spare); /* the one this handle knows, not what its slot names */
        vmc_spare_slot_release(c);
        vmc_pool_unlock(c);
    }
    pthread_mutex_lock(&c->rids_lock);
    for (uint32_t i = 0; i < c->n_rids; i++) /* gone: harmless */
        drop_reservation(c, RID_HEAD(c->rids[i]), RID_NONCE(c->rids[i] & ~RID_ORPHAN));
    c->n_rids = 0;
    pthread_mutex_unlock(&c->rids_lock);
}

/* drop_orphans -- free the orphans of no-repair calls (the file repaired). */
static void drop_orphans(vmc_cache *c)
{
    pthread_mutex_lock(&c->rids_lock);
    for (uint32_t i = 0; i < c->n_rids;) {
        uint64_t rid = c->rids[i];
        if (!(rid & RID_ORPHAN)) {
            i++;
            continue;
        }
        c->rids[i] = c->rids[--c->n_rids];
        drop_reservation(c, RID_HEAD(rid), RID_NONCE(rid & ~RID_ORPHAN));
    }
    pthread_mutex_unlock(&c->rids_lock);
}

int vmc_repair_file(vmc_cache *c)
{
    ENTER(c);
    int rc = vmc_repair(c);
    if (rc == VMC_OK)
        drop_orphans(c);
    leave(c);
    return rc;
}

/* clocks_sane -- repair first if the clock or the persisted watermark is
 * too large to be real (damage: no publication could have got there). */
static int clocks_sane(vmc_cache *c)
{
    if (VMC_LOAD(c->hdr->clock) < VMC_MAX_CLOCK && VMC_LOAD(c->hdr->persisted) < VMC_MAX_CLOCK)
        return VMC_OK;
    vmc_mark_damaged(c);
    return vmc_repair_needed(c);
}

/* ---- the spare: a put's reservation kept for the next put ----
 *
 * A replacement's old entry, if it is one small extent, is not freed: it
 * becomes a RESERVED head of this handle's (owned by its owner id, nonce
 * the file's spare mark, c->spare_mark), and the handle's next put of an entry of the same number
 * of units fills it without taking the pool lock. A spare is on no list: the
 * handle's spare slot in the header names it (vmc_format.h), so that a dead
 * owner's is found. A steady stream of replacements of one size thus takes no
 * pool lock at all: the put fills its spare, and its publication makes the
 * replaced entry the next spare (the slot names the one instead of the
 * other) under the shard lock alone; no extent changes hands and no shared
 * line but the shard's and the clock's is written. Invariants: a handle has
 * at most one spare and its slot names it (c->spare != 0 implies slot.unit ==
 * c->spare); while a put fills it (taken off c->spare) the slot still names
 * it, until its publication; it is counted as used room (it is allocated);
 * the handle's next allocation that does not use it, its next removal
 * (delete, evict, clear) and its close free it; a dead owner's spare is freed
 * with its slot by vmc_reclaim_dead, and by repair or recovery like any
 * reservation of it; a fork()ed child forgets its parent's spare and slot. */
#define SPARE_MAX_BYTES 4096u

/* name_spare -- make this handle's slot name the replaced entry at `old` in
 * place of `named` (the spare being refilled, or 0); false if the handle has
 * no slot, the entry does not qualify (one extent of at most 4 KiB) or the
 * slot names another (the handle holds a spare: the caller frees `old`). */
static bool name_spare(vmc_cache *c, uint32_t old, uint32_t named)
{
    struct vmc_spare_slot *slot = vmc_spare_slot(c);
    struct vmc_entry *e = vmc_unit(c, old);
    /* a relaxed load of the tag: the allocator may set PREV_FREE meanwhile */
    return slot && e->next == 0 && vmc_extent_bytes(c, vmc_tag_at(c, old)) <= SPARE_MAX_BYTES &&
           __atomic_compare_exchange_n(&slot->unit, &named, old, false, __ATOMIC_ACQ_REL,
                                       __ATOMIC_RELAXED);
}

/* stale_name -- (pool lock held) what this handle's slot names if that is no
 * spare of the handle's any more (a spare dropped by a failure, or damage),
 * so that the next spare replaces the name; else 0. */
static uint32_t stale_name(vmc_cache *c)
{
    struct vmc_spare_slot *slot = vmc_spare_slot(c);
    uint32_t named = slot ? VMC_LOAD(slot->unit) : 0;
    return named && !still_reserved(c, named, c->spare_mark) ? named : 0;
}

/* claim_naming, release_naming -- the right to rename this handle's spare
 * slot and make the entry it names the spare (c->naming). Without it, a
 * thread publishing under the pool lock could take the name a refill had
 * just given its replaced entry (not yet a spare, so "stale") and make a
 * second spare, one the slot would not name. */
static bool claim_naming(vmc_cache *c)
{
    uint32_t free_ = 0;
    return __atomic_compare_exchange_n(&c->naming, &free_, 1, false, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

static void release_naming(vmc_cache *c)
{
    __atomic_store_n(&c->naming, 0, __ATOMIC_RELEASE);
}

/* make_spare -- (shard lock held, the new value published) turn the replaced
 * entry at `old`, which the slot names, into this handle's spare. */
static void make_spare(vmc_cache *c, uint32_t old)
{
    struct vmc_entry *e = vmc_unit(c, old);
    VMC_STORE(e->state, VMC_REMOVED); /* tells a reader copying it without a lock */
    VMC_STORE(e->atime_ns, c->owner);
    VMC_STORE(e->checksum, c->spare_mark);
    VMC_STORE(e->state, VMC_RESERVED);
    __atomic_store_n(&c->spare, old, __ATOMIC_RELEASE);
}

/* take_spare -- the handle's spare, filled in for an entry of klen + vlen
 * bytes if it has exactly the units that entry takes (0 if not: *unfit then
 * holds a spare for make_room to free). */
static uint32_t take_spare(vmc_cache *c, size_t klen, uint64_t vlen, uint64_t expires,
                           uint32_t *unfit)
{
    uint32_t spare = take_off_spare(c);
    *unfit = 0;
    if (spare == 0)
        return 0;
    struct vmc_entry *e = vmc_head(c, spare);
    /* relaxed loads: the allocator may set PREV_FREE in the tag meanwhile */
    uint64_t need = sizeof *e + klen + vlen;
    uint64_t room = e ? vmc_extent_bytes(c, vmc_tag_at(c, spare)) : 0;
    /* exactly the units a new allocation would take: no room is wasted */
    if (e == NULL || !still_reserved(c, spare, c->spare_mark) || VMC_LOAD(e->next) != 0 ||
        need > room ||
        room - need >= c->unit_size) {
        *unfit = spare;
        return 0;
    }
    /* Sizes that are sound at every step for a recovery reading them now
     * (the value fits beside the key, so no BODY extent is looked for). */
    __atomic_store_n(&e->value_len, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&e->key_len, (uint16_t)klen, __ATOMIC_RELEASE);
    __atomic_store_n(&e->value_len, (uint32_t)vlen, __ATOMIC_RELEASE);
    VMC_STORE(e->expires_ns, expires);
    return spare;
}

/* publish -- link a filled RESERVED head into its shard, replacing an older
 * value of its key; `data` is the entry's data hash (vmc_entry_data_hash),
 * computed before locking: values may be large. Returns the timestamp, or 0
 * when `add` finds the key present. On any failure the reservation is freed:
 * it never outlives a publication that did not happen. */
static int64_t publish(vmc_cache *c, uint32_t head, uint32_t nonce, uint64_t hash, uint64_t data,
                       bool add, const char *key, size_t klen, uint64_t vlen)
{
    struct vmc_entry *e = vmc_unit(c, head);
    uint32_t s = vmc_shard_of(c, hash);
    struct vmc_shard *sh = &c->shards[s];
    int rc;
    bool spare = nonce == c->spare_mark; /* a refilled spare: on no list */
    for (int round = 0;; round++) {
        if ((rc = vmc_shard_lock(c, s)) < 0) {
            drop_reservation(c, head, nonce);
            return rc;
        }
        uint64_t now = vmc_now_ns();
        uint32_t slot = 0;
        uint32_t old = vmc_index_find(c, s, hash, key, klen, &slot);
        if (miss_unsure(c, old, round)) { /* the key may be past the damage: no duplicate */
            vmc_shard_unlock(c, s);
            continue;
        }
        if (!vmc_lru_sound(c, s) && round < 8) { /* counts that cannot be trusted */
            vmc_mark_damaged(c);
            vmc_shard_unlock(c, s);
            continue;
        }
        struct vmc_entry *oe = old ? vmc_unit(c, old) : NULL;
        bool old_expired = oe && vmc_expired(oe, now);
        uint32_t old_item = oe ? oe->link_prev : 0; /* read before its extent goes */
        if (oe)
            vmc_lru_prefetch(c, s, old_item); /* taken over after the pool section */
        if (add && oe && !old_expired) {
            vmc_shard_unlock(c, s);
            rc = drop_reservation(c, head, nonce);
            return rc < 0 ? rc : 0;
        }
        /* A shard whose index is at its load limit makes room in itself: a
         * many-sigma event, as a shard may hold its share of the pool's units
         * plus five standard deviations, and keys hash with a secret seed. */
        uint32_t victim = (!old && sh->count >= c->max_load) ? vmc_lru_settle(c, s) : 0;
        if (victim && c->policy == VMC_POLICY_NONE) {
            vmc_shard_unlock(c, s);
            drop_reservation(c, head, nonce);
            return vmc_fail(VMC_E_FULL, "cache full: the index of shard %u is full and the "
                                        "policy is \"none\"", s);
        }
        uint32_t vslot = victim ? vmc_index_slot_of(c, s, victim) : 0;
        /* Taken under the shard lock (timestamps follow publication order per
         * key, and committed() relies on it), but before the pool lock: the
         * clock's line is shared by every publisher. A publication that fails
         * below leaves a timestamp unused, which nothing minds. A clock at or
         * beyond VMC_MAX_CLOCK (wrapped included) is damage: the next round's
         * shard lock repairs, and the rebuild resets it. */
        uint64_t ts = __atomic_add_fetch(&c->hdr->clock, 1, __ATOMIC_SEQ_CST);
        if (ts - 1 >= VMC_MAX_CLOCK - 1) {
            vmc_mark_damaged(c);
            vmc_shard_unlock(c, s);
            if (round < 8)
                continue;
            drop_reservation(c, head, nonce);
            return vmc_fail(VMC_E_CORRUPT, "the file's clock stays at its end (%llu) after "
                                           "repair: its timestamps are damaged",
                            (unsigned long long)ts);
        }
        /* What the checksum seals must be what the owner wrote: sizes changed
         * under us are damage. */
        bool sound = e->key_len == klen && e->value_len == vlen &&
                     memcmp(vmc_entry_key(e), key, klen) == 0;
        /* A refilled spare replacing an entry fit to be the next spare takes
         * no pool lock: neither is on a list, the slot names the one instead of
         * the other, and no extent changes hands (see "the spare"). */
        bool renamed = spare && oe && sound && still_reserved(c, head, nonce) &&
                       claim_naming(c);
        if (renamed && !name_spare(c, old, head)) {
            release_naming(c);
            renamed = false;
        }
        bool pooled = !renamed;
        if (pooled) {
            rc = vmc_pool_lock_nested(c);
            if (rc == VMC_RETRY) {
                vmc_shard_unlock(c, s);
                continue;
            }
            if (rc < 0) {
                vmc_shard_unlock(c, s);
                drop_reservation(c, head, nonce);
                return rc;
            }
            if (!still_reserved(c, head, nonce)) { /* a concurrent publish or cancel won */
                vmc_pool_unlock(c);
                vmc_shard_unlock(c, s);
                return vmc_fail(VMC_E_STATE,
                                "reservation %u was published or cancelled meanwhile", head);
            }
            if (!sound) {
                vmc_mark_damaged(c);
                unlist(c, head, nonce);
                vmc_release_entry(c, head);
                vmc_pool_unlock(c);
                vmc_shard_unlock(c, s);
                return vmc_fail(VMC_E_CORRUPT, "the reservation of a %llu-byte value was "
                                               "damaged before its publication; the file "
                                               "will be repaired",
                                (unsigned long long)vlen);
            }
            unlist(c, head, nonce);
        }
        /* The new value is published before the old one goes: a crash in
         * between leaves both, and recovery keeps the newer. */
        e->stamp = ts;
        VMC_STORE(e->checksum, vmc_entry_seal(e, data));
        VMC_STORE(e->atime_ns, now); /* replaces the owner id: see struct vmc_entry */
        __atomic_store_n(&e->state, VMC_PUBLISHED, __ATOMIC_RELEASE);
        if (!pooled) {
            make_spare(c, old); /* named in place of head by name_spare */
            release_naming(c);
        } else if (oe && (nonce == 0 || spare) && vmc_spare_slot_claim(c) && claim_naming(c)) {
            if (name_spare(c, old, stale_name(c)))
                make_spare(c, old);
            else
                vmc_release_entry(c, old);
            release_naming(c);
        } else if (oe) {
            vmc_release_entry(c, old);
        }
        if (!oe) {
            if (victim && vslot == UINT32_MAX)
                vmc_mark_damaged(c);
            if (victim && vslot != UINT32_MAX) {
                vmc_index_delete(c, s, vslot);
                vmc_lru_pop(c, s);
                vmc_release_entry(c, victim);
                VMC_UNCOUNT(sh->count);
                VMC_COUNT(sh->evictions);
            }
            if (victim) /* the delete above moved slots: probe again */
                slot = vmc_index_insert(c, s, hash, head) < 0 ? UINT32_MAX : 0;
            else if (slot != UINT32_MAX)
                vmc_index_set(c, s, slot, hash, head);
            if (slot == UINT32_MAX) {
                vmc_mark_damaged(c);
                vmc_release_entry(c, head);
                vmc_pool_unlock(c);
                vmc_shard_unlock(c, s);
                return vmc_fail(VMC_E_CORRUPT, "the index of shard %u is full", s);
            }
            VMC_COUNT(sh->count);
        }
        if (pooled)
            vmc_pool_unlock(c);
        /* A replacement is linked under the shard lock alone: nobody reads
         * the shard's index or heap without it, and a crash here repairs. */
        if (oe) {
            vmc_index_set(c, s, slot, hash, head);
            vmc_lru_takeover(c, s, old, old_item, head);
            if (old_expired)
                VMC_COUNT(sh->expirations);
        } else {
            vmc_lru_insert(c, s, head);
        }
        VMC_COUNT(sh->puts);
        vmc_shard_unlock(c, s);
        return (int64_t)ts;
    }
}

/* ---- the operations ---- */

/* get -- vmc_get, and on a hit (if meta is not NULL) the entry's publication
 * timestamp and expiry in meta[0] and meta[1], read under the same lock as
 * the value; with a sink (VMC_F_WHOLE), vmc_get_sink. */
static int64_t get_hashed(vmc_cache *c, const char *key, size_t klen, uint64_t hash, uint64_t at,
                          char *dst, size_t cap, uint64_t offset, uint32_t flags, uint64_t *meta,
                          struct vmc_sink *sink);

/* The huge page size of x86-64 and of arm64 with 4 KiB pages: the alignment
 * of the blocks advise_fresh asks to be backed by huge pages. */
#define HUGE_PAGE (2u << 20)
/* The smallest buffer advise_fresh advises: glibc's largest mmap threshold on
 * 64-bit, so that the buffer is a mapping of its own and the advice dies with
 * it. A smaller one may lie in malloc's heap, which outlives it; there it is
 * cheap to free anyway (its pages stay with the heap). */
#define FRESH_HUGE_MIN (32u << 20)

/* advise_fresh -- ask the kernel to back the 2 MiB-aligned blocks inside
 * dst[0, len), a new buffer nobody else uses (VMC_F_FRESH), with transparent
 * huge pages. Whichever thread drops a large result last frees it, in
 * Python with the GIL held: unmapping 64 MiB of 4 KiB pages frees 16,384
 * pages (milliseconds: every other thread of the process waits), of huge
 * pages 32 (a tenth of that, the unaligned ends included), and faulting them
 * in as the value is copied is cheaper too. Only blocks wholly inside dst are
 * advised, so no other memory changes backing. A hint: without transparent
 * huge pages nothing changes. */
static void advise_fresh(char *dst, size_t len)
{
#ifdef MADV_HUGEPAGE
    uintptr_t lo = ((uintptr_t)dst + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t hi = ((uintptr_t)dst + len) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (dst && len >= FRESH_HUGE_MIN && hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE); /* a hint: failure changes nothing */
#endif
}

static int64_t get(vmc_cache *c, const char *key, size_t klen, char *dst, size_t cap,
                   uint64_t offset, uint32_t flags, uint64_t *meta, struct vmc_sink *sink)
{
    if (flags & VMC_F_FRESH)
        advise_fresh(dst, cap);
    ENTER_FLAGS(c, flags);
    int64_t rc = check_key(klen);
    if (rc == VMC_OK) {
        uint64_t hash = vmc_hash_key(c, key, klen);
        vmc_index_prefetch(c, hash, false); /* the slot's miss overlaps the lock and clock */
        rc = get_hashed(c, key, klen, hash, 0, dst, cap, offset, flags, meta, sink);
    }
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* copy_range -- what a get copies of a value of vlen bytes into a
 * destination of `room` bytes: with VMC_F_WHOLE the whole value if it fits,
 * else nothing; otherwise value[offset, offset + room), clipped to the value.
 * In *from and *len; true if that is the whole value (verified against its
 * checksum as it is copied). */
static bool copy_range(uint32_t flags, uint64_t vlen, uint64_t room, uint64_t offset,
                       uint64_t *from, uint64_t *len)
{
    *from = *len = 0;
    if (flags & VMC_F_WHOLE) {
        *len = vlen <= room ? vlen : 0;
    } else if (offset < vlen) {
        *from = offset;
        *len = room < vlen - offset ? room : vlen - offset;
    }
    return *from == 0 && *len == vlen;
}

/* ---- optimistic reads ----
 *
 * A get first looks its key up without the shard lock, as the read side of a
 * seqlock on the shard's `seq` (vmc_format.h): load `seq` (acquire; odd: a
 * writer is in, take the lock), look up and copy with every address checked
 * (vmc_index_find_unlocked, vmc_entry_copy: a racing writer may free and
 * reuse what they read), then load `seq` again: unchanged, nothing the read
 * saw was changed while it ran. A hit that way writes no line another core
 * reads: the shard's lock line stays where it is.
 *
 * The LRU touch never stores into an unvalidated entry: only after the
 * validation does the get store its access time, by compare-and-swap from the
 * access time it read (so it stores only while the word still holds what the
 * validated entry held), then check `seq` a third time. A writer that chose
 * this entry as a victim opened its write section before it read the access
 * time (a seq_cst increment), so either it saw the new time or the third check
 * sees its section and the get starts again. Exact LRU: as under the lock.
 *
 * Its hit is counted in the handle's spare slot (its own line, summed by
 * vmc_statistics): exact statistics. A miss, an expired entry, a value longer
 * than VMC_SCRATCH_SIZE, damage, or a failed validation (twice) fall back to
 * the locked get, which counts and handles them as before. */

#define OPTIMISTIC_TRIES 2

/* hit_counter -- the slot where this handle's optimistic hits are counted,
 * its spare slot, taken with no lock on first use; NULL if it has none: every
 * slot was held when it looked, by live handles or by dead ones not yet
 * reclaimed (its hits are then counted under the shard lock for its life;
 * attaching handles free dead owners' slots, vmc_reclaim_dead). */
static struct vmc_spare_slot *hit_counter(vmc_cache *c)
{
    if (__atomic_load_n(&c->spare_slot, __ATOMIC_ACQUIRE))
        return vmc_spare_slot(c);
    struct vmc_spare_slot *slot = vmc_spare_slot_take_free(c);
    uint32_t unclaimed = 0;
    if (slot == NULL) /* none free: do not look again on every get */
        __atomic_compare_exchange_n(&c->spare_slot, &unclaimed, UINT32_MAX, false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    return slot;
}

/* get_optimistic -- the get of get_hashed without the shard lock (above):
 * true with its answer in *rc (a hit), false if the locked get must answer. */
static bool get_optimistic(vmc_cache *c, uint32_t s, const char *key, size_t klen, uint64_t hash,
                           uint64_t at, char *dst, size_t cap, uint64_t offset, uint32_t flags,
                           uint64_t *meta, struct vmc_sink *sink, struct vmc_spare_slot *counter,
                           int64_t *rc)
{
    struct vmc_shard *sh = &c->shards[s];
    for (int attempt = 0; attempt < OPTIMISTIC_TRIES; attempt++) {
        uint64_t seq = __atomic_load_n(&sh->seq, __ATOMIC_ACQUIRE);
        if ((seq & 1) || vmc_damaged(c))
            return false;
        uint64_t now = at ? at : vmc_now_ns();
        bool odd;
        VMC_IGNORE_READS_BEGIN();
        uint32_t u = vmc_index_find_unlocked(c, s, hash, key, klen, &odd);
        struct vmc_entry *e = u ? vmc_unit(c, u) : NULL;
        uint64_t vlen = e ? VMC_LOAD(e->value_len) : 0;
        uint64_t expires = e ? VMC_LOAD(e->expires_ns) : 0;
        uint64_t atime = e ? VMC_LOAD(e->atime_ns) : 0;
        VMC_IGNORE_READS_END();
        if (e == NULL || (expires != 0 && now >= expires) || vlen > VMC_SCRATCH_SIZE)
            return false; /* a miss (counted under the lock), an entry to remove, a long copy */
        char *to = sink ? sink->dst(sink, vlen) : dst;
        uint64_t from, len;
        bool whole = copy_range(flags, vlen, sink ? (to ? vlen : 0) : cap, offset, &from, &len);
        uint64_t data = hash;
        VMC_IGNORE_READS_BEGIN();
        int copied = len || whole ? vmc_entry_copy(c, u, to, from, len, whole ? &data : NULL)
                                  : vmc_entry_check(c, u);
        bool sound = copied == VMC_OK && VMC_LOAD(e->value_len) == vlen &&
                     (!whole || vmc_entry_seal(e, data) == VMC_LOAD(e->checksum));
        if (meta) {
            meta[0] = VMC_LOAD(e->stamp);
            meta[1] = expires;
        }
        VMC_IGNORE_READS_END();
        VMC_FENCE(__ATOMIC_ACQUIRE); /* the reads above before the check */
        if (VMC_LOAD(sh->seq) != seq)
            continue; /* a writer was in: what was read means nothing */
        if (!sound || odd)
            return false; /* damage: the locked get finds it and repairs */
        if (counter) {
            /* validated: the entry was the key's all along. Touch it while it
             * still holds a time read in a validated state: a swap that fails
             * reloads the word. Another reader's touch moves it later (then
             * swap again from that time, unless it is already later than
             * ours); anything else (a writer's reuse, which moves `seq`, or
             * damage) ends the round: look again. Last, check for a victim
             * chooser that read the old time. */
            bool touched = true;
            uint64_t seen = atime;
            VMC_IGNORE_WRITES_BEGIN();
            VMC_IGNORE_READS_BEGIN();
            while (seen < now && !__atomic_compare_exchange_n(&e->atime_ns, &seen, now, false,
                                                              __ATOMIC_SEQ_CST,
                                                              __ATOMIC_SEQ_CST)) {
                if (seen < atime || __atomic_load_n(&sh->seq, __ATOMIC_SEQ_CST) != seq) {
                    touched = false;
                    break;
                }
                atime = seen;
            }
            VMC_IGNORE_READS_END();
            VMC_IGNORE_WRITES_END();
            if (!touched || __atomic_load_n(&sh->seq, __ATOMIC_SEQ_CST) != seq)
                continue;
            __atomic_fetch_add(&counter->hits, 1, __ATOMIC_RELAXED);
        }
        *rc = (int64_t)vlen;
        return true;
    }
    return false;
}

/* take_slot_hit -- one hit off a spare slot's count (compare-and-swap: its
 * owner's gets add to it with no lock); false if it holds none. */
static bool take_slot_hit(struct vmc_spare_slot *slot)
{
    uint64_t hits = __atomic_load_n(&slot->hits, __ATOMIC_RELAXED);
    while (hits > 0 && !__atomic_compare_exchange_n(&slot->hits, &hits, hits - 1, false,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ; /* counted meanwhile: again */
    return hits > 0;
}

/* uncount_hit -- (shard s locked) a get this handle counted as a hit, in the
 * call that sized its value, answers a miss after all: the key went before
 * the copy that finishes it (VMC_F_COUNTED). Count the miss, and take one hit
 * back. The statistics sum the shards' counts and the slots', so any of them
 * may give it, as long as one always can: the shard's count first (its lock
 * is held), then the handle's own slot, then any slot. A shard's count can
 * only have lost the hit to the take-back of a get of the same shard whose
 * hit a slot holds (the shard's went first), so when the shard has none, a
 * slot does. (Taking a slot's first, a large key's miss could empty the slot
 * that held a small key's hit, whose miss then found its own shard empty.) */
static void uncount_hit(vmc_cache *c, uint32_t s)
{
    struct vmc_shard *sh = &c->shards[s];
    struct vmc_spare_slot *own = vmc_spare_slot(c);
    VMC_COUNT(sh->misses);
    if (sh->hits > 0) {
        VMC_STORE(sh->hits, sh->hits - 1);
        return;
    }
    if (own && take_slot_hit(own))
        return;
    for (uint32_t i = 0; i < VMC_SPARE_SLOTS; i++)
        if (take_slot_hit(&c->hdr->spares[i]))
            return;
}

/* count_hit -- (shard lock held) a get found its entry and copied (or sized)
 * its value: count the hit and touch the entry (the LRU heap re-keys
 * lazily). Counted only then, so that a get that fails or looks again
 * (damage, a repair pending, a large copy thrown away) has counted nothing. */
static void count_hit(struct vmc_shard *sh, struct vmc_entry *e, uint64_t now)
{
    VMC_COUNT(sh->hits);
    VMC_STORE(e->atime_ns, now);
}

/* get_hashed -- get, for a key of a sound length and its hash, in a call
 * entered, at time `at` (its expiry check and access time; 0: the clock's). */
static int64_t get_hashed(vmc_cache *c, const char *key, size_t klen, uint64_t hash, uint64_t at,
                          char *dst, size_t cap, uint64_t offset, uint32_t flags, uint64_t *meta,
                          struct vmc_sink *sink)
{
    int64_t rc;
    uint32_t s = vmc_shard_of(c, hash);
    struct vmc_shard *sh = &c->shards[s];
    bool quiet = flags & (VMC_F_QUIET | VMC_F_COUNTED);
    bool found = false; /* a sink's get may back off (VMC_BUSY) until it finds the entry */
    struct vmc_spare_slot *counter = quiet ? NULL : hit_counter(c);
    if ((quiet || counter) &&
        get_optimistic(c, s, key, klen, hash, at, dst, cap, offset, flags, meta, sink, counter,
                       &rc))
        return rc;
    for (int round = 0;; round++) {
        bool no_wait = sink && !found;
        if ((rc = no_wait ? vmc_shard_trylock(c, s) : vmc_shard_lock_reading(c, s)) < 0)
            return rc;
        uint64_t now = at ? at : vmc_now_ns();
        uint32_t slot;
        uint32_t u = vmc_index_find(c, s, hash, key, klen, &slot);
        if (miss_unsure(c, u, round)) {
            vmc_shard_unlock(c, s);
            continue;
        }
        struct vmc_entry *e = u ? vmc_unit(c, u) : NULL;
        if (e && vmc_expired(e, now) && no_wait) { /* removing it takes the pool lock */
            vmc_shard_unlock(c, s);
            rc = VMC_BUSY;
            return rc;
        }
        if (e && vmc_expired(e, now)) {
            vmc_shard_writing(c, s);
            rc = remove_locked(c, s, u, slot);
            if (rc == VMC_RETRY) {
                vmc_shard_unlock(c, s);
                continue;
            }
            if (rc == VMC_OK)
                VMC_COUNT(sh->expirations);
            e = NULL;
        }
        if (e == NULL) {
            if (flags & VMC_F_COUNTED) /* a hit counted by the call that sized it */
                uncount_hit(c, s);
            else if (!quiet)
                VMC_COUNT(sh->misses);
            vmc_shard_unlock(c, s);
            rc = VMC_MISS;
            return rc;
        }
        uint64_t vlen = e->value_len;
        if (meta) {
            meta[0] = e->stamp;
            meta[1] = e->expires_ns;
        }
        found = true;
        if (sink) {
            dst = sink->dst(sink, vlen);
            cap = dst ? vlen : 0;
        }
        /* A whole value is verified against its checksum as it is copied; a
         * part (get_into) or a size only is checked against the extents. */
        uint64_t from, len;
        bool whole = copy_range(flags, vlen, cap, offset, &from, &len);
        uint64_t data = hash;
        int copied;
        if (len > VMC_SCRATCH_SIZE) /* a long copy: not with the GIL held */
            vmc_before_wait();
        if (len < VMC_UNLOCKED_COPY || round >= 4) { /* the last rounds never livelock */
            copied = len || whole ? vmc_entry_copy(c, u, dst, from, len, whole ? &data : NULL)
                                  : vmc_entry_check(c, u);
            if (copied == VMC_OK && whole && vmc_entry_seal(e, data) != e->checksum)
                copied = VMC_E_CORRUPT;
            if (copied < 0)
                vmc_mark_damaged(c);
            else if (!quiet)
                count_hit(sh, e, now);
            vmc_shard_unlock(c, s);
            if (copied == VMC_OK) {
                rc = (int64_t)vlen;
                return rc;
            }
            if (round >= 8) {
                rc = vmc_fail(VMC_E_CORRUPT, "an entry stays damaged after repair");
                return rc;
            }
            continue; /* the next lock repairs: the entry is dropped */
        }
        /* A large copy runs without the shard lock, optimistically: the
         * mapping stays valid whatever happens to the entry, and if it is
         * removed meanwhile (hence maybe freed, reused, overwritten) the key no
         * longer leads to this unit with this timestamp -- removal takes it out
         * of the index for good, and a new publication gets a new timestamp --
         * so the copy is thrown away and the key looked up again. */
        uint64_t stamp = e->stamp;
        vmc_shard_unlock(c, s);
        copied = vmc_entry_copy_unlocked(c, u, dst, from, len, whole ? &data : NULL);
        if ((rc = vmc_shard_lock_reading(c, s)) < 0)
            return rc;
        bool same = vmc_index_find(c, s, hash, key, klen, &slot) == u &&
                    ((struct vmc_entry *)vmc_unit(c, u))->stamp == stamp;
        if (same && copied == VMC_OK && whole && vmc_entry_seal(e, data) != e->checksum)
            copied = VMC_E_CORRUPT;
        if (same && copied < 0)
            vmc_mark_damaged(c);
        else if (same && copied == VMC_OK && !quiet)
            count_hit(sh, e, now);
        vmc_shard_unlock(c, s);
        if (same && copied == VMC_OK) {
            rc = (int64_t)vlen;
            return rc;
        }
        /* removed or replaced while we copied: look the key up again */
    }
}

/* vmc_get -- look key up; on a hit copy value[offset, offset+cap) into dst
 * (with VMC_F_WHOLE: the whole value, only if it fits) and return the value's
 * total length; VMC_MISS if absent or expired. */
int64_t vmc_get(vmc_cache *c, const char *key, size_t klen, char *dst, size_t cap,
                uint64_t offset, uint32_t flags)
{
    return get(c, key, klen, dst, cap, offset, flags, NULL, NULL);
}

int64_t vmc_get_sink(vmc_cache *c, const char *key, size_t klen, struct vmc_sink *sink,
                     uint32_t flags)
{
    return get(c, key, klen, NULL, 0, 0, (flags & VMC_F_NO_REPAIR) | VMC_F_WHOLE, NULL, sink);
}

/* The distances (in keys) at which vmc_get_many_sink prefetches ahead of its
 * lookups: the index slot of a key, then the entry its slot points to. */
#define AHEAD_SLOT 8
#define AHEAD_ENTRY 4

size_t vmc_get_many_sink(vmc_cache *c, const char *const *keys, const size_t *klens, size_t n,
                         int64_t *status, struct vmc_sink *sink, uint32_t flags)
{
    uint64_t hashes[16]; /* a ring: key i's hash at [i % 16], computed AHEAD_SLOT keys early */
    size_t i = 0;
    int rc = enter(c);
    if (rc < 0) {
        if (n)
            status[0] = rc;
        return 0;
    }
    bool no_repair_prev = vmc_no_repair_begin((flags & VMC_F_NO_REPAIR) != 0);
    /* One clock read per call: key i is looked up at start + i ns, a time within
     * the call (each lookup takes longer than 1 ns) that orders the keys' LRU
     * touches as they were asked, as a clock read per key would. */
    uint64_t start = vmc_now_ns();
    for (size_t j = 0; j < n && j < AHEAD_SLOT; j++) {
        hashes[j % 16] = vmc_hash_key(c, keys[j], klens[j]);
        vmc_index_prefetch(c, hashes[j % 16], false);
    }
    for (; i < n; i++) {
        if (i + AHEAD_SLOT < n) {
            size_t j = i + AHEAD_SLOT;
            hashes[j % 16] = vmc_hash_key(c, keys[j], klens[j]);
            vmc_index_prefetch(c, hashes[j % 16], false);
        }
        if (i + AHEAD_ENTRY < n)
            vmc_index_prefetch(c, hashes[(i + AHEAD_ENTRY) % 16], true);
        sink->item = i;
        int64_t got = check_key(klens[i]);
        if (got == VMC_OK)
            got = get_hashed(c, keys[i], klens[i], hashes[i % 16], start + i, NULL, 0, 0,
                             (flags & VMC_F_NO_REPAIR) | VMC_F_WHOLE, NULL, sink);
        status[i] = got;
        if (got < 0 && got != VMC_MISS)
            break; /* VMC_BUSY or a failure: the caller goes on from key i */
    }
    leave_flags(c, no_repair_prev);
    return i;
}

/* vmc_get_entry -- vmc_get with VMC_F_WHOLE, plus the entry's publication
 * timestamp (meta[0]) and expiry (meta[1], CLOCK_REALTIME ns, 0 = never). */
int64_t vmc_get_entry(vmc_cache *c, const char *key, size_t klen, char *dst, size_t cap,
                      uint32_t flags, uint64_t *meta)
{
    return get(c, key, klen, dst, cap, 0, flags | VMC_F_WHOLE, meta, NULL);
}

/* ---- the per-thread scratch buffer ---- */

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static __thread char *scratch;

static void scratch_init(void)
{
    pthread_key_create(&scratch_key, free);
}

char *vmc_scratch(void)
{
    if (scratch == NULL) {
        pthread_once(&scratch_once, scratch_init);
        scratch = malloc(VMC_SCRATCH_SIZE);
        if (scratch)
            pthread_setspecific(scratch_key, scratch); /* freed when the thread ends */
    }
    return scratch;
}

int64_t vmc_get_scratch(vmc_cache *c, const char *key, size_t klen)
{
    char *dst = vmc_scratch();
    if (dst == NULL)
        return vmc_fail(VMC_E_OS, "out of memory for a result buffer");
    return vmc_get(c, key, klen, dst, VMC_SCRATCH_SIZE, 0, VMC_F_WHOLE);
}

/* contains -- vmc_contains; with no_wait, VMC_BUSY where it would wait. */
static int contains(vmc_cache *c, const char *key, size_t klen, bool no_wait)
{
    ENTER(c);
    int rc = check_key(klen);
    if (rc == VMC_OK) {
        uint64_t hash = vmc_hash_key(c, key, klen);
        uint32_t s = vmc_shard_of(c, hash), slot, u = 0;
        for (int round = 0;
             (rc = no_wait ? vmc_shard_trylock(c, s) : vmc_shard_lock_reading(c, s)) == VMC_OK;
             round++) {
            u = vmc_index_find(c, s, hash, key, klen, &slot);
            rc = u && !vmc_expired(vmc_unit(c, u), vmc_now_ns());
            vmc_shard_unlock(c, s);
            if (!miss_unsure(c, u, round))
                break;
        }
    }
    leave(c);
    return rc;
}

/* vmc_contains -- 1 if key is present and unexpired; counts nothing, touches nothing. */
int vmc_contains(vmc_cache *c, const char *key, size_t klen)
{
    return contains(c, key, klen, false);
}

int vmc_contains_now(vmc_cache *c, const char *key, size_t klen)
{
    return contains(c, key, klen, true);
}

/* vmc_put -- store key -> value (VMC_F_ADD: only if absent). Returns the
 * publication timestamp, 0 when VMC_F_ADD found the key, or a failure. */
int64_t vmc_put(vmc_cache *c, const char *key, size_t klen, const char *value, size_t vlen,
                int64_t ttl_ns, uint32_t flags)
{
    ENTER_FLAGS(c, flags);
    int64_t rc = check_key(klen);
    if (rc == VMC_OK)
        rc = check_value(c, klen, vlen);
    if (rc < 0)
        goto out;
    uint64_t hash = vmc_hash_key(c, key, klen);
    vmc_index_prefetch(c, hash, false); /* publish looks the key up: its home slot... */
    bool add = flags & VMC_F_ADD;
    if (add && vmc_contains(c, key, klen) == 1) {
        rc = 0; /* present: evict nothing */
        goto out;
    }
    uint32_t unfit;
    uint64_t expires = expiry(c, ttl_ns, vmc_now_ns());
    uint32_t head = take_spare(c, klen, vlen, expires, &unfit);
    uint32_t nonce = head ? c->spare_mark : 0;
    if (head == 0 && (rc = make_room(c, klen, vlen, expires, false, flags, 0, unfit, &head)) < 0)
        goto out;
    vmc_index_prefetch(c, hash, true); /* ...then the entry it points to */
    struct vmc_entry *e = vmc_unit(c, head);
    if (vlen > VMC_SCRATCH_SIZE) /* a long copy: not with the GIL held */
        vmc_before_wait();
    memcpy(vmc_entry_key(e), key, klen);
    uint64_t data = hash; /* the key's hash, then the data hash, as the value is copied */
    if (vmc_entry_fill(c, head, value, &data) < 0) { /* the chain just allocated is damaged */
        vmc_mark_damaged(c);
        drop_reservation(c, head, nonce);
        rc = vmc_fail(VMC_E_CORRUPT, "a damaged extent chain was found; it will be repaired");
        goto out;
    }
    rc = publish(c, head, nonce, hash, data, add, key, klen, vlen);
out:
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* remove_key -- delete (or, with `evicted`, evict) key. 1 if it was there. */
static int remove_key(vmc_cache *c, const char *key, size_t klen, bool evicted)
{
    int rc = check_key(klen);
    if (rc < 0)
        return rc;
    uint64_t hash = vmc_hash_key(c, key, klen);
    uint32_t s = vmc_shard_of(c, hash), slot;
    struct vmc_shard *sh = &c->shards[s];
    for (int round = 0;; round++) {
        if ((rc = vmc_shard_lock_reading(c, s)) < 0) /* an absent key changes nothing */
            return rc;
        uint32_t u = vmc_index_find(c, s, hash, key, klen, &slot);
        if (u == 0) {
            vmc_shard_unlock(c, s);
            if (miss_unsure(c, u, round))
                continue;
            return 0;
        }
        vmc_shard_writing(c, s);
        bool expired = vmc_expired(vmc_unit(c, u), vmc_now_ns());
        rc = remove_locked(c, s, u, slot);
        if (rc == VMC_OK && expired)
            VMC_COUNT(sh->expirations);
        else if (rc == VMC_OK && evicted)
            VMC_COUNT(sh->evictions);
        vmc_shard_unlock(c, s);
        if (rc != VMC_RETRY)
            return rc < 0 ? rc : !expired;
    }
}

int vmc_delete(vmc_cache *c, const char *key, size_t klen, uint32_t flags)
{
    ENTER_FLAGS(c, flags);
    int rc = remove_key(c, key, klen, false);
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* vmc_evict -- evict key, or with key == NULL the least recently used entry,
 * copying its key to kout. Returns the key's length, or VMC_MISS. */
int vmc_evict(vmc_cache *c, const char *key, size_t klen, char *kout, size_t kcap,
              uint32_t flags)
{
    ENTER_FLAGS(c, flags);
    int rc;
    if (key) {
        rc = remove_key(c, key, klen, true);
        if (rc == 1)
            rc = (int)klen;
        else if (rc == 0)
            rc = VMC_MISS;
    } else if (c->policy == VMC_POLICY_NONE) {
        rc = VMC_MISS;
    } else {
        rc = evict_lru(c, kout, kcap, true);
    }
    leave_flags(c, no_repair_prev_);
    return rc;
}

int64_t vmc_count(vmc_cache *c)
{
    ENTER(c);
    int64_t n = 0;
    for (int round = 0; round < 2; round++) {
        bool sound = true;
        n = 0;
        for (uint32_t i = 0; i < c->n_shards; i++) {
            uint32_t count = VMC_LOAD(c->shards[i].count);
            sound = sound && count <= c->max_load;
            n += count;
        }
        if (sound)
            break;
        vmc_mark_damaged(c); /* a count no shard can hold: repair, then count again */
        if ((n = vmc_repair(c)) < 0)
            break;
    }
    leave(c);
    return n;
}

int vmc_shard_count(vmc_cache *c)
{
    return (int)c->n_shards;
}

static int check_shard(vmc_cache *c, int shard)
{
    if (shard < 0 || (uint32_t)shard >= c->n_shards)
        return vmc_fail(VMC_E_CONFIG, "shard %d out of range", shard);
    return VMC_OK;
}

/* slot_entry -- the entry an occupied index slot points to; NULL (and the
 * file marked damaged) if it is not a sound published head. */
static struct vmc_entry *slot_entry(vmc_cache *c, uint64_t slot)
{
    struct vmc_entry *e = vmc_head(c, VMC_SLOT_UNIT(slot));
    if (e == NULL || e->state != VMC_PUBLISHED) {
        vmc_mark_damaged(c);
        return NULL;
    }
    return e;
}

/* vmc_shard_keys -- serialise the unexpired keys of a shard as (u16 length,
 * bytes) records into dst; returns the bytes needed (retry if > cap). */
int64_t vmc_shard_keys(vmc_cache *c, int shard, char *dst, size_t cap)
{
    ENTER(c);
    int64_t rc = check_shard(c, shard);
    if (rc == VMC_OK && (rc = vmc_shard_lock_reading(c, (uint32_t)shard)) == VMC_OK) {
        const uint64_t *slots = c->index + (uint64_t)shard * c->slots;
        uint64_t now = vmc_now_ns(), used = 0;
        for (uint32_t i = 0; i < c->slots; i++) {
            struct vmc_entry *e = slots[i] ? slot_entry(c, slots[i]) : NULL;
            if (e == NULL || vmc_expired(e, now))
                continue;
            /* a key whose hash does not lead to this slot's shard and tag is damage */
            uint64_t h = vmc_hash_key(c, vmc_entry_key(e), e->key_len);
            if (vmc_shard_of(c, h) != (uint32_t)shard ||
                (uint32_t)(h >> 32) != VMC_SLOT_TAG(slots[i])) {
                vmc_mark_damaged(c);
                continue;
            }
            uint64_t need = 2 + (uint64_t)e->key_len;
            if (used + need <= cap) {
                uint16_t klen = e->key_len;
                memcpy(dst + used, &klen, 2);
                memcpy(dst + used + 2, vmc_entry_key(e), klen);
            }
            used += need;
        }
        vmc_shard_unlock(c, (uint32_t)shard);
        rc = (int64_t)used;
    }
    leave(c);
    return rc;
}

/* ---- expired entries ---- */
/* purge_range -- remove the expired entries among slots [from, to) of one
 * shard; returns how many. */
static int64_t purge_range(vmc_cache *c, uint32_t shard, uint32_t from, uint32_t to)
{
    struct vmc_shard *sh = &c->shards[shard];
    const uint64_t *slots = c->index + (uint64_t)shard * c->slots;
    int64_t rc, purged = 0;
restart:
    if ((rc = vmc_shard_lock(c, shard)) < 0)
        return rc;
    uint64_t now = vmc_now_ns();
    /* A deletion shifts later slots back into the hole: look at slot i again.
     * (A slot wrapped around from the front may be seen twice: harmless.) */
    for (uint32_t i = from; i < to;) {
        struct vmc_entry *e = slots[i] ? slot_entry(c, slots[i]) : NULL;
        if (e == NULL || !vmc_expired(e, now)) {
            i++;
            continue;
        }
        rc = remove_locked(c, shard, VMC_SLOT_UNIT(slots[i]), i);
        if (rc == VMC_RETRY) {
            vmc_shard_unlock(c, shard);
            goto restart;
        }
        if (rc < 0)
            break;
        VMC_COUNT(sh->expirations);
        purged++;
    }
    vmc_shard_unlock(c, shard);
    return rc < 0 ? rc : purged;
}

static int64_t purge_shard(vmc_cache *c, uint32_t shard)
{
    return purge_range(c, shard, 0, c->slots);
}

/* Slots a put that finds no room under policy "none" looks at for expired
 * entries: a bounded share of the index per call (as redis's dict.c bounds a
 * rehash step), resumed where the previous call stopped. */
#define PURGE_BUDGET 8192u

/* purge_some -- remove expired entries from the next PURGE_BUDGET slots of
 * the whole index (all of it, if smaller); returns how many. */
static int64_t purge_some(vmc_cache *c)
{
    uint64_t total = (uint64_t)c->n_shards * c->slots, purged = 0;
    uint64_t left = total < PURGE_BUDGET ? total : PURGE_BUDGET;
    uint64_t at = __atomic_fetch_add(&c->purge_cursor, left, __ATOMIC_RELAXED) % total;
    while (left > 0) {
        uint32_t shard = (uint32_t)(at / c->slots), from = (uint32_t)(at % c->slots);
        uint32_t to = left < c->slots - from ? from + (uint32_t)left : c->slots;
        int64_t n = purge_range(c, shard, from, to);
        if (n < 0)
            return n;
        purged += (uint64_t)n;
        left -= to - from;
        at = (at + (to - from)) % total;
    }
    return (int64_t)purged;
}

int64_t vmc_purge_shard(vmc_cache *c, int shard)
{
    ENTER(c);
    int64_t rc = check_shard(c, shard);
    if (rc == VMC_OK)
        rc = purge_shard(c, (uint32_t)shard);
    leave(c);
    return rc;
}

/* vmc_clear_shard -- remove every entry of one shard; no callbacks, no counts. */
int vmc_clear_shard(vmc_cache *c, int shard)
{
    ENTER(c);
    int rc = check_shard(c, shard);
    uint32_t s = (uint32_t)shard;
    struct vmc_shard *sh = &c->shards[s];
    uint64_t *slots = c->index + (uint64_t)s * c->slots;
    for (int attempt = 0; rc == VMC_OK; attempt++) {
        if ((rc = vmc_shard_lock(c, s)) < 0)
            break;
        /* An entry the index lost would survive the clear and come back at
         * the next repair: an index that does not account for every entry is
         * repaired first. */
        uint32_t sound = 0;
        for (uint32_t i = 0; i < c->slots; i++)
            if (slots[i] && slot_entry(c, slots[i]))
                sound++;
        if (sound != sh->count || vmc_damaged(c)) {
            vmc_mark_damaged(c);
            vmc_shard_unlock(c, s);
            if (attempt >= 2)
                rc = vmc_fail(VMC_E_CORRUPT, "the index of shard %u stays damaged after "
                                             "repair", s);
            continue;
        }
        rc = vmc_pool_lock_nested(c);
        if (rc == VMC_RETRY) {
            vmc_shard_unlock(c, s);
            rc = VMC_OK;
            continue;
        }
        if (rc == VMC_OK) {
            for (uint32_t i = 0; i < c->slots; i++)
                if (slots[i])
                    vmc_release_entry(c, VMC_SLOT_UNIT(slots[i]));
            memset(slots, 0, (uint64_t)c->slots * sizeof *slots);
            VMC_STORE(sh->heap_len, 0);
            VMC_STORE(sh->count, 0);
            VMC_STORE(sh->top_atime, UINT64_MAX);
            free_spare(c, take_off_spare(c));
            vmc_pool_unlock(c);
        }
        vmc_shard_unlock(c, s);
        break;
    }
    leave(c);
    return rc;
}

int vmc_statistics(vmc_cache *c, struct vmc_stats *out)
{
    ENTER(c);
    memset(out, 0, sizeof *out);
    for (uint32_t i = 0; i < c->n_shards; i++) {
        struct vmc_shard *sh = &c->shards[i];
        out->puts += VMC_LOAD(sh->puts);
        out->hits += VMC_LOAD(sh->hits);
        out->misses += VMC_LOAD(sh->misses);
        out->evictions += VMC_LOAD(sh->evictions);
        out->expirations += VMC_LOAD(sh->expirations);
        out->entries += VMC_LOAD(sh->count);
    }
    for (uint32_t i = 0; i < VMC_SPARE_SLOTS; i++) /* the optimistic gets' hits */
        out->hits += __atomic_load_n(&c->hdr->spares[i].hits, __ATOMIC_RELAXED);
    out->gets = out->hits + out->misses;
    struct vmc_header *h = c->hdr;
    out->loader_calls = __atomic_load_n(&h->loader_calls, __ATOMIC_RELAXED);
    out->coalesced_gets = __atomic_load_n(&h->coalesced_gets, __ATOMIC_RELAXED);
    out->load_takeovers = __atomic_load_n(&h->load_takeovers, __ATOMIC_RELAXED);
    uint64_t free_units = VMC_LOAD(c->hdr->pool.free_units);
    out->capacity = (uint64_t)c->pool_units << c->shift;
    out->used_bytes = free_units >= c->pool_units ? 0 : (c->pool_units - free_units) << c->shift;
    leave(c);
    return VMC_OK;
}

int vmc_count_loads(vmc_cache *c, const char *key, size_t klen, uint32_t loader_calls,
                    uint32_t takeovers, uint32_t coalesced, uint32_t coalesced_hits,
                    uint32_t flags)
{
    int rc = check_key(klen);
    if (rc < 0)
        return rc;
    if (coalesced_hits > coalesced)
        return vmc_fail(VMC_E_CONFIG, "%u coalesced hits out of %u coalesced gets",
                        coalesced_hits, coalesced);
    ENTER_FLAGS(c, flags);
    if (coalesced_hits) {
        /* Those gets were counted as misses when they looked the key up; they
         * were answered with a value, so they become hits (gets unchanged).
         * First, so that a failure (VMC_E_REPAIR: called again) counts nothing. */
        uint32_t s = vmc_shard_of(c, vmc_hash_key(c, key, klen));
        if ((rc = vmc_shard_lock_reading(c, s)) == VMC_OK) { /* counters only */
            struct vmc_shard *sh = &c->shards[s];
            uint64_t n = coalesced_hits < sh->misses ? coalesced_hits : sh->misses;
            VMC_STORE(sh->misses, sh->misses - n);
            VMC_STORE(sh->hits, sh->hits + n);
            vmc_shard_unlock(c, s);
        }
    }
    if (rc == VMC_OK) {
        struct vmc_header *h = c->hdr;
        __atomic_add_fetch(&h->loader_calls, loader_calls, __ATOMIC_RELAXED);
        __atomic_add_fetch(&h->load_takeovers, takeovers, __ATOMIC_RELAXED);
        __atomic_add_fetch(&h->coalesced_gets, coalesced, __ATOMIC_RELAXED);
    }
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* ---- reservations ---- */

/* vmc_reserve -- room for a value of `size` bytes in one extent, invisible
 * until published. Returns the reservation's id and sets *data_offset to where
 * the value goes, as an offset in the mapping. */
int64_t vmc_reserve(vmc_cache *c, const char *key, size_t klen, size_t size, int64_t ttl_ns,
                    uint32_t flags, uint64_t *data_offset)
{
    ENTER_FLAGS(c, flags);
    int64_t rc = check_key(klen);
    if (rc == VMC_OK)
        rc = check_value(c, klen, size);
    uint32_t head, nonce = next_nonce();
    uint64_t expires = expiry(c, ttl_ns, vmc_now_ns());
    if (rc == VMC_OK &&
        (rc = make_room(c, klen, size, expires, true, flags, nonce, take_off_spare(c), &head)) ==
            VMC_OK) {
        struct vmc_entry *e = vmc_unit(c, head);
        memcpy(vmc_entry_key(e), key, klen);
        *data_offset = (uint64_t)(vmc_entry_key(e) + klen - c->base);
        rc = (int64_t)RID(head, nonce);
        if (!track_rid(c, (uint64_t)rc, false)) {
            drop_reservation(c, head, nonce);
            rc = vmc_fail(VMC_E_OS, "out of memory for the list of open reservations");
        }
    }
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* owned_reservation -- the head of a reservation this process holds. */
static struct vmc_entry *owned_reservation(vmc_cache *c, uint64_t rid)
{
    if (RID_NONCE(rid) == 0 || (RID_NONCE(rid) & VMC_SPARE_BIT) ||
        !still_reserved(c, RID_HEAD(rid), RID_NONCE(rid))) {
        vmc_fail(VMC_E_STATE, "reservation %llx is not open in this process (already "
                              "published or cancelled, or made before a fork)",
                 (unsigned long long)rid);
        return NULL;
    }
    return vmc_unit(c, RID_HEAD(rid));
}

/* vmc_publish -- make a reservation visible; returns its timestamp. */
int64_t vmc_publish(vmc_cache *c, uint64_t reservation, const char *key, size_t klen,
                    uint64_t size)
{
    ENTER(c);
    int64_t rc = check_key(klen);
    struct vmc_entry *e = rc == VMC_OK ? owned_reservation(c, reservation) : NULL;
    if (e) {
        /* the key as the owner gave it: the copy in the file may have been damaged */
        uint64_t hash = vmc_hash_key(c, key, klen);
        uint64_t data = vmc_entry_data_hash(c, RID_HEAD(reservation)); /* written by the owner */
        rc = publish(c, RID_HEAD(reservation), RID_NONCE(reservation), hash, data, false, key,
                     klen, size);
    } else if (rc == VMC_OK) {
        rc = VMC_E_STATE;
    }
    untrack_rid(c, reservation);
    leave(c);
    return rc;
}

/* vmc_cancel -- free a reservation without publishing it. */
int vmc_cancel(vmc_cache *c, uint64_t reservation)
{
    ENTER(c);
    int rc = owned_reservation(c, reservation)
                 ? drop_reservation(c, RID_HEAD(reservation), RID_NONCE(reservation))
                 : VMC_E_STATE;
    untrack_rid(c, reservation);
    leave(c);
    return rc;
}

int vmc_map_fd(vmc_cache *c)
{
    ENTER(c); /* vmc_close waits: the descriptor cannot be closed (and reused) meanwhile */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", c->fd);
    int fd = open(self, O_RDWR | O_CLOEXEC); /* a description of its own, without locks */
    int rc = fd >= 0 ? fd : vmc_fail_errno("open", self);
    leave(c);
    return rc;
}

/* ---- time ---- */

int64_t vmc_clock_offset_ns;

void vmc_set_clock_offset(int64_t ns)
{
    __atomic_store_n(&vmc_clock_offset_ns, ns, __ATOMIC_RELAXED);
}

/* ---- timestamps ---- */

/* committed -- T such that every publication up to T is visible.
 * Publications take their timestamp under their shard lock, so once every
 * shard lock has been passed through, all those up to the clock value read
 * first have finished. */
static int64_t committed(vmc_cache *c)
{
    int rc = clocks_sane(c);
    if (rc < 0)
        return rc;
    uint64_t t = __atomic_load_n(&c->hdr->clock, __ATOMIC_SEQ_CST);
    for (uint32_t s = 0; s < c->n_shards; s++) {
        int rc = vmc_shard_lock_reading(c, s);
        if (rc < 0)
            return rc;
        vmc_shard_unlock(c, s);
    }
    return (int64_t)t;
}

int64_t vmc_committed_timestamp(vmc_cache *c, uint32_t flags)
{
    ENTER_FLAGS(c, flags);
    int64_t rc = committed(c);
    leave_flags(c, no_repair_prev_);
    return rc;
}

int64_t vmc_persisted_timestamp(vmc_cache *c, uint32_t flags)
{
    ENTER_FLAGS(c, flags);
    int64_t rc = clocks_sane(c);
    if (rc == VMC_OK)
        rc = (int64_t)__atomic_load_n(&c->hdr->persisted, __ATOMIC_ACQUIRE);
    leave_flags(c, no_repair_prev_);
    return rc;
}

/* vmc_persist -- flush the file, then raise the persisted watermark (and
 * flush it): data reaches the disk before the watermark that covers it. */
int64_t vmc_persist(vmc_cache *c)
{
    ENTER(c);
    int64_t rc = committed(c);
    if (rc < 0)
        goto out;
    uint64_t t = (uint64_t)rc;
    if (msync(c->base, c->file_size, MS_SYNC) != 0) {
        rc = vmc_fail_errno("msync", c->path);
        goto out;
    }
    uint64_t cur = __atomic_load_n(&c->hdr->persisted, __ATOMIC_ACQUIRE);
    while (cur < t && !__atomic_compare_exchange_n(&c->hdr->persisted, &cur, t, false,
                                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    if (msync(c->base, VMC_PAGE, MS_SYNC) != 0) {
        rc = vmc_fail_errno("msync", c->path);
        goto out;
    }
    rc = (int64_t)__atomic_load_n(&c->hdr->persisted, __ATOMIC_ACQUIRE);
out:
    leave(c);
    return rc;
}
