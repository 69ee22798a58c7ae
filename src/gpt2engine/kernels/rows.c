/* Per-row scans of the logits a decode step returns (gpt2engine.kernels), vectorised: torch's
 * argmax and its isfinite reductions take 45 and 25 microseconds over GPT-2's 50,257 logits, a
 * twentieth of a batch-1 step in int8; these take a few. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define CHUNK 64

/* x: (B, V) -> finite[b] = 1 if no value of row b among its first n is NaN or infinite. */
void gpt2engine_rows_finite(const float *x, int B, int V, int n, uint8_t *finite) {
    for (int b = 0; b < B; b++) {
        const float *row = x + (size_t)b * V;
        float poison = 0.0f;  /* 0 * inf and 0 * NaN are NaN, and NaN carries through the sum */
        #pragma omp simd reduction(+ : poison)
        for (int i = 0; i < n; i++) poison += row[i] * 0.0f;
        finite[b] = poison == 0.0f;
    }
}

/* x: (B, V) without NaN -> index[b] = the first position of row b's largest value (torch.argmax). */
void gpt2engine_rows_argmax(const float *x, int B, int V, int64_t *index) {
    for (int b = 0; b < B; b++) {
        const float *row = x + (size_t)b * V;
        float top = -INFINITY;
        #pragma omp simd reduction(max : top)
        for (int i = 0; i < V; i++) top = row[i] > top ? row[i] : top;
        int64_t at = 0;
        for (int start = 0; start < V; start += CHUNK) {  /* the first chunk holding it, then its place */
            int end = V - start < CHUNK ? V : start + CHUNK, hit = 0;
            #pragma omp simd reduction(| : hit)
            for (int i = start; i < end; i++) hit |= row[i] == top;
            if (hit) {
                for (at = start; row[at] != top; at++) {}
                break;
            }
        }
        index[b] = at;
    }
}
