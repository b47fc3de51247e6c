/* vmc_pool.h -- the extent allocator and the list of open reservations.
 *
 * Every function here runs with the pool lock held. Extents carry boundary
 * tags; free extents sit in size-segregated lists and coalesce with free
 * neighbours when freed; tags are rewritten so that a walk over the pool is
 * valid after every single store (vmc_format.h).
 */
#ifndef VMC_POOL_H
#define VMC_POOL_H

#include "vmc_handle.h"

/* vmc_alloc_entry -- room for an entry of key_len + value_len bytes: one HEAD
 * extent (then BODY extents unless `contiguous`). The caller marks the HEAD
 * RESERVED. VMC_OK, or VMC_E_NEED_ROOM leaving nothing taken. */
int vmc_alloc_entry(vmc_cache *c, uint64_t key_len, uint64_t value_len, bool contiguous,
                    uint32_t *head);
/* vmc_release_entry -- mark a head REMOVED and free its extents. */
void vmc_release_entry(vmc_cache *c, uint32_t head);
/* vmc_free_run -- list [unit, unit+units) as one free extent, as is (recovery). */
void vmc_free_run(vmc_cache *c, uint32_t unit, uint32_t units);
/* vmc_reserved_push -- put a RESERVED head on the reserved list. */
void vmc_reserved_push(vmc_cache *c, uint32_t head);
/* vmc_reserved_unlink -- take a head off the reserved list. */
void vmc_reserved_unlink(vmc_cache *c, uint32_t head);
/* vmc_reclaim_dead -- free reservations whose owner handle is gone (closed,
 * or its process dead: vmc_owner_alive); rate-limited unless forced; returns
 * the units freed. */
uint64_t vmc_reclaim_dead(vmc_cache *c, bool force);
/* vmc_spare_slot -- this handle's spare slot, or NULL if it has none (no
 * lock needed). */
struct vmc_spare_slot *vmc_spare_slot(vmc_cache *c);
/* vmc_spare_slot_take_free -- claim a free slot for this handle, with no
 * lock: compare-and-swap of its `owner` from 0 (every claim takes a slot so;
 * 0 is stored back by a free, a release or a reset, each by compare-and-swap
 * from the owner it checked, and by a claimer backing out of a second slot
 * for its handle); its slot if it had one already, NULL if none is free. An
 * optimistic get's first hit claims the slot it counts in this way. */
struct vmc_spare_slot *vmc_spare_slot_take_free(vmc_cache *c);
/* vmc_spare_slot_claim -- (pool lock held) this handle's spare slot, claimed
 * on first use (a free slot, or a dead owner's, freed with its spare); NULL
 * when every slot belongs to a live handle (the handle then keeps no spare
 * and counts its hits under the shard locks). */
struct vmc_spare_slot *vmc_spare_slot_claim(vmc_cache *c);
/* vmc_spare_slot_release -- (pool lock held) give this handle's slot back
 * at its close, the caller having freed the spare it knows (c->spare): not
 * what the slot names, which damage may have pointed anywhere, even at a
 * head forged inside a value. */
void vmc_spare_slot_release(vmc_cache *c);
/* vmc_spare_slots_reset -- (recovery, repair) free every slot (`all`: no
 * handle is attached) or those of dead owners; the spares themselves are the
 * sweep's. */
void vmc_spare_slots_reset(vmc_cache *c, bool all);
/* vmc_pool_window -- where to make a run of `units` contiguous units: the
 * stretch of the pool, near the largest free extent, that holds that many
 * units with the fewest entries in it and no reservation. Writes the heads of
 * those entries (at most `max`) to victims and returns their number; a single
 * victim 0 means the run is free already, and 0 that no such stretch was
 * found. The work is bounded by about eight times the units needed. */
uint32_t vmc_pool_window(vmc_cache *c, uint32_t units, uint32_t *victims, uint32_t max);
/* vmc_self_pid -- this process's id, cached (refreshed in a fork()ed child):
 * tells a handle inherited by fork() from one of this process's own. */
uint64_t vmc_self_pid(void);

#endif
