/* vmc_mutex.c -- robust process-shared mutexes and the damage flag. */
#include <errno.h>

#include "vmc_mutex.h"

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

bool vmc_damaged(vmc_cache *c)
{
    return __atomic_load_n(&c->hdr->needs_repair, __ATOMIC_ACQUIRE) != 0;
}

int vmc_mutex_lock(vmc_cache *c, pthread_mutex_t *m)
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

int vmc_pool_lock_nested(vmc_cache *c)
{
    int rc = vmc_mutex_lock(c, &c->hdr->pool.lock);
    if (rc < 0)
        return rc;
    if (rc == 0 && !vmc_damaged(c))
        return VMC_OK;
    pthread_mutex_unlock(&c->hdr->pool.lock);
    return VMC_RETRY;
}

void vmc_pool_unlock(vmc_cache *c)
{
    pthread_mutex_unlock(&c->hdr->pool.lock);
}

void vmc_shard_unlock(vmc_cache *c, uint32_t shard)
{
    pthread_mutex_unlock(&c->shards[shard].lock);
}
