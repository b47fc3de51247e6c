/* vmc_index.h -- a shard's hash index: key -> head unit.
 *
 * Every function but vmc_index_find_unlocked and vmc_index_prefetch runs with
 * the shard's lock held. A slot is
 * (hash >> 32) << 32 | head unit, 0 when empty (vmc_format.h).
 */
#ifndef VMC_INDEX_H
#define VMC_INDEX_H

#include "vmc_handle.h"

/* vmc_index_find -- the head unit of `key` in `shard` (and its slot), or 0;
 * on a miss *slot is the empty slot where the key belongs (UINT32_MAX if the
 * shard's index is full), valid until the index changes. */
uint32_t vmc_index_find(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                        size_t klen, uint32_t *slot);
/* vmc_index_find_unlocked -- vmc_index_find without the shard lock, for an
 * optimistic get (the shard's `seq` validates the answer afterwards): safe to
 * run against any concurrent change, its answer meaningful only if `seq` did
 * not change. *odd is set if a slot led to no published head (damage, or a
 * change in flight): the caller then looks again under the lock. */
uint32_t vmc_index_find_unlocked(vmc_cache *c, uint32_t shard, uint64_t hash, const char *key,
                                 size_t klen, bool *odd);
/* vmc_index_set -- point a slot at a head: an occupied slot at a new head of
 * the same key, or the empty slot a miss of vmc_index_find returned. */
void vmc_index_set(vmc_cache *c, uint32_t shard, uint32_t slot, uint64_t hash, uint32_t unit);
/* vmc_index_insert -- add a key known to be absent; -1 if the shard is full. */
int vmc_index_insert(vmc_cache *c, uint32_t shard, uint64_t hash, uint32_t unit);
/* vmc_index_delete -- empty `slot`, shifting back the run that follows it. */
void vmc_index_delete(vmc_cache *c, uint32_t shard, uint32_t slot);
/* vmc_index_prefetch -- a hint to the CPU, ahead of a lookup of `hash`: the
 * home slot of the hash, or (entry) the head its home slot points to. No
 * lock is needed: the slot is read only for an address to prefetch. */
void vmc_index_prefetch(vmc_cache *c, uint64_t hash, bool entry);
/* vmc_index_slot_of -- the slot holding head `unit`, or UINT32_MAX. */
uint32_t vmc_index_slot_of(vmc_cache *c, uint32_t shard, uint32_t unit);

#endif
