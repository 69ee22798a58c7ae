/* y = x W^T + b on the CPU, with W in float32, bfloat16 or int8 (gpt2engine.kernels).
 *
 * Decoding reads every weight once per token, so its speed is memory bandwidth: each block of 4
 * weight rows is read from memory once and stays in cache while the rows of x pass over it, 4 at
 * a time (16 sums in registers), the rest one at a time; the next block is prefetched meanwhile.
 * Smaller weights stream faster: bfloat16 (a float32 cut to its top 16 bits) and int8 (per output
 * row, w = scale * q) are widened to float32 in registers, so x and the sums stay float32.
 * Long inputs (a prefill) go over the weights in tiles of TILE rows of x, which stay in cache.
 * Batch invariance: every sum x[m] . W[o] is accumulated lane by lane (VL lanes, lane l taking
 * the products i = l, l + VL, ...) and the lanes are added in a fixed order, in both routines, so a
 * row gives bit-identical results alone or in any batch.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define TILE 32  /* rows of x per pass over the weights */
#define AHEAD 8  /* weight rows ahead of the block in use to prefetch (2 blocks) */

/* One weight of each format as a float, for the tails of rows that are not a multiple of VL. */
static inline float load_f32(const float *w) { return *w; }
static inline float load_bf16(const uint16_t *w) {
    uint32_t bits = (uint32_t)*w << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float load_i8(const int8_t *w) { return (float)*w; }

/* vec: VL float32 lanes, the widest the CPU has; widen_*: VL weights of a format as floats. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec widen_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec widen_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec widen_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec widen_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec widen_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec widen_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
#define VL 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline void vstore(float *p, vec v) { *p = v; }
static inline vec widen_f32(const float *p) { return *p; }
static inline vec widen_bf16(const uint16_t *p) { return load_bf16(p); }
static inline vec widen_i8(const int8_t *p) { return load_i8(p); }
#endif

static inline vec vload(const float *p) { return widen_f32(p); }

/* The lanes of a sum added in a fixed order. */
static inline float reduce(vec v) {
    float lanes[VL], s = 0.0f;
    vstore(lanes, v);
    for (int l = 0; l < VL; l++) s += lanes[l];
    return s;
}

/* Where a product's value v goes (kernels.h): y = v, y += v (a residual), y = gelu(v). */
static inline void emit(float *y, float v, int epilogue) {
    switch (epilogue) {
    case ADD: *y += v; break;
    case GELU_TANH: *y = v / (1.0f + expf(-1.5957691216f * (v + 0.044715f * v * v * v))); break;
    case GELU_ERF: *y = 0.5f * v * (1.0f + erff(v * 0.70710678118f)); break;
    default: *y = v;
    }
}

/* One copy of the routines per weight type: W_T is the element, WIDEN loads VL of them, LOAD one. */
#define W_T float
#define WIDEN widen_f32
#define LOAD load_f32
#define NAME(f) f##_f32
#include "linear_body.h"

#define W_T uint16_t
#define WIDEN widen_bf16
#define LOAD load_bf16
#define NAME(f) f##_bf16
#include "linear_body.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "linear_vnni.h"
#else
#define W_T int8_t
#define WIDEN widen_i8
#define LOAD load_i8
#define NAME(f) f##_i8
#include "linear_body.h"

int gpt2engine_int8_activations(void) { return 0; }

static void part_i8(const Weight *w, const float *x, float *y, int M, int epilogue, Quantized *room,
                    int first, int last) {
    (void)room;
    blocks_i8(x, w->data, w->scale, w->bias, y, M, w->in, w->out, first, last, epilogue);
}
#endif

void gpt2engine_linear_part(const Weight *w, const float *x, float *y, int M, int epilogue, Quantized *room) {
    int blocks = (w->out + 3) / 4, t = omp_get_thread_num(), nt = omp_get_num_threads();
    int first = (int)((long)blocks * t / nt), last = (int)((long)blocks * (t + 1) / nt);
    switch (w->format) {
    case FORMAT_F32: blocks_f32(x, w->data, w->scale, w->bias, y, M, w->in, w->out, first, last, epilogue); break;
    case FORMAT_BF16: blocks_bf16(x, w->data, w->scale, w->bias, y, M, w->in, w->out, first, last, epilogue); break;
    default: part_i8(w, x, y, M, epilogue, room, first, last);
    }
}

/* x: (M, in) -> y: (M, out) = x W^T + b, W in `format`, on `threads` threads. */
void gpt2engine_linear(const float *x, const void *W, int format, const float *scale, const float *b,
                       float *y, int M, int in, int out, int threads) {
    Weight w = {W, scale, b, format, in, out};
    Quantized room = {malloc((size_t)M * in), malloc((size_t)M * sizeof(float)), malloc((size_t)M * sizeof(int32_t))};
    if (room.q && room.scale && room.sum) {
        #pragma omp parallel num_threads(threads)
        gpt2engine_linear_part(&w, x, y, M, STORE, &room);
    } else {  /* a few KB: not expected; report NaN rather than crash */
        for (size_t k = 0; k < (size_t)M * out; k++) y[k] = NAN;
    }
    free(room.q), free(room.scale), free(room.sum);
}
