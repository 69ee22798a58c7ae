/* int8 weights against int8 activations, on every CPU (included by linear.c).
 *
 * Widening int8 weights to float32 leaves a batched decode step bound by the multiplies, so the
 * activations are quantized too, per row of x, as the prefill GEMM does (kernels/__init__.py):
 * xq = round(x / sx), sx = max |x| / 127. The products are then summed in int32, exactly, so a
 * row's result has the same bits whatever the batch, whatever order the sums were added in, and
 * whichever instruction set added them: AVX-512 VNNI, AVX2 or plain C (and torch._int_mm in the
 * prefill GEMM). Per instruction set, BYTES int8 products at a time into int32 lanes (ivec):
 * - AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so the weights are made unsigned
 *   by flipping their top bit (q + 128), and 128 * sum(xq) is taken back off (xsum);
 * - AVX2 (llama.cpp's q8_0 dot product): vpmaddubsw multiplies |xq| (unsigned) by the weight with
 *   xq's sign (signed), adding pairs into int16 (at most 2 * 127 * 127: no saturation), and
 *   vpmaddwd adds those pairs into int32;
 * - plain C: one product at a time.
 */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define BYTES 64
#define FLIPPED 128  /* the weights are read as q + 128 */
typedef __m512i ivec;
static inline ivec izero(void) { return _mm512_setzero_si512(); }
static inline ivec iload(const int8_t *p) { return _mm512_loadu_si512(p); }
static inline ivec iweight(const int8_t *p) { return _mm512_xor_si512(iload(p), _mm512_set1_epi8((char)0x80)); }
static inline ivec idot(ivec acc, ivec w, ivec x) { return _mm512_dpbusd_epi32(acc, w, x); }
static inline int32_t ireduce(ivec v) { return _mm512_reduce_add_epi32(v); }
#elif defined(__AVX2__)
#include <immintrin.h>
#define BYTES 32
#define FLIPPED 0
typedef __m256i ivec;
static inline ivec izero(void) { return _mm256_setzero_si256(); }
static inline ivec iload(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline ivec iweight(const int8_t *p) { return iload(p); }
static inline ivec idot(ivec acc, ivec w, ivec x) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
static inline int32_t ireduce(ivec v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}
#else
#define BYTES 1
#define FLIPPED 0
typedef int32_t ivec;
static inline ivec izero(void) { return 0; }
static inline ivec iload(const int8_t *p) { return *p; }
static inline ivec iweight(const int8_t *p) { return *p; }
static inline ivec idot(ivec acc, ivec w, ivec x) { return acc + w * x; }
static inline int32_t ireduce(ivec v) { return v; }
#endif

/* Each row of x: its scale (NaN if the row is not all finite; then its q are 0) and q; xsum: the
 * sum of its first n_vec q. Vectorised, the same bits as q = nearbyintf(x / s) one by one. */
static void quantize_rows(const float *x, int M, int in, int n_vec, int8_t *xq, float *xs,
                          int32_t *xsum) {
    for (int m = 0; m < M; m++) {
        const float *row = x + (size_t)m * in;
        int8_t *q = xq + (size_t)m * in;
        vec top_v = vzero(), poison = vzero();  /* poison: x * 0 summed, NaN once an inf or NaN came by */
        int i = 0;
        for (; i + VL <= in; i += VL) {
            vec v = vload(row + i);
            top_v = vmax(top_v, vabs(v));
            poison = vadd(poison, vmul(v, vzero()));
        }
        float top = reduce_max(top_v);
        int finite = reduce(poison) == 0.0f;
        for (int j = i; j < in; j++) {
            top = fabsf(row[j]) > top ? fabsf(row[j]) : top;
            finite &= isfinite(row[j]) != 0;
        }
        float s = finite ? int8_scale(top) : NAN;  /* NaN in, NaN out */
        xs[m] = s;
        if (!finite) {
            memset(q, 0, (size_t)in);
            xsum[m] = 0;
            continue;
        }
        vec sv = vset1(s);
        for (i = 0; i + VL <= in; i += VL) vstore_i8(q + i, vround(vdiv(vload(row + i), sv)));
        for (; i < in; i++) q[i] = (int8_t)nearbyintf(row[i] / s);
        int32_t sum = 0;
        for (i = 0; i < n_vec; i++) sum += q[i];
        xsum[m] = sum;
    }
}

static inline int32_t dot_exact(const int8_t *x, const int8_t *w, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)w[i] * x[i];
    return s;
}

/* R (1 or 4) rows of xq against 4 rows of W -> out[r][c] = xq[r] . w[c] (exact). One row of xq
 * reads the weight rows one after another, one stream through memory: faster at batches 1 to 3
 * than four rows side by side (docs/kernels.md). */
static inline void block_i8(const int8_t *x, size_t ldx, int R, const int8_t *w, size_t ldw, int n,
                            int n_vec, const int32_t *xsum, int32_t out[4][4], int prefetch) {
    if (R == 1) {
        for (int c = 0; c < 4; c++) {
            ivec acc = izero();
            for (int i = 0; i < n_vec; i += BYTES) {
                if (prefetch) __builtin_prefetch(w + (AHEAD + c) * ldw + i, 0, 1);
                acc = idot(acc, iweight(w + c * ldw + i), iload(x + i));
            }
            int32_t tail = dot_exact(x + n_vec, w + c * ldw + n_vec, n - n_vec);
            out[0][c] = ireduce(acc) - FLIPPED * xsum[0] + tail;
        }
        return;
    }
    ivec acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = izero();
    for (int i = 0; i < n_vec; i += BYTES) {
        if (prefetch)
            for (int c = 0; c < 4; c++) __builtin_prefetch(w + (AHEAD + c) * ldw + i, 0, 1);
        ivec wc[4];
        for (int c = 0; c < 4; c++) wc[c] = iweight(w + c * ldw + i);
        for (int r = 0; r < R; r++) {
            ivec xr = iload(x + r * ldx + i);
            for (int c = 0; c < 4; c++) acc[r][c] = idot(acc[r][c], wc[c], xr);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++)
            out[r][c] = ireduce(acc[r][c]) - FLIPPED * xsum[r]
                        + dot_exact(x + r * ldx + n_vec, w + c * ldw + n_vec, n - n_vec);
}

/* The weight blocks [first, last) of 4 rows against x quantized (xq, xs, xsum), through `epilogue`. */
static void blocks_i8(const int8_t *xq, const float *xs, const int32_t *xsum, const int8_t *W,
                      const float *scale, const float *b, float *y, int M, int in, int out,
                      int first, int last, int epilogue) {
    int n_vec = in - in % BYTES;
    for (int tile = 0; tile < M; tile += TILE) {
        int tile_end = M - tile < TILE ? M : tile + TILE;
        for (int blk = first; blk < last; blk++) {
            int o = 4 * blk, n = out - o < 4 ? out - o : 4;
            const int8_t *w = W + (size_t)o * in;
            for (int m = tile; m < tile_end;) {
                int R = (n == 4 && tile_end - m >= 4) ? 4 : 1;
                int32_t s[4][4];
                const int8_t *xm = xq + (size_t)m * in;
                if (n == 4) {
                    int ahead = (M > 1 || PREFETCH_ONE_ROW) && m == 0 && blk + AHEAD / 4 + 1 <= last;
                    block_i8(xm, in, R, w, in, in, n_vec, xsum + m, s, ahead);
                } else {
                    for (int c = 0; c < n; c++) s[0][c] = dot_exact(xm, w + (size_t)c * in, in);
                }
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < n; c++)
                        emit(y + (size_t)(m + r) * out + o + c,
                             (float)s[r][c] * xs[m + r] * scale[o + c] + (b ? b[o + c] : 0.0f), epilogue);
                m += R;
            }
        }
    }
}

/* x is quantized once, by one thread, into the shared room; then each thread takes its share. */
static void part_i8(const Weight *w, const float *x, float *y, int M, int epilogue, Quantized *room,
                    int first, int last) {
    #pragma omp single
    quantize_rows(x, M, w->in, w->in - w->in % BYTES, room->q, room->scale, room->sum);
    blocks_i8(room->q, room->scale, room->sum, w->data, w->scale, w->bias, y, M, w->in, w->out,
              first, last, epilogue);
}

/* For the prefill GEMM (torch._int_mm, kernels/__init__.py): x (M, in) quantized per row exactly as
 * above, into xq (M, in) and xs (M,), the rows shared among the threads. */
void gpt2engine_quantize(const float *x, int M, int in, int8_t *xq, float *xs, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int m = 0; m < M; m++) {
        int32_t sum;
        quantize_rows(x + (size_t)m * in, 1, in, 0, xq + (size_t)m * in, xs + m, &sum);
    }
}

/* ... and its exact int32 sums (M, out) back to floats: y = sums * xs[m] * scale[o] + b[o]. */
void gpt2engine_dequantize(const int32_t *sums, int M, int out, const float *xs, const float *scale,
                           const float *b, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int m = 0; m < M; m++)
        for (int o = 0; o < out; o++)
            y[(size_t)m * out + o] = (float)sums[(size_t)m * out + o] * xs[m] * scale[o] + (b ? b[o] : 0.0f);
}
