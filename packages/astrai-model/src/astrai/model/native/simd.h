/* Shared by AstrAI's C kernels (compiled by astrai/model/native/build.py, which puts this folder on the
 * include path and hashes this file into every library's name): 16-lane float32 SIMD through GCC/Clang vector
 * extensions (AVX-512 registers, or two AVX halves), bfloat16 conversions that round as torch does, and
 * helpers. Everything is static inline: a kernel carries only what it uses. */
#ifndef ASTRAI_SIMD_H
#define ASTRAI_SIMD_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(64)));
#define LANES 16

static inline float bf16_to_float(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 float_to_bf16(float f) { /* round to nearest even, as torch */
    union { uint32_t u; float f; } c = { .f = f };
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40u); /* NaN stays NaN */
    return (bf16)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* 16 elements at `src` (float32, or bfloat16 widened) as float32; unaligned loads. */
static inline vf load16(const void *src, int is_bf16) {
    vf out;
    if (is_bf16) {
        vh h;
        memcpy(&h, src, sizeof h);
        vu widened = __builtin_convertvector(h, vu) << 16;
        memcpy(&out, &widened, sizeof out);
    } else {
        memcpy(&out, src, sizeof out);
    }
    return out;
}

/* v rounded to the nearest bfloat16 (ties to even, NaN kept), still as float32: what torch's `.to(bf16)`
 * followed by widening gives. */
static inline vf round_bf16(vf v) {
    vu u = (vu)v;
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vu is_nan = (vu)(v != v);
    return (vf)((rounded & ~is_nan) | ((u | 0x400000u) & 0xffff0000u & is_nan));
}

/* Store 16 float32 lanes at `dst` (float32, or rounded to bfloat16). */
static inline void store16(void *dst, vf v, int is_bf16) {
    if (is_bf16) {
        vh h = __builtin_convertvector((vu)round_bf16(v) >> 16, vh);
        memcpy(dst, &h, sizeof h);
    } else {
        memcpy(dst, &v, sizeof v);
    }
}

/* Element `index` of a float32 or bfloat16 array. */
static inline const void *element(const void *base, int64_t index, int is_bf16) {
    return (const char *)base + index * (is_bf16 ? 2 : 4);
}

static inline void *element_mut(void *base, int64_t index, int is_bf16) {
    return (char *)base + index * (is_bf16 ? 2 : 4);
}

static inline float load1(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const bf16 *)base)[i]) : ((const float *)base)[i];
}

static inline void store1(void *base, int64_t i, float v, int is_bf16) {
    if (is_bf16)
        ((bf16 *)base)[i] = float_to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* float32 x rounded to bfloat16 and back when is_bf16 (torch's cast to the tensor dtype), else x. */
static inline float as_dtype(float x, int is_bf16) { return is_bf16 ? bf16_to_float(float_to_bf16(x)) : x; }

static inline float sum16(vf v) {
    vf a = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    vf b = a + __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    vf c = b + __builtin_shufflevector(b, b, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return c[0] + c[1];
}

/* e^x, 16 at a time (Cephes expf: Cody-Waite reduction, degree-6 polynomial; about 1 ulp) from -87 up to
 * where float32's e^x ends (88.72), infinity above, as expf; below -87 it gives e^-87 (~1.6e-38) rather than
 * 0 or a denormal (so a sum of them never loses precision); NaN stays NaN. */
static inline vf exp16(vf x) {
    const float top = 88.72283935546875f; /* the float nearest ln(FLT_MAX) */
    vi low = x < -87.0f, high = x > top;
    x = (vf)(((vi)x & ~low) | ((vi)((vf){0} - 87.0f) & low));
    x = (vf)(((vi)x & ~high) | ((vi)((vf){0} + top) & high));
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi); /* truncated; minus one where that rounded up: floor(x / ln 2 + 0.5) */
    n += (vi)(__builtin_convertvector(n, vf) > t);
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* times 2^n, n in [-126, 128], as 2^h * 2^(n - h) (each a normal float; exact); unsigned shifts, so a
     * NaN's n cannot overflow a signed one */
    vi h = n >> 1;
    vf e = p * (vf)((vu)(h + 127) << 23) * (vf)((vu)(n - h + 127) << 23);
    return (vf)(((vi)e & ~high) | ((vi)((vf){0} + __builtin_inff()) & high));
}

#endif
