/* The decoder layers of a packed CPU decode step as one C call (astrai/model/cpu_step.py binds and checks the
 * arguments; layers.py loads this). It calls, layer after layer, the same kernels in the same order with the same
 * arguments as cpu_step's Python loop over them (its reference in the tests), whose entry points it is handed:
 * the RMSNorm, rotary and SwiGLU kernels of fused.c, the product of matmul.c (built with other flags, so in their
 * own libraries), and the KV cache's store-and-attend of the step (astrai/inference/cache/paged_attention.c's
 * decode_step_attend, through the view the model was given). What it saves is the Python between the calls: in a
 * decode step of a small model that is a good part of the time. */
#include <stddef.h>
#include <stdint.h>

typedef int (*linear_fn)(const void *x, int64_t M, int64_t K, const void *packed, int64_t N, const void *bias,
                         const void *residual, void *y, uint32_t *scratch, int is_bf16, int num_threads);
typedef void (*rms_norm_fn)(const void *x, int64_t x_stride, const void *w, void *out, int64_t rows, int64_t dim,
                            float eps, int is_bf16, int num_threads);
typedef void (*rotary_fn)(const void *q, int64_t q_stride, int64_t q_heads, const void *k, int64_t k_stride,
                          int64_t k_heads, const float *cos, const float *sin, void *q_out, void *k_out, int64_t rows,
                          int64_t dim, int is_bf16, int num_threads);
typedef void (*silu_mul_fn)(const void *gate, const void *up, int64_t stride, void *out, int64_t rows, int64_t dim,
                            int is_bf16, int num_threads);
/* Store layer `layer`'s new keys and values and attend q (rows, n_heads, dim) over the cache into out. */
typedef int (*attend_fn)(const void *context, int64_t layer, const void *q, int64_t n_heads, const void *k,
                         int64_t k_stride, const void *v, int64_t v_stride, void *out, float scale);

typedef struct {
    linear_fn linear;
    rms_norm_fn rms_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    attend_fn attend;
    const void *context; /* attend's first argument */
} Calls;

/* One layer: its cache layer, RMSNorm weights and eps, packed products (q/k/v and gate/up concatenated) and
 * biases (NULL for none). */
typedef struct {
    int64_t layer_id;
    const void *norm1, *norm2;
    float eps1, eps2;
    const void *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
} Layer;

/* The step: its shapes, rotary tables (rows, head_dim) float32, and the buffers every layer reuses, all
 * contiguous: normed (rows, dim), qkv (rows, (heads + 2 kv_heads) head_dim), q and attn (rows, heads, head_dim),
 * k (rows, kv_heads, head_dim), gate_up (rows, 2 ffn), hidden (rows, ffn), scratch as matmul.c's. */
typedef struct {
    int64_t rows, dim, heads, kv_heads, head_dim, ffn;
    const float *cos, *sin;
    void *normed, *qkv, *q, *k, *attn, *gate_up, *hidden;
    uint32_t *scratch;
    float scale;
    int is_bf16, num_threads;
} Step;

#define PRODUCT_FAILED (-100) /* matmul.c's linear refused (a bfloat16 product in a build without its kernel) */

/* Every layer over x (rows, dim) into stream (rows, dim), which each layer's residuals update in place (x is
 * left as it is). Returns 0, the attention's error status, or PRODUCT_FAILED; the layers after it do not run. */
int decoder_layers(const Calls *calls, const Layer *layers, int64_t n_layers, const Step *s, const void *x,
                   void *stream) {
    int64_t N = s->rows, dim = s->dim, H = s->heads, Hkv = s->kv_heads, hd = s->head_dim, F = s->ffn;
    int64_t width = (H + 2 * Hkv) * hd, size = s->is_bf16 ? 2 : 4;
    int bf = s->is_bf16, threads = s->num_threads, rc;
    char *qkv = s->qkv, *gate_up = s->gate_up;
    const void *in = x;
    for (int64_t l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        calls->rms_norm(in, dim, L->norm1, s->normed, N, dim, L->eps1, bf, threads);
        if (calls->linear(s->normed, N, dim, L->qkv, width, L->qkv_bias, NULL, qkv, s->scratch, bf, threads))
            return PRODUCT_FAILED;
        calls->rotary(qkv, width, H, qkv + H * hd * size, width, Hkv, s->cos, s->sin, s->q, s->k, N, hd, bf, threads);
        rc = calls->attend(calls->context, L->layer_id, s->q, H, s->k, Hkv * hd, qkv + (H + Hkv) * hd * size, width,
                           s->attn, s->scale);
        if (rc) return rc;
        if (calls->linear(s->attn, N, H * hd, L->o, dim, L->o_bias, in, stream, s->scratch, bf, threads))
            return PRODUCT_FAILED;
        calls->rms_norm(stream, dim, L->norm2, s->normed, N, dim, L->eps2, bf, threads);
        if (calls->linear(s->normed, N, dim, L->gate_up, 2 * F, L->gate_up_bias, NULL, gate_up, s->scratch, bf,
                          threads))
            return PRODUCT_FAILED;
        calls->silu_mul(gate_up, gate_up + F * size, 2 * F, s->hidden, N, F, bf, threads);
        if (calls->linear(s->hidden, N, F, L->down, dim, L->down_bias, stream, stream, s->scratch, bf, threads))
            return PRODUCT_FAILED;
        in = stream;
    }
    return 0;
}
