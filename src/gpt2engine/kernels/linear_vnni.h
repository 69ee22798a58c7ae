/* int8 weights against int8 activations, for CPUs with AVX-512 VNNI (included by linear.c).
 *
 * Widening int8 weights to float32 leaves a batched decode step bound by the multiplies, so here
 * the activations are quantized too, per row of x, as the prefill GEMM does (kernels/__init__.py):
 * xq = round(x / sx), sx = max |x| / 127. vpdpbusd multiplies unsigned by signed bytes, 64 at a
 * time into 16 int32 sums: the weights are made unsigned by flipping their top bit (q + 128),
 * and 128 * sum(xq) is taken back off. Integer sums are exact, so every row's result is the same
 * whatever the batch and whatever order the sums were added in; the prefill GEMM gets the same
 * integers from torch._int_mm.
 */
#include <immintrin.h>

#define BYTES 64

/* Each row of x: its scale (NaN if the row is not all finite; then its q are 0) and q; xsum: the
 * sum of its first n_vec q. Vectorised, the same bits as q = nearbyintf(x / s) one by one. */
static void quantize_rows(const float *x, int M, int in, int n_vec, int8_t *xq, float *xs,
                          int32_t *xsum) {
    const __m512 zero = _mm512_setzero_ps();
    for (int m = 0; m < M; m++) {
        const float *row = x + (size_t)m * in;
        int8_t *q = xq + (size_t)m * in;
        __m512 top_v = zero, poison = zero;  /* poison: x * 0 summed, NaN once an inf or NaN came by */
        int i = 0;
        for (; i + 16 <= in; i += 16) {
            __m512 v = _mm512_loadu_ps(row + i);
            top_v = _mm512_max_ps(top_v, _mm512_abs_ps(v));
            poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
        }
        float top = _mm512_reduce_max_ps(top_v);
        int finite = _mm512_reduce_add_ps(poison) == 0.0f;
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
        __m512 sv = _mm512_set1_ps(s);
        __m512i sum_v = _mm512_setzero_si512();
        for (i = 0; i + 16 <= in; i += 16) {
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + i), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i qi = _mm512_cvtps_epi32(r);  /* whole numbers within +-127: exact */
            _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(qi));
            if (i + 16 <= n_vec) sum_v = _mm512_add_epi32(sum_v, qi);
        }
        int32_t sum = _mm512_reduce_add_epi32(sum_v);
        for (; i < in; i++) {
            q[i] = (int8_t)nearbyintf(row[i] / s);
            sum += i < n_vec ? q[i] : 0;
        }
        xsum[m] = sum;
    }
}

static inline int32_t dot_exact(const int8_t *x, const int8_t *w, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)w[i] * x[i];
    return s;
}

/* R (1 or 4) rows of xq against 4 rows of W -> out[r][c] = xq[r] . w[c] (exact). One row of xq
 * reads the weight rows one after another, one stream through memory: 6% faster at batch 1 and
 * 20% at batch 2 and 3 than four rows side by side (measured on Zen 4). */
static inline void block_vnni(const int8_t *x, size_t ldx, int R, const int8_t *w, size_t ldw, int n,
                              int n_vec, const int32_t *xsum, int32_t out[4][4], int prefetch) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (R == 1) {
        for (int c = 0; c < 4; c++) {
            __m512i acc = _mm512_setzero_si512();
            for (int i = 0; i < n_vec; i += BYTES) {
                if (prefetch) __builtin_prefetch(w + (AHEAD + c) * ldw + i, 0, 1);
                __m512i wc = _mm512_xor_si512(_mm512_loadu_si512(w + c * ldw + i), flip);
                acc = _mm512_dpbusd_epi32(acc, wc, _mm512_loadu_si512(x + i));
            }
            int32_t tail = dot_exact(x + n_vec, w + c * ldw + n_vec, n - n_vec);
            out[0][c] = _mm512_reduce_add_epi32(acc) - 128 * xsum[0] + tail;
        }
        return;
    }
    __m512i acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
    for (int i = 0; i < n_vec; i += BYTES) {
        if (prefetch)
            for (int c = 0; c < 4; c++) __builtin_prefetch(w + (AHEAD + c) * ldw + i, 0, 1);
        __m512i wc[4];
        for (int c = 0; c < 4; c++) wc[c] = _mm512_xor_si512(_mm512_loadu_si512(w + c * ldw + i), flip);
        for (int r = 0; r < R; r++) {
            __m512i xr = _mm512_loadu_si512(x + r * ldx + i);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wc[c], xr);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) {
            int32_t s = _mm512_reduce_add_epi32(acc[r][c]) - 128 * xsum[r];
            for (int i = n_vec; i < n; i++) s += (int32_t)w[c * ldw + i] * x[r * ldx + i];
            out[r][c] = s;
        }
}

/* The weight blocks [first, last) of 4 rows against x quantized (xq, xs, xsum), through `epilogue`. */
static void blocks_vnni(const int8_t *xq, const float *xs, const int32_t *xsum, const int8_t *W,
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
                    /* a batch of one streams fastest with the hardware's prefetch alone: the step
                     * took 0.70-0.90x the time without ours (Zen 4); a batch of 2 or 8, 1.04x and 1.5x */
                    int ahead = M > 1 && m == 0 && blk + AHEAD / 4 + 1 <= last;
                    block_vnni(xm, in, R, w, in, in, n_vec, xsum + m, s, ahead);
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
    blocks_vnni(room->q, room->scale, room->sum, w->data, w->scale, w->bias, y, M, w->in, w->out,
                first, last, epilogue);
}

int gpt2engine_int8_activations(void) { return 1; }

/* For the prefill GEMM (torch._int_mm, kernels/__init__.py): x (M, in) quantized per row exactly as
 * above, into xq (M, in) and xs (M,), the rows shared among the threads. */
void gpt2engine_quantize(const float *x, int M, int in, int8_t *xq, float *xs, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int m = 0; m < M; m++) {
        int32_t sum;
        quantize_rows(x + (size_t)m * in, 1, in, in, xq + (size_t)m * in, xs + m, &sum);
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
