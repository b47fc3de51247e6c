/* vmc_format.h -- the layout of an aiovmc cache file (format version 3).
 *
 * docs/format.md mirrors this header; change both together and bump
 * VMC_FORMAT_VERSION whenever a byte moves.
 *
 *   [ header page | shard table | flight table | index | LRU heaps | pool ]
 *
 * Every reference stored in the file is an offset or a unit number, never a
 * pointer, so processes may map the file at different addresses. Every number
 * read from the file is bounds-checked before it is used to address memory.
 *
 * Locks (process-shared, robust pthread mutexes living in the file):
 *   - shard[i].lock guards shard i: its index slots, its LRU heap, its
 *     counters, the atime of its PUBLISHED entries (an optimistic get also
 *     stores it without the lock: vmc_cache.c, "optimistic reads"); a holder
 *     that changes the index or an entry does so in a write section (`seq`);
 *   - pool.lock guards the allocator: free lists, extent tags, the reserved list
 *     and the links of RESERVED entries.
 *
 * LRU: each shard keeps a 4-ary min-heap of (access time, entry) items, one
 * per entry, whose keys are lower bounds of the entries' atime: a get hit only
 * stores the entry's new atime, and an item is re-keyed when it reaches the
 * top. An entry knows its item's position, so removal takes the item out at
 * once. The least recently used entry of the shard is then the
 * top once settled, and that of the whole cache the settled top with the
 * smallest key over all shards: exact LRU, with a hit writing nothing shared
 * but its own entry (and its handle's counter line).
 * Order: at most one shard lock, then the pool lock. Repair takes every shard
 * lock in ascending order, then the pool lock ("stop the world").
 *
 * Pool: an array of `pool_units` units of `unit_size` bytes, numbered from 1
 * (0 means "none"). The pool is tiled by extents; every extent starts with a
 * 64-bit tag (units | kind << 32 | PREV_FREE) written with a single store, so
 * a linear walk over the tags is valid at every instant, even after a crash in
 * the middle of a split or a merge. Free extents also end with a footer tag so
 * that a freed neighbour can find its left neighbour's start; the footer is
 * believed only when the neighbour's own tag carries PREV_FREE, which the
 * allocator alone writes (value bytes ending an allocated extent may look like
 * a footer: they are never consulted).
 *
 * Entry budget: the pool holds at most max_entries HEAD extents (a count
 * kept in pool.heads); an allocation that would exceed it evicts the
 * global LRU entry exactly as one that finds no room does. The index and the
 * heaps are sized for that budget, not for one entry per unit.
 *
 * An entry is a HEAD extent (struct vmc_entry, then the key, then the value)
 * followed by zero or more BODY extents (struct vmc_body, then more value bytes)
 * chained by `next`. Reservations are always one contiguous HEAD extent so that
 * their buffer is one memoryview; puts may scatter over several extents.
 */
#ifndef VMC_FORMAT_H
#define VMC_FORMAT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define VMC_MAGIC "AIOVMC\x00\x01"
#define VMC_FORMAT_VERSION 3u
#define VMC_PAGE 4096u
#define VMC_SHARDS 64u               /* power of two */
#define VMC_NCLASSES 32              /* free-list size classes: [2^k, 2^(k+1)) units */
#define VMC_MAX_KEY 65535u
#define VMC_MIN_UNIT 64u             /* a unit always holds the 56-byte entry header */
/* The default entry budget: the index and the LRU heaps are sized for one
 * entry per VMC_ENTRY_BYTES pool bytes, or per unit if units are larger (see
 * vmc_entry_budget), and the pool never holds more HEAD extents than that. */
#define VMC_ENTRY_BYTES 128u
#define VMC_MIN_FILE (1u << 20)
#define VMC_MAX_FILE (1ull << 62)      /* sizes stay far from 64-bit overflow */
#define VMC_MAX_UNITS 0xfffffff0u    /* unit numbers are 32-bit */
#define VMC_MAX_CLOCK (1ull << 62)   /* timestamps stay far from int64 overflow */

/* Extent kinds: the high half of a tag (its low bit is PREV_FREE); magic words
 * so garbage rarely passes. */
#define VMC_KIND_FREE 0x45455246u    /* "FREE" */
#define VMC_KIND_HEAD 0x44414548u    /* "HEAD" */
#define VMC_KIND_BODY 0x59444f42u    /* "BODY" */
#define VMC_KIND_FOOT 0x544f4f46u    /* "FOOT": footer of a free extent */

#define VMC_PREV_FREE (1ull << 32)     /* the extent before this one is free */
#define VMC_TAG(units, kind) ((uint64_t)(units) | ((uint64_t)(kind) << 32))
#define VMC_TAG_UNITS(tag) ((uint32_t)(tag))
#define VMC_TAG_KIND(tag) ((uint32_t)((tag) >> 32) & ~1u)

/* The `checksum` of a RESERVED head that is a handle's spare (or a put filling
 * it), on no list, named by its owner's spare slot instead, is the file's
 * spare mark (vmc_spare_mark): this bit, which no reservation nonce has (they
 * are 31 bits, and a put's own reservation has 0), and 31 bits drawn from the
 * file's hash seed. A slot may name a unit inside another entry's value (a
 * stale name, or damage), where the application's bytes could pass for any
 * constant; they pass for a spare only if they hold the file's secret. */
#define VMC_SPARE_BIT 0x80000000u
#define VMC_SPARE_SLOTS 48u          /* spare slots in the header page */

/* Entry states. */
#define VMC_RESERVED 1u              /* allocated, invisible; atime_ns = owner id */
#define VMC_PUBLISHED 2u             /* linked in its shard; stamp = timestamp */
#define VMC_REMOVED 3u               /* unlinked from its shard; its extents are being freed */
#define VMC_DEAD 0u                  /* freed by recovery (or never an entry) */

/* Index slot: (hash >> 32) << 32 | head unit; 0 = empty. Linear probing with
 * backward-shift deletion, so there are no tombstones. */

/* LRU heap item: `gen` is the entry's timestamp's low half at insertion, so an
 * item whose entry was removed, or whose unit now holds another entry, is
 * recognised as dead. */
struct vmc_heap_item {
    uint64_t key;           /* a lower bound of the entry's atime_ns */
    uint32_t unit;
    uint32_t gen;
};
#define VMC_SLOT(tag32, unit) (((uint64_t)(tag32) << 32) | (uint32_t)(unit))
#define VMC_SLOT_UNIT(s) ((uint32_t)(s))
#define VMC_SLOT_TAG(s) ((uint32_t)((s) >> 32))

/* At the start of every HEAD extent: 56 bytes, then key, then value. */
struct vmc_entry {
    uint64_t tag;           /* units | HEAD; pool lock */
    uint32_t next;          /* first BODY extent of the value, 0 = none; pool lock, at allocation */
    uint32_t value_len;     /* pool lock, at allocation */
    uint32_t link_prev;     /* RESERVED: the pool's reserved list; pool lock.
                               PUBLISHED: the position of its LRU heap item; shard lock */
    uint32_t link_next;     /* RESERVED: the pool's reserved list; pool lock. Else unused */
    uint16_t key_len;       /* pool lock, at allocation */
    uint8_t state;          /* RESERVED (pool lock, at allocation) -> PUBLISHED (shard lock)
                               -> REMOVED (pool lock, and the shard lock if it was published);
                               a replaced entry kept as its handle's spare goes on REMOVED ->
                               RESERVED (shard and pool locks: vmc_cache.c, "the spare") */
    uint8_t reserved0;
    uint32_t checksum;      /* over sizes, expiry, timestamp, key and value; shard lock, at publication */
    uint64_t expires_ns;    /* CLOCK_REALTIME deadline, 0 = never; pool lock, at allocation */
    uint64_t stamp;         /* publication timestamp; shard lock, at publication */
    uint64_t atime_ns;      /* PUBLISHED: last access (CLOCK_REALTIME), shard lock, or an
                               optimistic get's compare-and-swap after its validation.
                               RESERVED: the owner id (vmc_flight.h), pool lock. Publication
                               overwrites it before changing the state, so a crash in between
                               leaves a RESERVED entry whose "owner" (a time, >= 2^40) is none. */
};

/* At the start of every BODY extent: 16 bytes, then value bytes. */
struct vmc_body {
    uint64_t tag;           /* units | BODY; pool lock */
    uint32_t next;          /* next BODY extent, 0 = none; pool lock */
    uint32_t head;          /* unit of the HEAD this body belongs to; pool lock */
};

/* At the start of every FREE extent. The last 8 bytes hold VMC_TAG(units, FOOT). */
struct vmc_free {
    uint64_t tag;           /* units | FREE; pool lock */
    uint32_t prev, next;    /* size-class free list; pool lock */
};

struct vmc_shard {
    /* First cache line: all that a get under the lock writes (the lock and the
     * hit or miss count); an optimistic hit writes nothing of its shard. */
    pthread_mutex_t lock;
    uint32_t heap_len;      /* items in this shard's LRU heap */
    uint32_t reserved0;
    uint64_t hits, misses;  /* of gets under the lock (and a hit moved to the misses
                               when its get found the key gone before its copy); gets =
                               every hit (the spare slots' too) + misses */
    /* Second line: written by puts, removals and evictions. */
    uint64_t top_atime;     /* key of the heap's top item (UINT64_MAX if empty): a lower
                               bound of the shard's least recent access, read without the
                               lock by victim selection */
    uint32_t count;         /* entries indexed (expired ones too, until removed) */
    uint32_t reserved1;
    uint64_t puts, evictions, expirations;
    uint64_t seq;           /* the read sequence: odd while a lock holder may change the
                               shard's index slots or entries (or reads access times to
                               choose a victim), even otherwise. A write section opens
                               with a seq_cst increment taken with the lock (+1, or +2
                               if a dead holder or damage left it odd) and closes with
                               a release increment at the unlock; lock holders that
                               only read open none. Read without the lock by optimistic
                               gets (vmc_cache.c, "optimistic reads") */
    /* Every field is written under `lock`; count, top_atime and the counters
     * are also read without it (statistics, len, victim selection) through
     * relaxed atomic loads, so such a reader sees a slightly stale value. */
} __attribute__((aligned(64)));

/* ---- the flight table (vmc_flight.h) ---- */

#define VMC_MAX_FLIGHTS 1024u                /* slots in the table of a file of >= 2 MiB */
#define VMC_MIN_FLIGHTS 64u                  /* a smaller file has fewer (a power of two) */
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

struct vmc_pool {
    pthread_mutex_t lock;
    uint32_t free_head[VMC_NCLASSES];  /* lock */
    uint32_t reserved_head;            /* RESERVED entries, linked by link_prev/link_next; lock */
    uint32_t heads;                    /* HEAD extents in the pool (published, reserved or being
                                          freed): +1 when the allocator takes one, -1 when it
                                          frees one; lock. Never above max_entries (but
                                          in a recovered damaged file: docs/format.md).
                                          Recovery recounts it from the entries it keeps. */
    uint64_t free_units;               /* lock; read without it by statistics */
    uint64_t last_reclaim_ns;          /* when dead owners' reservations were last looked for; lock */
} __attribute__((aligned(64)));

/* A handle's spare slot: where the file names the handle's spare, a RESERVED
 * head on no list, so that a dead owner's spare is found (vmc_reclaim_dead)
 * without a walk over the pool, and where its optimistic gets count their
 * hits. A line of its own: only its owner writes `unit` and `hits`, on every
 * put that refills or renews its spare and every optimistic hit (and any
 * handle's get may take a hit back: uncount_hit). */
struct vmc_spare_slot {
    uint64_t owner;         /* the owner id holding the slot, 0 = free. Taken from 0 by
                               compare-and-swap (no lock: vmc_spare_slot_take_free);
                               set to 0 (release store, `unit` first) by its owner's
                               close and, for a dead owner, by vmc_reclaim_dead and
                               claims (pool lock) and by repair; recovery at open frees
                               all */
    uint32_t unit;          /* the owner's spare or the put filling it (RESERVED, nonce
                               the spare mark), 0 = none; may be stale (the head since
                               published or freed: believe it only with that state, owner
                               and nonce). Written by the owner alone (compare-and-swap:
                               threads of one handle), with its shard lock or the pool
                               lock held; read by others under the pool lock once the
                               owner is dead, or under every lock (repair) */
    uint32_t reserved0;
    uint64_t hits;          /* hits counted by the optimistic gets of the slot's owners
                               (atomic add by the owner, no lock), summed into the
                               statistics with the shards' counters. A hit whose get found
                               the key gone before its copy is taken back from here or
                               from a shard's count, whichever holds one (compare-and-swap,
                               any handle: vmc_cache.c, uncount_hit). Never reset while
                               the file lives: a slot's next owner counts on */
} __attribute__((aligned(64)));

/* The header page. The first block is written once by the creator, before the
 * file is linked into place, and never changes: geometry_check covers it. */
struct vmc_header {
    char magic[8];
    uint32_t format_version;
    uint32_t abi_signature;   /* vmc_abi_signature(): endianness and sizes of shared types */
    uint64_t file_size;
    uint64_t shards_off;
    uint64_t index_off;
    uint64_t heap_off;        /* n_shards heaps of slots_per_shard items */
    uint64_t pool_off;
    uint32_t unit_size;
    uint32_t unit_shift;
    uint32_t pool_units;
    uint32_t n_shards;
    uint32_t slots_per_shard;
    uint32_t policy;
    uint64_t default_ttl_ns;
    uint64_t hash_seed;
    uint64_t flights_off;     /* the flight table: n_flights slots (vmc_flight.h) */
    uint32_t n_flights;       /* a power of two in [VMC_MIN_FLIGHTS, VMC_MAX_FLIGHTS] */
    uint32_t max_entries;     /* the entry budget: at most vmc_entry_budget(pool_units,
                                 unit_shift), less if the creator asked; sizes the tables */
    uint64_t geometry_check;  /* hash of every field above */

    struct vmc_pool pool;

    /* Clocks: atomics, no lock. `clock` has its line to itself: every
     * publication writes it, while every lock taken reads `needs_repair`. */
    uint64_t clock __attribute__((aligned(64)));  /* last timestamp handed out (fetch_add) */
    uint64_t persisted __attribute__((aligned(64))); /* highest timestamp known durable;
                                                        only grows (CAS) */
    uint32_t needs_repair;    /* set by whoever finds a dead lock owner or damage */
    uint32_t fresh;           /* set by the creator: the pool is all zeros, so the first
                                 recovery need not read it; cleared by that recovery */

    /* Single-flight and owners (vmc_flight.c). */
    pthread_mutex_t flight_lock __attribute__((aligned(64)));  /* guards the flight table */
    uint64_t next_owner;      /* last owner id handed out (atomic fetch_add); never reused */
    uint64_t loader_calls;    /* file-wide load counters: atomic adds, read relaxed */
    uint64_t coalesced_gets;
    uint64_t load_takeovers;

    /* Spare slots: one per handle that keeps a spare (vmc_cache.c, "the spare"). */
    struct vmc_spare_slot spares[VMC_SPARE_SLOTS];
};

/* vmc_entry_budget -- the default entry budget (the most HEAD extents) of a
 * pool of `units` units of 2^shift bytes: one per VMC_ENTRY_BYTES bytes, or
 * one per unit if a unit is larger. An entry of 16 B key and 100 B value takes three
 * 64-byte units (192 B), so 64-byte units are not count-limited for it. */
static inline uint64_t vmc_entry_budget(uint64_t units, uint32_t shift)
{
    return (units << shift) / ((1ull << shift) > VMC_ENTRY_BYTES ? (1ull << shift)
                                                                  : VMC_ENTRY_BYTES);
}

_Static_assert(sizeof(struct vmc_entry) == 56, "entry header must stay 56 bytes");
_Static_assert(sizeof(struct vmc_entry) <= VMC_MIN_UNIT, "a unit holds an entry header");
_Static_assert(offsetof(struct vmc_shard, top_atime) == 64 || sizeof(pthread_mutex_t) != 40,
               "a get hit must write the shard's first cache line only");
_Static_assert(sizeof(struct vmc_shard) == 128, "a shard is two cache lines");
_Static_assert(sizeof(struct vmc_spare_slot) == 64, "a spare slot is one cache line");
_Static_assert(sizeof(struct vmc_body) == 16, "body header must stay 16 bytes");
_Static_assert(sizeof(struct vmc_header) <= VMC_PAGE, "header must fit its page");

#endif
