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

#endif
