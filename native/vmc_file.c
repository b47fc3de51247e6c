/* vmc_file.c -- creating, attaching to and detaching from a cache file.
 *
 * Creation is atomic: the header is written into a temporary file in the same
 * directory, which is then link()ed into place, so no opener ever sees a half
 * written header; a concurrent creator that loses the race attaches to the
 * winner's file. The pool of a new file is all zeros; the first attacher's
 * recovery turns it into one free extent and initialises the locks.
 *
 * Liveness: every handle holds a shared open-file-description lock on byte 1
 * of the file; openers serialise on an exclusive lock on byte 0. An opener
 * that can lock byte 1 exclusively knows that no other process uses the file
 * (cleanly closed or killed alike: the kernel drops OFD locks with the last
 * descriptor) and recovers it before anyone else can attach.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmc_cache.h"
#include "vmc_flight.h"
#include "vmc_mutex.h"
#include "vmc_pool.h"
#include "vmc_recover.h"
#include "vmc_repair.h"

#define OPENING_BYTE 0
#define LIVENESS_BYTE 1
#define TEMP_BYTE 2      /* locked by a creator on its temporary file */

static int ofd_lock(int fd, short type, off_t byte, bool wait)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    int rc;
    do
        rc = fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl);
    while (rc != 0 && errno == EINTR);
    return rc;
}

static uint64_t round_up(uint64_t n, uint64_t to)
{
    return (n + to - 1) / to * to;
}

/* abi_signature -- what must match for two builds to share a file: byte
 * order and the sizes and offsets of the shared structures. */
static uint32_t abi_signature(void)
{
#ifdef __GLIBC__
    const uint64_t libc = 1; /* the mutex layout is the C library's */
#else
    const uint64_t libc = 2;
#endif
    uint64_t parts[] = {
        0x0102030405060708ull,         /* hashed as bytes: differs by endianness */
        libc,
        sizeof(pthread_mutex_t),       sizeof(struct vmc_shard),
        sizeof(struct vmc_entry),      sizeof(struct vmc_body),
        sizeof(struct vmc_header),     offsetof(struct vmc_header, pool),
        offsetof(struct vmc_header, clock),
        offsetof(struct vmc_header, flight_lock), sizeof(struct vmc_flight),
    };
    return (uint32_t)vmc_hash(parts, sizeof parts, 0x61696f766d63ull);
}

static uint64_t geometry_check(const struct vmc_header *h)
{
    return vmc_hash(h, offsetof(struct vmc_header, geometry_check), 0x67656f6dull);
}

static uint64_t shards_bytes(void)
{
    return round_up(VMC_SHARDS * sizeof(struct vmc_shard), VMC_PAGE);
}

static uint64_t flights_bytes(uint32_t flights)
{
    return round_up((uint64_t)flights * sizeof(struct vmc_flight), VMC_PAGE);
}

static uint64_t isqrt(uint64_t n)
{
    uint64_t r = 0;
    for (uint64_t bit = 1ull << 62; bit; bit >>= 2) {
        if (n >= r + bit) {
            n -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
    }
    return r;
}

/* slots_for -- index slots (and heap items) per shard for a pool that holds
 * at most `entries` entries (vmc_entry_budget). A shard holds at most
 * max_load = 8/9 of them; max_load is a shard's share m of the budget plus
 * five standard deviations of how keys spread over shards (sqrt m), so that
 * even a pool holding its whole budget practically never fills one shard
 * (which would then evict its own oldest entry, out of LRU order). */
static uint32_t slots_for(uint64_t entries)
{
    uint64_t m = entries / VMC_SHARDS;
    uint64_t max_load = m + 5 * isqrt(m) + 8;
    return (uint32_t)(max_load + max_load / 8);
}

static uint64_t index_bytes(uint32_t slots)
{
    return round_up((uint64_t)VMC_SHARDS * slots * sizeof(uint64_t), VMC_PAGE);
}

static uint64_t heap_bytes(uint32_t slots)
{
    return round_up((uint64_t)VMC_SHARDS * slots * sizeof(struct vmc_heap_item), VMC_PAGE);
}

static uint64_t tables_bytes(uint32_t slots)
{
    return index_bytes(slots) + heap_bytes(slots);
}

static int validate_config(const struct vmc_config *cfg)
{
    if (cfg->size < VMC_MIN_FILE)
        return vmc_fail(VMC_E_CONFIG, "size %llu is below the minimum of 1 MiB",
                        (unsigned long long)cfg->size);
    if (cfg->size > VMC_MAX_FILE)
        return vmc_fail(VMC_E_CONFIG, "size %llu is above the maximum of 2^62 bytes",
                        (unsigned long long)cfg->size);
    uint32_t u = cfg->extent_size;
    if (u < VMC_MIN_UNIT || (u & (u - 1)) != 0 || u > cfg->size)
        return vmc_fail(VMC_E_CONFIG,
                        "extent_size %u must be a power of two between %u and size (%llu)", u,
                        VMC_MIN_UNIT,
                        (unsigned long long)cfg->size);
    if (cfg->max_entries > VMC_MAX_UNITS)
        return vmc_fail(VMC_E_CONFIG, "max_entries %llu is above the maximum of %u",
                        (unsigned long long)cfg->max_entries, VMC_MAX_UNITS);
    if (cfg->policy != VMC_POLICY_LRU && cfg->policy != VMC_POLICY_NONE)
        return vmc_fail(VMC_E_CONFIG, "unknown policy %u", cfg->policy);
    if (cfg->mode > 07777)
        return vmc_fail(VMC_E_CONFIG, "mode %o is not a permission mode", cfg->mode);
    return VMC_OK;
}

/* entries_for -- the entry budget of a pool of `units` units: the default
 * (vmc_entry_budget), or the creator's cap if lower (0: no cap). */
static uint64_t entries_for(uint64_t units, uint32_t shift, uint64_t cap)
{
    uint64_t budget = vmc_entry_budget(units, shift);
    return cap && cap < budget ? cap : budget;
}

static uint64_t pool_bytes_with_tables(uint64_t units, uint32_t shift, uint64_t cap)
{
    return tables_bytes(slots_for(entries_for(units, shift, cap))) + (units << shift);
}

/* pool_units_for -- the most units that fit after index_off with their
 * tables (a binary search: the bytes needed grow with the units). */
static uint64_t pool_units_for(uint64_t size, uint64_t index_off, uint32_t shift, uint64_t cap)
{
    uint64_t avail = size - index_off;
    uint64_t lo = 0, hi = avail >> shift; /* lo fits (or is 0); hi + 1 does not */
    while (lo < hi) {
        uint64_t mid = hi - (hi - lo) / 2;
        if (pool_bytes_with_tables(mid, shift, cap) <= avail)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* layout -- the geometry of a file of cfg->size bytes (rounded up to a page).
 * The flight table has VMC_MAX_FLIGHTS slots unless that would leave the pool
 * under 80% of the file (files under 2 MiB): then the most that fit. */
static int layout(struct vmc_header *h, const struct vmc_config *cfg)
{
    uint64_t size = round_up(cfg->size, VMC_PAGE);
    uint32_t shift = (uint32_t)__builtin_ctz(cfg->extent_size);
    uint32_t flights = VMC_MAX_FLIGHTS;
    uint64_t index_off, units;
    for (;; flights /= 2) {
        index_off = VMC_PAGE + shards_bytes() + flights_bytes(flights);
        units = pool_units_for(size, index_off, shift, cfg->max_entries);
        if (flights == VMC_MIN_FLIGHTS || (units > 0 && (units << shift) * 5 >= size * 4))
            break;
    }
    if (units > VMC_MAX_UNITS)
        return vmc_fail(VMC_E_CONFIG, "size %llu needs more than 2^32 extents of %u bytes: "
                                      "use a larger extent_size",
                        (unsigned long long)size, cfg->extent_size);
    uint64_t entries = entries_for(units, shift, cfg->max_entries);
    uint32_t slots = slots_for(entries);
    if (cfg->max_entries > entries && units > 0)
        return vmc_fail(VMC_E_CONFIG,
                        "max_entries %llu is more than a pool of %llu bytes in %u-byte extents "
                        "can hold: at most %llu (one entry per %u bytes)",
                        (unsigned long long)cfg->max_entries, (unsigned long long)(units << shift),
                        cfg->extent_size, (unsigned long long)entries,
                        cfg->extent_size > VMC_ENTRY_BYTES ? cfg->extent_size : VMC_ENTRY_BYTES);
    if (units == 0 || entries == 0 || (units << shift) * 5 < size * 4)
        return vmc_fail(VMC_E_CONFIG,
                        "extent_size %u does not suit a file of %llu bytes: the usable pool "
                        "would be %llu bytes, less than 80%% of it (%s)",
                        cfg->extent_size, (unsigned long long)size,
                        (unsigned long long)(units << shift),
                        tables_bytes(slots) > (units << shift) / 16
                            ? "the index and LRU heaps sized for its entry budget take the "
                              "rest: use a larger size or extent_size"
                            : "use a smaller extent_size");
    memset(h, 0, sizeof *h);
    memcpy(h->magic, VMC_MAGIC, 8);
    h->format_version = VMC_FORMAT_VERSION;
    h->abi_signature = abi_signature();
    h->file_size = size;
    h->shards_off = VMC_PAGE;
    h->index_off = index_off;
    h->heap_off = index_off + index_bytes(slots);
    h->pool_off = h->heap_off + heap_bytes(slots);
    h->unit_size = cfg->extent_size;
    h->unit_shift = shift;
    h->pool_units = (uint32_t)units;
    h->n_shards = VMC_SHARDS;
    h->slots_per_shard = slots;
    h->policy = cfg->policy;
    h->default_ttl_ns = cfg->default_ttl_ns;
    h->flights_off = VMC_PAGE + shards_bytes();
    h->n_flights = flights;
    h->max_entries = (uint32_t)entries;
    if (getrandom(&h->hash_seed, sizeof h->hash_seed, 0) != sizeof h->hash_seed)
        h->hash_seed = vmc_now_ns() ^ ((uint64_t)getpid() << 32);
    h->geometry_check = geometry_check(h);
    h->fresh = 1;
    return VMC_OK;
}

/* validate_header -- refuse anything that is not a sound header of this version for
 * a file of `size` bytes. */
static int validate_header(const struct vmc_header *h, uint64_t size, const char *path)
{
    if (memcmp(h->magic, VMC_MAGIC, 8) != 0)
        return vmc_fail(VMC_E_FORMAT, "%s is not an aiovmc cache file (no aiovmc magic)", path);
    if (h->format_version != VMC_FORMAT_VERSION)
        return vmc_fail(VMC_E_FORMAT,
                        "%s has format version %u; this aiovmc reads version %u only (recreate "
                        "the file with reset=True once no process of the older version uses it)",
                        path, h->format_version, VMC_FORMAT_VERSION);
    if (h->abi_signature != abi_signature())
        return vmc_fail(VMC_E_FORMAT,
                        "%s was made by an incompatible build (different byte order or lock "
                        "layout)", path);
    if (h->geometry_check != geometry_check(h))
        return vmc_fail(VMC_E_FORMAT, "%s has a corrupt header (geometry checksum mismatch)",
                        path);
    if (h->file_size != size)
        return vmc_fail(VMC_E_FORMAT, "%s is truncated or extended: its header says %llu bytes, "
                                      "the file has %llu",
                        path, (unsigned long long)h->file_size, (unsigned long long)size);
    uint32_t u = h->unit_size;
    bool sound = u >= VMC_MIN_UNIT && (u & (u - 1)) == 0 && h->unit_shift < 32 &&
                 (1u << h->unit_shift) == u && h->n_shards == VMC_SHARDS &&
                 h->shards_off == VMC_PAGE && h->flights_off == VMC_PAGE + shards_bytes() &&
                 h->n_flights >= VMC_MIN_FLIGHTS && h->n_flights <= VMC_MAX_FLIGHTS &&
                 (h->n_flights & (h->n_flights - 1)) == 0 &&
                 h->index_off == h->flights_off + flights_bytes(h->n_flights) &&
                 h->slots_per_shard >= 1 && h->max_entries >= 1 &&
                 h->max_entries <= vmc_entry_budget(h->pool_units, h->unit_shift) &&
                 h->slots_per_shard == slots_for(h->max_entries) &&
                 h->heap_off == h->index_off + index_bytes(h->slots_per_shard) &&
                 h->pool_off == h->heap_off + heap_bytes(h->slots_per_shard) &&
                 h->pool_units >= 1 && h->pool_units <= VMC_MAX_UNITS &&
                 h->pool_off + ((uint64_t)h->pool_units << h->unit_shift) <= size &&
                 (h->policy == VMC_POLICY_LRU || h->policy == VMC_POLICY_NONE);
    if (!sound)
        return vmc_fail(VMC_E_FORMAT, "%s has an inconsistent header geometry", path);
    return VMC_OK;
}

/* read_header -- read and validate the header of the file open on fd, whose size
 * is size: VMC_OK; VMC_E_FORMAT (too small, foreign, another version, corrupt);
 * VMC_E_OS. */
static int read_header(int fd, off_t size, const char *path, struct vmc_header *h)
{
    if ((uint64_t)size < sizeof *h)
        return vmc_fail(VMC_E_FORMAT, "%s is too small (%lld bytes) to be an aiovmc cache file",
                        path, (long long)size);
    if (pread(fd, h, sizeof *h, 0) != (ssize_t)sizeof *h)
        return vmc_fail_errno("pread", path);
    return validate_header(h, (uint64_t)size, path);
}

static int reserve_space(int fd, uint64_t size, const char *path)
{
    int rc = posix_fallocate(fd, 0, (off_t)size);
    if (rc == EOPNOTSUPP || rc == EINVAL) {
        if (ftruncate(fd, (off_t)size) == 0)
            return VMC_OK;
        return vmc_fail_errno("ftruncate", path);
    }
    if (rc != 0) {
        errno = rc;
        return vmc_fail(VMC_E_OS, "cannot reserve %llu bytes for %s: %s",
                        (unsigned long long)size, path, strerror(rc));
    }
    return VMC_OK;
}

/* sweep_dead_temporaries -- remove the temporary files (<path>.<pid>.<hex>.tmp)
 * of creators that died before linking them: full size, and in RAM on tmpfs.
 * A live creator holds a lock on TEMP_BYTE of its temporary; a temporary whose
 * lock can be taken has no creator left (the kernel dropped the lock with it,
 * in whatever pid namespace it ran). */
static void sweep_dead_temporaries(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t blen = strlen(base);
    char *dir = slash ? strndup(path, (size_t)(slash - path) + 1) : strdup(".");
    DIR *d = dir ? opendir(dir) : NULL;
    free(dir);
    if (d == NULL)
        return; /* best effort: creation goes on */
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        const char *name = ent->d_name, *p = name + blen;
        size_t nlen = strlen(name);
        if (nlen <= blen + 5 || strncmp(name, base, blen) != 0 || *p++ != '.' ||
            strcmp(name + nlen - 4, ".tmp") != 0)
            continue;
        size_t digits = strspn(p, "0123456789");
        const char *hex = p + digits + 1, *end = name + nlen - 4;
        if (digits == 0 || p[digits] != '.' || hex >= end ||
            strspn(hex, "0123456789abcdef") != (size_t)(end - hex))
            continue;
        int fd = openat(dirfd(d), name, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            continue;
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() &&
            ofd_lock(fd, F_WRLCK, TEMP_BYTE, false) == 0)
            unlinkat(dirfd(d), name, 0);
        close(fd);
    }
    closedir(d);
}

/* create_file -- create path atomically. Returns 1 if this call created it,
 * 0 if another process did first, or a failure. */
static int create_file(const char *path, const struct vmc_config *cfg)
{
    struct vmc_header h;
    int rc = layout(&h, cfg);
    if (rc < 0)
        return rc;
    size_t n = strlen(path) + 64;
    char *tmp = malloc(n);
    if (tmp == NULL)
        return vmc_fail(VMC_E_OS, "out of memory");
    uint64_t token; /* not the hash seed: a directory listing must not reveal it */
    if (getrandom(&token, sizeof token, 0) != sizeof token)
        token = vmc_now_ns();
    snprintf(tmp, n, "%s.%d.%llx.tmp", path, (int)getpid(), (unsigned long long)token);
    sweep_dead_temporaries(path);
    int fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, cfg->mode);
    if (fd < 0) {
        /* Name the file the caller asked for, not our temporary. */
        int err = errno;
        if (err == ENOENT)
            rc = vmc_fail(VMC_E_OS, "cannot create %s: its directory does not exist", path);
        else
            rc = vmc_fail(VMC_E_OS, "cannot create %s: %s (errno %d)", path, strerror(err), err);
        free(tmp);
        return rc;
    }
    /* Held until the end: a sweeper that can take it knows this creator died. */
    if (ofd_lock(fd, F_WRLCK, TEMP_BYTE, false) != 0)
        rc = vmc_fail_errno("fcntl(F_OFD_SETLK)", tmp);
    else if (fchmod(fd, cfg->mode) != 0)
        rc = vmc_fail_errno("fchmod", tmp);
    else if ((rc = reserve_space(fd, h.file_size, path)) == VMC_OK &&
             pwrite(fd, &h, sizeof h, 0) != (ssize_t)sizeof h)
        rc = vmc_fail_errno("pwrite", tmp);
    if (rc == VMC_OK) {
        if (link(tmp, path) == 0)
            rc = 1;
        else if (errno == EEXIST || errno == ENOENT) /* ENOENT: swept in the instant before
                                                        the lock; the caller tries again */
            rc = 0;
        else
            rc = vmc_fail_errno("link", path);
    }
    unlink(tmp);
    close(fd);
    free(tmp);
    return rc;
}

/* reset_file -- empty an aiovmc file nobody else uses and give it a new geometry. */
static int reset_file(int fd, const char *path, const struct vmc_config *cfg)
{
    if (ofd_lock(fd, F_WRLCK, LIVENESS_BYTE, false) != 0)
        return vmc_fail(VMC_E_CONFIG, "cannot reset %s: it is open (by another process, or another handle of this one)", path);
    char magic[8] = {0};
    if (pread(fd, magic, 8, 0) != 8 || memcmp(magic, VMC_MAGIC, 8) != 0)
        return vmc_fail(VMC_E_FORMAT, "refusing to reset %s: it is not an aiovmc cache file",
                        path);
    struct vmc_header h;
    int rc = layout(&h, cfg);
    if (rc < 0)
        return rc;
    /* Keep the old header page (its magic) until the new header replaces it:
     * a reset cut short leaves a file that a later reset=True still accepts. */
    if (ftruncate(fd, VMC_PAGE) != 0)
        return vmc_fail_errno("ftruncate", path);
    if (fchmod(fd, cfg->mode) != 0)
        return vmc_fail_errno("fchmod", path);
    if ((rc = reserve_space(fd, h.file_size, path)) < 0)
        return rc;
    if (pwrite(fd, &h, sizeof h, 0) != (ssize_t)sizeof h)
        return vmc_fail_errno("pwrite", path);
    return VMC_OK;
}

static int open_failure(const char *path)
{
    switch (errno) {
    case ELOOP:
        return vmc_fail(VMC_E_FORMAT, "%s is a symbolic link; aiovmc does not follow links", path);
    case EISDIR:
        return vmc_fail(VMC_E_FORMAT, "%s is a directory, not a cache file", path);
    case ENXIO:
    case ENODEV:
        return vmc_fail(VMC_E_FORMAT, "%s is not a regular file (a socket or a device)", path);
    case ENOENT:
        return vmc_fail(VMC_E_CONFIG, "%s does not exist; give a size to create it", path);
    default:
        return vmc_fail_errno("open", path);
    }
}

int vmc_open(const char *path, const struct vmc_config *cfg, uint32_t flags, vmc_cache **out,
             struct vmc_info *info)
{
    *out = NULL;
    memset(info, 0, sizeof *info);
    info->fd = -1;
    int rc;
    if ((flags & (VMC_F_CREATE | VMC_F_RESET)) && (rc = validate_config(cfg)) < 0)
        return rc;
    int fd = -1;
    for (int attempt = 0; fd < 0; attempt++) {
        fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0)
            break;
        if (errno != ENOENT || !(flags & VMC_F_CREATE) || attempt >= 8)
            return open_failure(path);
        if ((rc = create_file(path, cfg)) < 0)
            return rc;
        info->created = rc;
    }
    struct stat st;
    struct vmc_header h;
    if (fstat(fd, &st) != 0) {
        rc = vmc_fail_errno("fstat", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = vmc_fail(VMC_E_FORMAT, "%s is not a regular file", path);
        goto fail;
    }
    if (st.st_uid != geteuid() && !(flags & VMC_F_ANY_OWNER)) {
        rc = vmc_fail(VMC_E_FORMAT,
                      "%s belongs to uid %u, not to this process (uid %u): anyone who can write "
                      "it controls what this process reads; pass allow_other_owner=True to "
                      "trust it",
                      path, (unsigned)st.st_uid, (unsigned)geteuid());
        goto fail;
    }
    if (ofd_lock(fd, F_WRLCK, OPENING_BYTE, true) != 0) {
        rc = vmc_fail_errno("fcntl(F_OFD_SETLKW)", path);
        goto fail;
    }
    if ((flags & VMC_F_RESET) && !info->created) {
        if ((rc = reset_file(fd, path, cfg)) < 0)
            goto fail;
        info->created = 1;
        if (fstat(fd, &st) != 0) {
            rc = vmc_fail_errno("fstat", path);
            goto fail;
        }
    }
    if ((rc = read_header(fd, st.st_size, path, &h)) < 0)
        goto fail;
    if (cfg && cfg->size && round_up(cfg->size, VMC_PAGE) != h.file_size) {
        rc = vmc_fail(VMC_E_CONFIG,
                      "%s holds a cache of %llu bytes, not %llu: geometry belongs to the file "
                      "(open it without size; to change it, recreate it once with reset=True while no "
                      "process has it open, e.g. at deploy time, not in every worker)",
                      path, (unsigned long long)h.file_size, (unsigned long long)cfg->size);
        goto fail;
    }
    vmc_cache *c = calloc(1, sizeof *c);
    char *copy = strdup(path);
    if (c == NULL || copy == NULL) {
        free(c);
        free(copy);
        rc = vmc_fail(VMC_E_OS, "out of memory");
        goto fail;
    }
    c->fd = fd;
    c->path = copy;
    pthread_mutex_init(&c->rids_lock, NULL);
    c->file_size = h.file_size;
    c->shards_off = h.shards_off;
    c->index_off = h.index_off;
    c->heap_off = h.heap_off;
    c->pool_off = h.pool_off;
    c->seed = h.hash_seed;
    c->spare_mark = vmc_spare_mark(h.hash_seed);
    c->shift = h.unit_shift;
    c->unit_size = h.unit_size;
    c->pool_units = h.pool_units;
    c->n_shards = h.n_shards;
    c->slots = h.slots_per_shard;
    c->n_flights = h.n_flights;
    c->max_load = (uint32_t)((uint64_t)h.slots_per_shard * 8 / 9);
    c->max_entries = h.max_entries;
    c->policy = h.policy;
    c->default_ttl_ns = h.default_ttl_ns;
    info->fd = fd;
    info->file_size = h.file_size;
    info->capacity = (uint64_t)h.pool_units << h.unit_shift;
    info->extent_size = h.unit_size;
    info->policy = h.policy;
    info->default_ttl_ns = h.default_ttl_ns;
    info->max_entries = h.max_entries;
    info->max_key_size = VMC_MAX_KEY;
    info->max_value_size = info->capacity - sizeof(struct vmc_entry);
    if (info->max_value_size > UINT32_MAX)
        info->max_value_size = UINT32_MAX;
    *out = c;
    return VMC_OK;
fail:
    close(fd); /* drops the opening lock with the descriptor */
    return rc;
}

int vmc_attach(vmc_cache *c, void *base, struct vmc_info *info)
{
    c->base = base;
    c->hdr = base;
    /* The offsets validated at open, never the mapping's: it may have changed since. */
    c->shards = (struct vmc_shard *)(c->base + c->shards_off);
    c->index = (uint64_t *)(c->base + c->index_off);
    c->heaps = (struct vmc_heap_item *)(c->base + c->heap_off);
    c->pool = c->base + c->pool_off;
    c->pid = vmc_self_pid();
    int rc = VMC_OK;
    if (ofd_lock(c->fd, F_WRLCK, LIVENESS_BYTE, false) == 0) {
        rc = vmc_rebuild(c, VMC_REBUILD_RECOVER, &info->recovered_entries,
                         &info->dropped_entries);
        if (rc == VMC_OK && (rc = vmc_flight_init_lock(c)) == VMC_OK)
            vmc_flight_recover(c);
        if (rc == VMC_OK) {
            c->hdr->needs_repair = 0;
            info->recovered = 1;
        }
    }
    if (rc == VMC_OK && ofd_lock(c->fd, F_RDLCK, LIVENESS_BYTE, true) != 0)
        rc = vmc_fail_errno("fcntl(F_OFD_SETLKW)", c->path);
    if (rc == VMC_OK)
        rc = vmc_owner_take(c);
    if (rc == VMC_OK && !info->recovered && (rc = vmc_pool_lock(c)) == VMC_OK) {
        vmc_reclaim_dead(c, true);
        vmc_pool_unlock(c);
    }
    ofd_lock(c->fd, F_UNLCK, OPENING_BYTE, false);
    return rc;
}

void vmc_abort(vmc_cache *c)
{
    close(c->fd);
    pthread_mutex_destroy(&c->rids_lock);
    free(c->rids);
    free(c->path);
    free(c);
}

/* forget_rids -- in a child of fork(): the reservations and orphans on the
 * list are the parent's (vmc_close must not cancel them, a repair must not
 * free them), and a thread of the parent that is gone here may have held the
 * lock guarding it (drop_orphans holds it while it waits for the pool lock):
 * an empty list, a lock nobody holds. The array is freed only if nobody held
 * the lock: a holder may have been resizing it (left to leak, once). */
static void forget_rids(vmc_cache *c)
{
    if (pthread_mutex_trylock(&c->rids_lock) == 0) {
        free(c->rids);
        pthread_mutex_unlock(&c->rids_lock);
    } else {
        pthread_mutex_init(&c->rids_lock, NULL);
    }
    c->rids = NULL;
    c->n_rids = c->cap_rids = 0;
}

int vmc_after_fork(vmc_cache *c)
{
    atomic_store(&c->active, 0);
    forget_rids(c);
    c->spare = 0; /* the parent's, which the parent may fill */
    c->naming = 0; /* a parent's thread may have been renaming */
    c->spare_slot = 0; /* the parent's too: the child claims its own */
    if (atomic_load(&c->closed))
        return VMC_OK;
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", c->fd);
    int fd = open(self, O_RDWR | O_CLOEXEC);
    int rc = fd < 0 ? vmc_fail_errno("open", self) : VMC_OK;
    if (rc == VMC_OK && ofd_lock(fd, F_RDLCK, LIVENESS_BYTE, true) != 0) {
        rc = vmc_fail_errno("fcntl(F_OFD_SETLKW)", c->path);
        close(fd);
    }
    if (rc < 0) {
        /* Unusable in this child. Closing must not unlock the inherited
         * descriptor: that would drop the parent's liveness lock. */
        atomic_store(&c->closed, 1);
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    /* The inherited descriptor shares the parent's locks: close it, never unlock it. */
    close(c->fd);
    c->fd = fd;
    c->pid = vmc_self_pid();
    c->owner = 0; /* the parent's loads and reservations are not the child's */
    rc = vmc_owner_take(c);
    if (rc < 0) {
        atomic_store(&c->closed, 1);
        close(c->fd);
        c->fd = -1;
    }
    return rc;
}

/* detach -- close the handle once: wait for calls in flight; if the file is
 * still mapped, cancel the reservations still open on this handle and orphan
 * the loads it leads; drop its locks with its descriptor. Only the process
 * that took the handle's locks does any of that: a handle inherited by fork()
 * (and never given locks of its own) shares its parent's, which closing the
 * descriptor leaves alone. */
static void detach(vmc_cache *c, bool mapped)
{
    if (atomic_exchange(&c->closed, 1))
        return;
    while (atomic_load(&c->active) > 0)
        sched_yield();
    bool ours = c->pid == vmc_self_pid();
    if (ours && mapped && c->hdr)
        vmc_cache_drop_reservations(c);
    if (c->fd >= 0) {
        if (ours && mapped)
            vmc_flight_release_owner(c);
        if (ours)
            ofd_lock(c->fd, F_UNLCK, LIVENESS_BYTE, false);
        close(c->fd);
        c->fd = -1;
    }
}

int vmc_close(vmc_cache *c)
{
    detach(c, true);
    return VMC_OK;
}

void vmc_free(vmc_cache *c)
{
    if (c == NULL)
        return;
    /* The garbage collector may have unmapped the file already: touch nothing
     * in it. Loads this handle led are taken over once its owner lock is gone. */
    detach(c, false);
    pthread_mutex_destroy(&c->rids_lock);
    free(c->rids);
    free(c->path);
    free(c);
}

int vmc_detach_view(void *addr, size_t len)
{
    if (((uintptr_t)addr & (VMC_PAGE - 1)) != 0 || len == 0)
        return vmc_fail(VMC_E_CONFIG, "a view mapping must start on a page and not be empty");
    void *p = mmap(addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                   -1, 0);
    if (p == MAP_FAILED)
        return vmc_fail_errno("mmap", "a reservation's view");
    return VMC_OK;
}

/* vmc_peek -- a cache file's statistics, read without writing anything: the
 * file is opened O_RDONLY and mapped PROT_READ (a write would fault), its
 * header validated like vmc_open's, and the counters summed by
 * vmc_statistics on a handle that exists only for this call. No liveness lock
 * is taken and nothing is run on the file: no recovery, no reclaim. A shared
 * lock on the opening byte, held for the call, waits out an opener that is
 * recovering or resetting the file (a reset may resize it under the mapping)
 * and delays the next opener by as long as the read takes. */
int vmc_peek(const char *path, struct vmc_stats *out, uint64_t *times)
{
    memset(out, 0, sizeof *out);
    times[0] = times[1] = 0;
    /* O_NONBLOCK: a FIFO planted at `path` must not block the open. */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return errno == ENOENT ? vmc_fail(VMC_E_CONFIG, "%s does not exist", path)
                               : open_failure(path);
    struct stat st;
    struct vmc_header h;
    void *base = MAP_FAILED;
    int rc;
    if (fstat(fd, &st) != 0) {
        rc = vmc_fail_errno("fstat", path);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = vmc_fail(VMC_E_FORMAT, "%s is not a regular file", path);
        goto out;
    }
    if (ofd_lock(fd, F_RDLCK, OPENING_BYTE, true) != 0 || fstat(fd, &st) != 0) {
        rc = vmc_fail_errno("fcntl(F_OFD_SETLKW)", path);
        goto out;
    }
    if ((rc = read_header(fd, st.st_size, path, &h)) < 0)
        goto out;
    base = mmap(NULL, h.file_size, PROT_READ, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = vmc_fail_errno("mmap", path);
        goto out;
    }
    /* Only what vmc_statistics reads: the header, the shard table, the geometry. */
    vmc_cache view = {0};
    view.base = base;
    view.hdr = base;
    view.shards = (struct vmc_shard *)((char *)base + h.shards_off);
    view.file_size = h.file_size;
    view.shift = h.unit_shift;
    view.unit_size = h.unit_size;
    view.pool_units = h.pool_units;
    view.n_shards = h.n_shards;
    view.fd = -1;
    view.pid = vmc_self_pid(); /* a handle of this process, for the call's checks */
    view.path = (char *)path;
    rc = vmc_statistics(&view, out);
    times[0] = __atomic_load_n(&view.hdr->clock, __ATOMIC_ACQUIRE);
    times[1] = __atomic_load_n(&view.hdr->persisted, __ATOMIC_ACQUIRE);
out:
    if (base != MAP_FAILED)
        munmap(base, h.file_size);
    close(fd); /* drops the lock with the descriptor */
    return rc;
}
