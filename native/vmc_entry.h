/* vmc_entry.h -- an entry: its checked header, its chain of extents, its bytes.
 *
 * An entry is a HEAD extent (struct vmc_entry, key, first value bytes) and a
 * chain of BODY extents (vmc_format.h). Everything here walks the chain with
 * every link checked: a damaged chain is reported (VMC_E_CORRUPT, or a zero
 * checksum), never followed out of the pool. No lock is taken here; each
 * function says what its caller must hold.
 */
#ifndef VMC_ENTRY_H
#define VMC_ENTRY_H

#include "vmc_handle.h"

/* vmc_head -- the HEAD at `unit` if its key fits its extent; NULL (damage) otherwise. */
static inline struct vmc_entry *vmc_head(const vmc_cache *c, uint32_t unit)
{
    if (!vmc_unit_ok(c, unit))
        return NULL;
    struct vmc_entry *e = vmc_unit(c, unit);
    uint64_t tag = VMC_LOAD(e->tag); /* one load: checked and used */
    uint32_t n = VMC_TAG_UNITS(tag);
    if (VMC_TAG_KIND(tag) != VMC_KIND_HEAD || n == 0 || n > c->pool_units - unit + 1)
        return NULL;
    if (sizeof *e + (uint64_t)VMC_LOAD(e->key_len) > (uint64_t)n << c->shift)
        return NULL;
    return e;
}

/* vmc_entry_key -- the key bytes, right after the entry header. */
static inline char *vmc_entry_key(struct vmc_entry *e) { return (char *)(e + 1); }

/* vmc_expired -- whether the entry's deadline has passed at `now`. */
static inline bool vmc_expired(const struct vmc_entry *e, uint64_t now)
{
    return e->expires_ns != 0 && now >= e->expires_ns;
}

/* vmc_entry_copy -- copy value[offset, offset+len) of head into dst; VMC_OK
 * or VMC_E_CORRUPT (no message set) if the chain is damaged. With `data`,
 * which holds the hash of the entry's key (vmc_hash_key), and a copy of the
 * whole value: *data becomes the data hash of the bytes copied (compare
 * vmc_entry_seal(e, *data) with the checksum), else 0. */
int vmc_entry_copy(vmc_cache *c, uint32_t head, char *dst, uint64_t offset, uint64_t len,
                   uint64_t *data);
/* vmc_entry_copy_unlocked -- vmc_entry_copy with no lock held, optimistically:
 * the entry may be freed and its room rewritten meanwhile, so the caller
 * throws the copy away unless the entry is the same afterwards (a seqlock's
 * read side). Its reads race with a writer reusing the room by design: under
 * the thread sanitizer they are annotated as such, and only they are. */
int vmc_entry_copy_unlocked(vmc_cache *c, uint32_t head, char *dst, uint64_t offset,
                            uint64_t len, uint64_t *data);
/* vmc_entry_check -- walk the chain without reading the value: VMC_OK or
 * VMC_E_CORRUPT (sizes and extents disagree). */
int vmc_entry_check(vmc_cache *c, uint32_t head);
/* vmc_entry_fill -- copy value_len bytes from src into the entry's chain
 * (its owner, no lock); VMC_OK or VMC_E_CORRUPT. *data holds the hash of
 * the entry's key (vmc_hash_key) and becomes the data hash of the entry
 * (vmc_entry_data_hash), computed in the same pass as the copy; 0 on failure. */
int vmc_entry_fill(vmc_cache *c, uint32_t head, const char *src, uint64_t *data);
/* vmc_entry_data_hash -- hash of the entry's key and value; 0 if the chain is damaged. */
uint64_t vmc_entry_data_hash(vmc_cache *c, uint32_t head);
/* vmc_entry_seal -- the checksum from a data hash and the entry's sizes,
 * expiry and stamp; never 0. */
uint32_t vmc_entry_seal(const struct vmc_entry *e, uint64_t data);
/* vmc_entry_checksum -- the checksum an entry should carry; 0 if its chain is damaged. */
uint64_t vmc_entry_checksum(vmc_cache *c, uint32_t head);

#endif
