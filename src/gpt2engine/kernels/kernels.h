/* What the kernel sources share (gpt2engine.kernels): a weight in one of the formats, the
 * epilogues a product can end with, and the per-thread parts the decode step (step.c) calls
 * inside its one parallel region. */
#ifndef GPT2ENGINE_KERNELS_H
#define GPT2ENGINE_KERNELS_H
#include <float.h>
#include <stdint.h>

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_I8 = 2 };  /* formats.py's FORMATS, in order */

/* The scale of a row quantized to int8 (symmetric, q in [-127, 127]) whose largest magnitude is
 * top: int8 weights (convert.c) and int8 activations (linear_vnni.h) alike. */
static inline float int8_scale(float top) {
    return (top > FLT_MIN ? top : FLT_MIN) / 127.0f;
}
enum { STORE = 0, ADD = 1, GELU_TANH = 2, GELU_ERF = 3 };  /* y = v, y += v, y = gelu(v) */

/* W: (out, in) row-major in `format`; scale: (out,) or NULL (w[o] = scale[o] * W[o]); bias: (out,) or NULL. */
typedef struct {
    const void *data;
    const float *scale, *bias;
    int format, in, out;
} Weight;

/* Room for M rows of x quantized to int8 (for int8 weights: linear_int8.h), shared by the threads. */
typedef struct {
    int8_t *q;
    float *scale;
    int32_t *sum;
} Quantized;

/* Called by every thread of a parallel region: this thread's share of the output columns of
 * y = epilogue(x W^T + b), x: (M, in), y: (M, out). No barrier at its end. */
void gpt2engine_linear_part(const Weight *w, const float *x, float *y, int M, int epilogue, Quantized *room);

/* One decode step's attention (attention.c): step row b's key and value into cache row `row`; then
 * its query, head h, over that cache row. */
void gpt2engine_store_kv(const float *qkv, float *k_cache, float *v_cache, int64_t position, int b, int64_t row,
                         int H, int S, int D);
void gpt2engine_attend(const float *qkv, const float *k_cache, const float *v_cache, int64_t position,
                       float *out, int b, int64_t row, int h, int H, int S, int D, float scale);
#endif
