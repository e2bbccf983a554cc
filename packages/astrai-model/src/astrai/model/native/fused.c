/* Fused CPU kernels for the model's small per-token operations, each one pass over its rows instead of several
 * torch ops with a tensor between each (loaded by fused.py, which documents the layouts and checks the
 * arguments; the references they are tested against are the torch expressions named below).
 *
 * Built with -ffp-contract=off: every product and sum is rounded separately, in torch's order, so rotary
 * embedding equals torch bit for bit and the others differ only where torch sums in another order (RMSNorm's
 * sum of squares) or its exp differs (SiLU), by an ulp or so. bfloat16 rows are widened to float32, computed,
 * and rounded back at the same points torch rounds.
 *
 * Rows run in parallel on torch's OpenMP runtime once there is enough work to pay for waking the threads. */
#include <math.h>

#include "simd.h"

#define PARALLEL_MIN 32768 /* elements below which one thread does the whole call */

/* transformers' RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)).to(dtype), in float32 until the cast. */
static inline __attribute__((always_inline)) void rms_norm_row(const void *x, const void *w, void *out, int64_t dim,
                                                               float eps, int is_bf16) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES) {
        vf v = load16(element(x, i, is_bf16), is_bf16);
        acc += v * v;
    }
    float squares = sum16(acc);
    for (; i < dim; i++) squares += load1(x, i, is_bf16) * load1(x, i, is_bf16);
    float r = 1.0f / sqrtf(squares / (float)dim + eps);
    for (i = 0; i + LANES <= dim; i += LANES) {
        vf y = load16(element(x, i, is_bf16), is_bf16) * r;
        if (is_bf16) y = round_bf16(y);
        store16(element_mut(out, i, is_bf16), load16(element(w, i, is_bf16), is_bf16) * y, is_bf16);
    }
    for (; i < dim; i++) store1(out, i, load1(w, i, is_bf16) * as_dtype(load1(x, i, is_bf16) * r, is_bf16), is_bf16);
}

/* x: rows of dim elements, row r at x + r * x_stride; w: (dim,); out: (rows, dim) contiguous. */
void rms_norm(const void *x, int64_t x_stride, const void *w, void *out, int64_t rows, int64_t dim, float eps,
              int is_bf16, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_MIN && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        if (is_bf16)
            rms_norm_row(element(x, r * x_stride, 1), w, element_mut(out, r * dim, 1), dim, eps, 1);
        else
            rms_norm_row(element(x, r * x_stride, 0), w, element_mut(out, r * dim, 0), dim, eps, 0);
    }
}

/* Rotary embedding of one head (rope.apply_rotary_emb): with x1, x2 the halves of x and c, s of cos, sin,
 * out = [x1 * c1 - x2 * s1, x2 * c2 + x1 * s2] (torch: x * cos + cat(-x2, x1) * sin; x + (-y) is x - y). */
static inline __attribute__((always_inline)) void rotate_head(const void *x, const float *cos, const float *sin,
                                                              void *out, int64_t dim, int is_bf16) {
    int64_t half = dim / 2, i = 0;
    for (; i + LANES <= half; i += LANES) {
        vf x1 = load16(element(x, i, is_bf16), is_bf16), x2 = load16(element(x, half + i, is_bf16), is_bf16);
        vf c1 = load16(cos + i, 0), c2 = load16(cos + half + i, 0);
        vf s1 = load16(sin + i, 0), s2 = load16(sin + half + i, 0);
        store16(element_mut(out, i, is_bf16), x1 * c1 - x2 * s1, is_bf16);
        store16(element_mut(out, half + i, is_bf16), x2 * c2 + x1 * s2, is_bf16);
    }
    for (; i < half; i++) {
        float x1 = load1(x, i, is_bf16), x2 = load1(x, half + i, is_bf16);
        store1(out, i, x1 * cos[i] - x2 * sin[i], is_bf16);
        store1(out, half + i, x2 * cos[half + i] + x1 * sin[half + i], is_bf16);
    }
}

/* q: rows of q_heads heads of dim elements, row r at q + r * q_stride, its heads dim apart (k likewise);
 * cos, sin: (rows, dim) float32; q_out: (rows, q_heads, dim) and k_out: (rows, k_heads, dim) contiguous. */
void rotary(const void *q, int64_t q_stride, int64_t q_heads, const void *k, int64_t k_stride, int64_t k_heads,
            const float *cos, const float *sin, void *q_out, void *k_out, int64_t rows, int64_t dim, int is_bf16,
            int num_threads) {
    int64_t heads = q_heads + k_heads;
#pragma omp parallel for num_threads(num_threads) if (rows * heads * dim >= PARALLEL_MIN && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t h = 0; h < heads; h++) {
            int is_q = h < q_heads;
            const void *src = is_q ? element(q, r * q_stride + h * dim, is_bf16)
                                   : element(k, r * k_stride + (h - q_heads) * dim, is_bf16);
            void *dst = is_q ? element_mut(q_out, (r * q_heads + h) * dim, is_bf16)
                             : element_mut(k_out, (r * k_heads + h - q_heads) * dim, is_bf16);
            if (is_bf16)
                rotate_head(src, cos + r * dim, sin + r * dim, dst, dim, 1);
            else
                rotate_head(src, cos + r * dim, sin + r * dim, dst, dim, 0);
        }
    }
}

/* SwiGLU's activation: out = silu(gate) * up, silu(g) = g / (1 + e^-g) (torch's formula), rounded to the
 * dtype after silu and after the product (torch: F.silu(gate) * up). */
static inline __attribute__((always_inline)) void silu_mul_row(const void *gate, const void *up, void *out,
                                                               int64_t dim, int is_bf16) {
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES) {
        vf g = load16(element(gate, i, is_bf16), is_bf16);
        vf s = g / (1.0f + exp16(-g));
        if (is_bf16) s = round_bf16(s);
        store16(element_mut(out, i, is_bf16), s * load16(element(up, i, is_bf16), is_bf16), is_bf16);
    }
    if (i < dim) { /* the last few, through the same vector formula */
        float g_tail[LANES] = {0}, u_tail[LANES] = {0}, o_tail[LANES];
        for (int64_t j = i; j < dim; j++) g_tail[j - i] = load1(gate, j, is_bf16), u_tail[j - i] = load1(up, j, is_bf16);
        vf g = load16(g_tail, 0), s = g / (1.0f + exp16(-g));
        if (is_bf16) s = round_bf16(s);
        store16(o_tail, s * load16(u_tail, 0), 0);
        for (int64_t j = i; j < dim; j++) store1(out, j, o_tail[j - i], is_bf16);
    }
}

/* gate, up: rows of dim elements, row r at gate + r * stride (up likewise); out: (rows, dim) contiguous. */
void silu_mul(const void *gate, const void *up, int64_t stride, void *out, int64_t rows, int64_t dim, int is_bf16,
              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_MIN && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        if (is_bf16)
            silu_mul_row(element(gate, r * stride, 1), element(up, r * stride, 1), element_mut(out, r * dim, 1), dim, 1);
        else
            silu_mul_row(element(gate, r * stride, 0), element(up, r * stride, 0), element_mut(out, r * dim, 0), dim, 0);
    }
}
