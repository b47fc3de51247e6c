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

/* vmc_hash -- hash n bytes at data with seed. */
static inline uint64_t vmc_hash(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t s = vmc_fold(seed ^ VMC_K0, (uint64_t)n ^ VMC_K1);
    uint64_t a, b;
    if (n <= 16) {
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
    } else {
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
        while (left > 16) {
            s = vmc_fold(vmc_rd64(p) ^ VMC_K1, vmc_rd64(p + 8) ^ s);
            p += 16;
            left -= 16;
        }
        a = vmc_rd64(p + left - 16);
        b = vmc_rd64(p + left - 8);
    }
    return vmc_fold(VMC_K1 ^ (uint64_t)n, vmc_fold(a ^ VMC_K1, b ^ s));
}

#endif
