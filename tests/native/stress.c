/* stress.c -- many threads hammering one cache handle, for the sanitizers.
 *
 * Built from the core's sources by tests/test_native_stress.py (and .ci/run)
 * with -fsanitize=thread, or address,undefined; run as
 *     stress PATH THREADS SECONDS_x100
 * Every operation of vmc.h (host-wide single-flight included), and the
 * no-wait calls of the CPython fast path (vmc_cache.h), runs
 * concurrently on a few keys, with values large
 * enough to take the unlocked copy path and the scattered allocation, and
 * small same-size replacements that refill the handle's spare from several
 * threads at once (its naming token), in a file whose entry budget is below
 * the number of keys. Gets race with all of it optimistically. Values
 * verify themselves: [key id u64][seq u64] then bytes derived from both; a get
 * that returns anything else fails the run. Exit status 0: clean.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vmc.h"
#include "vmc_cache.h" /* vmc_get_sink, vmc_get_many_sink, vmc_contains_now: the fast path's no-wait calls */

#define KEYS 48
#define MAX_VALUE (600u * 1024)

static vmc_cache *cache;

/* A sink as vmc_fast.c's: the destination for values of at most 64 KiB. */
struct buf_sink {
    struct vmc_sink base;
    char *buf;
    bool copied;
};

static char *buf_dst(struct vmc_sink *sink, uint64_t len)
{
    struct buf_sink *b = (struct buf_sink *)sink;
    b->copied = len <= VMC_SCRATCH_SIZE;
    return b->copied ? b->buf : NULL;
}

/* A sink as vmc_fast.c's get_many: a 64 KiB destination per key of a batch. */
#define MANY 8
struct many_sink {
    struct vmc_sink base;
    char *buf; /* MANY * VMC_SCRATCH_SIZE bytes */
    bool copied[MANY];
};

static char *many_dst(struct vmc_sink *sink, uint64_t len)
{
    struct many_sink *m = (struct many_sink *)sink;
    m->copied[sink->item] = len <= VMC_SCRATCH_SIZE;
    return m->copied[sink->item] ? m->buf + sink->item * VMC_SCRATCH_SIZE : NULL;
}
static atomic_int failures;
static atomic_long seq_counter;
static double deadline;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(char *v, size_t n, uint64_t id, uint64_t seq)
{
    memcpy(v, &id, 8);
    memcpy(v + 8, &seq, 8);
    for (size_t i = 16; i < n; i++)
        v[i] = (char)(seq * 31 + i * 7 + id);
}

static void fail(const char *what, uint64_t id, long n)
{
    fprintf(stderr, "stress: %s (key %llu, result %ld: %s)\n", what, (unsigned long long)id, n,
            vmc_last_error());
    atomic_fetch_add(&failures, 1);
}

static void verify(const char *v, size_t n, uint64_t id)
{
    uint64_t got_id, seq;
    if (n < 16) {
        fail("value too short", id, (long)n);
        return;
    }
    memcpy(&got_id, v, 8);
    memcpy(&seq, v + 8, 8);
    if (got_id != id) {
        fail("value of another key", id, (long)got_id);
        return;
    }
    for (size_t i = 16; i < n; i++)
        if (v[i] != (char)(seq * 31 + i * 7 + id)) {
            fail("torn value", id, (long)i);
            return;
        }
}

static size_t pick_size(unsigned *r)
{
    unsigned x = rand_r(r) % 100;
    if (x < 70)
        return 16 + rand_r(r) % 2000;
    if (x < 95)
        return 16 + rand_r(r) % 20000;
    return 300000 + rand_r(r) % (MAX_VALUE - 300000); /* the unlocked copy path */
}

static void *worker(void *arg)
{
    unsigned r = (unsigned)(uintptr_t)arg;
    char *buf = malloc(MAX_VALUE), *val = malloc(MAX_VALUE), kout[64];
    while (now_s() < deadline) {
        uint64_t id = (uint64_t)(rand_r(&r) % KEYS);
        char key[32];
        int klen = snprintf(key, sizeof key, "key-%llu", (unsigned long long)id);
        unsigned op = (unsigned)rand_r(&r) % 100;
        long n;
        if (op < 20) {
            n = (long)vmc_get(cache, key, (size_t)klen, buf, MAX_VALUE, 0, VMC_F_WHOLE);
            if (n >= 0)
                verify(buf, (size_t)n, id);
            else if (n != VMC_MISS)
                fail("get", id, n);
        } else if (op < 30) { /* as vmc_fast.c: values up to 64 KiB copied under the lock */
            struct buf_sink sink = {{buf_dst, 0}, buf, false};
            n = (long)vmc_get_sink(cache, key, (size_t)klen, &sink.base, VMC_F_NO_REPAIR);
            if (n == VMC_BUSY)
                n = (long)vmc_get(cache, key, (size_t)klen, NULL, 0, 0, VMC_F_WHOLE);
            else if (n >= 0 && sink.copied)
                verify(buf, (size_t)n, id);
            if (n < 0 && n != VMC_MISS)
                fail("get_sink", id, n);
        } else if (op < 35) { /* as vmc_fast.c's get_many: a batch of keys in one call */
            const char *keys[MANY];
            char names[MANY][32];
            size_t klens[MANY];
            uint64_t ids[MANY];
            int64_t status[MANY];
            for (int i = 0; i < MANY; i++) {
                ids[i] = (uint64_t)(rand_r(&r) % KEYS);
                klens[i] = (size_t)snprintf(names[i], sizeof names[i], "key-%llu",
                                            (unsigned long long)ids[i]);
                keys[i] = names[i];
            }
            struct many_sink sink = {{many_dst, 0}, buf, {false}};
            size_t done = vmc_get_many_sink(cache, keys, klens, MANY, status, &sink.base, 0);
            for (size_t i = 0; i < done; i++)
                if (status[i] >= 0 && sink.copied[i])
                    verify(buf + i * VMC_SCRATCH_SIZE, (size_t)status[i], ids[i]);
            if (done < MANY && status[done] != VMC_BUSY)
                fail("get_many", ids[done], (long)status[done]);
        } else if (op < 60) { /* 40..47: same-size replacements, which refill spares */
            size_t size = op >= 40 && op < 48 ? 200 : pick_size(&r);
            fill(val, size, id, (uint64_t)atomic_fetch_add(&seq_counter, 1));
            n = (long)vmc_put(cache, key, (size_t)klen, val, size, -1, op < 40 ? VMC_F_ADD : 0);
            if (n < 0 && n != VMC_E_FULL)
                fail("put", id, n);
        } else if (op < 68) {
            uint64_t off;
            size_t size = pick_size(&r);
            int64_t rid = vmc_reserve(cache, key, (size_t)klen, size, -1, 0, &off);
            if (rid < 0) {
                if (rid != VMC_E_FULL)
                    fail("reserve", id, (long)rid);
                continue;
            }
            /* The buffer is the caller's mapping: the core knows its offset only. */
            extern char *stress_base;
            fill(stress_base + off, size, id, (uint64_t)atomic_fetch_add(&seq_counter, 1));
            if (op % 3 == 0)
                n = vmc_cancel(cache, (uint64_t)rid);
            else
                n = (long)vmc_publish(cache, (uint64_t)rid, key, (size_t)klen, size);
            if (n < 0 && n != VMC_E_FULL)
                fail("publish or cancel", id, n);
        } else if (op < 78) {
            n = vmc_delete(cache, key, (size_t)klen, op & 1 ? VMC_F_NO_REPAIR : 0);
            if (n < 0)
                fail("delete", id, n);
        } else if (op < 84) {
            n = vmc_evict(cache, NULL, 0, kout, sizeof kout, 0);
            if (n < 0 && n != VMC_MISS)
                fail("evict", id, n);
        } else if (op < 90) {
            n = (long)vmc_get(cache, key, (size_t)klen, buf, 100, 10, 0); /* a part */
            if (n < 0 && n != VMC_MISS)
                fail("get part", id, n);
        } else if (op < 95) {
            struct vmc_stats st;
            int now = vmc_contains_now(cache, key, (size_t)klen);
            if (vmc_statistics(cache, &st) < 0 || vmc_count(cache) < 0 ||
                vmc_contains(cache, key, (size_t)klen) < 0 || (now < 0 && now != VMC_BUSY))
                fail("statistics", id, 0);
        } else if (op < 97) {
            if (vmc_purge_shard(cache, (int)(id % 64)) < 0)
                fail("purge", id, 0);
        } else if (op < 99) { /* a host-wide single-flight load */
            struct vmc_ticket t = {0};
            for (int round = 0; round < 4; round++) {
                int j = vmc_flight_join(cache, key, (size_t)klen, 1000000000, &t);
                if (j == VMC_FLIGHT_LEAD || j == VMC_FLIGHT_TAKEOVER) {
                    size_t size = 16 + rand_r(&r) % 1000;
                    fill(val, size, id, (uint64_t)atomic_fetch_add(&seq_counter, 1));
                    int64_t ts = vmc_put(cache, key, (size_t)klen, val, size, -1, 0);
                    if (vmc_flight_end(cache, &t, ts > 0 ? VMC_END_VALUE : VMC_END_FAILED) < 0)
                        fail("flight end", id, 0);
                    break;
                }
                if (j == VMC_FLIGHT_WAIT) {
                    if (vmc_flight_wait(cache, &t) < 0)
                        fail("flight wait", id, 0);
                    continue;
                }
                if (j < 0)
                    fail("flight join", id, j);
                break; /* VALUE, NONE, FULL */
            }
        } else {
            if (vmc_clear_shard(cache, (int)(id % 64)) < 0 || vmc_committed_timestamp(cache, VMC_F_NO_REPAIR) < 0)
                fail("clear", id, 0);
        }
    }
    free(buf);
    free(val);
    return NULL;
}

char *stress_base;

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: stress PATH THREADS SECONDS_x100\n");
        return 2;
    }
    int threads = atoi(argv[2]);
    deadline = now_s() + atoi(argv[3]) / 100.0;
    /* A budget under KEYS: puts evict because the entry count is reached as
     * well as for room. */
    struct vmc_config cfg = {.size = 8u << 20, .extent_size = 256, .policy = VMC_POLICY_LRU,
                             .mode = 0600, .max_entries = KEYS * 2 / 3};
    struct vmc_info info;
    if (vmc_open(argv[1], &cfg, VMC_F_CREATE | VMC_F_RESET, &cache, &info) < 0) {
        fprintf(stderr, "stress: open: %s\n", vmc_last_error());
        return 1;
    }
    stress_base = mmap(NULL, info.file_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.fd, 0);
    if (stress_base == MAP_FAILED || vmc_attach(cache, stress_base, &info) < 0) {
        fprintf(stderr, "stress: attach: %s\n", vmc_last_error());
        return 1;
    }
    pthread_t t[64];
    if (threads > 64)
        threads = 64;
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i * 7919 + 1));
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    vmc_close(cache);
    vmc_free(cache);
    munmap(stress_base, info.file_size);
    int bad = atomic_load(&failures);
    printf("stress: %d threads, %ld values written, %d failures\n", threads,
           atomic_load(&seq_counter), bad);
    return bad ? 1 : 0;
}
