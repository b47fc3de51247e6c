/* vmc_entry.c -- walking an entry's chain of extents: copy, fill, checksum. */
#include "vmc_entry.h"

/* Visit the value's pieces in order: fn(ctx, piece, offset_in_value, len). */
typedef void (*piece_fn)(void *ctx, const char *piece, uint64_t at, uint64_t len);

/* last_piece_fits -- an extent that ends a value is the smallest that holds
 * its part: the allocator takes exactly that many units for it (every other
 * extent of the chain is used to the end), so a tag or a value_len that
 * disagrees with the other is damage. */
static bool last_piece_fits(const vmc_cache *c, uint32_t units, uint64_t bytes)
{
    uint64_t need = (bytes + c->unit_size - 1) >> c->shift;
    return units == (need ? need : 1);
}

/* walk_value -- call fn on each piece of head's value; VMC_E_CORRUPT if a
 * link is unsound. Every field is read once into a local, checked, and only
 * the checked copy is used: a reader copying without the shard lock may see
 * the extents freed and reused under it, and each piece must still lie inside
 * its extent, hence inside the pool. */
static int walk_value(vmc_cache *c, uint32_t head, piece_fn fn, void *ctx)
{
    if (!vmc_unit_ok(c, head))
        return VMC_E_CORRUPT;
    struct vmc_entry *e = vmc_unit(c, head);
    uint64_t tag = VMC_LOAD(e->tag);
    uint64_t klen = VMC_LOAD(e->key_len), vlen = VMC_LOAD(e->value_len);
    uint32_t next = VMC_LOAD(e->next);
    uint32_t units = VMC_TAG_UNITS(tag);
    if (VMC_TAG_KIND(tag) != VMC_KIND_HEAD || units == 0 || units > c->pool_units - head + 1 ||
        sizeof *e + klen > (uint64_t)units << c->shift)
        return VMC_E_CORRUPT;
    uint64_t room = ((uint64_t)units << c->shift) - sizeof *e - klen;
    if (room >= vlen && !last_piece_fits(c, units, sizeof *e + klen + vlen))
        return VMC_E_CORRUPT;
    uint64_t n = room < vlen ? room : vlen;
    fn(ctx, vmc_entry_key(e) + klen, 0, n);
    uint64_t at = n;
    for (uint32_t steps = 0; at < vlen; steps++) {
        if (!vmc_unit_ok(c, next) || steps >= c->pool_units)
            return VMC_E_CORRUPT;
        struct vmc_body *b = vmc_unit(c, next);
        tag = VMC_LOAD(b->tag);
        units = VMC_TAG_UNITS(tag);
        if (VMC_TAG_KIND(tag) != VMC_KIND_BODY || units == 0 ||
            units > c->pool_units - next + 1 || VMC_LOAD(b->head) != head)
            return VMC_E_CORRUPT;
        room = ((uint64_t)units << c->shift) - sizeof *b;
        if (room >= vlen - at && !last_piece_fits(c, units, sizeof *b + (vlen - at)))
            return VMC_E_CORRUPT;
        n = room < vlen - at ? room : vlen - at;
        fn(ctx, (const char *)(b + 1), at, n);
        at += n;
        next = VMC_LOAD(b->next);
    }
    return VMC_OK;
}

struct copy_ctx {
    char *dst;
    uint64_t from, to; /* value range wanted */
    uint64_t *data;    /* NULL, or the data hash of what was copied (whole values) */
    bool whole;        /* every piece fell inside [from, to) */
    uint64_t end;      /* where the value ends, as walked */
};

static void copy_piece(void *ctx, const char *piece, uint64_t at, uint64_t len)
{
    struct copy_ctx *x = ctx;
    x->end = at + len;
    uint64_t lo = at > x->from ? at : x->from;
    uint64_t hi = at + len < x->to ? at + len : x->to;
    if (x->data && lo == at && hi == at + len) { /* a whole piece of a whole value */
        /* copied and hashed in one pass; what is hashed is the copy, not the
         * mapping: what is verified is what is returned */
        *x->data = vmc_fold(*x->data ^ vmc_hash_copy(x->dst + at, piece, len, VMC_K2), VMC_K0);
        return;
    }
    if (lo < hi)
        memcpy(x->dst + (lo - x->from), piece + (lo - at), hi - lo);
    if (x->data) /* a longer value than the caller saw: not a whole copy */
        x->whole = false;
}

int vmc_entry_copy(vmc_cache *c, uint32_t head, char *dst, uint64_t offset, uint64_t len,
                   uint64_t *data)
{
    struct copy_ctx x = {dst, offset, offset + len, offset == 0 ? data : NULL, true, 0};
    int rc = walk_value(c, head, copy_piece, &x);
    /* whole: the value walked is exactly [0, len), not shorter (a reader
     * without the lock may find another value's length there) */
    if (x.data && x.whole && x.end == len && rc == VMC_OK)
        *data |= 1;
    else if (data)
        *data = 0;
    return rc;
}

int vmc_entry_copy_unlocked(vmc_cache *c, uint32_t head, char *dst, uint64_t offset,
                            uint64_t len, uint64_t *data)
{
    VMC_IGNORE_READS_BEGIN();
    int rc = vmc_entry_copy(c, head, dst, offset, len, data);
    VMC_IGNORE_READS_END();
    return rc;
}

static void no_piece(void *ctx, const char *piece, uint64_t at, uint64_t len)
{
    (void)ctx, (void)piece, (void)at, (void)len;
}

int vmc_entry_check(vmc_cache *c, uint32_t head)
{
    return walk_value(c, head, no_piece, NULL);
}

struct fill_ctx {
    const char *src;
    uint64_t data; /* the data hash so far */
};

static void fill_piece(void *ctx, const char *piece, uint64_t at, uint64_t len)
{
    struct fill_ctx *x = ctx;
    /* hashed as written: what the checksum seals is what the mapping holds */
    x->data = vmc_fold(x->data ^ vmc_hash_copy((char *)piece, x->src + at, len, VMC_K2), VMC_K0);
}

int vmc_entry_fill(vmc_cache *c, uint32_t head, const char *src, uint64_t *data)
{
    struct fill_ctx x = {src, *data};
    int rc = walk_value(c, head, fill_piece, &x);
    *data = rc == VMC_OK ? x.data | 1 : 0;
    return rc;
}

static void hash_piece(void *ctx, const char *piece, uint64_t at, uint64_t len)
{
    uint64_t *acc = ctx;
    (void)at;
    *acc = vmc_fold(*acc ^ vmc_hash(piece, len, VMC_K2), VMC_K0);
}

uint64_t vmc_entry_data_hash(vmc_cache *c, uint32_t head)
{
    struct vmc_entry *e = vmc_head(c, head);
    if (e == NULL)
        return 0;
    uint64_t acc = vmc_hash(vmc_entry_key(e), VMC_LOAD(e->key_len), c->seed);
    if (walk_value(c, head, hash_piece, &acc) != VMC_OK)
        return 0;
    return acc | 1;
}

uint32_t vmc_entry_seal(const struct vmc_entry *e, uint64_t data)
{
    uint64_t sizes = ((uint64_t)e->key_len << 32) | e->value_len;
    uint32_t sum = (uint32_t)vmc_fold(data ^ e->stamp * VMC_K1, sizes ^ e->expires_ns ^ VMC_K3);
    return sum ? sum : 1;
}

uint64_t vmc_entry_checksum(vmc_cache *c, uint32_t head)
{
    uint64_t data = vmc_entry_data_hash(c, head);
    return data ? vmc_entry_seal(vmc_unit(c, head), data) : 0;
}
