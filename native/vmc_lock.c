/* vmc_lock.c -- robust process-shared mutexes and the repair they trigger.
 *
 * A process killed while holding a lock must never block the others. Every
 * mutex in the file is PTHREAD_PROCESS_SHARED and PTHREAD_MUTEX_ROBUST: the
 * next owner gets EOWNERDEAD. Rather than guess what the dead owner left half
 * done, the finder marks the file damaged and the cache is rebuilt from the
 * pool (vmc_rebuild, LIVE mode) with every lock held; the same code recovers a
 * file at open. Callers holding a shard lock who find the pool lock's owner dead
 * get VMC_RETRY, unwind without having changed anything and start again.
 */
#include <errno.h>
#include <sched.h>

#include "vmc_internal.h"

/* vmc_mutex_init -- initialise a process-shared robust mutex in the file. */
int vmc_mutex_init(pthread_mutex_t *m)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        return vmc_fail_errno("pthread_mutex_init", NULL);
    }
    return VMC_OK;
}

void vmc_mark_damaged(vmc_cache *c)
{
    __atomic_store_n(&c->hdr->needs_repair, 1, __ATOMIC_RELEASE);
}

static bool damaged(vmc_cache *c)
{
    return __atomic_load_n(&c->hdr->needs_repair, __ATOMIC_ACQUIRE) != 0;
}

/* raw_lock -- lock m; a dead owner's mutex is made consistent and the file
 * marked for repair. Returns 0, 1 (the owner had died) or a failure. */
static int raw_lock(vmc_cache *c, pthread_mutex_t *m)
{
    int rc = pthread_mutex_lock(m);
    if (rc == 0)
        return 0;
    if (rc == EOWNERDEAD) {
        vmc_mark_damaged(c);
        pthread_mutex_consistent(m);
        return 1;
    }
    errno = rc;
    return vmc_fail_errno("pthread_mutex_lock", NULL);
}

/* vmc_repair -- stop the world and rebuild the cache if it is marked damaged. */
static int vmc_repair(vmc_cache *c)
{
    int rc = VMC_OK;
    uint32_t locked = 0;
    for (; locked < c->n_shards; locked++) {
        rc = raw_lock(c, &c->shards[locked].lock);
        if (rc < 0)
            goto out;
    }
    rc = raw_lock(c, &c->hdr->pool.lock);
    if (rc < 0)
        goto out;
    rc = VMC_OK;
    if (damaged(c)) {
        uint64_t kept, dropped;
        rc = vmc_rebuild(c, VMC_REBUILD_LIVE, &kept, &dropped);
        if (rc == VMC_OK)
            __atomic_store_n(&c->hdr->needs_repair, 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&c->hdr->pool.lock);
out:
    while (locked > 0)
        pthread_mutex_unlock(&c->shards[--locked].lock);
    return rc;
}

/* lock_outer -- lock m with no other lock held, repairing first if needed. */
static int lock_outer(vmc_cache *c, pthread_mutex_t *m)
{
    for (int attempt = 0;; attempt++) {
        int rc = raw_lock(c, m);
        if (rc < 0)
            return rc;
        if (rc == 0 && !damaged(c))
            return VMC_OK;
        pthread_mutex_unlock(m);
        if (attempt >= 8)
            return vmc_fail(VMC_E_CORRUPT, "the cache file stays damaged after repair");
        rc = vmc_repair(c);
        if (rc < 0)
            return rc;
    }
}

int vmc_shard_lock(vmc_cache *c, uint32_t shard)
{
    return lock_outer(c, &c->shards[shard].lock);
}

void vmc_shard_unlock(vmc_cache *c, uint32_t shard)
{
    pthread_mutex_unlock(&c->shards[shard].lock);
}

int vmc_pool_lock(vmc_cache *c)
{
    return lock_outer(c, &c->hdr->pool.lock);
}

int vmc_pool_lock_nested(vmc_cache *c)
{
    int rc = raw_lock(c, &c->hdr->pool.lock);
    if (rc < 0)
        return rc;
    if (rc == 0 && !damaged(c))
        return VMC_OK;
    pthread_mutex_unlock(&c->hdr->pool.lock);
    return VMC_RETRY;
}

void vmc_pool_unlock(vmc_cache *c)
{
    pthread_mutex_unlock(&c->hdr->pool.lock);
}
