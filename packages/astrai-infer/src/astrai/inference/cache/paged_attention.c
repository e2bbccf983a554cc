/* Attention over the paged KV cache, read in place: queries attend to their row's cached keys and values where
 * they lie in the page tensors, with no gathered copy of the history.
 *
 * Built and loaded by paged_attention.py (which documents the layout and checks the arguments); the reference
 * both kernels are tested against is gather + softmax(q k^T * scale) v in torch. Position t of a row lies in
 * cache slot page_table[b][t / page_size] * page_size + t % page_size, whose entry for KV head g is row
 * slot * n_kv_heads + g of the (slots * n_kv_heads, dim) cache. Work items run in parallel on the OpenMP runtime
 * torch itself uses (see paged_attention.py). SIMD through GCC/Clang vector extensions, 16 float32 lanes.
 *
 * paged_decode_attention: one query token per row (a decode). A work item is one row (or, with fewer rows than
 * threads, a group of its KV heads):
 *   pass 1: scores[h][t] = scale * q[b, h] . k[t, h / n_rep] (bfloat16 on CPUs with AVX512-BF16: `vdpbf16ps` on
 *           pairs of elements as stored, exact products summed in float32; a 13-row step of the 20M benchmark
 *           model, 8 layers: 1.09 -> 0.99 ms with the cache in memory, 0.140 -> 0.115 ms per layer in cache)
 *   softmax over t in float32 (max-subtracted)
 *   pass 2: out[b, h] = sum_t probs[h][t] * v[t, h / n_rep]
 * Every key and value row is read from memory once, for all the query heads that share it.
 *
 * paged_chunk_attention: a chunk of consecutive queries of one row (a prefill chunk), each attending causally
 * up to its own position. The chunk's (token, query head) pairs that read one KV head are taken 16 at a time,
 * one per SIMD lane; the keys go by in blocks of 16 with an online softmax (flash attention), so each key and
 * value is read once per 16 queries and every multiply-add does 16 queries' work. In bfloat16 on CPUs with
 * AVX512-BF16 the scores are `vdpbf16ps` dot products of pairs as stored (2 threads, 6 query heads over 2 KV
 * heads of 64: a 512-token first chunk 1.71 -> 1.45 ms, 200 tokens after 300 cached 1.00 -> 0.81 ms).
 */
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>

#include "simd.h" /* astrai/model/native: vector types, bfloat16, load16, sum16, exp16 */

static inline vf max16(vf a, vf b) { /* NaN in a propagates (as torch's max), so a NaN score gives NaN */
    vi a_wins = (a > b) | (a != a);
    return (vf)(((vi)a & a_wins) | ((vi)b & ~a_wins));
}

static inline float reduce_max16(vf v) {
    vf a = max16(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    vf b = max16(a, __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3));
    vf c = max16(b, __builtin_shufflevector(b, b, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1));
    return c[0] > c[1] || c[0] != c[0] ? c[0] : c[1];
}

/* out[i] = sum of the lanes of v[i], for 16 vectors at once (a transposing tree: 3 operations per vector
 * instead of a horizontal sum each). */
static inline vf sum16x16(vf v[LANES]) {
    vf w[8], x[4], y[2];
    for (int j = 0; j < 8; j++)  /* lanes 0-7: 8 partial sums of vector 2j; 8-15: of vector 2j + 1 */
        w[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                       30, 31);
    for (int j = 0; j < 4; j++)  /* 4 partial sums each of vectors 4j .. 4j + 3 */
        x[j] = __builtin_shufflevector(w[2 * j], w[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(w[2 * j], w[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                       31);
    for (int j = 0; j < 2; j++)  /* 2 partial sums each of vectors 8j .. 8j + 7 */
        y[j] = __builtin_shufflevector(x[2 * j], x[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(x[2 * j], x[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                       31);
    return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#define MAX_CHUNKS 16 /* head_dim <= 256 (checked by the caller) */
#define MAX_HEADS 16  /* query heads handled in one pass over a row's entries; more go round again */
#define MAX_SET_CHUNKS 24 /* query heads sharing a KV head x chunks of dim whose pass-2 sums stay in registers */

/* Ask for `bytes` at `at` ahead of use, into L2 only. A row's KV pages lie anywhere in the cache and hardware
 * prefetchers stop at page boundaries; without this, loads and arithmetic do not overlap. Measured on Zen (2
 * threads, cache in DRAM): one token of the next block per token of this one, into L2, 20-25 ns per token and
 * KV head; the whole next block at once 27-29 ns; into L1 (evicting the block in use) or not at all 42-49 ns. */
static inline void prefetch_l2(const char *at, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(at + offset, 0, 1);
}

/* Query heads lo .. hi - 1 of this call (as indices into it) that read KV head g (all query heads read KV head
 * h / n_rep, and a call takes query heads h0 .. h0 + n_q - 1). */
static inline void group_heads(int64_t g, int64_t h0, int64_t n_q, int64_t n_rep, int64_t *lo, int64_t *hi) {
    *lo = g * n_rep - h0 < 0 ? 0 : g * n_rep - h0;
    *hi = g * n_rep - h0 + n_rep > n_q ? n_q : g * n_rep - h0 + n_rep;
}

/* Pass 2 for `set` query heads from `lo` on that all read KV head g: acc[h] = sum_t probs[h][t] * v_t, each value
 * row read (and widened) once for all of them, the next ones prefetched. Called with a constant `set` and
 * `chunks`, the sums live in registers. */
static inline __attribute__((always_inline)) void weigh_values(
    const void *v, const int64_t *rows, int64_t len, int64_t g, int64_t lo, int64_t set, int64_t chunks,
    int64_t dim, int64_t stride, const float *scores, vf acc[MAX_HEADS][MAX_CHUNKS], int is_bf16) {
    vf sums[MAX_SET_CHUNKS];
    for (int64_t j = 0; j < set * chunks; j++) sums[j] = (vf){0};
    const float *probs = scores + lo * stride;
    int64_t row_bytes = dim * (is_bf16 ? 2 : 4);
    for (int64_t t = 0; t < len; t++) {
        if (t + LANES < len) prefetch_l2((const char *)v + (rows[t + LANES] + g) * row_bytes, row_bytes);
        const void *value = element(v, (rows[t] + g) * dim, is_bf16);
        for (int64_t c = 0; c < chunks; c++) {
            vf x = load16(element(value, c * LANES, is_bf16), is_bf16);
            for (int64_t r = 0; r < set; r++) sums[r * chunks + c] += probs[r * stride + t] * x;
        }
    }
    for (int64_t r = 0; r < set; r++)
        for (int64_t c = 0; c < chunks; c++) acc[lo + r][c] = sums[r * chunks + c];
}

/* Query heads h0 .. h1 - 1 of one row (q_row: the row's first head as a row of q) over its positions
 * 0 .. len - 1, whose entries for KV head g are rows rows[t] + g of k and v (rows of dim elements). Query head
 * h reads KV head h / n_rep. Each key row, and then each value row, is read (and widened) once for every query
 * head that reads it, not once per head: with grouped heads (n_rep > 1) that is most of the work. Keys go in
 * blocks of 16 tokens (the next block prefetched into L2 while this one is read), values token by token per KV
 * head (16 tokens ahead prefetched). `scores` holds n_q rows of len rounded up to 16 floats. */
static inline __attribute__((always_inline)) void attend_heads(
    const void *q, const void *k, const void *v, void *out, const int64_t *rows, int64_t len, int64_t q_row,
    int64_t h0, int64_t h1, int64_t n_rep, int64_t dim, float scale, int is_bf16, float *scores) {
    int64_t n_q = h1 - h0, chunks = dim / LANES, stride = (len + LANES - 1) / LANES * LANES;
    int64_t row_bytes = dim * (is_bf16 ? 2 : 4), first_kv = h0 / n_rep;
    int64_t span = ((h1 - 1) / n_rep - first_kv + 1) * row_bytes; /* one token's rows of the KV heads read */
    const char *k_first = (const char *)k + first_kv * row_bytes;
    int64_t last_kv = (h0 + n_q - 1) / n_rep;
    /* bfloat16 with an even number of chunks: each dot product by `vdpbf16ps` on the queries as stored, a pair of
     * elements at a time (exact products, float32 sums), the scale applied to the sums. Otherwise the queries
     * scaled in float32 times the keys widened. */
    vf acc[MAX_HEADS][MAX_CHUNKS], query[MAX_HEADS][MAX_CHUNKS];
    int pairs = 0;
#ifdef __AVX512BF16__
    __m512bh query_pairs[MAX_HEADS][MAX_CHUNKS / 2];
    pairs = is_bf16 && chunks % 2 == 0;
    for (int64_t h = 0; pairs && h < n_q; h++)
        for (int64_t c = 0; c < chunks / 2; c++)
            query_pairs[h][c] = (__m512bh)_mm512_loadu_si512(element(q, (q_row + h0 + h) * dim + c * 2 * LANES, 1));
#endif
    for (int64_t h = 0; !pairs && h < n_q; h++)
        for (int64_t c = 0; c < chunks; c++)
            query[h][c] = load16(element(q, (q_row + h0 + h) * dim + c * LANES, is_bf16), is_bf16) * scale;
    for (int64_t t0 = 0; t0 < len; t0 += LANES) { /* pass 1: scores[h][t] = scale * q_h . k_t */
        int64_t n = len - t0 < LANES ? len - t0 : LANES;
        vf dots[MAX_HEADS][LANES]; /* per head, per token: the 16 partial sums of its dot product */
        for (int64_t i = 0; i < LANES; i++) {
            if (t0 + LANES + i < len) prefetch_l2(k_first + rows[t0 + LANES + i] * row_bytes, span);
            for (int64_t g = first_kv; g <= last_kv; g++) { /* each key row once, for every query head reading it */
                int64_t lo, hi;
                group_heads(g, h0, n_q, n_rep, &lo, &hi);
#ifdef __AVX512BF16__
                if (pairs) {
                    __m512bh key[MAX_CHUNKS / 2];
                    for (int64_t c = 0; c < chunks / 2; c++) /* (row numbers past len are not set) */
                        key[c] = i < n ? (__m512bh)_mm512_loadu_si512(
                                             element(k, (rows[t0 + i] + g) * dim + c * 2 * LANES, 1))
                                       : (__m512bh)_mm512_setzero_si512();
                    for (int64_t h = lo; h < hi; h++) {
                        __m512 dot = _mm512_setzero_ps();
                        for (int64_t c = 0; c < chunks / 2; c++) dot = _mm512_dpbf16_ps(dot, query_pairs[h][c], key[c]);
                        memcpy(&dots[h][i], &dot, sizeof dot);
                    }
                    continue;
                }
#endif
                vf key[MAX_CHUNKS];
                for (int64_t c = 0; c < chunks; c++)
                    key[c] = i < n ? load16(element(k, (rows[t0 + i] + g) * dim + c * LANES, is_bf16), is_bf16)
                                   : (vf){0};
                for (int64_t h = lo; h < hi; h++) {
                    vf dot = {0};
                    for (int64_t c = 0; c < chunks; c++) dot += query[h][c] * key[c];
                    dots[h][i] = dot;
                }
            }
        }
        for (int64_t h = 0; h < n_q; h++) {
            vf block = sum16x16(dots[h]);
            if (pairs) block *= scale;
            memcpy(scores + h * stride + t0, &block, sizeof block);
        }
    }
    float inv_sum[MAX_HEADS];
    for (int64_t h = 0; h < n_q; h++) { /* softmax in float32 over the row padded to whole vectors */
        float *s = scores + h * stride;
        for (int64_t t = len; t < stride; t++) s[t] = -INFINITY;
        vf max = (vf){0} - INFINITY, sum = {0}, chunk;
        for (int64_t t = 0; t < stride; t += LANES) {
            memcpy(&chunk, s + t, sizeof chunk);
            max = max16(max, chunk);
        }
        float row_max = reduce_max16(max);
        for (int64_t t = 0; t < stride; t += LANES) {
            memcpy(&chunk, s + t, sizeof chunk);
            chunk = exp16(chunk - row_max);
            sum += chunk;
            memcpy(s + t, &chunk, sizeof chunk);
        }
        inv_sum[h] = len > 0 ? 1.0f / sum16(sum) : 0.0f;
    }
    for (int64_t g = first_kv; g <= last_kv; g++) { /* pass 2: acc[h] = sum_t probs[h][t] * v_t */
        int64_t lo, hi;
        group_heads(g, h0, n_q, n_rep, &lo, &hi);
#define WEIGH(SET) weigh_values(v, rows, len, g, lo, SET, chunks, dim, stride, scores, acc, is_bf16)
        switch (hi - lo <= MAX_SET_CHUNKS / chunks ? hi - lo : 0) { /* the usual group sizes: sums in registers */
            case 1: WEIGH(1); break;
            case 2: WEIGH(2); break;
            case 3: WEIGH(3); break;
            case 4: WEIGH(4); break;
            default:
                for (int64_t h = lo; h < hi; h++) weigh_values(v, rows, len, g, h, 1, chunks, dim, stride, scores, acc,
                                                                is_bf16);
        }
#undef WEIGH
    }
    for (int64_t h = 0; h < n_q; h++) {
        for (int64_t c = 0; c < chunks; c++) {
            store16(element_mut(out, (q_row + h0 + h) * dim + c * LANES, is_bf16), acc[h][c] * inv_sum[h], is_bf16);
        }
    }
}

/* rc = CALL(dim), the usual head sizes as constants: loops of a known length (unrolled, registers for every chunk). */
#define BY_HEAD_DIM(rc, CALL)              \
    switch (dim) {                         \
        case 64: rc = CALL(64); break;     \
        case 128: rc = CALL(128); break;   \
        default: rc = CALL(dim);           \
    }

/* A work item's error status (0: none) into the call's, from any thread. */
static inline void record(int *status, int rc) {
    if (rc != 0) {
#pragma omp atomic write
        *status = rc;
    }
}

/* Row b, KV heads g0 .. g1 - 1; returns 0, -1 when a page index lies outside the cache, -4 for a negative
 * length. `work` holds `len` row numbers, then the score rows. */
static inline __attribute__((always_inline)) int attend(
    const void *q, const void *k, const void *v, void *out, const int64_t *pages, int64_t len, int64_t q_row,
    int64_t n_kv_heads, int64_t g0, int64_t g1, int64_t n_rep, int64_t dim, int64_t page_size, int64_t num_pages,
    float scale, int is_bf16, int64_t *work) {
    if (len < 0) return -4;
    int64_t *rows = work;
    float *scores = (float *)(work + len);
    for (int64_t t0 = 0; t0 < len; t0 += page_size) {
        int64_t page = pages[t0 / page_size], n = len - t0 < page_size ? len - t0 : page_size;
        if (page < 0 || page >= num_pages) return -1;
        for (int64_t i = 0; i < n; i++) rows[t0 + i] = (page * page_size + i) * n_kv_heads; /* KV head 0's row */
    }
    for (int64_t h = g0 * n_rep; h < g1 * n_rep; h += MAX_HEADS)
        attend_heads(q, k, v, out, rows, len, q_row, h, h + MAX_HEADS < g1 * n_rep ? h + MAX_HEADS : g1 * n_rep,
                     n_rep, dim, scale, is_bf16, scores);
    return 0;
}

/* q, out: (batch, n_heads, dim) contiguous; k, v: one layer's cache, (num_pages, page_size, n_kv_heads, dim)
 * contiguous; page_table: (batch, max_pages) int64; seq_lens: (batch,) int64, each <= max_pages * page_size;
 * 0 <= seq_lens[b]; dim a multiple of 16, at most 256. Returns 0, -1 when a page index lies outside the cache,
 * -2 when out of memory, -3 for an unsupported dim, -4 for a negative length. */
int paged_decode_attention(const void *q, const void *k, const void *v, void *out, const int64_t *page_table,
                           const int64_t *seq_lens, int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t dim,
                           int64_t max_pages, int64_t page_size, int64_t num_pages, float scale, int is_bf16,
                           int num_threads) {
    if (dim % LANES != 0 || dim > LANES * MAX_CHUNKS) return -3;
    if (batch <= 0) return 0;
    /* A work item is one row's whole set of KV heads, split into head groups only when there are too few rows
     * to keep every thread busy. */
    int64_t n_rep = n_heads / n_kv_heads, longest = 0;
    int64_t parts = batch >= 2 * num_threads ? 1 : (2 * num_threads + batch - 1) / batch;
    parts = parts > n_kv_heads ? n_kv_heads : parts;
    int64_t group = (n_kv_heads + parts - 1) / parts; /* KV heads per item */
    parts = (n_kv_heads + group - 1) / group;
    for (int64_t b = 0; b < batch; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t *work = malloc((size_t)longest * sizeof(int64_t) /* row numbers, then MAX_HEADS score rows */
                               + (size_t)(MAX_HEADS * ((longest + LANES - 1) / LANES * LANES + 1)) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * parts; item++) {
            int64_t b = item / parts, g0 = item % parts * group, g1 = g0 + group < n_kv_heads ? g0 + group : n_kv_heads;
            const int64_t *pages = page_table + b * max_pages;
            int rc = -2;
#define ATTEND(DIM) attend(q, k, v, out, pages, seq_lens[b], b * n_heads, n_kv_heads, g0, g1, n_rep, DIM, \
                           page_size, num_pages, scale, is_bf16, work)
            if (work != NULL) BY_HEAD_DIM(rc, ATTEND);
#undef ATTEND
            record(&status, rc);
        }
        free(work);
    }
    return status;
}

/* One decode step's rows, bound once for every layer (`DecodeStep` in paged_attention.py, which checks them). */
typedef struct {
    void *k_cache, *v_cache;   /* layer 0's pages, (num_pages, page_size, n_kv_heads, dim); layer l's layer_size
                                * elements further on, for n_layers layers */
    int64_t layer_size, n_layers;
    const int64_t *slots;      /* (batch,): the flat cache slot of each row's new entry */
    const int64_t *page_table; /* (batch, max_pages) */
    const int64_t *seq_lens;   /* (batch,), the new entries counted */
    int64_t batch, n_kv_heads, dim, max_pages, page_size, num_pages;
    int is_bf16, num_threads;
} DecodeStep;

/* Layer `layer` of a decode step: row b's new key and value (its n_kv_heads * dim entries, contiguous, at k + b *
 * k_stride and v + b * v_stride elements) stored at slot slots[b] of that layer's caches, then
 * paged_decode_attention of q (batch, n_heads, dim) contiguous into out. Returns as paged_decode_attention, -1
 * also for a slot outside the cache, -5 for n_heads not a multiple of n_kv_heads, -6 for a layer outside the
 * cache (nothing written then). The signature the model's C decoder layers call (astrai/model/native/layers.c). */
int decode_step_attend(const DecodeStep *step, int64_t layer, const void *q, int64_t n_heads, const void *k,
                       int64_t k_stride, const void *v, int64_t v_stride, void *out, float scale) {
    int64_t entry = step->n_kv_heads * step->dim, size = step->is_bf16 ? 2 : 4;
    if (n_heads < 1 || n_heads % step->n_kv_heads) return -5;
    if (layer < 0 || layer >= step->n_layers) return -6;
    char *k_cache = (char *)step->k_cache + layer * step->layer_size * size;
    char *v_cache = (char *)step->v_cache + layer * step->layer_size * size;
    for (int64_t b = 0; b < step->batch; b++)
        if (step->slots[b] < 0 || step->slots[b] >= step->num_pages * step->page_size) return -1;
    for (int64_t b = 0; b < step->batch; b++) {
        memcpy(k_cache + step->slots[b] * entry * size, (const char *)k + b * k_stride * size, (size_t)(entry * size));
        memcpy(v_cache + step->slots[b] * entry * size, (const char *)v + b * v_stride * size, (size_t)(entry * size));
    }
    return paged_decode_attention(q, k_cache, v_cache, out, step->page_table, step->seq_lens, step->batch,
                                  n_heads, step->n_kv_heads, step->dim, step->max_pages, step->page_size,
                                  step->num_pages, scale, step->is_bf16, step->num_threads);
}

#define KEY_BLOCK 16 /* keys per step of paged_chunk_attention */

/* Positions t0 .. t0 + n - 1 (n <= KEY_BLOCK) of KV head g from one layer's k or v cache, widened to float32
 * into dst[KEY_BLOCK][dim]; rows from n on are zero. Returns 0, or -1 when a page index lies outside the cache. */
static inline __attribute__((always_inline)) int widen_block(
    const void *src, const int64_t *pages, int64_t t0, int64_t n, int64_t g, int64_t n_kv_heads, int64_t dim,
    int64_t page_size, int64_t num_pages, int is_bf16, float *dst) {
    for (int64_t j = 0; j < KEY_BLOCK; j++) {
        float *row = dst + j * dim;
        if (j >= n) {
            memset(row, 0, (size_t)dim * sizeof(float));
            continue;
        }
        int64_t t = t0 + j, page = pages[t / page_size];
        if (page < 0 || page >= num_pages) return -1;
        const void *entry = element(src, ((page * page_size + t % page_size) * n_kv_heads + g) * dim, is_bf16);
        for (int64_t c = 0; c < dim; c += LANES) {
            vf x = load16(element(entry, c, is_bf16), is_bf16);
            memcpy(row + c, &x, sizeof x);
        }
    }
    return 0;
}

/* The scores of one block of keys by `vdpbf16ps` (bfloat16 on CPUs with AVX512-BF16): s[j][lane] = scale * q . k
 * for positions t0 + j of KV head g, j < n (s[j] for j >= n: some key's, to be masked), the lanes' queries as
 * pairs of bfloat16 in qt (dim / 2, LANES), each key's pairs broadcast from the cache as stored; exact products
 * summed in float32. Returns 0, or -1 when a page index lies outside the cache. */
static inline __attribute__((always_inline)) int pair_scores(
    const float *qt, const void *k, const int64_t *pages, int64_t t0, int64_t n, int64_t g, int64_t n_kv_heads,
    int64_t dim, int64_t page_size, int64_t num_pages, float scale, vf s[KEY_BLOCK]) {
#ifdef __AVX512BF16__
    const uint32_t *key[KEY_BLOCK];
    for (int64_t j = 0; j < KEY_BLOCK; j++) {
        int64_t t = t0 + (j < n ? j : 0), page = pages[t / page_size];
        if (page < 0 || page >= num_pages) return -1;
        key[j] = element(k, ((page * page_size + t % page_size) * n_kv_heads + g) * dim, 1);
    }
    __m512 dots[KEY_BLOCK];
    for (int j = 0; j < KEY_BLOCK; j++) dots[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim / 2; c++) {
        __m512bh query = (__m512bh)_mm512_loadu_si512((const uint32_t *)qt + c * LANES);
        for (int j = 0; j < KEY_BLOCK; j++)
            dots[j] = _mm512_dpbf16_ps(dots[j], query, (__m512bh)_mm512_set1_epi32((int)key[j][c]));
    }
    for (int j = 0; j < KEY_BLOCK; j++) {
        memcpy(&s[j], &dots[j], sizeof s[j]);
        s[j] *= scale;
    }
    return 0;
#else
    (void)qt, (void)k, (void)pages, (void)t0, (void)n, (void)g, (void)n_kv_heads, (void)dim, (void)page_size;
    (void)num_pages, (void)scale, (void)s;
    return -3; /* not called: pairs are bfloat16 on CPUs with AVX512-BF16 only */
#endif
}

/* Lanes lane0 .. lane0 + 15 of one chunk and KV head g. The chunk's queries are rows first .. of q (token i at
 * position start + i); its lanes are its (token, query head) pairs that read KV head g, token-major, lane
 * i * n_rep + r being token i's query head g * n_rep + r. Lanes past the chunk repeat its last one (computed,
 * not stored). Per lane the transposed queries qt[d][lane] (scaled in float32; bfloat16 on CPUs with
 * AVX512-BF16: as stored, in pairs, for `pair_scores`), the sums acc[d][lane], the running max m and sum; per
 * block of 16 keys: scores s[j][lane] = scale * q . k_j (-inf past the lane's position), m' = max(m, max_j s),
 * acc = acc * e^(m - m') + sum_j e^(s_j - m') v_j. `work` holds 2 * (16 + KEY_BLOCK) * dim floats. */
static inline __attribute__((always_inline)) int attend_chunk_lanes(
    const void *q, const void *k, const void *v, void *out, const int64_t *pages, int64_t start, int64_t first,
    int64_t lanes, int64_t lane0, int64_t g, int64_t n_heads, int64_t n_kv_heads, int64_t n_rep, int64_t dim,
    int64_t page_size, int64_t num_pages, float scale, int is_bf16, float *work) {
    float *qt = work, *acc = qt + dim * LANES, *keys = acc + dim * LANES, *values = keys + KEY_BLOCK * dim;
    int64_t n = lanes - lane0 < LANES ? lanes - lane0 : LANES, q_rows[LANES];
    int pairs = 0; /* bfloat16 scores as pairs of elements (below) */
#ifdef __AVX512BF16__
    pairs = is_bf16;
#endif
    vi pos;
    for (int64_t l = 0; l < LANES; l++) {
        int64_t pair = lane0 + (l < n ? l : n - 1), i = pair / n_rep;
        pos[l] = (int32_t)(start + i);
        q_rows[l] = (first + i) * n_heads + g * n_rep + pair % n_rep;
        if (pairs) /* qt as (dim / 2, LANES) pairs of bfloat16: lane l's elements 2 c and 2 c + 1 */
            for (int64_t c = 0; c < dim / 2; c++)
                memcpy((uint32_t *)qt + c * LANES + l, element(q, q_rows[l] * dim + 2 * c, 1), sizeof(uint32_t));
        else
            for (int64_t d = 0; d < dim; d++) qt[d * LANES + l] = load1(q, q_rows[l] * dim + d, is_bf16) * scale;
    }
    int64_t lowest = pos[0], highest = pos[n - 1];
    memset(acc, 0, (size_t)(dim * LANES) * sizeof(float));
    vf m = (vf){0} - INFINITY, sum = {0};
    for (int64_t t0 = 0; t0 <= highest; t0 += KEY_BLOCK) {
        int64_t n_keys = highest + 1 - t0 < KEY_BLOCK ? highest + 1 - t0 : KEY_BLOCK;
        vf s[KEY_BLOCK];
        int rc = pairs ? pair_scores(qt, k, pages, t0, n_keys, g, n_kv_heads, dim, page_size, num_pages, scale, s)
                       : widen_block(k, pages, t0, n_keys, g, n_kv_heads, dim, page_size, num_pages, is_bf16, keys);
        if (rc == 0) rc = widen_block(v, pages, t0, n_keys, g, n_kv_heads, dim, page_size, num_pages, is_bf16, values);
        if (rc) return rc;
        if (!pairs) {
            for (int j = 0; j < KEY_BLOCK; j++) s[j] = (vf){0};
            for (int64_t d = 0; d < dim; d++) {
                vf q_d;
                memcpy(&q_d, qt + d * LANES, sizeof q_d);
                for (int j = 0; j < KEY_BLOCK; j++) s[j] += keys[j * dim + d] * q_d;
            }
        }
        int causal = t0 + KEY_BLOCK - 1 > lowest; /* some key of this block lies past some lane's position */
        vi visible[KEY_BLOCK];
        for (int j = 0; j < KEY_BLOCK; j++) {
            visible[j] = causal ? pos >= (int32_t)(t0 + j) : (vi){0} - 1;
            s[j] = (vf)(((vi)s[j] & visible[j]) | ((vi)((vf){0} - INFINITY) & ~visible[j]));
        }
        vf block_max = s[0];
        for (int j = 1; j < KEY_BLOCK; j++) block_max = max16(block_max, s[j]);
        vf m_new = max16(m, block_max), alpha = exp16(m - m_new), p[KEY_BLOCK], p_sum = {0};
        for (int j = 0; j < KEY_BLOCK; j++) { /* exp16 floors at e^-87: hidden keys get exactly 0 by the mask */
            p[j] = (vf)((vi)exp16(s[j] - m_new) & visible[j]);
            p_sum += p[j];
        }
        sum = sum * alpha + p_sum;
        m = m_new;
        for (int64_t d0 = 0; d0 < dim; d0 += 8) { /* 8 sums at a time in registers, over the block's 16 values */
            vf a[8];
            for (int u = 0; u < 8; u++) {
                memcpy(&a[u], acc + (d0 + u) * LANES, sizeof a[u]);
                a[u] *= alpha;
            }
            if (causal) /* a hidden value adds exactly nothing, even an infinite or NaN one (0 * inf is NaN) */
                for (int j = 0; j < KEY_BLOCK; j++)
                    for (int u = 0; u < 8; u++) a[u] += (vf)((vi)(values[j * dim + d0 + u] * p[j]) & visible[j]);
            else
                for (int j = 0; j < KEY_BLOCK; j++)
                    for (int u = 0; u < 8; u++) a[u] += values[j * dim + d0 + u] * p[j];
            for (int u = 0; u < 8; u++) memcpy(acc + (d0 + u) * LANES, &a[u], sizeof a[u]);
        }
    }
    for (int64_t l = 0; l < n; l++) { /* out = acc / sum, lane by lane back into rows */
        float inv = 1.0f / sum[l], row[LANES * MAX_CHUNKS];
        for (int64_t d = 0; d < dim; d++) row[d] = acc[d * LANES + l] * inv;
        for (int64_t c = 0; c < dim; c += LANES) {
            vf x;
            memcpy(&x, row + c, sizeof x);
            store16(element_mut(out, q_rows[l] * dim + c, is_bf16), x, is_bf16);
        }
    }
    return 0;
}

/* q, out: (N, n_heads, dim) contiguous; k, v: one layer's cache as for paged_decode_attention. Chunk c's queries
 * are rows firsts[c] .. firsts[c] + counts[c] - 1 of q, at positions starts[c] .. starts[c] + counts[c] - 1 of
 * the row whose page table is tables[c] (max_pages int64); each attends to positions 0 .. its own, its chunk's
 * entries already written. Only the chunks' rows of out are written. The caller checks that counts >= 1, that
 * the chunks lie within q and their positions within their pages. Returns as paged_decode_attention. */
int paged_chunk_attention(const void *q, const void *k, const void *v, void *out, const int64_t *tables,
                          const int64_t *starts, const int64_t *counts, const int64_t *firsts, int64_t n_chunks,
                          int64_t n_heads, int64_t n_kv_heads, int64_t dim, int64_t max_pages, int64_t page_size,
                          int64_t num_pages, float scale, int is_bf16, int num_threads) {
    if (dim % LANES != 0 || dim > LANES * MAX_CHUNKS) return -3;
    int64_t n_rep = n_heads / n_kv_heads, items = 0;
    int64_t *item_of = malloc((size_t)(n_chunks + 1) * sizeof(int64_t)); /* chunk c's first work item */
    if (item_of == NULL) return -2;
    for (int64_t c = 0; c < n_chunks; c++) {
        item_of[c] = items;
        items += n_kv_heads * ((counts[c] * n_rep + LANES - 1) / LANES);
    }
    item_of[n_chunks] = items;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *work = malloc((size_t)(2 * (LANES + KEY_BLOCK) * dim) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            int64_t item = items - 1 - i, c = n_chunks - 1; /* the last lanes of a chunk read the most keys: first */
            while (item_of[c] > item) c--;
            int64_t blocks = (counts[c] * n_rep + LANES - 1) / LANES, local = item - item_of[c];
            int64_t g = local / blocks, lane0 = local % blocks * LANES;
            int rc = -2;
#define ATTEND(DIM) attend_chunk_lanes(q, k, v, out, tables + c * max_pages, starts[c], firsts[c], counts[c] * n_rep, \
                                       lane0, g, n_heads, n_kv_heads, n_rep, DIM, page_size, num_pages, scale,      \
                                       is_bf16, work)
            if (work != NULL) BY_HEAD_DIM(rc, ATTEND);
#undef ATTEND
            record(&status, rc);
        }
        free(work);
    }
    free(item_of);
    return status;
}
