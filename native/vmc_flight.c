/* vmc_flight.c -- host-wide single-flight and owner liveness (see vmc_flight.h).
 *
 * A wave of one key, seen from the table:
 *
 *   join (no slot for the key)      -> LOADING, owner = leader      (VMC_FLIGHT_LEAD)
 *   join (LOADING, leader alive,
 *         younger than the timeout) -> unchanged                    (VMC_FLIGHT_WAIT)
 *   join (LOADING, leader dead or
 *         older than the timeout;
 *         or ORPHANED)              -> LOADING, owner = joiner      (VMC_FLIGHT_TAKEOVER)
 *   end VALUE / NONE                -> DONE, outcome                (waiters: VALUE / NONE)
 *   end FAILED (error, cancel),
 *   close of the leader's handle    -> ORPHANED                     (the next joiner leads)
 *
 * `gen` goes up by one at every change of leader and at every end, so a ticket
 * (slot, gen) names one leadership: an end whose ticket is stale (its wave was
 * taken over) changes nothing, and a waiter whose ticket's slot has moved on
 * and shows DONE knows how the key's last wave since it joined ended (its own,
 * or the one that took it over). A slot keeps its key after the wave ends,
 * until another key needs the room (the slot ended longest ago is reused
 * first), so waiters woken late still find their outcome.
 *
 * Every slot field is written under hdr->flight_lock in an order that leaves
 * a harmless slot if the writer dies half way (the key before the state, the
 * state before gen), so a dead lock owner needs no repair: the lock is made
 * consistent and used again.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vmc_flight.h"
#include "vmc_mutex.h"

/* ---- calls in flight: the same guard as vmc_cache.c's (vmc_close waits for them) ---- */

static bool enter(vmc_cache *c)
{
    atomic_fetch_add(&c->active, 1);
    if (atomic_load(&c->closed)) {
        atomic_fetch_sub(&c->active, 1);
        return false;
    }
    return true;
}

static void leave(vmc_cache *c)
{
    atomic_fetch_sub(&c->active, 1);
}

#define ENTER(c)                                                                  \
    do {                                                                          \
        if (!enter(c))                                                            \
            return vmc_fail(VMC_E_CLOSED, "the cache handle is closed");          \
    } while (0)

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- owners ---- */

static int owner_lock(int fd, short cmd, short type, uint64_t owner, struct flock *fl)
{
    *fl = (struct flock){.l_type = type, .l_whence = SEEK_SET,
                         .l_start = (off_t)(VMC_OWNER_BASE + owner), .l_len = 1};
    int rc;
    do
        rc = fcntl(fd, cmd, fl);
    while (rc != 0 && errno == EINTR);
    return rc;
}

/* vmc_owner_take -- a fresh owner id for this handle, and its lock. Ids only
 * grow; a counter found at or beyond VMC_OWNER_LIMIT (2^40 attaches: damage,
 * in practice) starts again from 1, skipping the ids of live handles (their
 * locks are held). */
int vmc_owner_take(vmc_cache *c)
{
    struct flock fl;
    for (int attempt = 0; attempt < 64; attempt++) {
        uint64_t id = __atomic_add_fetch(&c->hdr->next_owner, 1, __ATOMIC_RELAXED);
        if (id == 0 || id >= VMC_OWNER_LIMIT) {
            uint64_t seen = id;
            __atomic_compare_exchange_n(&c->hdr->next_owner, &seen, 0, false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
            continue;
        }
        if (owner_lock(c->fd, F_OFD_SETLK, F_WRLCK, id, &fl) == 0) {
            c->owner = id;
            return VMC_OK;
        }
        if (errno != EAGAIN && errno != EACCES)
            return vmc_fail_errno("fcntl(F_OFD_SETLK)", c->path);
        /* Held already: the counter went back (damage, or a restored file). */
    }
    return vmc_fail(VMC_E_CORRUPT, "%s: no free owner id after 64 attempts (next_owner %llu)",
                    c->path, (unsigned long long)__atomic_load_n(&c->hdr->next_owner,
                                                                 __ATOMIC_RELAXED));
}

/* vmc_owner_alive -- whether the handle with this owner id is still open. The
 * caller's own id is alive (its own lock never conflicts with itself). */
bool vmc_owner_alive(vmc_cache *c, uint64_t owner)
{
    if (owner == 0 || owner >= VMC_OWNER_LIMIT)
        return false;
    if (owner == c->owner)
        return true;
    struct flock fl;
    if (owner_lock(c->fd, F_OFD_GETLK, F_WRLCK, owner, &fl) != 0)
        return true; /* cannot tell: never free what may be in use */
    return fl.l_type != F_UNLCK;
}

/* ---- the table ---- */

static struct vmc_flight *slots(vmc_cache *c)
{
    return (struct vmc_flight *)(c->base + c->hdr->flights_off);
}

int vmc_flight_init_lock(vmc_cache *c)
{
    return vmc_mutex_init(&c->hdr->flight_lock);
}

/* vmc_flight_recover -- the sole user at open: no load is in flight, no owner alive. */
void vmc_flight_recover(vmc_cache *c)
{
    memset(slots(c), 0, (size_t)c->n_flights * sizeof(struct vmc_flight));
    /* Recovery dropped every reservation and the table holds no load: no
     * record names an owner any more, so ids may start again. */
    c->hdr->next_owner = 0;
}

static int table_lock(vmc_cache *c)
{
    int rc = pthread_mutex_lock(&c->hdr->flight_lock);
    if (rc == EOWNERDEAD) /* slots stay harmless at every step: see the top */
        rc = pthread_mutex_consistent(&c->hdr->flight_lock);
    if (rc != 0) {
        errno = rc;
        return vmc_fail_errno("pthread_mutex_lock", c->path);
    }
    return VMC_OK;
}

static void table_unlock(vmc_cache *c)
{
    pthread_mutex_unlock(&c->hdr->flight_lock);
}

static void wake_all(struct vmc_flight *s)
{
    syscall(SYS_futex, &s->gen, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void bump(struct vmc_flight *s)
{
    __atomic_store_n(&s->gen, s->gen + 1, __ATOMIC_RELEASE);
}

static bool holds_key(const struct vmc_flight *s, uint64_t hash, size_t klen)
{
    return s->state != VMC_SLOT_FREE && s->hash == hash && s->key_len == klen;
}

/* lead -- make this handle the leader of slot s, from now. */
static int lead(vmc_cache *c, struct vmc_flight *s, int64_t now, int status, struct vmc_ticket *t)
{
    s->owner = c->owner;
    s->started_ns = (uint64_t)now;
    s->state = VMC_SLOT_LOADING;
    bump(s);
    t->gen = s->gen;
    t->wait_ns = 0;
    return status;
}

static int find(vmc_cache *c, uint64_t hash, size_t klen, int64_t load_timeout_ns,
                int64_t now, struct vmc_ticket *t)
{
    struct vmc_flight *table = slots(c);
    uint32_t mask = c->n_flights - 1;
    uint32_t home = (uint32_t)(hash >> 40) & mask;
    struct vmc_flight *room = NULL;
    /* A key may use any slot: the whole table (1024 slots, 32 KiB, at most) is
     * looked at, so a miss falls back to its process only when every slot holds
     * a live load. A window of 16 slots from the home slot made that happen with
     * half the table free (adversarial test: 813 loader calls for 800 keys). */
    for (uint32_t i = 0; i < c->n_flights; i++) {
        uint32_t at = (home + i) & mask;
        struct vmc_flight *s = &table[at];
        if (!holds_key(s, hash, klen)) {
            /* Room for a new key: a free slot, else the one ended longest ago
             * (a load whose leader died ended when it died). */
            if (s->state == VMC_SLOT_FREE) {
                if (room == NULL || room->state != VMC_SLOT_FREE)
                    room = s;
            } else if ((room == NULL ||
                        (room->state != VMC_SLOT_FREE && s->started_ns < room->started_ns)) &&
                       (s->state != VMC_SLOT_LOADING || !vmc_owner_alive(c, s->owner))) {
                room = s;
            }
            continue;
        }
        t->slot = at + 1;
        if (s->state == VMC_SLOT_DONE)
            return lead(c, s, now, VMC_FLIGHT_LEAD, t);  /* a new wave */
        if (s->state != VMC_SLOT_LOADING || !vmc_owner_alive(c, s->owner))
            return lead(c, s, now, VMC_FLIGHT_TAKEOVER, t);  /* orphaned, dead leader */
        int64_t started = (int64_t)s->started_ns;
        int64_t age = now > started ? now - started : 0;
        if (load_timeout_ns >= 0 && age >= load_timeout_ns)
            return lead(c, s, now, VMC_FLIGHT_TAKEOVER, t);  /* a live leader, too slow */
        t->gen = s->gen;
        t->wait_ns = (int64_t)VMC_FLIGHT_PROBE_MS * 1000000;
        if (load_timeout_ns >= 0 && load_timeout_ns - age < t->wait_ns)
            t->wait_ns = load_timeout_ns - age;
        return VMC_FLIGHT_WAIT;
    }
    if (room == NULL) {
        t->slot = 0;
        return VMC_FLIGHT_FULL;
    }
    room->state = VMC_SLOT_FREE; /* until the key is complete: see the top */
    room->hash = hash;
    room->key_len = (uint16_t)klen;
    t->slot = (uint32_t)(room - table) + 1;
    return lead(c, room, now, VMC_FLIGHT_LEAD, t);
}

int vmc_flight_join(vmc_cache *c, const char *key, size_t klen, int64_t load_timeout_ns,
                    struct vmc_ticket *t)
{
    if (klen > VMC_MAX_KEY)
        return vmc_fail(VMC_E_KEY_TOO_LARGE, "key of %zu bytes exceeds the maximum of %u bytes",
                        klen, VMC_MAX_KEY);
    ENTER(c);
    if (t->slot > c->n_flights) {
        leave(c);
        return vmc_fail(VMC_E_CONFIG, "flight ticket names slot %u of %u", t->slot, c->n_flights);
    }
    uint64_t hash = vmc_hash_key(c, key, klen);
    int rc = table_lock(c);
    if (rc == VMC_OK) {
        struct vmc_flight *s = t->slot ? &slots(c)[t->slot - 1] : NULL;
        if (s && s->state == VMC_SLOT_DONE && s->gen != t->gen &&
            holds_key(s, hash, klen))
            rc = s->outcome == VMC_END_VALUE ? VMC_FLIGHT_VALUE : VMC_FLIGHT_NONE;
        else
            rc = find(c, hash, klen, load_timeout_ns, monotonic_ns(), t);
        table_unlock(c);
    }
    leave(c);
    return rc;
}

int vmc_flight_wait(vmc_cache *c, const struct vmc_ticket *t)
{
    if (t->slot == 0 || t->slot > c->n_flights)
        return vmc_fail(VMC_E_CONFIG, "flight ticket names slot %u of %u", t->slot, c->n_flights);
    ENTER(c);
    uint32_t *word = &slots(c)[t->slot - 1].gen;
    leave(c);
    /* Not counted as a call in flight, so that closing the handle never waits
     * for a sleeper; the futex reads nothing once the file is unmapped (EFAULT). */
    int64_t ns = t->wait_ns > 0 ? t->wait_ns : 0;
    struct timespec timeout = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    syscall(SYS_futex, word, FUTEX_WAIT, t->gen, &timeout, NULL, 0);
    return VMC_OK;
}

int vmc_flight_kick(vmc_cache *c, const struct vmc_ticket *t)
{
    if (t->slot == 0 || t->slot > c->n_flights)
        return vmc_fail(VMC_E_CONFIG, "flight ticket names slot %u of %u", t->slot, c->n_flights);
    ENTER(c);
    wake_all(&slots(c)[t->slot - 1]);
    leave(c);
    return VMC_OK;
}

int vmc_flight_end(vmc_cache *c, const struct vmc_ticket *t, int outcome)
{
    if (t->slot == 0 || t->slot > c->n_flights)
        return vmc_fail(VMC_E_CONFIG, "flight ticket names slot %u of %u", t->slot, c->n_flights);
    if (outcome != VMC_END_VALUE && outcome != VMC_END_NONE && outcome != VMC_END_FAILED)
        return vmc_fail(VMC_E_CONFIG, "unknown flight outcome %d", outcome);
    ENTER(c);
    struct vmc_flight *s = &slots(c)[t->slot - 1];
    int rc = table_lock(c);
    bool ended = false;
    if (rc == VMC_OK) {
        if (s->state == VMC_SLOT_LOADING && s->gen == t->gen && s->owner == c->owner) {
            s->outcome = (uint8_t)outcome;
            s->started_ns = (uint64_t)monotonic_ns();
            s->state = outcome == VMC_END_FAILED ? VMC_SLOT_ORPHANED : VMC_SLOT_DONE;
            bump(s);
            ended = true;
        }
        table_unlock(c);
    }
    if (ended)
        wake_all(s);
    leave(c);
    return rc < 0 ? rc : ended;
}

/* vmc_flight_release_owner -- orphan the loads this handle leads (it is
 * closing), so that their waiters take over at once. */
void vmc_flight_release_owner(vmc_cache *c)
{
    if (c->owner == 0 || table_lock(c) != VMC_OK)
        return;
    struct vmc_flight *table = slots(c);
    for (uint32_t i = 0; i < c->n_flights; i++) {
        struct vmc_flight *s = &table[i];
        if (s->state == VMC_SLOT_LOADING && s->owner == c->owner) {
            s->state = VMC_SLOT_ORPHANED;
            s->started_ns = (uint64_t)monotonic_ns();
            bump(s);
            wake_all(s);
        }
    }
    table_unlock(c);
}

/* vmc_flights_in_use -- loads in flight whose leader is alive (a dead
 * leader's slot is reused or taken over by the next joiner). */
int64_t vmc_flights_in_use(vmc_cache *c)
{
    ENTER(c);
    int64_t n = 0;
    int rc = table_lock(c);
    if (rc == VMC_OK) {
        struct vmc_flight *table = slots(c);
        for (uint32_t i = 0; i < c->n_flights; i++)
            n += table[i].state == VMC_SLOT_LOADING && vmc_owner_alive(c, table[i].owner);
        table_unlock(c);
    }
    leave(c);
    return rc < 0 ? rc : n;
}
