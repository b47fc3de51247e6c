/* vmc_lru.h -- a shard's LRU heap: which entry to evict.
 *
 * A 4-ary min-heap of (access time, entry) items per shard, keyed lazily
 * (vmc_format.h). Every function runs with the shard's lock held.
 */
#ifndef VMC_LRU_H
#define VMC_LRU_H

#include "vmc_handle.h"

/* vmc_lru_sound -- the shard's counts agree: as many heap items as indexed
 * entries, and no more than the index may hold. What changes or trusts them
 * (a removal, a publication) checks first and has the file repaired if not;
 * a get, which uses neither, does not read them (they are on the shard's
 * second cache line, which puts write). */
bool vmc_lru_sound(const vmc_cache *c, uint32_t shard);
/* vmc_lru_insert -- a newly published entry joins its shard's heap. */
void vmc_lru_insert(vmc_cache *c, uint32_t shard, uint32_t unit);
/* vmc_lru_takeover -- a replacement: the new entry `unit` takes the item of
 * the entry `old` it replaces, at that item's position `item` (read from the
 * old entry's link_prev before its extent was freed or reused), with its key:
 * a lower bound of the new entry's atime too, so that no sift is needed. */
void vmc_lru_takeover(vmc_cache *c, uint32_t shard, uint32_t old, uint32_t item, uint32_t unit);
/* vmc_lru_prefetch -- a hint to the CPU: the item at position `item` of the
 * shard's heap will be used soon. */
void vmc_lru_prefetch(vmc_cache *c, uint32_t shard, uint32_t item);
/* vmc_lru_remove -- an entry leaves its shard: its item goes too. */
void vmc_lru_remove(vmc_cache *c, uint32_t shard, uint32_t unit);
/* vmc_lru_settle -- bring the shard's least recently used entry to the top,
 * re-keying items whose entry was touched since; returns its unit (0 if the
 * shard is empty); top_atime is then its exact access time. Each re-key is
 * paid for by an earlier get. */
uint32_t vmc_lru_settle(vmc_cache *c, uint32_t shard);
/* vmc_lru_pop -- remove the settled top item (its entry is being evicted). */
void vmc_lru_pop(vmc_cache *c, uint32_t shard);
/* vmc_lru_append -- recovery: give a kept entry an item, out of order
 * (vmc_lru_heapify orders them). */
void vmc_lru_append(vmc_cache *c, uint32_t shard, uint32_t unit);
/* vmc_lru_heapify -- rebuild a shard's heap from the items recovery appended:
 * drop those whose entry is not published, restore heap order in linear time
 * and record every position. */
void vmc_lru_heapify(vmc_cache *c, uint32_t shard);

#endif
