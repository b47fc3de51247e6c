/* vmc_repair.c -- the outer locks, and the stop-the-world repair they run.
 *
 * Rather than guess what a dead lock owner left half done, the finder marks
 * the file damaged and the cache is rebuilt from the pool (vmc_rebuild, LIVE
 * mode) with every lock held; the same code recovers a file at open. Callers
 * holding a shard lock who find the pool lock's owner dead get VMC_RETRY,
 * unwind without having changed anything and start again.
 */
#include "vmc_repair.h"

#include <errno.h>

#include "vmc_mutex.h"
#include "vmc_recover.h"

/* Set for the duration of a call made with VMC_F_NO_REPAIR. */
static __thread bool no_repair;

bool vmc_no_repair_begin(bool on)
{
    bool previous = no_repair;
    no_repair = previous || on;
    return previous;
}

void vmc_no_repair_end(bool previous)
{
    no_repair = previous;
}

bool vmc_no_repair(void)
{
    return no_repair;
}

/* deferred -- the answer of a no-repair call that found the file damaged. */
static int deferred(void)
{
    return vmc_fail(VMC_E_REPAIR, "the cache file needs a repair (a process died holding "
                                  "one of its locks, or damage was found); this call does "
                                  "not run it");
}

int vmc_repair(vmc_cache *c)
{
    int rc = VMC_OK;
    uint32_t locked = 0;
    for (; locked < c->n_shards; locked++) {
        rc = vmc_mutex_lock(c, &c->shards[locked].lock);
        if (rc < 0)
            goto out;
        vmc_shard_writing(c, locked);
    }
    rc = vmc_mutex_lock(c, &c->hdr->pool.lock);
    if (rc < 0)
        goto out;
    rc = VMC_OK;
    if (vmc_damaged(c)) {
        uint64_t kept, dropped;
        rc = vmc_rebuild(c, VMC_REBUILD_LIVE, &kept, &dropped);
        if (rc == VMC_OK)
            __atomic_store_n(&c->hdr->needs_repair, 0, __ATOMIC_RELEASE);
    }
    vmc_pool_unlock(c);
out:
    while (locked > 0)
        vmc_shard_unlock(c, --locked);
    return rc;
}

int vmc_repair_needed(vmc_cache *c)
{
    return no_repair ? deferred() : vmc_repair(c);
}

/* lock_outer -- lock m with no other lock held, repairing first if needed
 * (in a no-repair call: VMC_E_REPAIR, without waiting for a repair that
 * holds m). */
static int lock_outer(vmc_cache *c, pthread_mutex_t *m)
{
    for (int attempt = 0;; attempt++) {
        if (no_repair && vmc_damaged(c))
            return deferred();
        int rc = vmc_mutex_lock(c, m);
        if (rc < 0)
            return rc;
        if (rc == 0 && !vmc_damaged(c))
            return VMC_OK;
        pthread_mutex_unlock(m);
        if (no_repair)
            return deferred();
        if (attempt >= 8)
            return vmc_fail(VMC_E_CORRUPT, "the cache file stays damaged after repair");
        vmc_before_wait(); /* a repair visits the whole file */
        rc = vmc_repair(c);
        if (rc < 0)
            return rc;
    }
}

int vmc_shard_lock(vmc_cache *c, uint32_t shard)
{
    int rc = vmc_shard_lock_reading(c, shard);
    if (rc == VMC_OK)
        vmc_shard_writing(c, shard);
    return rc;
}

int vmc_shard_lock_reading(vmc_cache *c, uint32_t shard)
{
    VMC_ASSERT(shard < c->n_shards, "shard %u of %u", shard, c->n_shards);
    return lock_outer(c, &c->shards[shard].lock);
}

int vmc_shard_trylock(vmc_cache *c, uint32_t shard)
{
    VMC_ASSERT(shard < c->n_shards, "shard %u of %u", shard, c->n_shards);
    pthread_mutex_t *m = &c->shards[shard].lock;
    int rc = pthread_mutex_trylock(m);
    if (rc == EOWNERDEAD) { /* as vmc_mutex_lock: the blocking lock then repairs */
        vmc_mark_damaged(c);
        pthread_mutex_consistent(m);
        pthread_mutex_unlock(m);
        return VMC_BUSY;
    }
    if (rc != 0) /* taken (or a failure, which the blocking lock reports) */
        return VMC_BUSY;
    if (vmc_damaged(c)) {
        pthread_mutex_unlock(m);
        return VMC_BUSY;
    }
    return VMC_OK;
}

int vmc_pool_lock(vmc_cache *c)
{
    return lock_outer(c, &c->hdr->pool.lock);
}
