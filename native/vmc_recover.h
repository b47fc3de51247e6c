/* vmc_recover.h -- rebuild every derived structure from the pool.
 *
 * The pool is the truth; indexes, heaps, free lists, the reserved list and
 * counts are derived and rebuilt by mark and sweep (vmc_recover.c).
 */
#ifndef VMC_RECOVER_H
#define VMC_RECOVER_H

#include "vmc_handle.h"

enum vmc_rebuild_mode {
    VMC_REBUILD_RECOVER,          /* sole user at open: re-init locks, verify checksums */
    VMC_REBUILD_LIVE              /* under every lock, others alive: keep their reservations */
};

/* vmc_rebuild -- rebuild the derived state; counts the entries kept and
 * dropped. VMC_OK or VMC_E_OS (out of memory). */
int vmc_rebuild(vmc_cache *c, enum vmc_rebuild_mode mode, uint64_t *kept, uint64_t *dropped);

#endif
