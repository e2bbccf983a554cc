/* y = x W^T (+ bias) in float32 through a weight packed 16 output features at a time: W (N, K) is stored as
 * (N / 16, K, 16), so for each k the 16 weights of a block of outputs are one vector. A block of up to 16 rows
 * of x keeps its 16 x 16 sums in registers; each step over k loads one weight vector and multiplies it by each
 * row's x[r][k], broadcast from a transposed copy of x (16 rows' values of one k side by side, one cache line).
 * Each weight is read from memory once per 16 rows, which is what a decode step of a few to a few dozen
 * sequences is bound by; oneDNN's blocked product runs those shapes 1.2-1.35x slower on Zen 4.
 *
 * Built and loaded by matmul.py (which checks the arguments); tested against torch's float64 product.
 * Parallel over blocks of outputs on torch's OpenMP threads.
 */
#include "simd.h" /* astrai/model/native: vf, LANES */

#define ROWS 16 /* rows of x per register block */

/* Rows 0 .. R - 1 of one group (xt: (K, ROWS), row r's x[k] at xt[k * ROWS + r]) times output block `col`
 * (w: (K, 16)) into y[r][col .. col + 15] (rows N apart), plus bias[col ..] when given. */
static inline __attribute__((always_inline)) void block(const float *xt, const float *w, const float *bias,
                                                        float *y, int64_t K, int64_t N, int R, int64_t col) {
    vf acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        __builtin_prefetch(w + (k + LANES) * LANES, 0, 3); /* a kilobyte ahead: the weights stream from DRAM */
        vf wv;
        memcpy(&wv, w + k * LANES, sizeof wv);
        for (int r = 0; r < R; r++) acc[r] += xt[k * ROWS + r] * wv;
    }
    vf b = {0};
    if (bias != NULL) memcpy(&b, bias + col, sizeof b);
    for (int r = 0; r < R; r++) {
        vf out = acc[r] + b;
        memcpy(y + r * N + col, &out, sizeof out);
    }
}

/* x (M, K) contiguous, packed (N / 16, K, 16), bias (N) or NULL, y (M, N); scratch holds ceil(M / 16) * 16 * K
 * floats (x transposed per group of 16 rows). N a multiple of 16. */
void linear_f32(const float *x, int64_t M, int64_t K, const float *packed, int64_t N, const float *bias, float *y,
                float *scratch, int num_threads) {
    int64_t groups = (M + ROWS - 1) / ROWS, blocks = N / LANES;
#pragma omp parallel for num_threads(num_threads) if (M * K >= 65536)
    for (int64_t g = 0; g < groups; g++) {
        float *xt = scratch + g * ROWS * K;
        for (int64_t k = 0; k < K; k++)
            for (int64_t r = 0; r < ROWS; r++) xt[k * ROWS + r] = g * ROWS + r < M ? x[(g * ROWS + r) * K + k] : 0.0f;
    }
    /* Item = (output block, row group), block-major: each thread takes a contiguous run of the weights and
     * reuses each block (from L1 or L2) for every group of rows. */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t item = 0; item < blocks * groups; item++) {
        int64_t b = item / groups, g = item % groups, rows = M - g * ROWS < ROWS ? M - g * ROWS : ROWS;
        const float *xt = scratch + g * ROWS * K, *w = packed + b * K * LANES;
        float *out = y + g * ROWS * N;
        /* A constant row count per case: the sums stay in registers and the loops unroll. */
#define BLOCK(R) block(xt, w, bias, out, K, N, R, b * LANES)
        switch (rows) {
            case 1: BLOCK(1); break;
            case 2: BLOCK(2); break;
            case 3: BLOCK(3); break;
            case 4: BLOCK(4); break;
            case 5: BLOCK(5); break;
            case 6: BLOCK(6); break;
            case 7: BLOCK(7); break;
            case 8: BLOCK(8); break;
            case 9: BLOCK(9); break;
            case 10: BLOCK(10); break;
            case 11: BLOCK(11); break;
            case 12: BLOCK(12); break;
            case 13: BLOCK(13); break;
            case 14: BLOCK(14); break;
            case 15: BLOCK(15); break;
            default: BLOCK(16);
        }
#undef BLOCK
    }
}
