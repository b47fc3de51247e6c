/* vmc_hash.h -- a seeded 64-bit hash for keys and entry checksums.
 *
 * A multiply-fold construction: 128-bit products of the input with odd
 * constants, folded to 64 bits. Three independent lanes consume 48 bytes per
 * round so long inputs (checksums of large values) run near memory speed;
 * short inputs (keys) take one or two products. Not cryptographic: the seed is
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

static inline void vmc_wr64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

/* vmc_hash_tail -- the end of vmc_hash: the last `left` bytes at p (16 < n,
 * 0 < left <= 48; the 16 bytes before p are readable) with the state s of
 * the bytes before them. */
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

/* vmc_hash -- hash n bytes at data with seed. */
static inline uint64_t vmc_hash(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t s = vmc_fold(seed ^ VMC_K0, (uint64_t)n ^ VMC_K1);
    uint64_t a, b;
    if (n > 16) {
        size_t left = n;
        if (left > 48) {
            uint64_t s1 = s ^ VMC_K2, s2 = s ^ VMC_K3;
            do {
                s = vmc_fold(vmc_rd64(p) ^ VMC_K1, vmc_rd64(p + 8) ^ s);
                s1 = vmc_fold(vmc_rd64(p + 16) ^ VMC_K2, vmc_rd64(p + 24) ^ s1);
                s2 = vmc_fold(vmc_rd64(p + 32) ^ VMC_K3, vmc_rd64(p + 40) ^ s2);
                p += 48;
                left -= 48;
            } while (left > 48);
            s ^= s1 ^ s2;
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

/* vmc_hash_copy -- copy n bytes from src to dst (not overlapping) and return
 * vmc_hash(dst, n, seed), in one pass: each 48-byte block is loaded once,
 * stored, and hashed from the registers it was loaded into, so what is
 * hashed is exactly what was written, even if src changes meanwhile. */
static inline uint64_t vmc_hash_copy(void *dst, const void *src, size_t n, uint64_t seed)
{
    if (n <= 48) {
        memcpy(dst, src, n);
        return vmc_hash(dst, n, seed);
    }
    unsigned char *d = dst;
    const unsigned char *p = src;
    uint64_t s = vmc_fold(seed ^ VMC_K0, (uint64_t)n ^ VMC_K1);
    uint64_t s1 = s ^ VMC_K2, s2 = s ^ VMC_K3;
    size_t left = n;
    do {
        uint64_t w0 = vmc_rd64(p), w1 = vmc_rd64(p + 8), w2 = vmc_rd64(p + 16);
        uint64_t w3 = vmc_rd64(p + 24), w4 = vmc_rd64(p + 32), w5 = vmc_rd64(p + 40);
        vmc_wr64(d, w0);
        vmc_wr64(d + 8, w1);
        vmc_wr64(d + 16, w2);
        vmc_wr64(d + 24, w3);
        vmc_wr64(d + 32, w4);
        vmc_wr64(d + 40, w5);
        s = vmc_fold(w0 ^ VMC_K1, w1 ^ s);
        s1 = vmc_fold(w2 ^ VMC_K2, w3 ^ s1);
        s2 = vmc_fold(w4 ^ VMC_K3, w5 ^ s2);
        p += 48;
        d += 48;
        left -= 48;
    } while (left > 48);
    memcpy(d, p, left); /* the tail is hashed from dst: what was written */
    return vmc_hash_tail(s ^ s1 ^ s2, d, left, n);
}

#endif
