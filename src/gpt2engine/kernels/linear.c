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
#include <string.h>

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

/* Whether int8 weights meet int8 activations (linear_vnni.h) or float32 ones (here). */
int gpt2engine_int8_activations(void) { return 0; }
#endif
