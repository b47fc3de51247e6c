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

/* How many times a taken lock is polled before the thread sleeps on it. A
 * lock section lasts a fraction of a microsecond (a get's, a put's pool
 * section), while a futex sleep and its wake-up cost several microseconds
 * and, between processes, a context switch each; a holder that is not
 * running (more runnable threads than cores) is not worth longer spinning. */
#ifndef VMC_SPINS /* -DVMC_SPINS=0 builds a core that never spins, to measure against */
#define VMC_SPINS 64
#endif

static __thread struct vmc_wait_hook *wait_hook;

void vmc_wait_hook_set(struct vmc_wait_hook *hook)
{
    wait_hook = hook;
}

void vmc_before_wait(void)
{
    struct vmc_wait_hook *hook = wait_hook;
    if (hook) {
        wait_hook = NULL;
        hook->before_wait(hook);
    }
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* held -- whether m looks taken (a plain read: no cache line bouncing between
 * pollers); glibc's lock word, elsewhere a guess that lets trylock decide. */
static inline bool held(pthread_mutex_t *m)
{
#ifdef __GLIBC__
    return __atomic_load_n(&m->__data.__lock, __ATOMIC_RELAXED) != 0;
#else
    (void)m;
    return false;
#endif
}

int vmc_mutex_lock(vmc_cache *c, pthread_mutex_t *m)
{
    int rc = pthread_mutex_trylock(m);
    for (int spin = 0; rc == EBUSY && spin < VMC_SPINS; spin++) {
        cpu_relax();
        if (!held(m))
            rc = pthread_mutex_trylock(m);
    }
    if (rc == EBUSY) {
        vmc_before_wait();
        rc = pthread_mutex_lock(m);
    }
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

void vmc_shard_writing(vmc_cache *c, uint32_t shard)
{
    uint64_t *seq = &c->shards[shard].seq;
    /* Even: +1. Odd (left so by a holder that died in a section, or forged):
     * +2, so that the value moves past any a reader could have seen. */
    __atomic_fetch_add(seq, (VMC_LOAD(*seq) & 1) ? 2 : 1, __ATOMIC_SEQ_CST);
    /* a full fence (x86's locked add already is one; arm64 needs it): this
     * thread's later loads of access times come after the increment */
    VMC_FENCE(__ATOMIC_SEQ_CST);
}

void vmc_shard_unlock(vmc_cache *c, uint32_t shard)
{
    uint64_t *seq = &c->shards[shard].seq;
    uint64_t v = VMC_LOAD(*seq);
    if (v & 1)
        __atomic_store_n(seq, v + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&c->shards[shard].lock);
}
