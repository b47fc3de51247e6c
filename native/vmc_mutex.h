/* vmc_mutex.h -- robust process-shared mutexes and the damage flag.
 *
 * A process killed while holding a lock must never block the others. Every
 * mutex in the file is PTHREAD_PROCESS_SHARED and PTHREAD_MUTEX_ROBUST: the
 * next owner gets EOWNERDEAD, makes the mutex consistent and marks the file
 * damaged (`needs_repair`). This module never repairs: vmc_repair.h takes
 * the outer locks, which repair first when the flag is set.
 */
#ifndef VMC_MUTEX_H
#define VMC_MUTEX_H

#include "vmc_handle.h"

/* What a thread does before it first waits in a call (the CPython fast path
 * releases the GIL there: it calls the core with the GIL held, and the GIL
 * must never be held while waiting for another process). Set per thread for
 * the length of one call; it runs at most once, and is cleared as it runs. */
struct vmc_wait_hook {
    void (*before_wait)(struct vmc_wait_hook *hook);
};

/* vmc_wait_hook_set -- this thread's hook for its next call (NULL: none). */
void vmc_wait_hook_set(struct vmc_wait_hook *hook);
/* vmc_before_wait -- run (and clear) this thread's hook, if any: called
 * before anything that may wait or run long (a lock that spinning did not
 * get, a repair, a long copy). */
void vmc_before_wait(void);

/* vmc_mutex_init -- initialise a process-shared robust mutex in the file. */
int vmc_mutex_init(pthread_mutex_t *m);
/* vmc_mutex_lock -- lock m: 0, 1 if its owner had died (the file is then
 * marked damaged), or a failure. A lock that is taken is spun on briefly
 * before the thread runs its wait hook and sleeps. */
int vmc_mutex_lock(vmc_cache *c, pthread_mutex_t *m);
/* vmc_mark_damaged -- ask for a repair at the next outer lock. */
void vmc_mark_damaged(vmc_cache *c);
/* vmc_damaged -- whether a repair is pending. */
bool vmc_damaged(vmc_cache *c);
/* vmc_pool_lock_nested -- take the pool lock while holding a shard lock;
 * VMC_RETRY (nothing held) if the file needs repair: the caller unwinds. */
int vmc_pool_lock_nested(vmc_cache *c);
/* vmc_pool_unlock -- release the pool lock. */
void vmc_pool_unlock(vmc_cache *c);
/* vmc_shard_writing -- with the shard's lock held, open a write section: the
 * shard's `seq` becomes odd and moves, by a seq_cst increment (+1, or +2 if
 * it was odd already: a holder that died in a section, or damage) after which
 * no load of this thread, an access time read to choose a victim included, is
 * ordered before it; optimistic gets of the shard fail their validation until
 * the unlock. */
void vmc_shard_writing(vmc_cache *c, uint32_t shard);
/* vmc_shard_unlock -- close the write section if one is open (`seq` even
 * again, a release store), and release the shard's lock. */
void vmc_shard_unlock(vmc_cache *c, uint32_t shard);

#endif
