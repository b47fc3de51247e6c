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

#include <stdbool.h>
#include <stdint.h>

struct vmc_cache;
struct vmc_stats;

#define VMC_MAX_FLIGHTS 1024u                /* slots in the table of a file of >= 2 MiB */
#define VMC_MIN_FLIGHTS 64u                  /* a smaller file has fewer (a power of two) */
#define VMC_FLIGHT_PROBES 16u                /* slots a key may use, from its home slot */
#define VMC_OWNER_BASE (1ull << 40)          /* owner id n holds byte VMC_OWNER_BASE + n */
#define VMC_OWNER_LIMIT (1ull << 40)         /* ids at or above this name no owner */

/* Slot states. */
#define VMC_SLOT_FREE 0u                     /* never used since the last recovery */
#define VMC_SLOT_LOADING 1u                  /* `owner` is running the loader */
#define VMC_SLOT_DONE 2u                     /* the wave ended; `outcome` says how */
#define VMC_SLOT_ORPHANED 3u                 /* the leader failed or left: the next joiner leads */

/* One load in flight: 32 bytes, every field written under hdr->flight_lock.
 * A key is known by its 64-bit seeded hash and its length: two keys that agree
 * on both (chance 2^-64 per pair, the seed being secret) share one flight. */
struct vmc_flight {
    uint32_t gen;           /* futex word: +1 (release store) whenever the leader changes or the
                               wave ends; read without the lock by the futex */
    uint8_t state;          /* VMC_SLOT_* */
    uint8_t outcome;        /* DONE: VMC_END_VALUE or VMC_END_NONE */
    uint16_t key_len;       /* the key's full length */
    uint64_t hash;          /* vmc_hash of the key (the file's seed) */
    uint64_t owner;         /* LOADING: the leader's owner id */
    uint64_t started_ns;    /* LOADING: CLOCK_MONOTONIC start of this leader's load;
                               DONE/ORPHANED: when it ended */
};

_Static_assert(sizeof(struct vmc_flight) == 32, "a flight slot is half a cache line");

/* ---- used by the rest of the core ---- */
int vmc_owner_take(struct vmc_cache *c);                 /* at attach and after fork */
bool vmc_owner_alive(struct vmc_cache *c, uint64_t owner);
void vmc_flight_recover(struct vmc_cache *c);            /* sole user at open */
int vmc_flight_init_lock(struct vmc_cache *c);           /* sole user at open */
void vmc_flight_release_owner(struct vmc_cache *c);      /* at close: orphan our loads */
void vmc_flight_statistics(struct vmc_cache *c, struct vmc_stats *out);

#endif
