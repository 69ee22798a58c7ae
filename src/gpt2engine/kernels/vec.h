/* vec: VL float32 lanes, the widest the CPU has (AVX-512, AVX2 + FMA, or one plain float), and
 * the few operations the kernels need, so each kernel is written once (gpt2engine.kernels). */
#ifndef GPT2ENGINE_VEC_H
#define GPT2ENGINE_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* One weight of each float format as a float, for the tails of rows that are not a multiple of VL. */
static inline float load_f32(const float *w) { return *w; }
static inline float load_bf16(const uint16_t *w) {
    uint32_t bits = (uint32_t)*w << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* vec: VL float32 lanes, the widest the CPU has; widen_*: VL weights of a float format as floats. */
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
static inline vec vset1(float f) { return _mm512_set1_ps(f); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vscale2(vec p, vec n) { return _mm512_scalef_ps(p, n); }  /* p * 2^n */
static inline vec vzero_below(vec v, vec x, vec lo) {  /* 0 where x < lo */
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
}
static inline vec vabs(vec a) { return _mm512_abs_ps(a); }
static inline void vstore_i8(int8_t *p, vec whole) {  /* VL whole numbers within +-127 */
    _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(whole)));
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
static inline vec vset1(float f) { return _mm256_set1_ps(f); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vscale2(vec p, vec n) {  /* p * 2^n, for -126 <= n <= 0 */
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline vec vzero_below(vec v, vec x, vec lo) {  /* 0 where x < lo */
    return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}
static inline vec vabs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline void vstore_i8(int8_t *p, vec whole) {  /* VL whole numbers within +-127 */
    __m256i wide = _mm256_cvtps_epi32(whole);
    __m128i half = _mm_packs_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(half, half));
}
#else
#define VL 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline void vstore(float *p, vec v) { *p = v; }
static inline vec widen_f32(const float *p) { return *p; }
static inline vec widen_bf16(const uint16_t *p) { return load_bf16(p); }
static inline vec vset1(float f) { return f; }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline vec vmin(vec a, vec b) { return a < b ? a : b; }
static inline vec vdiv(vec a, vec b) { return a / b; }
static inline vec vround(vec a) { return nearbyintf(a); }
static inline vec vabs(vec a) { return fabsf(a); }
static inline void vstore_i8(int8_t *p, vec whole) { *p = (int8_t)whole; }
#endif

static inline vec vload(const float *p) { return widen_f32(p); }

/* The lanes of a sum added in a fixed order: halves pairwise, down to one (a few instructions,
 * where adding the lanes one after another was a chain of VL dependent additions per sum). */
#if VL > 1
static inline float reduce4(__m128 q) {
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));  /* lanes 0+2, 1+3 */
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
static inline float reduce8(__m256 h) {
    return reduce4(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif
#if VL == 16
static inline float reduce(vec v) {
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return reduce8(_mm256_add_ps(_mm512_castps512_ps256(v), high));
}
#elif VL == 8
static inline float reduce(vec v) { return reduce8(v); }
#else
static inline float reduce(vec v) { return v; }
#endif

/* The largest lane (NaN-free input). */
static inline float reduce_max(vec v) {
    float lanes[VL], m = -INFINITY;
    vstore(lanes, v);
    for (int l = 0; l < VL; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}

/* exp(x) for x <= 88 (softmax weights, the largest score subtracted; GELU's sigmoid), within 2
 * ulp: x = n ln 2 + r, |r| <= ln 2 / 2, exp(r) by Cephes' polynomial, times 2^n; below -87 it is 0. */
static inline float exp_flushed(float x) { return x < -87.0f ? 0.0f : expf(x); }  /* as vexp */
#if VL > 1
static inline vec vexp(vec x) {
    const vec lo = vset1(-87.0f);
    x = vmin(x, vset1(88.0f));
    vec n = vround(vmul(x, vset1(1.44269504088896341f)));
    vec r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vec p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vadd(vfma(p, vmul(r, r), r), vset1(1.0f));
    return vzero_below(vscale2(p, n), x, lo);
}
#else
static inline vec vexp(vec x) { return exp_flushed(x); }
#endif
#endif
