/* vmc_repair.h -- the outer locks, and the stop-the-world repair they run.
 *
 * An outer lock (no other lock held) that finds the file marked damaged
 * releases it and repairs first: every shard lock in ascending order, then
 * the pool lock, then vmc_rebuild() in LIVE mode. Callers holding a shard
 * lock use vmc_pool_lock_nested() (vmc_mutex.h) instead, which backs off.
 */
#ifndef VMC_REPAIR_H
#define VMC_REPAIR_H

#include "vmc_handle.h"

/* vmc_repair -- stop the world and rebuild the cache if it is marked damaged. */
int vmc_repair(vmc_cache *c);
/* vmc_shard_lock -- lock a shard with no other lock held, repairing first if needed. */
int vmc_shard_lock(vmc_cache *c, uint32_t shard);
/* vmc_shard_trylock -- lock a shard only if that takes no wait and no repair:
 * VMC_OK, or VMC_BUSY (nothing held; a dead owner is noted for the next lock). */
int vmc_shard_trylock(vmc_cache *c, uint32_t shard);
/* vmc_pool_lock -- lock the pool with no other lock held, repairing first if needed. */
int vmc_pool_lock(vmc_cache *c);

#endif
