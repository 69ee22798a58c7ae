/* Attention on the CPU (gpt2engine.kernels): a decode step's, fused (called by step.c), and a
 * prefill chunk's, causal (below).
 *
 * A decode step has one new token per step row: its key and value are written into its cache row's
 * slot `position` (all rows' first, so that several step rows of one cache row, a speculative
 * verification's consecutive positions, see each other), then its query attends to the slots
 * 0..position of that cache row only, so each row costs what its own length costs and gives the
 * same bits alone or in any batch. Replaces, per layer: split,
 * three transposes, the cache scatter, the masked scaled_dot_product_attention and the reshape
 * back, a dozen small torch calls.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

/* qkv: (B, 3*H*D), the fused projection of the new tokens (q, then k, then v, heads within each);
 * k_cache, v_cache: (rows, H, S, D). Step row b's key and value, every head, into cache row `row`. */
void gpt2engine_store_kv(const float *qkv, float *k_cache, float *v_cache, int64_t position, int b, int64_t row,
                         int H, int S, int D) {
    for (int h = 0; h < H; h++) {
        const float *q = qkv + (size_t)b * 3 * H * D + (size_t)h * D;
        size_t slot = (((size_t)row * H + h) * S + (size_t)position) * D;
        memcpy(k_cache + slot, q + (size_t)H * D, D * sizeof(float));
        memcpy(v_cache + slot, q + (size_t)2 * H * D, D * sizeof(float));
    }
}

/* Step row b's query, head h, over slots 0..position of cache row `row` (stored already) -> out:
 * (B, H*D). */
void gpt2engine_attend(const float *qkv, const float *k_cache, const float *v_cache, int64_t position,
                       float *out, int b, int64_t row, int h, int H, int S, int D, float scale) {
    const float *q = qkv + (size_t)b * 3 * H * D + (size_t)h * D;
    const float *k = k_cache + ((size_t)row * H + h) * S * D, *v = v_cache + ((size_t)row * H + h) * S * D;
    int last = (int)position;
    float weights[last + 1], acc[D], top = -INFINITY, total = 0.0f;
    for (int j = 0; j <= last; j++) {
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++) s += q[d] * k[(size_t)j * D + d];
        weights[j] = s * scale;
        top = weights[j] > top ? weights[j] : top;
    }
    for (int d = 0; d < D; d++) acc[d] = 0.0f;
    for (int j = 0; j <= last; j++) {
        float p = expf(weights[j] - top);
        total += p;
        #pragma omp simd
        for (int d = 0; d < D; d++) acc[d] += p * v[(size_t)j * D + d];
    }
    float *o = out + (size_t)b * H * D + (size_t)h * D;
    for (int d = 0; d < D; d++) o[d] = acc[d] / total;
}

#define QB 8  /* queries of a prefill chunk taken together */

/* The causal attention of a prefill chunk for one row: the queries of positions start..start+T-1,
 * whose keys and values are already in the cache, each attending to the slots 0..its position.
 * torch's CPU attention computes every score of the chunk against every slot and masks half of
 * them away; here the heads are shared out among the threads, each transposes its head's keys
 * once, and the scores of QB queries against VL keys come out of D fused multiply-adds apiece,
 * only up to the last query's position; the softmax's exponentials are vectorised (vec.h).
 * qkv: (T, 3*H*D); k_cache, v_cache: (H, S, D), this row's; out: (T, H*D). 0 if out of memory. */
int gpt2engine_prefill_attention(const float *qkv, const float *k_cache, const float *v_cache, float *out,
                                 int T, int start, int H, int S, int D, float scale, int threads) {
    int keys_all = start + T, padded = (keys_all + VL - 1) / VL * VL, ok = 1;
    #pragma omp parallel num_threads(threads) reduction(& : ok)
    {
        float *kt = malloc(sizeof(float) * (size_t)D * padded);  /* this head's keys, (D, padded) */
        float *p = malloc(sizeof(float) * (size_t)QB * padded);  /* scores, then softmax weights */
        if (!kt || !p) ok = 0;
        #pragma omp for schedule(static)
        for (int h = 0; h < H; h++) {
            if (!kt || !p) continue;
            const float *k = k_cache + (size_t)h * S * D, *v = v_cache + (size_t)h * S * D;
            for (int j = 0; j < padded; j++)
                for (int d = 0; d < D; d++) kt[(size_t)d * padded + j] = j < keys_all ? k[(size_t)j * D + d] : 0.0f;
            for (int t0 = 0; t0 < T; t0 += QB) {
                int nq = T - t0 < QB ? T - t0 : QB, keys = start + t0 + nq;  /* the last query's slots */
                const float *q[QB];
                for (int i = 0; i < QB; i++)  /* past the chunk: the last query again, never stored */
                    q[i] = qkv + (size_t)(t0 + (i < nq ? i : nq - 1)) * 3 * H * D + (size_t)h * D;
                for (int j0 = 0; j0 < keys; j0 += VL) {  /* scores */
                    vec acc[QB];
                    for (int i = 0; i < QB; i++) acc[i] = vzero();
                    for (int d = 0; d < D; d++) {
                        vec kd = vload(kt + (size_t)d * padded + j0);
                        for (int i = 0; i < QB; i++) acc[i] = vfma(vset1(q[i][d]), kd, acc[i]);
                    }
                    for (int i = 0; i < nq; i++) vstore(p + (size_t)i * padded + j0, vmul(acc[i], vset1(scale)));
                }
                float total[QB];
                for (int i = 0; i < nq; i++) {  /* softmax over each query's own slots; 0 past them */
                    float *s = p + (size_t)i * padded;
                    int n = start + t0 + i + 1, j = 0;
                    vec top_v = vset1(-INFINITY);
                    for (; j + VL <= n; j += VL) top_v = vmax(top_v, vload(s + j));
                    float top = reduce_max(top_v), sum = 0.0f;
                    for (; j < n; j++) top = s[j] > top ? s[j] : top;
                    vec sum_v = vzero(), shift = vset1(-top);
                    for (j = 0; j + VL <= n; j += VL) {
                        vec e = vexp(vadd(vload(s + j), shift));
                        vstore(s + j, e);
                        sum_v = vadd(sum_v, e);
                    }
                    for (; j < n; j++) sum += s[j] = exp_flushed(s[j] - top);
                    for (; j < keys; j++) s[j] = 0.0f;
                    total[i] = reduce(sum_v) + sum;
                }
                for (int i = nq; i < QB; i++) {  /* rows past the chunk weigh nothing */
                    memset(p + (size_t)i * padded, 0, sizeof(float) * keys);
                    total[i] = 1.0f;
                }
                int d0 = 0;
                for (; d0 + VL <= D; d0 += VL) {  /* out[i] = sum_j p[i][j] v[j] / total[i], VL dims at a time */
                    vec acc[QB];
                    for (int i = 0; i < QB; i++) acc[i] = vzero();
                    for (int j = 0; j < keys; j++) {
                        vec vj = vload(v + (size_t)j * D + d0);
                        for (int i = 0; i < QB; i++) acc[i] = vfma(vset1(p[(size_t)i * padded + j]), vj, acc[i]);
                    }
                    for (int i = 0; i < nq; i++)
                        vstore(out + (size_t)(t0 + i) * H * D + (size_t)h * D + d0, vmul(acc[i], vset1(1.0f / total[i])));
                }
                for (int i = 0; i < nq; i++)  /* the dims past the last whole vector */
                    for (int d = d0; d < D; d++) {
                        float a = 0.0f;
                        for (int j = 0; j < keys; j++) a += p[(size_t)i * padded + j] * v[(size_t)j * D + d];
                        out[(size_t)(t0 + i) * H * D + (size_t)h * D + d] = a * (1.0f / total[i]);
                    }
            }
        }
        free(kt), free(p);
    }
    return ok;
}
