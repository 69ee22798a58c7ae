/* Loading: a checkpoint's float32 tensor into a weight of ours, in one pass (gpt2engine.kernels).
 *
 * Hugging Face keeps the block projections as Conv1D, (in, out), the transpose of our (out, in);
 * the formats (formats.py) store bfloat16 or int8 with a scale per output row. Here each thread
 * takes a share of the output rows, gathers them (a transpose reads 16 columns, one cache line,
 * per source row), checks that every value is finite, and writes them in the format: the same
 * values as formats.encode, bit for bit. With `release`, the source is a private file mapping
 * whose pages are given back as they are consumed, so loading never holds the whole file.
 */
#include <math.h>
#include <float.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels.h"

#define BLOCK 16  /* output rows gathered at a time */

/* float32 -> bfloat16, rounded to nearest even (as torch; the values are finite). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One output row of n values in `format`; 0 if one of them is NaN or infinite. */
static int encode_row(const float *w, int n, int format, void *dst, float *scale) {
    int finite = 1;
    float top = 0.0f;
    for (int i = 0; i < n; i++) {
        finite &= isfinite(w[i]) != 0;
        top = fabsf(w[i]) > top ? fabsf(w[i]) : top;
    }
    if (format == FORMAT_F32) {
        memcpy(dst, w, sizeof(float) * n);
    } else if (format == FORMAT_BF16) {
        for (int i = 0; i < n; i++) ((uint16_t *)dst)[i] = to_bf16(w[i]);
    } else {  /* symmetric: scale = max |w| / 127, q = round(w / scale), half to even */
        float s = (top > FLT_MIN ? top : FLT_MIN) / 127.0f;
        for (int i = 0; i < n; i++) {
            float q = nearbyintf(w[i] / s);
            ((int8_t *)dst)[i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
        }
        *scale = s;
    }
    return finite;
}

/* Give back the whole pages inside [begin, end) of a private file mapping (the page cache keeps
 * them; this process stops counting them). */
static void release_pages(const void *begin, const void *end) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = ((uintptr_t)begin + page - 1) & ~(page - 1), last = (uintptr_t)end & ~(page - 1);
    if (last > first) madvise((void *)first, last - first, MADV_DONTNEED);
}

/* src: (rows, cols) row-major float32; dst: (rows, cols) in `format`, or (cols, rows) when
 * `transpose`; scale: one per dst row for int8. Returns 1 if every value was finite. */
int gpt2engine_convert(const float *src, int rows, int cols, int transpose, int format, void *dst,
                       float *scale, int release, int threads) {
    int out = transpose ? cols : rows, n = transpose ? rows : cols, finite = 1;
    size_t width = format == FORMAT_F32 ? 4 : format == FORMAT_BF16 ? 2 : 1;
    #pragma omp parallel num_threads(threads) reduction(& : finite)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int first = (int)((long)out * t / nt), last = (int)((long)out * (t + 1) / nt);
        float *tile = transpose ? malloc(sizeof(float) * BLOCK * n) : NULL;
        const float *released = src + (size_t)first * cols;  /* this thread's rows before it: given back */
        if (transpose && !tile) finite = 0;  /* reported as a failed load; not expected */
        else
            for (int o = first; o < last; o += BLOCK) {
                int count = last - o < BLOCK ? last - o : BLOCK;
                if (transpose)
                    for (int i = 0; i < n; i++)
                        for (int r = 0; r < count; r++) tile[(size_t)r * n + i] = src[(size_t)i * cols + o + r];
                for (int r = 0; r < count; r++) {
                    const float *row = transpose ? tile + (size_t)r * n : src + (size_t)(o + r) * cols;
                    finite &= encode_row(row, n, format, (char *)dst + (size_t)(o + r) * n * width,
                                         scale ? scale + o + r : NULL);
                }
                if (release && !transpose) {  /* rows of the source done with */
                    const float *done = src + (size_t)(o + count) * cols;
                    release_pages(released, done);
                    released = (const float *)((uintptr_t)done & ~((uintptr_t)sysconf(_SC_PAGESIZE) - 1));
                    released = released > src ? released : src;
                }
            }
        free(tile);
    }
    if (release) release_pages(src, src + (size_t)rows * cols);
    return finite;
}
