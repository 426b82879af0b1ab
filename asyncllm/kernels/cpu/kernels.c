/* CPU kernels for the decode step's small ops: fused add + RMSNorm, rotary in place,
 * SiLU-and-multiply, KV cache write, paged decode attention that reads K/V blocks where they
 * lie in the cache, and the matmul of a decode step's few rows.
 *
 * Plain C called through ctypes (asyncllm/model/layers/cpu_kernels/library.py compiles it with
 * gcc at first use). Parallel loops use OpenMP: the library links libgomp.so.1, which resolves
 * to the copy torch has already loaded, so these loops share torch's worker threads.
 * Compiled with -ffp-contract=off so elementwise fp32 results equal torch's (no fused
 * multiply-adds where torch rounds twice).
 *
 * kernels_impl.h is included once per element type (float and bf16) with T/LOAD/STORE set, and
 * after it decode_stack_impl.h: the whole decoder of a 1-8-row decode step in one call.
 * panel_gemm_impl.h (fp32, included once): the matmul of steps of any size against packed panels,
 * and panel_gemm_bf16_impl.h the bf16 one on the same tiles (the decode stack calls them too:
 * PANEL_LINEAR_FOR); after them
 * prefill_attention_impl.h: prompt attention (decode attention's scores and softmax, P @ V on the
 * panel tiles; fp32 or bf16 in and out).
 */
#include <math.h>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_to_float(bf16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, NaN kept quiet: what torch's c10::BFloat16 conversion does. */
static inline bf16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}

/* exp(x) for x <= 0 (softmax after subtracting the max; silu's e^-|g|): Cephes' expf range
 * reduction and polynomial, about 1 ulp. n = round(x / ln 2) comes from adding 1.5 * 2^23, which
 * leaves n in the low mantissa bits: unlike floorf and a float-to-int conversion, gcc vectorises
 * that (libm's expf is a scalar call). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    union { float value; int32_t bits; } rounded = {.value = shifted};
    union { int32_t bits; float value; } scale = {.bits = (rounded.bits - 0x4B400000 + 127) << 23};  /* 2^n */
    return y * scale.value;
}

/* Sixteen floats as one value (gcc vector extensions: one AVX-512 register, two AVX2 ones). */
typedef float v16sf __attribute__((vector_size(64)));
typedef int32_t v16si __attribute__((vector_size(64)));
typedef uint16_t v16hu __attribute__((vector_size(32)));
typedef uint32_t v16su __attribute__((vector_size(64)));

static inline v16sf load16_f32(const float *p) {
    v16sf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16sf load16_bf16(const bf16_t *p) {
#ifdef __AVX512F__
    /* One widening load (vpmovzxwd to 512 bits) and a shift; gcc splits the generic version
     * below into two 256-bit halves and a merge, which made bf16 attention 1.6x slower. */
    __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (v16sf)_mm512_castsi512_ps(bits);
#else
    v16hu h;
    memcpy(&h, p, sizeof h);
    v16su bits = __builtin_convertvector(h, v16su) << 16;
    v16sf v;
    memcpy(&v, &bits, sizeof v);
    return v;
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* The AVX2 build's hot loops work on 8-lane registers directly: gcc lowers the 16-lane types
 * above to pairs of ymm registers that it keeps in memory once a loop holds more than a few (the
 * block kernel's 16-accumulator tile ran at ~10 GFLOPS, attention scores at ~6). The arithmetic
 * is the 16-lane code's, lane for lane: a 16-lane value as its lanes 0-7 and 8-15. */
#define KERNELS_AVX2 1
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 load8_bf16(const bf16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* One 16-lane accumulator (lanes 0-7 in lo, 8-15 in hi) summed in sum16's tree for each of its
 * vectors: lanes j and j + 8, then j and j + 4, j and j + 2, j and j + 1. The same bits. */
static inline float lane_sum16_halves(__m256 lo, __m256 hi) {
    __m256 q = _mm256_add_ps(lo, hi);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
    __m128 s = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#endif

/* Sums of 16 vectors at once: lane i holds the sum of p[bitreverse4(i)]. A transposing tree of
 * shuffles and adds, 2 instructions per sum instead of one horizontal reduction (~10) each. */
static const int SUM16_ORDER[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline v16sf sum16(const v16sf p[16]) {
    const v16si l1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16si h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16si l2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const v16si h2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const v16si l3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const v16si h3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const v16si l4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const v16si h4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    v16sf a[8], b[4], c[2];
    for (int k = 0; k < 8; k++)
        a[k] = __builtin_shuffle(p[2 * k], p[2 * k + 1], l1) + __builtin_shuffle(p[2 * k], p[2 * k + 1], h1);
    for (int k = 0; k < 4; k++)
        b[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], l2) + __builtin_shuffle(a[2 * k], a[2 * k + 1], h2);
    for (int k = 0; k < 2; k++)
        c[k] = __builtin_shuffle(b[2 * k], b[2 * k + 1], l3) + __builtin_shuffle(b[2 * k], b[2 * k + 1], h3);
    return __builtin_shuffle(c[0], c[1], l4) + __builtin_shuffle(c[0], c[1], h4);
}

/* a * b + c rounded once. The library is built with -ffp-contract=off (elementwise kernels
 * must round like torch), so matmul accumulations ask for fused multiply-adds explicitly. */
static inline v16sf fma16(v16sf a, v16sf b, v16sf c) {
#if defined(__AVX512F__)
    return (v16sf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    typedef float v8sf __attribute__((vector_size(32)));
    union { v16sf whole; v8sf half[2]; } ua = {a}, ub = {b}, uc = {c}, r;
    for (int i = 0; i < 2; i++)
        r.half[i] = (v8sf)_mm256_fmadd_ps((__m256)ua.half[i], (__m256)ub.half[i], (__m256)uc.half[i]);
    return r.whole;
#else
    return a * b + c;
#endif
}

static inline v16sf splat16(float s) {
#ifdef __AVX512F__
    return (v16sf)_mm512_set1_ps(s);
#else
    return (v16sf){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#endif
}

/* p[i] = exp(p[i] - max) / sum over the row: torch's softmax, with exp_nonpositive. The sum's
 * order depends on n only (16 lanes by index from the row's start, then the lanes in order, then
 * the tail), never on where p lies: decode and prompt attention call this on rows at different
 * alignments and must get the same bits (an `omp simd` reduction may peel for alignment). */
static void softmax_row(float *p, int64_t n) {
    float top = p[0];
    /* A compare, not fmaxf: gcc calls libm's fmaxf per element (not vectorised), which took a
     * fifth of a long prompt's attention. The same maximum for finite scores. */
#pragma omp simd reduction(max : top)
    for (int64_t i = 1; i < n; i++) top = p[i] > top ? p[i] : top;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) p[i] = exp_nonpositive(p[i] - top);
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lanes[j] += p[i + j];
    float total = 0.0f;
    for (int j = 0; j < 16; j++) total += lanes[j];
    for (; i < n; i++) total += p[i];
    float inv_total = 1.0f / total;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) p[i] *= inv_total;
}

/* Decode attention splits into one task per sequence (all its KV heads) when there are enough
 * sequences to share out, else one per (sequence, KV head) so a single long sequence still uses
 * every thread. */
static inline int64_t attention_heads_per_task(int64_t seqs, int64_t kv_heads, int num_threads) {
    return seqs >= 4 * num_threads ? kv_heads : 1;
}

static inline int64_t max_seq_len(const int64_t *seq_lens, int64_t seqs) {
    int64_t longest = 1;
    for (int64_t b = 0; b < seqs; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    return longest;
}

#define FEW_ROWS_PREFETCH 8  /* rows; 4-32 measured alike, none or a non-temporal hint much slower */

#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)
#define NAME(base) CONCAT(base, SUFFIX)

#define T float
#define SUFFIX f32
#define LOAD16 load16_f32
#define LOAD8 load8_f32
#define LOAD(p) (p)
#define STORE(x) (x)
#define PANEL_LINEAR_FOR panel_linear_for /* decode_stack's matmul on panel copies */
#include "kernels_impl.h"
#include "quant_rows_impl.h"
#include "decode_stack_impl.h"
#undef T
#undef SUFFIX
#undef LOAD
#undef STORE
#undef LOAD16
#undef LOAD8
#undef PANEL_LINEAR_FOR

#define T bf16_t
#define SUFFIX bf16
#define LOAD16 load16_bf16
#define LOAD8 load8_bf16
#define LOAD(p) bf16_to_float(p)
#define STORE(x) float_to_bf16(x)
#define PANEL_LINEAR_FOR panel_linear_bf16_for
#include "kernels_impl.h"
#include "quant_rows_impl.h"
#include "decode_stack_impl.h"
#undef T
#undef SUFFIX
#undef LOAD
#undef STORE
#undef LOAD16
#undef LOAD8
#undef PANEL_LINEAR_FOR
#undef NAME
#undef CONCAT
#undef CONCAT_

#include "panel_gemm_impl.h"
#include "panel_gemm_bf16_impl.h"
#include "prefill_attention_impl.h"

/* KV write (dtype-free: rows are copied as bytes). k, v: [tokens, row_bytes] with the given
 * byte strides; the cache: [num_slots, row_bytes] per K and V. Negative slots are skipped. */
void write_kv_cache(const char *k, int64_t k_stride, const char *v, int64_t v_stride,
                    char *k_cache, char *v_cache, const int64_t *slot_mapping,
                    int64_t tokens, int64_t row_bytes, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (tokens >= 64) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(k_cache + slot * row_bytes, k + t * k_stride, (size_t)row_bytes);
        memcpy(v_cache + slot * row_bytes, v + t * v_stride, (size_t)row_bytes);
    }
}
