/* vmc_flight.h -- host-wide single-flight and owner liveness (DESIGN.md §9).
 *
 * Owners. Every attached handle (one per Cache object, and one more in a
 * forked child) takes an owner id from the file's `next_owner` counter (ids
 * are never reused while the file lives) and holds an exclusive open file
 * description lock on byte VMC_OWNER_BASE + id of the file. The kernel drops
 * that lock when the handle closes or its process dies, whatever pid namespace
 * the process lives in and whatever pid it had: an owner is alive exactly
 * while its byte is locked. Load leaders and reservations record owner ids.
 *
 * Flights. The flight table (n_flights slots of 32 bytes at flights_off,
 * guarded by hdr->flight_lock) records the loads in flight on the host. A miss
 * joins the flight of its key: the first caller leads (runs the loader, stores
 * the value, ends the flight), the others wait on the slot's 32-bit `gen`
 * word with FUTEX_WAIT (shared, not private) for at most the probe interval,
 * then join again, which probes the leader's owner byte (F_OFD_GETLK) and the
 * load's age. `gen` changes at every change of leader and at every end, and
 * each end FUTEX_WAKEs every waiter. A full table answers VMC_FLIGHT_FULL:
 * the caller coalesces within its process only.
 */
#ifndef VMC_FLIGHT_H
#define VMC_FLIGHT_H

#include "vmc_handle.h"


/* ---- used by the rest of the core ---- */
int vmc_owner_take(vmc_cache *c);                 /* at attach and after fork */
bool vmc_owner_alive(vmc_cache *c, uint64_t owner);
void vmc_flight_recover(vmc_cache *c);            /* sole user at open */
int vmc_flight_init_lock(vmc_cache *c);           /* sole user at open */
void vmc_flight_release_owner(vmc_cache *c);      /* at close: orphan our loads */

#endif
