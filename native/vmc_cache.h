/* vmc_cache.h -- what the operations (vmc_cache.c) offer the rest of the core.
 *
 * The operations themselves are the entry points of vmc.h.
 */
#ifndef VMC_CACHE_H
#define VMC_CACHE_H

#include "vmc_handle.h"

/* vmc_cache_drop_reservations -- cancel the reservations still open on this
 * handle (vmc_close, once no call is in flight): a reservation whose id never
 * reached its caller (a close racing vmc_reserve) is not leaked. */
void vmc_cache_drop_reservations(vmc_cache *c);

/* A destination chosen once the value's length is known, under the shard
 * lock or in an optimistic round (vmc_fast.c: a bytes object of that length,
 * allocated with the GIL held). `dst` may be called again, in a later round
 * of the same get, with another length; it returns NULL to copy nothing. The
 * destination holds the value only if the get answers a hit: a round that
 * failed its validation may have filled it, and the get may then miss or
 * answer VMC_BUSY without calling `dst` again. */
struct vmc_sink {
    char *(*dst)(struct vmc_sink *sink, uint64_t len);
    size_t item; /* vmc_get_many_sink: the index of the key being looked up */
};

/* vmc_get_sink -- vmc_get with VMC_F_WHOLE into sink->dst(len), for a caller
 * that must not wait (it holds the GIL): VMC_BUSY, having counted nothing,
 * where vmc_get would wait for a shard lock, a repair or the pool lock (to
 * remove an expired entry); the caller then calls vmc_get. Once it has
 * counted a hit it finishes as vmc_get does, waiting if it must. `flags`: 0
 * or VMC_F_NO_REPAIR. The value's length (copied if sink->dst gave a
 * destination), VMC_MISS, or a failure. */
int64_t vmc_get_sink(vmc_cache *c, const char *key, size_t klen, struct vmc_sink *sink,
                     uint32_t flags);

/* vmc_get_many_sink -- vmc_get_sink of keys[0..n) in order, in one call that
 * prefetches index slots and entries ahead of the lookups (sink->item says
 * which key sink->dst is called for). status[i] is what vmc_get_sink says
 * of key i; the call stops after the first key whose status is VMC_BUSY or
 * a failure. Returns the number of keys done (hits and misses) before it.
 * `flags`: 0 or VMC_F_NO_REPAIR. */
size_t vmc_get_many_sink(vmc_cache *c, const char *const *keys, const size_t *klens, size_t n,
                         int64_t *status, struct vmc_sink *sink, uint32_t flags);

/* vmc_contains_now -- vmc_contains, or VMC_BUSY where it would wait (a shard
 * lock taken, a repair pending). */
int vmc_contains_now(vmc_cache *c, const char *key, size_t klen);

#endif
