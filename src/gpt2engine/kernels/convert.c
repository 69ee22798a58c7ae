/* Loading: a checkpoint's float32 tensor into a weight of ours, in one pass (gpt2engine.kernels).
 *
 * Hugging Face keeps the block projections as Conv1D, (in, out), the transpose of our (out, in);
 * the formats (formats.py) store bfloat16 or int8 with a scale per output row. Here the threads
 * share out the source rows, check that every value is finite and write them in the format: the
 * same values as formats.encode, bit for bit.
 *
 * A tensor in a file is read with pread, BLOCK rows at a time, into a buffer of each thread's:
 * read through the file's memory map instead, the kernel maps each large folio of the page cache
 * whole at its first touch, and that much stays counted in the process until given back: at the
 * end of a load, those pages were the top of the peak (docs/loading.md).
 */
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels.h"

#define BLOCK 16  /* source rows (and columns of a transpose) handled at a time */

typedef struct {
    const float *memory;  /* the tensor, or NULL: then it is in file `fd` at byte `offset` */
    int fd;
    int64_t offset;
    int cols;
} Source;

/* Source rows [first, first + count): where they lie in memory, else read into `buffer` (room
 * for BLOCK rows). NULL if the file cannot be read. */
static const float *source_rows(const Source *s, int first, int count, float *buffer) {
    size_t stride = sizeof(float) * (size_t)s->cols;
    if (s->memory) return s->memory + (size_t)first * s->cols;
    char *at = (char *)buffer;
    size_t left = stride * count;
    off_t where = (off_t)(s->offset + (int64_t)stride * first);
    while (left > 0) {
        ssize_t got = pread(s->fd, at, left, where);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return NULL;
        at += got, where += got, left -= (size_t)got;
    }
    return buffer;
}

/* The next source rows of a thread's share [i, last), BLOCK at most, into *rows: how many, 0 at
 * its end or if the file cannot be read (then *readable = 0). */
static int next_rows(const Source *s, int i, int last, float *buffer, const float **rows, int *readable) {
    int count = last - i < BLOCK ? last - i : BLOCK;
    if (count <= 0 || !*readable) return 0;
    if (!(*rows = source_rows(s, i, count, buffer))) *readable = 0;
    return *rows ? count : 0;
}

/* float32 -> bfloat16, rounded to nearest even (as torch; the values are finite). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* The value w of a row whose scale is s, in `format`, at dst[i]: int8 as round(w / s), half to even. */
static inline void encode_value(float w, int format, void *dst, size_t i, float s) {
    if (format == FORMAT_F32) {
        ((float *)dst)[i] = w;
    } else if (format == FORMAT_BF16) {
        ((uint16_t *)dst)[i] = to_bf16(w);
    } else {
        float q = nearbyintf(w / s);
        ((int8_t *)dst)[i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
    }
}

/* One output row of n values in `format` (and its scale in int8); 0 if one of them is NaN or infinite. */
static int encode_row(const float *w, int n, int format, void *dst, float *scale) {
    int finite = 1;
    float top = 0.0f, s = 0.0f;
    for (int i = 0; i < n; i++) {
        finite &= isfinite(w[i]) != 0;
        top = fabsf(w[i]) > top ? fabsf(w[i]) : top;
    }
    if (format == FORMAT_I8) *scale = s = int8_scale(top);
    for (int i = 0; i < n; i++) encode_value(w[i], format, dst, (size_t)i, s);
    return finite;
}

enum { UNREADABLE = -1 };  /* what a conversion returns besides 1 (all finite) and 0 */

/* dst = src in `format`: each thread encodes its share of the rows, BLOCK at a time. */
static int convert_rows(const Source *src, int rows, int format, void *dst, float *scale, int threads) {
    int finite = 1, readable = 1, cols = src->cols;
    size_t width = format == FORMAT_F32 ? 4 : format == FORMAT_BF16 ? 2 : 1;
    #pragma omp parallel num_threads(threads) reduction(& : finite, readable)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int first = (int)((long)rows * t / nt), last = (int)((long)rows * (t + 1) / nt);
        float *buffer = src->memory ? NULL : malloc(sizeof(float) * BLOCK * cols);
        const float *block;
        readable = src->memory || buffer;
        for (int o = first, count; (count = next_rows(src, o, last, buffer, &block, &readable)); o += count)
            for (int r = 0; r < count; r++)
                finite &= encode_row(block + (size_t)r * cols, cols, format,
                                     (char *)dst + (size_t)(o + r) * cols * width, scale ? scale + o + r : NULL);
        free(buffer);
    }
    return readable ? finite : UNREADABLE;
}

/* dst (cols, rows) = src (rows, cols) transposed, in `format`. The threads share out the source
 * rows and take them BLOCK at a time, writing BLOCK values of each of BLOCK output rows from a
 * tile. An int8 row's scale is the maximum of a source column: a pass of its own first. */
static int convert_transposed(const Source *src, int rows, int format, void *dst, float *scale, int threads) {
    int finite = 1, readable = 1, cols = src->cols;
    float *top = format == FORMAT_I8 ? calloc((size_t)threads * cols, sizeof(float)) : NULL;
    if (format == FORMAT_I8 && !top) return UNREADABLE;
    #pragma omp parallel num_threads(threads) reduction(& : finite, readable)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int first = (int)((long)rows * t / nt), last = (int)((long)rows * (t + 1) / nt);
        float *buffer = src->memory ? NULL : malloc(sizeof(float) * BLOCK * cols);
        const float *block;
        readable = src->memory || buffer;
        if (top) {
            float *mine = top + (size_t)t * cols;
            for (int i = first, count; (count = next_rows(src, i, last, buffer, &block, &readable)); i += count)
                for (int r = 0; r < count; r++)
                    for (int o = 0; o < cols; o++) {
                        float w = block[(size_t)r * cols + o];
                        finite &= isfinite(w) != 0;
                        mine[o] = fabsf(w) > mine[o] ? fabsf(w) : mine[o];
                    }
            #pragma omp barrier
            #pragma omp for
            for (int o = 0; o < cols; o++) {
                float s = 0.0f;
                for (int k = 0; k < nt; k++) s = top[(size_t)k * cols + o] > s ? top[(size_t)k * cols + o] : s;
                scale[o] = int8_scale(s);
            }  /* the loop's implied barrier: every scale is set before any is used */
        }
        float tile[BLOCK][BLOCK];
        for (int i = first, count; (count = next_rows(src, i, last, buffer, &block, &readable)); i += count) {
            for (int o = 0; o < cols; o += BLOCK) {
                int span = cols - o < BLOCK ? cols - o : BLOCK;
                for (int r = 0; r < count; r++)
                    for (int k = 0; k < span; k++) tile[k][r] = block[(size_t)r * cols + o + k];
                for (int k = 0; k < span; k++)
                    for (int r = 0; r < count; r++) {
                        if (!top) finite &= isfinite(tile[k][r]) != 0;
                        encode_value(tile[k][r], format, dst, (size_t)(o + k) * rows + i + r,
                                     top ? scale[o + k] : 0.0f);
                    }
            }
        }
        free(buffer);
    }
    free(top);
    return readable ? finite : UNREADABLE;
}

/* src: (rows, cols) row-major float32, in memory, or (memory NULL) in file fd at byte offset;
 * dst: (rows, cols) in `format`, or (cols, rows) when `transpose`; scale: one per dst row for
 * int8. Returns 1 if every value was finite, 0 if not, -1 if the file could not be read. */
int gpt2engine_convert(const float *memory, int fd, int64_t offset, int rows, int cols, int transpose,
                       int format, void *dst, float *scale, int threads) {
    Source src = {memory, fd, offset, cols};
    return (transpose ? convert_transposed : convert_rows)(&src, rows, format, dst, scale, threads);
}
