/* vmc_hash.h -- a seeded 64-bit hash for keys and entry checksums.
 *
 * A multiply-fold construction: 128-bit products of the input with odd
 * constants, folded to 64 bits. Six independent lanes consume a 96-byte block
 * per round, so the products of one lane do not wait on each other and long
 * inputs (checksums of large values) run near the multiplier's throughput
 * (format version 3; version 2 had three lanes and 48-byte blocks); short
 * inputs (keys) take one or two products. Not cryptographic: the seed is
 * random per file, which is what defeats chosen-key flooding of the index.
 */
#ifndef VMC_HASH_H
#define VMC_HASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define VMC_K0 0x9e3779b97f4a7c15ull
#define VMC_K1 0xd6e8feb86659fd93ull
#define VMC_K2 0xa0761d6478bd642full
#define VMC_K3 0xe7037ed1a0b428dbull
#define VMC_K4 0x8ebc6af09c88c6e3ull
#define VMC_K5 0x589965cc75374cc3ull
#define VMC_K6 0x1d8e4e27c47d124full

#define VMC_LANES 6
#define VMC_BLOCK (16 * VMC_LANES) /* bytes per round: 16 per lane */

static inline uint64_t vmc_fold(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t vmc_rd64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t vmc_rd32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* vmc_hash_tail -- the end of vmc_hash: the last `left` bytes at p (16 < n,
 * 0 < left <= VMC_BLOCK; the 16 bytes before p are readable) with the state s
 * of the bytes before them. */
static inline uint64_t vmc_hash_tail(uint64_t s, const unsigned char *p, size_t left, size_t n)
{
    while (left > 16) {
        s = vmc_fold(vmc_rd64(p) ^ VMC_K1, vmc_rd64(p + 8) ^ s);
        p += 16;
        left -= 16;
    }
    uint64_t a = vmc_rd64(p + left - 16), b = vmc_rd64(p + left - 8);
    return vmc_fold(VMC_K1 ^ (uint64_t)n, vmc_fold(a ^ VMC_K1, b ^ s));
}

/* vmc_hash_lanes -- the lanes' starting states for a hash whose state is s. */
static inline void vmc_hash_lanes(uint64_t lane[VMC_LANES], uint64_t s)
{
    lane[0] = s, lane[1] = s ^ VMC_K2, lane[2] = s ^ VMC_K3;
    lane[3] = s ^ VMC_K4, lane[4] = s ^ VMC_K5, lane[5] = s ^ VMC_K6;
}

/* vmc_hash_lanes_end -- the state the lanes leave for the tail. */
static inline uint64_t vmc_hash_lanes_end(const uint64_t lane[VMC_LANES])
{
    return lane[0] ^ lane[1] ^ lane[2] ^ lane[3] ^ lane[4] ^ lane[5];
}

/* vmc_hash_blocks -- the lanes of vmc_hash over `blocks` blocks of VMC_BLOCK
 * bytes at p; meanwhile, a prefetch every 48 bytes (which touches every cache
 * line) of read[0, fetch_len) and, for writing, of write[0, fetch_len), so the
 * CPU fetches the next chunk of a copy as it hashes this one. */
static inline void vmc_hash_blocks(uint64_t lane[VMC_LANES], const unsigned char *p,
                                   size_t blocks, const unsigned char *read,
                                   unsigned char *write, size_t fetch_len)
{
    uint64_t s0 = lane[0], s1 = lane[1], s2 = lane[2], s3 = lane[3], s4 = lane[4], s5 = lane[5];
    for (size_t at = 0; blocks; blocks--, p += VMC_BLOCK, at += VMC_BLOCK) {
        if (at < fetch_len) {
            __builtin_prefetch(read + at);
            __builtin_prefetch(write + at, 1);
            __builtin_prefetch(read + at + 48);
            __builtin_prefetch(write + at + 48, 1);
        }
        s0 = vmc_fold(vmc_rd64(p) ^ VMC_K1, vmc_rd64(p + 8) ^ s0);
        s1 = vmc_fold(vmc_rd64(p + 16) ^ VMC_K2, vmc_rd64(p + 24) ^ s1);
        s2 = vmc_fold(vmc_rd64(p + 32) ^ VMC_K3, vmc_rd64(p + 40) ^ s2);
        s3 = vmc_fold(vmc_rd64(p + 48) ^ VMC_K4, vmc_rd64(p + 56) ^ s3);
        s4 = vmc_fold(vmc_rd64(p + 64) ^ VMC_K5, vmc_rd64(p + 72) ^ s4);
        s5 = vmc_fold(vmc_rd64(p + 80) ^ VMC_K6, vmc_rd64(p + 88) ^ s5);
    }
    lane[0] = s0, lane[1] = s1, lane[2] = s2, lane[3] = s3, lane[4] = s4, lane[5] = s5;
}

/* vmc_hash -- hash n bytes at data with seed. */
static inline uint64_t vmc_hash(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t s = vmc_fold(seed ^ VMC_K0, (uint64_t)n ^ VMC_K1);
    uint64_t a, b;
    if (n > 16) {
        size_t left = n;
        if (left > VMC_BLOCK) {
            uint64_t lane[VMC_LANES];
            vmc_hash_lanes(lane, s);
            size_t blocks = (left - 1) / VMC_BLOCK; /* leaving 1 to VMC_BLOCK bytes */
            vmc_hash_blocks(lane, p, blocks, NULL, NULL, 0);
            p += blocks * VMC_BLOCK;
            left -= blocks * VMC_BLOCK;
            s = vmc_hash_lanes_end(lane);
        }
        return vmc_hash_tail(s, p, left, n);
    }
    if (n >= 8) {
        a = vmc_rd64(p);
        b = vmc_rd64(p + n - 8);
    } else if (n >= 4) {
        a = vmc_rd32(p);
        b = vmc_rd32(p + n - 4);
    } else if (n > 0) {
        a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1];
        b = 0;
    } else {
        a = b = 0;
    }
    return vmc_fold(VMC_K1 ^ (uint64_t)n, vmc_fold(a ^ VMC_K1, b ^ s));
}

/* vmc_copy_chunk -- memcpy, called out of line: given the chunk's bounds
 * and alignment, GCC would inline it as `rep movsq`, which glibc's vector
 * copy beats at these sizes (a 4 KiB get measured 0.71 vs 0.76 x lmdb).
 * noipa keeps GCC from propagating those bounds into it. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noipa))
#else
__attribute__((noinline))
#endif
static void vmc_copy_chunk(void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
}

/* Up to this many bytes, vmc_hash_copy copies 48 bytes at a time inline:
 * for a small value the call to memcpy costs more than it saves. */
#define VMC_INLINE_COPY (48 * 5)

/* The bytes vmc_hash_copy copies before it hashes them: a whole number of
 * blocks, small enough to be hashed from the L1 cache it was just written to. */
#define VMC_COPY_CHUNK (VMC_BLOCK * 64)

/* vmc_hash_copy -- copy n bytes from src to dst (not overlapping) and return
 * vmc_hash(dst, n, seed), in one pass over src: each chunk is copied by
 * memcpy (whose wide loads keep many cache misses in flight), then hashed
 * from dst while it is still in the L1 cache (and the next chunk of src and
 * dst is prefetched), so what is hashed is exactly what was written, even if
 * src changes meanwhile. */
static inline uint64_t vmc_hash_copy(void *dst, const void *src, size_t n, uint64_t seed)
{
    if (n <= VMC_BLOCK) {
        memcpy(dst, src, n);
        return vmc_hash(dst, n, seed);
    }
    unsigned char *d = dst;
    const unsigned char *p = src;
    uint64_t lane[VMC_LANES];
    vmc_hash_lanes(lane, vmc_fold(seed ^ VMC_K0, (uint64_t)n ^ VMC_K1));
    size_t left = n;
    while (left > VMC_BLOCK) {
        size_t blocks = (left - 1) / VMC_BLOCK; /* as vmc_hash: 1 to VMC_BLOCK bytes left */
        size_t all = blocks * VMC_BLOCK;
        size_t chunk = all < VMC_COPY_CHUNK ? all : VMC_COPY_CHUNK;
        if (chunk <= VMC_INLINE_COPY) { /* a small value: no call */
            for (size_t at = 0; at < chunk; at += 48)
                memcpy(d + at, p + at, 48);
        } else {
            vmc_copy_chunk(d, p, chunk);
        }
        /* hashed from dst while the next chunk of src and dst is fetched */
        vmc_hash_blocks(lane, d, chunk / VMC_BLOCK, p + chunk, d + chunk, left - chunk);
        p += chunk;
        d += chunk;
        left -= chunk;
    }
    memcpy(d, p, left); /* the tail is hashed from dst too */
    return vmc_hash_tail(vmc_hash_lanes_end(lane), d, left, n);
}

#endif
