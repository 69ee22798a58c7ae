/* The attention of a decode step on the CPU, fused (gpt2engine.kernels, called by step.c).
 *
 * One new token per row: its key and value are written into the row's cache slot `position`,
 * then its query attends to the slots 0..position of that row only, so each row costs what its
 * own length costs and gives the same bits alone or in any batch. Replaces, per layer: split,
 * three transposes, the cache scatter, the masked scaled_dot_product_attention and the reshape
 * back, a dozen small torch calls.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* qkv: (B, 3*H*D), the fused projection of the new tokens (q, then k, then v, heads within each);
 * k_cache, v_cache: (B, H, S, D); out: (B, H*D); this call: row b, head h. */
void gpt2engine_attend(const float *qkv, float *k_cache, float *v_cache, int64_t position, float *out,
                       int b, int h, int H, int S, int D, float scale) {
    const float *q = qkv + (size_t)b * 3 * H * D + (size_t)h * D;
    float *k = k_cache + ((size_t)b * H + h) * S * D, *v = v_cache + ((size_t)b * H + h) * S * D;
    int last = (int)position;
    memcpy(k + (size_t)last * D, q + (size_t)H * D, D * sizeof(float));
    memcpy(v + (size_t)last * D, q + (size_t)2 * H * D, D * sizeof(float));
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
