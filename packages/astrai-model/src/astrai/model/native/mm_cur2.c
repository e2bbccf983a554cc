/* y = x W^T (+ bias) through a weight packed 16 output features at a time, float32 or bfloat16.
 *
 * float32: W (N, K) is stored as (N / 16, K, 16), so for each k the weights of a block of 16 outputs are one
 * vector. bfloat16 (CPUs with AVX512-BF16 only): as (N / 16, K / 2, 16, 2), for each pair of k one vector of 16
 * outputs x 2 weights, which one `vdpbf16ps` multiplies by a row's pair of x values and adds to the row's 16
 * float32 sums. Either way a block of up to 16 rows of x keeps its 16 x 16 sums in registers; each step loads one
 * weight vector and multiplies it by each row's x value (or pair), broadcast from a transposed copy of x (16
 * rows' values of one step side by side, one cache line). Each weight is read from memory once per 16 rows, which
 * is what a decode step of one to a few dozen sequences is bound by: oneDNN's blocked product runs those shapes
 * 1.2-1.55x slower on Zen 4. bfloat16 sums are rounded once, at the end (with the bias added in float32).
 *
 * Built and loaded by matmul.py (which checks the arguments); tested against torch's float64 product.
 * Parallel over blocks of outputs on torch's OpenMP threads.
 */
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "simd.h" /* astrai/model/native: vf, LANES, load16, store16 */

#define ROWS 16 /* rows of x per register block */
/* Bytes of weights asked for (into L2) ahead of use. They stream from memory, a thread's blocks one after the
 * other, so far ahead is into the thread's next block. All the products of a bfloat16 decode step of the 20M
 * benchmark model on a 2-core Zen 4 (weights from memory, interleaved A/B against 1 KB ahead into L1): 1 row
 * 1.11 -> 0.99 ms, 13 rows 1.81 -> 1.66 ms, the same from 64 rows on; 4 to 16 KB ahead alike, 32 KB slower. */
#define AHEAD 16384

/* Whether this build has the bfloat16 kernel (the CPU has AVX512-BF16). */
int has_bf16_dot(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* Rows 0 .. R - 1 of one group times output block `col`: xt (steps, ROWS) holds the rows' x values (float32
 * bits, or bfloat16 pairs) step by step, w (steps, 16 or 16 x 2) the block's weights. Sums (plus bias[col ..]
 * when given) into y[r][col .. col + 15], rows N apart; with `res` (rows N apart too), res + that, as torch's
 * `res + F.linear(...)` rounds it (the product in y's dtype first). res may be y itself. */
static inline __attribute__((always_inline)) void block_f32(const uint32_t *xt, const float *w, const float *bias,
                                                            const float *res, float *y, int64_t steps, int64_t N,
                                                            int R, int64_t col) {
    vf acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = (vf){0};
    for (int64_t k = 0; k < steps; k++) {
        __builtin_prefetch((const char *)(w + k * LANES) + AHEAD, 0, 1);
        vf wv;
        memcpy(&wv, w + k * LANES, sizeof wv);
        for (int r = 0; r < R; r++) {
            float x;
            memcpy(&x, xt + k * ROWS + r, sizeof x);
            acc[r] += x * wv;
        }
    }
    vf b = {0};
    if (bias != NULL) memcpy(&b, bias + col, sizeof b);
    for (int r = 0; r < R; r++) {
        vf out = acc[r] + b;
        if (res != NULL) out += load16(res + r * N + col, 0);
        memcpy(y + r * N + col, &out, sizeof out);
    }
}

#ifdef __AVX512BF16__
static inline __attribute__((always_inline)) void block_bf16(const uint32_t *xt, const bf16 *w, const bf16 *bias,
                                                             const bf16 *res, bf16 *y, int64_t steps, int64_t N,
                                                             int R, int64_t col) {
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < steps; p++) {
        __builtin_prefetch((const char *)(w + p * 2 * LANES) + AHEAD, 0, 1);
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + p * 2 * LANES);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)xt[p * ROWS + r]), wv);
    }
    vf b = bias != NULL ? load16(bias + col, 1) : (vf){0};
    for (int r = 0; r < R; r++) {
        vf sums;
        memcpy(&sums, &acc[r], sizeof sums);
        sums += b;
        if (res != NULL) sums = round_bf16(sums) + load16(res + r * N + col, 1);
        store16(y + r * N + col, sums, 1);
    }
}
#endif

/* x (M, K) contiguous, packed as above, bias (N) or NULL, residual (M, N) or NULL (it may be y), y (M, N), all
 * float32 or all bfloat16 (is_bf16); scratch holds ceil(M / 16) * 16 * steps 32-bit values, steps = K (float32)
 * or K / 2 (bfloat16). N a multiple of 16, K even for bfloat16. Returns 0, or -1 for bfloat16 in a build without
 * the bfloat16 kernel. */
int linear(const void *x, int64_t M, int64_t K, const void *packed, int64_t N, const void *bias,
           const void *residual, void *y, uint32_t *scratch, int is_bf16, int num_threads) {
#ifndef __AVX512BF16__
    if (is_bf16) return -1;
#endif
    int64_t groups = (M + ROWS - 1) / ROWS, blocks = N / LANES, steps = is_bf16 ? K / 2 : K;
#pragma omp parallel for num_threads(num_threads) if (M * K >= 65536)
    for (int64_t g = 0; g < groups; g++) {
        uint32_t *xt = scratch + g * ROWS * steps;
        for (int64_t s = 0; s < steps; s++)
            for (int64_t r = 0; r < ROWS; r++) {
                uint32_t value = 0;
                if (g * ROWS + r < M) /* 4 bytes a step: one float32, or a pair of bfloat16 */
                    memcpy(&value, (const char *)x + ((g * ROWS + r) * steps + s) * 4, 4);
                xt[s * ROWS + r] = value;
            }
    }
    /* Item = (output block, row group), block-major: each thread takes a contiguous run of the weights and
     * reuses each block (from L1 or L2) for every group of rows. */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t item = 0; item < blocks * groups; item++) {
        int64_t b = item / groups, g = item % groups, rows = M - g * ROWS < ROWS ? M - g * ROWS : ROWS;
        const uint32_t *xt = scratch + g * ROWS * steps;
        const char *w = (const char *)packed + b * K * LANES * (is_bf16 ? 2 : 4);
        int64_t offset = g * ROWS * N * (is_bf16 ? 2 : 4); /* the group's first row of y (and of residual) */
        char *out = (char *)y + offset;
        const char *res = residual == NULL ? NULL : (const char *)residual + offset;
        /* A constant row count per case: the sums stay in registers and the loops unroll. */
#ifdef __AVX512BF16__
#define BLOCK(R)                                                                                                  \
    is_bf16 ? block_bf16(xt, (const bf16 *)w, bias, (const bf16 *)res, (bf16 *)out, steps, N, R, b * LANES)       \
            : block_f32(xt, (const float *)w, bias, (const float *)res, (float *)out, steps, N, R, b * LANES)
#else
#define BLOCK(R) block_f32(xt, (const float *)w, bias, (const float *)res, (float *)out, steps, N, R, b * LANES)
#endif
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
    return 0;
}
