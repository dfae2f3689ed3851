/* One token's FFN over the neurons it needs, computed on their bundle records where they lie.

   out[0:d] = sum over i < k of act(gate_i . x + gate_bias) * (up_i . x + up_bias) * down_i
   (ungated: act(up_i . x + up_bias) * down_i), where neuron i's bundle is the record at
   records + rows[i] * stride, its parts at byte offsets gate_off, up_off and down_off, each a
   vector of d values in its kind: float32, float16, bfloat16, or GGUF's q8_0, q4_0 and q4_1
   blocks of 32 values (streamer/blocks.py has the byte layout).

   Why by hand: torch has no matrix-vector product over a gathered set of rows, so the engine
   copied a token's rows out of its window cache before multiplying them, and the copy cost as
   much as the product; this reads each needed byte once, converts or dequantizes in registers,
   and never writes a copy (README, "Decisions"). Built at first use with the machine's compiler
   (streamer/kernels/__init__.py); the engine computes in torch where no compiler is found.

   Threads: OpenMP, in the process's own OpenMP runtime (torch's, whose libgomp is loaded before
   this library), so that the kernel's threads are the ones torch already keeps. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5 };
enum { RELU = 0, SILU = 1, GELU = 2, GELU_TANH = 3 };
#define QK 32      /* values per block */
#define AHEAD 2    /* records prefetched ahead */

static inline float f16_to_f32(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int block_bytes(int kind) {
    return kind == Q8_0 ? 34 : kind == Q4_0 ? 18 : 20;
}

static inline int64_t vector_bytes(int kind, int64_t d) {
    if (kind == F32) return 4 * d;
    if (kind == F16 || kind == BF16) return 2 * d;
    return d / QK * block_bytes(kind);
}

#ifdef __AVX512F__
static inline __m512 load16(const uint8_t *p, int kind) {
    if (kind == F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (kind == BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps(p);
}

/* A block's 32 codes as two vectors of 16 floats (values 0-15 and 16-31), before the scale
   (and, for q4_0, after subtracting 8). */
static inline void codes32(const uint8_t *q, int kind, __m512 *lo, __m512 *hi) {
    if (kind == Q8_0) {
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
        return;
    }
    __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i m = _mm512_set1_epi32(15);
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(c, m));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
    if (kind == Q4_0) {
        __m512 eight = _mm512_set1_ps(8.f);
        *lo = _mm512_sub_ps(*lo, eight);
        *hi = _mm512_sub_ps(*hi, eight);
    }
}
#endif

/* The value j of a block kind's vector (the scalar path). */
static inline float block_value(const uint8_t *v, int kind, int64_t j) {
    const uint8_t *b = v + (j / QK) * block_bytes(kind);
    int64_t r = j % QK;
    uint16_t s;
    memcpy(&s, b, 2);
    float scale = f16_to_f32(s);
    if (kind == Q8_0) return scale * (float)(int8_t)b[2 + r];
    int off = kind == Q4_0 ? 2 : 4;
    int q = r < 16 ? (b[off + r] & 15) : (b[off + r - 16] >> 4);
    if (kind == Q4_0) return scale * (float)(q - 8);
    uint16_t mm;
    memcpy(&mm, b + 2, 2);
    return scale * (float)q + f16_to_f32(mm);
}

static inline float value(const uint8_t *v, int kind, int64_t j) {
    uint16_t h;
    switch (kind) {
    case F32: {
        float f;
        memcpy(&f, v + 4 * j, 4);
        return f;
    }
    case F16: memcpy(&h, v + 2 * j, 2); return f16_to_f32(h);
    case BF16: memcpy(&h, v + 2 * j, 2); return bf16_to_f32(h);
    default: return block_value(v, kind, j);
    }
}

/* v . x; xsum[b]: the sum of x over block b (q4_1's offsets). */
static float dot(const uint8_t *v, int kind, const float *x, const float *xsum, int64_t d) {
#ifdef __AVX512F__
    if (kind <= BF16 && d % 32 == 0) {
        const int size = kind == F32 ? 4 : 2;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 32) {
            a0 = _mm512_fmadd_ps(load16(v + j * size, kind), _mm512_loadu_ps(x + j), a0);
            a1 = _mm512_fmadd_ps(load16(v + (j + 16) * size, kind), _mm512_loadu_ps(x + j + 16), a1);
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
    if (kind > BF16) {
        const int bb = block_bytes(kind), off = kind == Q4_1 ? 4 : 2;
        float acc = 0.f;
        for (int64_t b = 0; b < d / QK; b++) {
            const uint8_t *blk = v + b * bb;
            uint16_t s;
            memcpy(&s, blk, 2);
            __m512 lo, hi;
            codes32(blk + off, kind, &lo, &hi);
            __m512 p = _mm512_mul_ps(lo, _mm512_loadu_ps(x + b * QK));
            p = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * QK + 16), p);
            float sum = f16_to_f32(s) * _mm512_reduce_add_ps(p);
            if (kind == Q4_1) {
                uint16_t mm;
                memcpy(&mm, blk + 2, 2);
                sum += f16_to_f32(mm) * xsum[b];
            }
            acc += sum;
        }
        return acc;
    }
#endif
    float acc = 0.f;
    for (int64_t j = 0; j < d; j++) acc += value(v, kind, j) * x[j];
    return acc;
}

/* y += a * v */
static void axpy(const uint8_t *v, int kind, float a, float *y, int64_t d) {
#ifdef __AVX512F__
    if (kind <= BF16 && d % 16 == 0) {
        const int size = kind == F32 ? 4 : 2;
        __m512 av = _mm512_set1_ps(a);
        for (int64_t j = 0; j < d; j += 16)
            _mm512_storeu_ps(y + j, _mm512_fmadd_ps(load16(v + j * size, kind), av, _mm512_loadu_ps(y + j)));
        return;
    }
    if (kind > BF16) {
        const int bb = block_bytes(kind), off = kind == Q4_1 ? 4 : 2;
        for (int64_t b = 0; b < d / QK; b++) {
            const uint8_t *blk = v + b * bb;
            uint16_t s;
            memcpy(&s, blk, 2);
            __m512 lo, hi;
            codes32(blk + off, kind, &lo, &hi);
            __m512 as = _mm512_set1_ps(a * f16_to_f32(s));
            float *yb = y + b * QK;
            __m512 y0 = _mm512_fmadd_ps(lo, as, _mm512_loadu_ps(yb));
            __m512 y1 = _mm512_fmadd_ps(hi, as, _mm512_loadu_ps(yb + 16));
            if (kind == Q4_1) {
                uint16_t mm;
                memcpy(&mm, blk + 2, 2);
                __m512 am = _mm512_set1_ps(a * f16_to_f32(mm));
                y0 = _mm512_add_ps(y0, am);
                y1 = _mm512_add_ps(y1, am);
            }
            _mm512_storeu_ps(yb, y0);
            _mm512_storeu_ps(yb + 16, y1);
        }
        return;
    }
#endif
    for (int64_t j = 0; j < d; j++) y[j] += a * value(v, kind, j);
}

static inline float activate(float v, int act) {
    switch (act) {
    case RELU: return v > 0.f ? v : 0.f;
    case SILU: return v / (1.f + expf(-v));
    case GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    default: {
        const float c = 0.79788456080286536f; /* sqrt(2 / pi) */
        return 0.5f * v * (1.f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
    }
}

typedef struct {
    const uint8_t *records;
    int64_t stride;
    const int64_t *rows, *ids;
    int64_t d, gate_off, up_off, down_off;
    int kind, down_kind, gated, act;
    const float *x, *xsum, *gate_bias, *up_bias;
} ffn_t;

static void neurons(const ffn_t *f, int64_t lo, int64_t hi, float *out) {
    const int64_t span = f->down_off + vector_bytes(f->down_kind, f->d);
    for (int64_t i = lo; i < hi; i++) {
        const uint8_t *r = f->records + f->rows[i] * f->stride;
        if (i + AHEAD < hi) {
            const char *next = (const char *)(f->records + f->rows[i + AHEAD] * f->stride);
            for (int64_t o = 0; o < span; o += 64) __builtin_prefetch(next + o);
        }
        float u = dot(r + f->up_off, f->kind, f->x, f->xsum, f->d);
        if (f->up_bias) u += f->up_bias[f->ids[i]];
        float h;
        if (f->gated) {
            float g = dot(r + f->gate_off, f->kind, f->x, f->xsum, f->d);
            if (f->gate_bias) g += f->gate_bias[f->ids[i]];
            h = activate(g, f->act) * u;
        } else {
            h = activate(u, f->act);
        }
        if (h != 0.f) axpy(r + f->down_off, f->down_kind, h, out, f->d);
    }
}

/* The entry point (see the top of the file). x: d floats; gate_bias, up_bias: per-neuron
   float arrays indexed by ids (NULL: none); out: d floats, overwritten; scratch: threads * d
   floats. Returns 0, or -1 for arguments it cannot take. */
int sparse_ffn(const uint8_t *records, int64_t stride, const int64_t *rows, const int64_t *ids,
               int64_t k, int64_t d, int kind, int down_kind, int gated, int act,
               int64_t gate_off, int64_t up_off, int64_t down_off, const float *x,
               const float *gate_bias, const float *up_bias, float *out, float *scratch,
               int threads) {
    if (d <= 0 || k < 0 || kind < F32 || kind > Q4_1 || down_kind < F32 || down_kind > Q4_1) return -1;
    if ((kind > BF16 || down_kind > BF16) && d % QK) return -1;
    float xsum[d / QK + 1];
    for (int64_t b = 0; b < d / QK; b++) {
        float s = 0.f;
        for (int j = 0; j < QK; j++) s += x[b * QK + j];
        xsum[b] = s;
    }
    ffn_t f = {records, stride, rows, ids, d, gate_off, up_off, down_off, kind, down_kind, gated,
               act, x, xsum, gate_bias, up_bias};
    memset(out, 0, d * sizeof(float));
    if (threads < 1) threads = 1;
    if (k < 32 * threads) threads = 1; /* too few neurons to share */
    if (threads == 1) {
        neurons(&f, 0, k, out);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        float *mine = scratch + (int64_t)t * d;
        memset(mine, 0, d * sizeof(float));
        neurons(&f, k * t / n, k * (t + 1) / n, mine);
#pragma omp barrier
#pragma omp for
        for (int64_t j = 0; j < d; j++) {
            float s = 0.f;
            for (int q = 0; q < n; q++) s += scratch[(int64_t)q * d + j];
            out[j] = s;
        }
    }
    return 0;
}
