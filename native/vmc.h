/* vmc.h -- the public API of the aiovmc native core.
 *
 * This header is read twice: by the C compiler and by cffi's cdef (build_ffi.py
 * drops the preprocessor lines), so it holds plain declarations only.
 *
 * Every entry point returns a status >= 0 on success or a negative `vmc_status`;
 * on failure vmc_last_error() returns a message naming what was wrong (a
 * thread-local string, valid until the next call on the same thread).
 * A handle may be used by many threads at once: the core never relies on the
 * GIL, which cffi releases around every call.
 *
 * The comment above each entry point lists what it returns. Besides those,
 * every call on a handle (all but vmc_open, vmc_abort, vmc_close, vmc_free,
 * vmc_scratch, vmc_shard_count, vmc_detach_view and the error accessors) returns
 * VMC_E_CLOSED once the handle is closed, and every call that takes a lock in
 * the file may return VMC_E_OS (a lock or a repair failed: out of memory) or
 * VMC_E_CORRUPT (damage that repair could not mend).
 *
 * Repair. A call that finds the file damaged (a lock whose owner died, a
 * count or a chain that cannot be right) repairs it before it goes on: a
 * stop-the-world rebuild, O(pool), with every lock held. The calls that take
 * `flags` accept VMC_F_NO_REPAIR, for callers that must not spend that long
 * (an event loop's thread): such a call neither repairs nor waits for a
 * repair in progress; it answers VMC_E_REPAIR, and the caller runs
 * vmc_repair_file() where it can wait, then calls again. VMC_E_REPAIR may
 * come after the call counted a get (the retry counts it again) or evicted
 * entries (their keys are reported as usual), never after it stored a value.
 *
 * The implementation is split by concern (native/vmc_handle.h draws the call
 * graph): vmc_file.c implements opening and closing, vmc_cache.c the rest.
 */
#ifndef VMC_H
#define VMC_H
#include <stddef.h>
#include <stdint.h>

enum vmc_status {
    VMC_OK = 0,
    VMC_MISS = -1,               /* the key is absent (not an error) */
    VMC_E_FORMAT = -2,           /* the file is not a compatible cache */
    VMC_E_CONFIG = -3,           /* invalid or conflicting parameters */
    VMC_E_FULL = -4,             /* no room (policy "none", or a reservation cannot fit) */
    VMC_E_KEY_TOO_LARGE = -5,
    VMC_E_VALUE_TOO_LARGE = -6,
    VMC_E_CLOSED = -7,           /* the handle is closed */
    VMC_E_OS = -8,               /* a system call failed; the message names it and errno */
    VMC_E_STATE = -9,            /* a reservation used in the wrong state */
    VMC_E_CORRUPT = -10,         /* damage found that repair could not mend */
    VMC_E_NEED_ROOM = -11,       /* with VMC_F_NO_EVICT: the caller must evict first */
    VMC_E_REPAIR = -12           /* with VMC_F_NO_REPAIR: a repair is pending; nothing was
                                    changed: call vmc_repair_file, then call again */
};

enum vmc_flags {
    VMC_F_ADD = 1,               /* put: store only if the key is absent */
    VMC_F_NO_EVICT = 2,          /* put/reserve: return VMC_E_NEED_ROOM instead of evicting */
    VMC_F_WHOLE = 4,             /* get: copy only if the whole value fits the buffer */
    VMC_F_QUIET = 8,             /* get: count no statistics, leave the LRU order alone */
    VMC_F_CREATE = 16,           /* open: create the file if it does not exist */
    VMC_F_RESET = 32,            /* open: reinitialise an existing cache file */
    VMC_F_ANY_OWNER = 64,        /* open: accept a file owned by another user */
    VMC_F_CONTIGUOUS = 128,      /* evict_for: room for a reservation (one extent) */
    VMC_F_NO_REPAIR = 256,       /* never repair, nor wait for a repair: VMC_E_REPAIR */
    VMC_F_FRESH = 512,           /* get: dst is a new buffer of the caller's, shared with
                                    nothing: the core may have the kernel back it with huge
                                    pages (cheap to fault in, cheap to unmap) */
    VMC_F_COUNTED = 1024         /* get (implies VMC_F_QUIET): the rest of a get this handle
                                    already counted as a hit (the copy after sizing it); if
                                    the key has gone, that hit is counted a miss instead */
};

enum vmc_policy { VMC_POLICY_LRU = 0, VMC_POLICY_NONE = 1 };

/* Each thread's result buffer: big enough for any key, and for the values the
 * hot path returns without a second call. */
enum { VMC_SCRATCH_SIZE = 65536 };

/* Parameters for creating (or resetting) a cache file. */
struct vmc_config {
    uint64_t size;               /* file size in bytes */
    uint32_t extent_size;        /* allocation unit: power of two, >= 64 */
    uint32_t policy;             /* enum vmc_policy */
    uint64_t default_ttl_ns;     /* 0: no expiry */
    uint32_t mode;               /* permission bits of a new file */
    uint64_t max_entries;        /* entry budget; 0: the default (vmc_entry_budget) */
};

/* What an attached handle learns from the file (its geometry). */
struct vmc_info {
    int fd;                      /* the handle's descriptor; the caller maps it */
    uint64_t file_size;
    uint64_t capacity;           /* usable pool bytes */
    uint32_t extent_size;
    uint32_t policy;
    uint64_t default_ttl_ns;
    uint64_t max_entries;        /* the most entries the file holds (its entry budget) */
    uint32_t max_key_size;
    uint64_t max_value_size;     /* the largest value the pool could ever hold */
    int created;                 /* 1 if this open created or reset the file */
    int recovered;               /* 1 if this open ran recovery (first user) */
    uint64_t recovered_entries;
    uint64_t dropped_entries;    /* entries recovery found damaged or expired */
};

struct vmc_stats {
    uint64_t puts, gets, hits, misses, evictions, expirations;
    uint64_t entries, used_bytes, capacity;
    uint64_t loader_calls, coalesced_gets, load_takeovers;
};

/* Host-wide single-flight (vmc_flight.h). vmc_flight_join answers a positive
 * enum vmc_flight_status (or a failure); the ticket carries the caller's place
 * in the wave from one call to the next. */
enum vmc_flight_status {
    VMC_FLIGHT_LEAD = 1,         /* lead a new wave: load, store, then vmc_flight_end */
    VMC_FLIGHT_TAKEOVER = 2,     /* lead a wave whose leader failed, left, died or timed out */
    VMC_FLIGHT_WAIT = 3,         /* another handle leads: vmc_flight_wait, then join again */
    VMC_FLIGHT_VALUE = 4,        /* the wave waited for stored a value: read it */
    VMC_FLIGHT_NONE = 5,         /* the wave waited for ended with no value */
    VMC_FLIGHT_FULL = 6          /* the table has no room: coalesce in this process only */
};

/* A waiter rejoins at least this often, to see whether its leader died or timed out. */
enum { VMC_FLIGHT_PROBE_MS = 200 };

enum vmc_flight_end {
    VMC_END_VALUE = 1,           /* a value was stored */
    VMC_END_NONE = 2,            /* the loader returned no value */
    VMC_END_FAILED = 3           /* the loader raised, or the leader was cancelled */
};

struct vmc_ticket {
    uint32_t slot;               /* 1-based slot of the flight joined; 0 before the first join */
    uint32_t gen;                /* the slot's generation when it was joined or led */
    int64_t wait_ns;             /* after VMC_FLIGHT_WAIT: sleep at most this long, then join */
};

typedef struct vmc_cache vmc_cache;

/* vmc_last_error -- the message of this thread's last failure. */
const char *vmc_last_error(void);
/* vmc_last_errno -- errno behind this thread's last VMC_E_OS (0 otherwise). */
int vmc_last_errno(void);

/* Opening is two steps so that Python's mmap object owns the mapping (and
 * memoryviews into it keep it alive): vmc_open() opens or creates the file,
 * validates its header and takes the opening lock; the caller maps info->fd
 * MAP_SHARED for info->file_size bytes and hands the address to vmc_attach(),
 * which recovers the file if this is its only user and releases the lock.
 * vmc_abort() undoes a vmc_open() whose mapping failed. */

/* vmc_open -- open (VMC_F_CREATE: or create; VMC_F_RESET: reinitialise) a
 * cache file. VMC_OK; VMC_E_CONFIG (invalid config, a size the file does not
 * have, no file and no VMC_F_CREATE, a reset of a file others use);
 * VMC_E_FORMAT (not a compatible cache file, not a regular file, a symbolic
 * link, another user's file without VMC_F_ANY_OWNER); VMC_E_OS. */
int vmc_open(const char *path, const struct vmc_config *config, uint32_t flags,
             vmc_cache **out, struct vmc_info *info);
/* vmc_attach -- use the caller's mapping, recovering the file if this is its
 * only user. VMC_OK; VMC_E_OS; VMC_E_CORRUPT. On failure call vmc_abort(). */
int vmc_attach(vmc_cache *c, void *base, struct vmc_info *info);
/* vmc_abort -- undo a vmc_open() (or a failed vmc_attach()): close and free. */
void vmc_abort(vmc_cache *c);
/* vmc_after_fork -- in a fork()ed child, take a liveness lock of the child's
 * own and forget the parent's open reservations (closed or not). VMC_OK; VMC_E_OS, and the handle is then closed (without unlocking
 * the parent's lock). */
int vmc_after_fork(vmc_cache *c);
/* vmc_close -- detach: wait for calls in flight on other threads, cancel
 * the reservations still open on this handle, release the locks. Always
 * VMC_OK (closing twice is harmless). The caller unmaps afterwards. */
int vmc_close(vmc_cache *c);
/* vmc_free -- release the handle's memory (closing it first if needed): call
 * once, when no thread can use the handle any more (Python: its garbage
 * collector). */
void vmc_free(vmc_cache *c);

/* vmc_get -- look key up; on a hit copy value[offset, offset+cap) into dst
 * (VMC_F_WHOLE: the whole value, only if it fits; VMC_F_QUIET: no counts, no
 * LRU touch). The value's total length (>= 0); VMC_MISS (absent or expired);
 * VMC_E_KEY_TOO_LARGE. */
int64_t vmc_get(vmc_cache *c, const char *key, size_t klen, char *dst, size_t cap,
                uint64_t offset, uint32_t flags);
/* vmc_get_scratch -- the hot path: vmc_get(c, key, klen, vmc_scratch(),
 * VMC_SCRATCH_SIZE, 0, VMC_F_WHOLE) with three arguments, each of which costs
 * the caller a conversion. As vmc_get, and VMC_E_OS if the scratch buffer
 * cannot be allocated. */
int64_t vmc_get_scratch(vmc_cache *c, const char *key, size_t klen);
/* vmc_get_entry -- vmc_get with VMC_F_WHOLE that also reports, on a hit, the
 * entry's publication timestamp (meta[0]) and its expiry (meta[1],
 * CLOCK_REALTIME ns, 0 = never). Returns as vmc_get. */
int64_t vmc_get_entry(vmc_cache *c, const char *key, size_t klen, char *dst, size_t cap,
                      uint32_t flags, uint64_t *meta);
/* vmc_scratch -- this thread's scratch buffer (VMC_SCRATCH_SIZE bytes; NULL
 * if out of memory). */
char *vmc_scratch(void);
/* vmc_contains -- 1 if key is present and unexpired, else 0; counts nothing,
 * touches nothing. VMC_E_KEY_TOO_LARGE. */
int vmc_contains(vmc_cache *c, const char *key, size_t klen);
/* vmc_put -- store key -> value (VMC_F_ADD: only if absent; VMC_F_NO_EVICT:
 * never evict). ttl_ns < 0: the file's default TTL; 0: none. The publication
 * timestamp (> 0); 0 when VMC_F_ADD found the key; VMC_E_KEY_TOO_LARGE;
 * VMC_E_VALUE_TOO_LARGE (can never fit); VMC_E_FULL (policy "none", or
 * nothing left to evict); VMC_E_NEED_ROOM (VMC_F_NO_EVICT). */
int64_t vmc_put(vmc_cache *c, const char *key, size_t klen, const char *value, size_t vlen,
                int64_t ttl_ns, uint32_t flags);
/* vmc_delete -- remove key: 1 if it was there (unexpired), else 0;
 * VMC_E_KEY_TOO_LARGE; VMC_E_REPAIR (VMC_F_NO_REPAIR). */
int vmc_delete(vmc_cache *c, const char *key, size_t klen, uint32_t flags);
/* vmc_evict -- evict key, or with key == NULL the least recently used entry
 * (its key copied to kout when it fits kcap). The evicted key's length;
 * VMC_MISS (nothing evicted); VMC_E_KEY_TOO_LARGE; VMC_E_REPAIR. */
int vmc_evict(vmc_cache *c, const char *key, size_t klen, char *kout, size_t kcap,
              uint32_t flags);
/* vmc_repair_file -- repair the file if it is marked damaged, or wait for
 * the repair in progress (every lock is taken in order, so of several
 * callers at once, in any processes, one rebuilds and the others sleep on
 * the locks until it is done). VMC_OK. */
int vmc_repair_file(vmc_cache *c);
/* vmc_evict_for -- with VMC_F_NO_EVICT, evict what a put (VMC_F_CONTIGUOUS:
 * a reservation) of klen + vlen bytes still needs: the least recently used
 * entry while free room falls short, else the entries of the stretch of the
 * pool that makes a long enough run at the least cost. Their keys go to kout
 * as (u16 length, bytes) records while they fit. The bytes of records (> 0:
 * something was evicted; 0: nothing was needed, try again); VMC_MISS (nothing
 * evictable, or policy "none"); VMC_E_KEY_TOO_LARGE. */
int64_t vmc_evict_for(vmc_cache *c, size_t klen, uint64_t vlen, uint32_t flags, char *kout,
                      size_t kcap);
/* vmc_count -- the number of entries (expired ones until removed), >= 0. */
int64_t vmc_count(vmc_cache *c);
/* vmc_shard_count -- the number of shards (> 0); never fails. */
int vmc_shard_count(vmc_cache *c);
/* vmc_shard_keys -- serialise a shard's unexpired keys as (u16 length, bytes)
 * records into dst. The bytes needed (retry with a larger dst if > cap);
 * VMC_E_CONFIG (no such shard). */
int64_t vmc_shard_keys(vmc_cache *c, int shard, char *dst, size_t cap);
/* vmc_clear_shard -- remove every entry of a shard. VMC_OK; VMC_E_CONFIG. */
int vmc_clear_shard(vmc_cache *c, int shard);
/* vmc_purge_shard -- remove a shard's expired entries. How many (>= 0);
 * VMC_E_CONFIG. */
int64_t vmc_purge_shard(vmc_cache *c, int shard);
/* vmc_statistics -- fill *out with the file-wide counters. VMC_OK. */
int vmc_statistics(vmc_cache *c, struct vmc_stats *out);
/* vmc_peek -- read a cache file's statistics without changing a byte of it:
 * no recovery, no reclaim, no liveness lock (a shared lock on the opening
 * byte waits out an opener that is recovering or resetting the file); opened
 * O_RDONLY and mapped PROT_READ. Also the last timestamp handed out (times[0]) and the persisted
 * one (times[1]). VMC_OK; VMC_E_CONFIG (no such file); VMC_E_FORMAT (as
 * vmc_open); VMC_E_OS. */
int vmc_peek(const char *path, struct vmc_stats *out, uint64_t *times);

/* vmc_reserve -- room for a value of `size` bytes in one extent, invisible
 * until published; *data_offset is where the value goes, as an offset in the
 * mapping. The reservation's id (> 0); VMC_E_KEY_TOO_LARGE;
 * VMC_E_VALUE_TOO_LARGE; VMC_E_FULL; VMC_E_NEED_ROOM (VMC_F_NO_EVICT). */
int64_t vmc_reserve(vmc_cache *c, const char *key, size_t klen, size_t size, int64_t ttl_ns,
                    uint32_t flags, uint64_t *data_offset);
/* vmc_publish -- make a reservation visible, replacing its key's value. `key`
 * and `size` are those it was made with (what the checksum seals is checked
 * against them). The publication timestamp (> 0); VMC_E_STATE (not an open
 * reservation of this process); VMC_E_FULL (policy "none" and the key's shard
 * index is full); VMC_E_CORRUPT (the reservation was damaged). On any failure
 * but VMC_E_STATE the reservation is freed. */
int64_t vmc_publish(vmc_cache *c, uint64_t reservation, const char *key, size_t klen,
                    uint64_t size);
/* vmc_cancel -- free a reservation without publishing it. VMC_OK; VMC_E_STATE. */
int vmc_cancel(vmc_cache *c, uint64_t reservation);

/* load_timeout_ns < 0: wait for a live leader forever. */
int vmc_flight_join(vmc_cache *c, const char *key, size_t klen, int64_t load_timeout_ns,
                    struct vmc_ticket *ticket);
/* Sleep until the wave changes or ticket->wait_ns pass (never counted as a call
 * in flight: closing the handle does not wait for it). */
int vmc_flight_wait(vmc_cache *c, const struct vmc_ticket *ticket);
/* Wake every waiter of the ticket's slot (a cancelled waiter frees its thread). */
int vmc_flight_kick(vmc_cache *c, const struct vmc_ticket *ticket);
/* End the wave the ticket leads: 1 if it ended it, 0 if it had been taken over. */
int vmc_flight_end(vmc_cache *c, const struct vmc_ticket *ticket, int outcome);
int64_t vmc_flights_in_use(vmc_cache *c);
/* vmc_count_loads -- add to the file-wide counters; coalesced_hits gets of
 * `key` turn from misses into hits. VMC_OK; VMC_E_CONFIG; VMC_E_KEY_TOO_LARGE;
 * VMC_E_REPAIR (VMC_F_NO_REPAIR: nothing counted). */
int vmc_count_loads(vmc_cache *c, const char *key, size_t klen, uint32_t loader_calls,
                    uint32_t takeovers, uint32_t coalesced, uint32_t coalesced_hits,
                    uint32_t flags);
/* vmc_map_fd -- a new descriptor (close-on-exec) of the handle's file, on an open
 * file description of its own, for a mapping of the caller's; the caller closes
 * it. Not a dup: a dup shares the handle's description, and with it the handle's
 * OFD locks (liveness, owner), which would then stay held as long as anything
 * keeps that copy -- Python's mmap keeps a dup of the descriptor it maps, and a
 * forked child inherits it. The descriptor (>= 0); VMC_E_CLOSED; VMC_E_OS. */
int vmc_map_fd(vmc_cache *c);
/* vmc_detach_view -- replace [addr, addr+len) (page aligned), a separate
 * mapping the caller made of a reservation's pages to hand out its buffer, by
 * private anonymous memory: views of that buffer that outlive the reservation
 * then write nowhere in the file. VMC_OK; VMC_E_CONFIG; VMC_E_OS. */
int vmc_detach_view(void *addr, size_t len);

/* vmc_set_clock_offset -- for tests: this process sees CLOCK_REALTIME + ns
 * (TTL deadlines, expiry checks, access times). Other processes do not. */
void vmc_set_clock_offset(int64_t ns);

/* vmc_committed_timestamp -- T such that every publication up to T is
 * visible (>= 0); VMC_E_REPAIR (VMC_F_NO_REPAIR). */
int64_t vmc_committed_timestamp(vmc_cache *c, uint32_t flags);
/* vmc_persisted_timestamp -- the highest timestamp known durable (>= 0);
 * VMC_E_REPAIR (VMC_F_NO_REPAIR). */
int64_t vmc_persisted_timestamp(vmc_cache *c, uint32_t flags);
/* vmc_persist -- flush the file and raise the persisted watermark; returns
 * it (>= 0). VMC_E_OS (msync failed). */
int64_t vmc_persist(vmc_cache *c);

#endif
