/* y = x W^T + b on the CPU, with W in float32, bfloat16 or int8 (gpt2engine.kernels).
 *
 * Decoding reads every weight once per token, so its speed is memory bandwidth: each block of 4
 * weight rows is read from memory once and stays in cache while the rows of x pass over it, 4 at
 * a time (16 sums in registers), the last 1 to 3 together; the next block is prefetched meanwhile.
 * Smaller weights stream faster: bfloat16 (a float32 cut to its top 16 bits) is widened to float32
 * in registers, so x and the sums stay float32; int8 (per output row, w = scale * q) meets x
 * quantized to int8 in integer sums (linear_int8.h).
 * Long inputs (a prefill) go over the weights in tiles of TILE rows of x, which stay in cache.
 * Batch invariance: every sum x[m] . W[o] is accumulated lane by lane (VL lanes, lane l taking
 * the products i = l, l + VL, ...) and the lanes are added in a fixed order, in both routines, so a
 * row gives bit-identical results alone or in any batch.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define TILE 32  /* rows of x per pass over the weights */
#define AHEAD 8  /* weight rows ahead of the block in use to prefetch (2 blocks) */
#ifndef PREFETCH_ONE_ROW  /* whether a batch of one prefetches too (native.py decides per CPU) */
#define PREFETCH_ONE_ROW 1
#endif

#include "vec.h"

#define TWO_SQRT_2_OVER_PI 1.5957691216f

/* GELU's tanh approximation as v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3). */
static inline float gelu_tanh(float v) {
    return v / (1.0f + expf(-TWO_SQRT_2_OVER_PI * (v + 0.044715f * v * v * v)));
}

/* Where a product's value v goes (kernels.h): y = v, y += v (a residual), y = gelu(v). */
static inline void emit(float *y, float v, int epilogue) {
    switch (epilogue) {
    case ADD: *y += v; break;
    case GELU_TANH: *y = gelu_tanh(v); break;
    case GELU_ERF: *y = 0.5f * v * (1.0f + erff(v * 0.70710678118f)); break;
    default: *y = v;
    }
}

/* x = gelu_tanh(x) in place over a prefill's MLP: one vectorised pass on every thread instead of
 * torch's six. */
void gpt2engine_gelu_tanh(float *x, long n, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long start = 0; start < n; start += 4096) {
        long end = n - start < 4096 ? n : start + 4096, i = start;
        for (; i + VL <= end; i += VL) {
            vec v = vload(x + i);
            vec t = vmul(vmul(v, vset1(-TWO_SQRT_2_OVER_PI)), vfma(vmul(v, v), vset1(0.044715f), vset1(1.0f)));
            vstore(x + i, vdiv(v, vadd(vset1(1.0f), vexp(t))));
        }
        for (; i < end; i++) x[i] = gelu_tanh(x[i]);
    }
}

/* One copy of the routines per weight type: W_T is the element, WIDEN loads VL of them, LOAD one.
 * ONE_STREAM: a single row of x reads each block's weight rows one after another. For float32 that
 * streams faster everywhere measured; bfloat16, which widens in the sum's one dependency chain,
 * only with our prefetch and 16 lanes (docs/kernels.md). */
#define W_T float
#define ONE_STREAM 1
#define WIDEN widen_f32
#define LOAD load_f32
#define NAME(f) f##_f32
#include "linear_body.h"

#define W_T uint16_t
#define ONE_STREAM (PREFETCH_ONE_ROW && VL >= 16)
#define WIDEN widen_bf16
#define LOAD load_bf16
#define NAME(f) f##_bf16
#include "linear_body.h"

#include "linear_int8.h"

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
