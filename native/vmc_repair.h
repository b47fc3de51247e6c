/* vmc_repair.h -- the outer locks, and the stop-the-world repair they run.
 *
 * An outer lock (no other lock held) that finds the file marked damaged
 * releases it and repairs first: every shard lock in ascending order, then
 * the pool lock, then vmc_rebuild() in LIVE mode. Callers holding a shard
 * lock use vmc_pool_lock_nested() (vmc_mutex.h) instead, which backs off.
 *
 * A thread inside a call made with VMC_F_NO_REPAIR (vmc_no_repair_begin)
 * never repairs: its outer locks answer VMC_E_REPAIR, holding nothing, when
 * the file is marked damaged -- before waiting for the lock, so that it does
 * not wait for a repair in progress either.
 */
#ifndef VMC_REPAIR_H
#define VMC_REPAIR_H

#include "vmc_handle.h"

/* vmc_repair -- stop the world and rebuild the cache if it is marked damaged
 * (whatever the calling thread's mode: this is the repair it defers). */
int vmc_repair(vmc_cache *c);
/* vmc_repair_needed -- the file is marked damaged: repair it now, or answer
 * VMC_E_REPAIR inside a no-repair call. */
int vmc_repair_needed(vmc_cache *c);
/* vmc_no_repair_begin -- enter a call; with `on`, the calling thread defers
 * repairs until the matching vmc_no_repair_end (nested calls inherit it).
 * Returns the setting to restore. */
bool vmc_no_repair_begin(bool on);
/* vmc_no_repair_end -- leave the call: restore the setting begin returned. */
void vmc_no_repair_end(bool previous);
/* vmc_no_repair -- whether the calling thread defers repairs. */
bool vmc_no_repair(void);
/* vmc_shard_lock -- lock a shard with no other lock held, repairing first if
 * needed, and open a write section (vmc_shard_writing): the holder may change
 * the shard's index and entries. */
int vmc_shard_lock(vmc_cache *c, uint32_t shard);
/* vmc_shard_lock_reading -- vmc_shard_lock for a holder that only reads (and
 * stores access times and counters): no write section, so optimistic gets of
 * the shard go on. It opens one (vmc_shard_writing) before any other change. */
int vmc_shard_lock_reading(vmc_cache *c, uint32_t shard);
/* vmc_shard_trylock -- vmc_shard_lock_reading only if that takes no wait and
 * no repair: VMC_OK, or VMC_BUSY (nothing held; a dead owner is noted for the
 * next lock). */
int vmc_shard_trylock(vmc_cache *c, uint32_t shard);
/* vmc_pool_lock -- lock the pool with no other lock held, repairing first if needed. */
int vmc_pool_lock(vmc_cache *c);

#endif
