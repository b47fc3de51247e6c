/* vmc_index.c -- a shard's index: written under the shard lock, in a write
 * section (relaxed atomic stores), read under it or by optimistic gets.
 *
 * Open addressing with linear probing over 64-bit slots (hash tag << 32 |
 * head unit); deletion shifts later slots back, so there are no tombstones
 * and a probe ends at the first empty slot. A slot's home is derived from its
 * tag, which is what backward shifting needs.
 */
#include "vmc_index.h"

#include "vmc_entry.h"
#include "vmc_mutex.h"

static uint64_t *slots_of(vmc_cache *c, uint32_t shard)
{
    return c->index + (uint64_t)shard * c->slots;
}

static uint32_t home_of(const vmc_cache *c, uint32_t tag)
{
    return (uint32_t)(((uint64_t)tag * c->slots) >> 32);
}

/* find -- vmc_index_find, or (locked false) its optimistic twin: every load
 * a relaxed atomic one, every address checked, and a slot that leads to no
 * published head only noted in *odd (under the lock it is damage). */
static uint32_t find(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key, size_t klen,
                     uint32_t *slot, bool locked, bool *odd)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t tag = (uint32_t)(hash >> 32);
    uint32_t i = home_of(c, tag);
    for (uint32_t probes = 0; probes < c->slots; probes++) {
        uint64_t v = VMC_LOAD(s[i]);
        if (v == 0) {
            *slot = i;
            return 0;
        }
        if (VMC_SLOT_TAG(v) == tag) {
            uint32_t u = VMC_SLOT_UNIT(v);
            /* The line after the pair the header and key sit in (a 100-byte value
             * with a 16-byte key ends there), and the two after it (where a larger
             * value's copy starts): fetched while the header's miss is served and
             * the key compared. */
            if (vmc_unit_ok(c, u)) {
                __builtin_prefetch((const char *)vmc_unit(c, u) + 128);
                __builtin_prefetch((const char *)vmc_unit(c, u) + 192);
                __builtin_prefetch((const char *)vmc_unit(c, u) + 256);
            }
            /* vmc_head checked the key_len it loaded against the extent; a
             * racing writer may change it before the load below, so the key's
             * bytes are compared only where the pool holds them. */
            struct vmc_entry *e = vmc_head(c, u);
            if (e == NULL || VMC_LOAD(e->state) != VMC_PUBLISHED) {
                if (locked)
                    vmc_mark_damaged(c);
                else
                    *odd = true;
            } else if (VMC_LOAD(e->key_len) == klen &&
                       ((uint64_t)(u - 1) << c->shift) + sizeof *e + klen <=
                           (uint64_t)c->pool_units << c->shift &&
                       memcmp(vmc_entry_key(e), key, klen) == 0) {
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

uint32_t vmc_index_find(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                        size_t klen, uint32_t *slot)
{
    return find(c, shard, hash, key, klen, slot, true, NULL);
}

uint32_t vmc_index_find_unlocked(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                                 size_t klen, bool *odd)
{
    uint32_t slot;
    *odd = false;
    return find(c, shard, hash, key, klen, &slot, false, odd);
}

void vmc_index_prefetch(vmc_cache *c, uint64_t hash, bool entry)
{
    uint32_t tag = (uint32_t)(hash >> 32);
    uint64_t *slot = slots_of(c, vmc_shard_of(c, hash)) + home_of(c, tag);
    if (!entry) {
        __builtin_prefetch(slot);
        return;
    }
#ifdef __SANITIZE_THREAD__ /* a racy read by design, for a hint: none under the race detector */
    return;
#endif
    uint64_t v = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (v != 0 && VMC_SLOT_TAG(v) == tag && vmc_unit_ok(c, VMC_SLOT_UNIT(v))) {
        const char *e = vmc_unit(c, VMC_SLOT_UNIT(v));
        __builtin_prefetch(e);
        __builtin_prefetch(e + 128); /* as vmc_index_find: the line a small value ends in */
    }
}

void vmc_index_set(vmc_cache *c, uint32_t shard, uint32_t slot, uint64_t hash, uint32_t unit)
{
    VMC_ASSERT(slot < c->slots && vmc_unit_ok(c, unit), "slot %u of %u, unit %u of %u", slot,
               c->slots, unit, c->pool_units);
    VMC_STORE(slots_of(c, shard)[slot], VMC_SLOT((uint32_t)(hash >> 32), unit));
}

int vmc_index_insert(vmc_cache *c, uint32_t shard, uint64_t hash, uint32_t unit)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t tag = (uint32_t)(hash >> 32);
    uint32_t i = home_of(c, tag);
    for (uint32_t probes = 0; probes < c->slots; probes++) {
        if (s[i] == 0) {
            VMC_STORE(s[i], VMC_SLOT(tag, unit));
            return 0;
        }
        if (++i == c->slots)
            i = 0;
    }
    return -1;
}

void vmc_index_delete(vmc_cache *c, uint32_t shard, uint32_t slot)
{
    uint64_t *s = slots_of(c, shard);
    uint32_t n = c->slots, hole = slot, j = slot;
    VMC_STORE(s[hole], 0);
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
        VMC_STORE(s[hole], v);
        VMC_STORE(s[j], 0);
        hole = j;
    }
}

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
