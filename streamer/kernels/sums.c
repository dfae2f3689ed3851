/* The bundle checksums of the read path: XXH3-64 (seed 0, the default secret) of each record,
   compared with what the converter wrote (`streamer.layout.BundleSums`, which computes them with
   the `xxhash` package).

   Why by hand: every bundle read is checked, thousands a token, and from Python each check is a
   library call and a slice, about 0.7 us a record on this machine: more than the hash itself.
   This is the published XXH3 algorithm's path for inputs over 240 bytes (records are that long;
   shorter ones are checked in Python), with its published default secret; the tests and the
   loader check it against the `xxhash` package. */
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PRIME32_1 0x9E3779B1U
#define PRIME32_2 0x85EBCA77U
#define PRIME32_3 0xC2B2AE3DU
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define STRIPE 64
#define SECRET_SIZE 192
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8)
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)

static const uint8_t SECRET[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

static inline uint64_t read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian machines only: the loader's self-test says otherwise */
    return v;
}

static inline void accumulate(uint64_t *acc, const uint8_t *in, const uint8_t *secret) {
#ifdef __AVX512F__
    __m512i a = _mm512_loadu_si512(acc);
    __m512i data = _mm512_loadu_si512(in);
    __m512i key = _mm512_xor_si512(data, _mm512_loadu_si512(secret));
    __m512i product = _mm512_mul_epu32(key, _mm512_srli_epi64(key, 32));
    __m512i swapped = _mm512_shuffle_epi32(data, (_MM_PERM_ENUM)_MM_SHUFFLE(1, 0, 3, 2));
    _mm512_storeu_si512(acc, _mm512_add_epi64(product, _mm512_add_epi64(a, swapped)));
#else
    for (int i = 0; i < 8; i++) {
        uint64_t v = read64(in + 8 * i), k = v ^ read64(secret + 8 * i);
        acc[i ^ 1] += v;
        acc[i] += (k & 0xFFFFFFFFULL) * (k >> 32);
    }
#endif
}

static inline void scramble(uint64_t *acc, const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= read64(secret + 8 * i);
        acc[i] = a * PRIME32_1;
    }
}

static inline uint64_t mul_fold(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

/* XXH3_64bits(in, len) for len > 240. */
uint64_t xxh3_long(const uint8_t *in, int64_t len) {
    uint64_t acc[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                       PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    int64_t blocks = (len - 1) / BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        for (int s = 0; s < STRIPES_PER_BLOCK; s++)
            accumulate(acc, in + b * BLOCK + s * STRIPE, SECRET + s * 8);
        scramble(acc, SECRET + SECRET_SIZE - STRIPE);
    }
    int64_t stripes = ((len - 1) - BLOCK * blocks) / STRIPE;
    for (int64_t s = 0; s < stripes; s++)
        accumulate(acc, in + blocks * BLOCK + s * STRIPE, SECRET + s * 8);
    accumulate(acc, in + len - STRIPE, SECRET + SECRET_SIZE - STRIPE - 7);
    uint64_t h = (uint64_t)len * PRIME64_1;
    for (int i = 0; i < 4; i++)
        h += mul_fold(acc[2 * i] ^ read64(SECRET + 11 + 16 * i),
                      acc[2 * i + 1] ^ read64(SECRET + 11 + 16 * i + 8));
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

/* The first i < n whose record (record_bytes at base + rows[i] * stride; rows NULL: row i) does
   not hash to want[i], or -1 when all do. record_bytes must be over 240. */
int64_t first_mismatch(const uint8_t *base, int64_t stride, const int64_t *rows, int64_t n,
                       int64_t record_bytes, const uint64_t *want, int threads) {
    int64_t bad = n;
    if (n < 64) threads = 1;
#pragma omp parallel for num_threads(threads) reduction(min : bad) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = base + (rows ? rows[i] : i) * stride;
        if (xxh3_long(r, record_bytes) != want[i] && i < bad) bad = i;
    }
    return bad == n ? -1 : bad;
}
