/* y = x W^T + b for float32 on the CPU, for the few rows of a decode step (gpt2engine.kernels).
 *
 * Decoding reads every weight once per token, so speed is memory bandwidth: each block of 4
 * weight rows is read from memory once and stays in cache while every row of x passes over it,
 * 4 rows of x at a time (16 sums in registers), the rest one at a time; the next block is
 * prefetched while the first rows of x pass over this one.
 * Batch invariance: every sum x[m] . W[o] is accumulated lane by lane (VL lanes, lane l taking
 * the products i = l, l + VL, ...) and the lanes are added in a fixed order, in both routines, so a
 * row gives bit-identical results alone or in any batch.
 */
#include <stddef.h>

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

static inline float finish(const float lanes[VL], const float *x, const float *w, int from, int n) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += lanes[l];
    for (int i = from; i < n; i++) s += x[i] * w[i];
    return s;
}

/* R (1 or 4) rows of x against 4 rows of W -> out[r][c] = x[r] . w[c]. */
static inline void block(const float *x, size_t ldx, int R, const float *w, size_t ldw, int n,
                         float out[4][4], int prefetch) {
    float acc[4][4][VL] = {{{0.0f}}};
    int i = 0;
    for (; i + VL <= n; i += VL) {
        if (prefetch)  /* the next 4 weight rows, while this block computes */
            for (int c = 0; c < 4; c++) __builtin_prefetch(w + (4 + c) * ldw + i, 0, 1);
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * ldx + i;
            for (int c = 0; c < 4; c++) {
                const float *wc = w + c * ldw + i;
                #pragma omp simd
                for (int l = 0; l < VL; l++) acc[r][c][l] += xr[l] * wc[l];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) out[r][c] = finish(acc[r][c], x + r * ldx, w + c * ldw, i, n);
}

static inline float dot(const float *x, const float *w, int n) {
    float acc[VL] = {0.0f};
    int i = 0;
    for (; i + VL <= n; i += VL) {
        #pragma omp simd
        for (int l = 0; l < VL; l++) acc[l] += x[i + l] * w[i + l];
    }
    return finish(acc, x, w, i, n);
}

/* x: (M, in), W: (out, in) row-major, b: (out,) or NULL, y: (M, out). */
void gpt2engine_linear_f32(const float *x, const float *W, const float *b, float *y,
                           int M, int in, int out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < out; o += 4) {
        int n = out - o < 4 ? out - o : 4;
        const float *w = W + (size_t)o * in;
        for (int m = 0; m < M;) {
            int R = (n == 4 && M - m >= 4) ? 4 : 1;
            float s[4][4];
            if (n == 4) {
                int ahead = m == 0 && o + 8 <= out;  /* once per weight block */
                if (R == 4) block(x + (size_t)m * in, in, 4, w, in, in, s, ahead);
                else block(x + (size_t)m * in, in, 1, w, in, in, s, ahead);
            } else {
                for (int c = 0; c < n; c++) s[0][c] = dot(x + (size_t)m * in, w + (size_t)c * in, in);
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < n; c++) y[(size_t)(m + r) * out + o + c] = s[r][c] + (b ? b[o + c] : 0.0f);
            m += R;
        }
    }
}
