/* The routines of linear.c for one weight type; included once per type with W_T, WIDEN, LOAD,
 * ONE_STREAM and NAME defined, which it undefines at its end. */

/* x . w over n inputs, the first `from` of them already summed lane by lane in `lanes`. */
static inline float NAME(finish)(vec lanes, const float *x, const W_T *w, int from, int n) {
    float s = reduce(lanes);
    for (int i = from; i < n; i++) s += x[i] * LOAD(w + i);
    return s;
}

/* R (1 to 4) rows of x against 4 rows of W -> out[r][c] = x[r] . w[c]. */
static inline void NAME(block)(const float *x, size_t ldx, int R, const W_T *w, size_t ldw, int n,
                               float out[4][4], int prefetch) {
    vec acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = vzero();
    int i = 0;
    for (; i + VL <= n; i += VL) {
        if (prefetch)  /* the next 4 weight rows, while this block computes */
            for (int c = 0; c < 4; c++) __builtin_prefetch(w + (AHEAD + c) * ldw + i, 0, 1);
        vec wc[4];
        for (int c = 0; c < 4; c++) wc[c] = WIDEN(w + c * ldw + i);
        for (int r = 0; r < R; r++) {
            vec xr = vload(x + r * ldx + i);
            for (int c = 0; c < 4; c++) acc[r][c] = vfma(xr, wc[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) out[r][c] = NAME(finish)(acc[r][c], x + r * ldx, w + c * ldw, i, n);
}

/* x . w over n inputs; `ahead` (or NULL): a weight row to prefetch meanwhile, a line at a time. */
static inline float NAME(dot)(const float *x, const W_T *w, int n, const W_T *ahead) {
    vec acc = vzero();
    int i = 0;
    for (; i + VL <= n; i += VL) {
        if (ahead && i % (64 / sizeof(W_T)) == 0) __builtin_prefetch(ahead + i, 0, 1);
        acc = vfma(vload(x + i), WIDEN(w + i), acc);
    }
    return NAME(finish)(acc, x, w, i, n);
}

/* x: (M, in), W: (out, in) row-major, scale: (out,) or NULL (y[.., o] = scale[o] * (x . W[o])),
 * b: (out,) or NULL, y: (M, out), through `epilogue`; the weight blocks [first, last) of 4 rows,
 * one thread's share. */
static void NAME(blocks)(const float *x, const W_T *W, const float *scale, const float *b, float *y,
                         int M, int in, int out, int first, int last, int epilogue) {
    /* at batch 1, where it is faster (see ONE_STREAM): each weight row in turn, one stream through
     * memory, by the same lane-by-lane sums as a block's */
    int one_stream = ONE_STREAM && M == 1;
    for (int tile = 0; tile < M; tile += TILE) {
        int tile_end = M - tile < TILE ? M : tile + TILE;
        for (int blk = first; blk < last; blk++) {
            int o = 4 * blk, n = out - o < 4 ? out - o : 4;
            const W_T *w = W + (size_t)o * in;
            for (int m = tile; m < tile_end;) {
                int R = n == 4 && !one_stream ? (tile_end - m < 4 ? tile_end - m : 4) : 1;
                float s[4][4];
                if (n == 4 && !one_stream) {
                    int ahead = m == 0 && blk + AHEAD / 4 + 1 <= last;  /* once per weight block */
                    const float *xm = x + (size_t)m * in;
                    switch (R) {  /* each a constant, so the sums stay in registers */
                    case 4: NAME(block)(xm, in, 4, w, in, in, s, ahead); break;
                    case 3: NAME(block)(xm, in, 3, w, in, in, s, ahead); break;
                    case 2: NAME(block)(xm, in, 2, w, in, in, s, ahead); break;
                    default: NAME(block)(xm, in, 1, w, in, in, s, ahead);
                    }
                } else {
                    int ahead = PREFETCH_ONE_ROW && one_stream && blk + AHEAD / 4 + 1 <= last;
                    for (int c = 0; c < n; c++)
                        s[0][c] = NAME(dot)(x + (size_t)m * in, w + (size_t)c * in, in,
                                            ahead ? w + (size_t)(AHEAD + c) * in : NULL);
                }
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < n; c++)
                        emit(y + (size_t)(m + r) * out + o + c,
                             (scale ? scale[o + c] * s[r][c] : s[r][c]) + (b ? b[o + c] : 0.0f), epilogue);
                m += R;
            }
        }
    }
}

#undef W_T
#undef ONE_STREAM
#undef WIDEN
#undef LOAD
#undef NAME
