/* A whole decode step of GPT-2 on the CPU in one call (gpt2engine.kernels.step).
 *
 * At batch 1 a step is mostly weight streaming, and driving it from Python, one torch call per
 * LayerNorm, product, attention and residual (some 150 of them for the 124M model), added half
 * as much again (docs/kernels.md). Here the whole step is one OpenMP parallel region: the threads share out each
 * product's weight rows (linear.c) and each layer's heads (attention.c), and meet at a barrier
 * between the stages. The residual adds and the GELU are the epilogues of the products before
 * them. The arithmetic is model.py's, row by row, so a row gives the same bits alone or in any
 * batch.
 *
 * Hook points of the residual stream (hooks.py) are tapped here too, so a request that captures or
 * steers them keeps the fused step: tap k of layer l is 3l + k (k: 0 hook_resid_pre, 1 hook_resid_mid,
 * 2 hook_resid_post), tap 3 n_layer is ln_final.hook_normalized. `steer[t]`, where not NULL, is added
 * to rows (B, C) at tap t; then `capture[t]`, where not NULL, receives them (B, C).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct {
    const float *ln_1_weight, *ln_1_bias;
    Weight attn, attn_proj;  /* c_attn (fused q, k, v), attn.c_proj */
    const float *ln_2_weight, *ln_2_bias;
    Weight fc, mlp_proj;  /* mlp.c_fc, mlp.c_proj */
    float *k_cache, *v_cache;  /* (rows, H, S, D) */
    float attn_scale;
} Layer;

typedef struct {
    int n_layer, n_embd, n_head, n_inner, max_len, activation;  /* activation: GELU_TANH or GELU_ERF */
    float eps;
    Weight wte;  /* (V, C), looked up by row; also the head when tied */
    const float *wpe;  /* (P, C) */
    const Layer *layers;
    const float *ln_f_weight, *ln_f_bias;
    Weight head;  /* (V, C) */
} Model;

/* (C,) -> (C,): (x - mean) / sqrt(var + eps) * weight + bias, as torch.layer_norm. */
static void layer_norm(const float *x, const float *weight, const float *bias, float *y, int C, float eps) {
    double sum = 0.0, squares = 0.0;
    for (int i = 0; i < C; i++) sum += x[i];
    float mean = (float)(sum / C);
    for (int i = 0; i < C; i++) squares += (double)(x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf((float)(squares / C) + eps);
    for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * inv * weight[i] + bias[i];
}

/* Row `token` of the token embedding in its format, plus row `position` of the position one. */
static void embed(const Model *m, int64_t token, int64_t position, float *x) {
    int C = m->n_embd;
    const float *wpe = m->wpe + (size_t)position * C;
    const float *scale = m->wte.scale;
    switch (m->wte.format) {
    case FORMAT_F32: {
        const float *row = (const float *)m->wte.data + (size_t)token * C;
        for (int i = 0; i < C; i++) x[i] = row[i] + wpe[i];
        break;
    }
    case FORMAT_BF16: {
        const uint16_t *row = (const uint16_t *)m->wte.data + (size_t)token * C;
        for (int i = 0; i < C; i++) {
            union { uint32_t bits; float f; } wide = {(uint32_t)row[i] << 16};
            x[i] = wide.f + wpe[i];
        }
        break;
    }
    default: {
        const int8_t *row = (const int8_t *)m->wte.data + (size_t)token * C;
        for (int i = 0; i < C; i++) x[i] = (float)row[i] * scale[token] + wpe[i];
    }
    }
}

/* Row b of tap t: steered, then captured (steer and capture may be NULL: no taps at all). */
static void tap(const float *const *steer, float *const *capture, int t, float *x, int b, int C) {
    if (steer && steer[t]) {
        const float *add = steer[t] + (size_t)b * C;
        for (int i = 0; i < C; i++) x[i] += add[i];
    }
    if (capture && capture[t]) memcpy(capture[t] + (size_t)b * C, x, sizeof(float) * C);
}

/* tokens, positions: (B,) -> logits: (B, V); each step row's key and value written into its cache
 * slot. Step row b is cache row rows[b] (rows NULL: b); several step rows of one cache row at
 * consecutive positions are a speculative verification, each computed as its own decode step. */
#define ROW(b) (rows ? rows[b] : (int64_t)(b))
void gpt2engine_decode_step(const Model *m, const int64_t *tokens, const int64_t *positions, const int64_t *rows,
                            int B, float *logits, int threads, const float *const *steer, float *const *capture) {
    int C = m->n_embd, H = m->n_head, D = C / H, widest = m->n_inner > C ? m->n_inner : C;
    float *x = malloc(sizeof(float) * B * C), *h = malloc(sizeof(float) * B * C);
    float *qkv = malloc(sizeof(float) * B * 3 * C), *att = malloc(sizeof(float) * B * C);
    float *hidden = malloc(sizeof(float) * B * m->n_inner);
    Quantized room = {malloc((size_t)B * widest), malloc(sizeof(float) * B), malloc(sizeof(int32_t) * B)};
    if (x && h && qkv && att && hidden && room.q && room.scale && room.sum) {
        #pragma omp parallel num_threads(threads)
        {
            #pragma omp for
            for (int b = 0; b < B; b++) embed(m, tokens[b], positions[b], x + (size_t)b * C);
            for (int l = 0; l < m->n_layer; l++) {
                const Layer *L = &m->layers[l];
                #pragma omp for
                for (int b = 0; b < B; b++) {
                    if (l > 0) tap(steer, capture, 3 * l - 1, x + (size_t)b * C, b, C);
                    tap(steer, capture, 3 * l, x + (size_t)b * C, b, C);
                    layer_norm(x + (size_t)b * C, L->ln_1_weight, L->ln_1_bias, h + (size_t)b * C, C, m->eps);
                }
                gpt2engine_linear_part(&L->attn, h, qkv, B, STORE, &room);
                #pragma omp barrier
                #pragma omp for
                for (int b = 0; b < B; b++)
                    gpt2engine_store_kv(qkv, L->k_cache, L->v_cache, positions[b], b, ROW(b), H, m->max_len, D);
                #pragma omp for collapse(2) schedule(static)
                for (int b = 0; b < B; b++)
                    for (int head = 0; head < H; head++)
                        gpt2engine_attend(qkv, L->k_cache, L->v_cache, positions[b], att, b, ROW(b), head, H,
                                          m->max_len, D, L->attn_scale);
                gpt2engine_linear_part(&L->attn_proj, att, x, B, ADD, &room);
                #pragma omp barrier
                #pragma omp for
                for (int b = 0; b < B; b++) {
                    tap(steer, capture, 3 * l + 1, x + (size_t)b * C, b, C);
                    layer_norm(x + (size_t)b * C, L->ln_2_weight, L->ln_2_bias, h + (size_t)b * C, C, m->eps);
                }
                gpt2engine_linear_part(&L->fc, h, hidden, B, m->activation, &room);
                #pragma omp barrier
                gpt2engine_linear_part(&L->mlp_proj, hidden, x, B, ADD, &room);
                #pragma omp barrier
            }
            #pragma omp for
            for (int b = 0; b < B; b++) {
                int last = 3 * m->n_layer;
                tap(steer, capture, last - 1, x + (size_t)b * C, b, C);
                layer_norm(x + (size_t)b * C, m->ln_f_weight, m->ln_f_bias, h + (size_t)b * C, C, m->eps);
                tap(NULL, capture, last, h + (size_t)b * C, b, C);
            }
            gpt2engine_linear_part(&m->head, h, logits, B, STORE, &room);
        }
    } else {  /* a few KB: not expected; report NaN rather than crash */
        for (size_t k = 0; k < (size_t)B * m->head.out; k++) logits[k] = NAN;
    }
    free(x), free(h), free(qkv), free(att), free(hidden), free(room.q), free(room.scale), free(room.sum);
}
