/* The matmul of a decode step's 1-8 rows against a group-quantised weight; included by kernels.c
 * once per element type (of x and out) after kernels_impl.h, whose tile shapes it follows.
 *
 * A small decode step is bound by reading the weights: fp32 costs 4 bytes per parameter, these
 * 0.75 (4-bit) or 1.125 (8-bit). Each weight row is a run of blocks, one per 32 input columns:
 *   4-bit (llama.cpp's Q4_1): float scale, float min, 16 bytes of codes; byte j holds column j
 *     in its low nibble and column j + 16 in its high one; w = code * scale + min.
 *   8-bit (llama.cpp's Q8_0): float scale, 32 signed bytes; w = code * scale.
 *   8-bit float (bits == QUANT_FP8: FP8 checkpoints, quantization="fp8"): float scale, 32 e4m3
 *     bytes (1 sign, 4 exponent bits of bias 7, 3 mantissa bits); w = e4m3 value * scale.
 * Every block is unpacked to fp32 once per tile (w rounded once, by one fused multiply-add) and
 * multiplied into every activation row while in registers, so each output is one multiply-add
 * chain over k in order: a row's result does not depend on the step's other rows. The scale and
 * min sit in the block (one stream per weight row, not three), and each block of the next tile is
 * prefetched while this tile's is used. Measured on 2 cores, the unpacking makes the 4-bit
 * kernel compute-bound even at one row (~4 ms per token of the default model's projections
 * with the weights in cache, against ~3.3 ms to stream their 80 MB). */

#ifndef QUANT_ROWS_COMMON
#define QUANT_ROWS_COMMON
#define QUANT_GROUP 32
#define QUANT_FP8 9 /* the "bits" of e4m3 blocks: 8 bits like Q8_0's, told apart by this value */

static inline int64_t quant_block_bytes(int bits) { return bits == 4 ? 8 + 16 : 4 + 32; }

/* 16 e4m3 codes (zero-extended bytes) → their exact fp32 values. A normal code's exponent and
 * mantissa, moved into fp32's fields and rebiased (7 → 127), is the value; a subnormal one (exponent
 * 0) is m * 2^-9, computed from the integer so no fp32 denormal is involved (the CPU may flush
 * those). e4m3fn's NaN codes (S.1111.111) never come from a quantiser, which saturates at 448. */
static inline v16sf e4m3_to_f32(v16si code) {
    v16si magnitude = code & 0x7f;
    v16si normal = (magnitude << 20) + (120 << 23);
    v16sf subnormal = __builtin_convertvector(magnitude, v16sf) * (1.0f / 512.0f);
    v16si is_subnormal = magnitude < 8;
    v16su value = (v16su)((is_subnormal & (v16si)subnormal) | (~is_subnormal & normal));
    return (v16sf)(value | ((v16su)(code & 0x80) << 24));
}

/* 16 bytes → 16 int32 lanes, zero- or sign-extended. With intrinsics: gcc turns the generic
 * __builtin_convertvector of bytes into one insert per lane (3x slower kernel). */
static inline v16si widen16(const uint8_t *p, const int is_signed) {
#if defined(__AVX512F__)
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    return (v16si)(is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
    union { v16si whole; __m256i half[2]; } u;
    for (int i = 0; i < 2; i++) {
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(p + 8 * i));
        u.half[i] = is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
    }
    return u.whole;
#else
    v16si out;
    for (int i = 0; i < 16; i++) out[i] = is_signed ? (int32_t)(int8_t)p[i] : (int32_t)p[i];
    return out;
#endif
}

#ifdef KERNELS_AVX2
/* The AVX2 build (kernels.c): a block's weights as four 8-lane vectors, columns 0-7, 8-15,
 * 16-23 and 24-31 (unpack_block's lo and hi halves). */
static inline __m256i widen8(const uint8_t *p, const int is_signed) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    return is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
}

static inline __m256 e4m3_to_f32_8(__m256i code) { /* e4m3_to_f32, 8 lanes */
    __m256i magnitude = _mm256_and_si256(code, _mm256_set1_epi32(0x7f));
    __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23));
    __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0f / 512.0f));
    __m256i is_subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude);
    __m256i value = _mm256_blendv_epi8(normal, _mm256_castps_si256(subnormal), is_subnormal);
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(value, sign));
}

/* unpack_block's values: w[0], w[1] its lo half, w[2], w[3] its hi half. */
static inline void unpack_block8(const uint8_t *block, const int bits, __m256 w[4]) {
    float scale;
    memcpy(&scale, block, sizeof scale);
    __m256 s = _mm256_set1_ps(scale);
    if (bits == 4) {
        float min;
        memcpy(&min, block + 4, sizeof min);
        __m256 m = _mm256_set1_ps(min);
        for (int i = 0; i < 2; i++) {
            __m256i codes = widen8(block + 8 + 8 * i, 0);
            w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(codes, _mm256_set1_epi32(15))), s, m);
            w[2 + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4)), s, m);
        }
    } else if (bits == QUANT_FP8) {
        for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(e4m3_to_f32_8(widen8(block + 4 + 8 * i, 0)), s);
    } else {
        for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(widen8(block + 4 + 8 * i, 1)), s);
    }
}

#endif

/* One block's 32 weights as two vectors: columns 0-15 and 16-31. By value, so they stay in
 * registers. */
typedef struct { v16sf lo, hi; } quant_pair;

static inline quant_pair unpack_block(const uint8_t *block, const int bits) {
    float scale;
    memcpy(&scale, block, sizeof scale);
    v16sf s = splat16(scale);
    quant_pair w;
    if (bits == 4) {
        float min;
        memcpy(&min, block + 4, sizeof min);
        v16si codes = widen16(block + 8, 0);
        v16sf m = splat16(min);
#if defined(__AVX512F__) && !defined(QUANT_NO_PERM)
        /* The block's 16 possible weights, code * scale + min, once; then each lane looks its
         * code up (vpermps reads the low 4 bits of the index): the same values as converting
         * every code, in fewer instructions. */
        const v16sf iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        __m512 table = (__m512)fma16(iota, s, m);
        w.lo = (v16sf)_mm512_permutexvar_ps((__m512i)codes, table);
        w.hi = (v16sf)_mm512_permutexvar_ps(_mm512_srli_epi32((__m512i)codes, 4), table);
#else
        w.lo = fma16(__builtin_convertvector(codes & 15, v16sf), s, m);
        w.hi = fma16(__builtin_convertvector(codes >> 4, v16sf), s, m);
#endif
    } else if (bits == QUANT_FP8) {
        w.lo = e4m3_to_f32(widen16(block + 4, 0)) * s;
        w.hi = e4m3_to_f32(widen16(block + 4 + 16, 0)) * s;
    } else {
        w.lo = __builtin_convertvector(widen16(block + 4, 1), v16sf) * s;
        w.hi = __builtin_convertvector(widen16(block + 4 + 16, 1), v16sf) * s;
    }
    return w;
}

/* One group of 32 fp32 weights → its block, by the rules of layers/int4.py in the same fp32
 * operations (so the same codes and scales as the torch quantiser). → how many of the 32 the
 * block does not give back exactly (as unpack_block computes them). */
static int64_t quantize_group(const float *x, uint8_t *block, int bits) {
    int64_t misses = 0;
    if (bits == 4) {
        float low = x[0], high = x[0];
        for (int j = 1; j < QUANT_GROUP; j++) {
            low = x[j] < low ? x[j] : low;
            high = x[j] > high ? x[j] : high;
        }
        float scale = (high - low) / 15.0f;
        if (!(scale > 0.0f)) scale = 1.0f; /* a constant group: every code 0 */
        uint8_t codes[QUANT_GROUP];
        for (int j = 0; j < QUANT_GROUP; j++) {
            float q = nearbyintf((x[j] - low) / scale); /* round half to even, as torch.round */
            q = q < 0.0f ? 0.0f : q > 15.0f ? 15.0f : q;
            codes[j] = (uint8_t)q;
            misses += fmaf(q, scale, low) != x[j];
        }
        memcpy(block, &scale, 4);
        memcpy(block + 4, &low, 4);
        for (int j = 0; j < QUANT_GROUP / 2; j++) block[8 + j] = (uint8_t)(codes[j] | codes[j + 16] << 4);
    } else {
        float top = 0.0f;
        for (int j = 0; j < QUANT_GROUP; j++) top = fabsf(x[j]) > top ? fabsf(x[j]) : top;
        float scale = top / 127.0f;
        if (!(scale > 0.0f)) scale = 1.0f; /* all zeros: every code 0 */
        memcpy(block, &scale, 4);
        for (int j = 0; j < QUANT_GROUP; j++) {
            float q = nearbyintf(x[j] / scale);
            q = q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q;
            block[4 + j] = (uint8_t)(int8_t)q;
            misses += q * scale != x[j];
        }
    }
    return misses;
}

/* w [n, k] (rows `w_stride` apart) → blocks [n][k / 32 * quant_block_bytes(bits)]. → how many
 * weights the blocks do not reproduce exactly (0: the matmul against them computes with the
 * weights themselves, as for a GGUF tensor stored in that format). */
int64_t quantize_blocks_f32(const float *w, int64_t w_stride, int64_t n, int64_t k, int64_t bits, uint8_t *blocks,
                            int num_threads) {
    const int64_t block_bytes = quant_block_bytes((int)bits), groups = k / QUANT_GROUP;
    int64_t misses = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(+ : misses)
    for (int64_t row = 0; row < n; row++)
        for (int64_t g = 0; g < groups; g++)
            misses += quantize_group(w + row * w_stride + g * QUANT_GROUP, blocks + (row * groups + g) * block_bytes,
                                     (int)bits);
    return misses;
}
#endif

/* out[m][n0 + r] = x[m] . w[n0 + r] for r < ROWS weight rows and m < MB activation rows, as in
 * few_rows_tile (16 accumulators, x rows past `rows` repeat row 0 and are not stored). */
static inline __attribute__((always_inline)) void NAME(quant_rows_tile)(
        const T *const *xs, const uint8_t *w, int64_t row_bytes, T *out, int64_t out_stride, int64_t n0, int64_t k,
        int64_t rows, const int MB, const int ROWS, const int bits) {
    const int64_t block_bytes = quant_block_bytes(bits);
#ifdef KERNELS_AVX2
    /* Up to 4 outputs at a time (8 ymm accumulators): RW weight rows by GROUP x rows, each weight
     * block unpacked once per group. Each output is the same multiply-add chain as below, reduced
     * in sum16's order: the same bits. */
    const int GROUP = MB < 4 ? MB : 4, RW = 4 / GROUP;
    for (int r0 = 0; r0 < ROWS; r0 += RW)
        for (int m0 = 0; m0 < MB; m0 += GROUP) {
            __m256 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            for (int64_t c = 0, b = 0; c < k; c += QUANT_GROUP, b += block_bytes)
                for (int rr = 0; rr < RW; rr++) {
                    const uint8_t *block = w + (n0 + r0 + rr) * row_bytes + b;
                    __builtin_prefetch(block + ROWS * row_bytes, 0, 3);
                    __m256 wv[4];
                    unpack_block8(block, bits, wv);
                    for (int m = 0; m < GROUP; m++) {
                        const T *x = xs[m0 + m] + c;
                        __m256 *a = acc[rr * GROUP + m];
                        a[0] = _mm256_fmadd_ps(LOAD8(x), wv[0], a[0]);
                        a[1] = _mm256_fmadd_ps(LOAD8(x + 8), wv[1], a[1]);
                        a[0] = _mm256_fmadd_ps(LOAD8(x + 16), wv[2], a[0]);
                        a[1] = _mm256_fmadd_ps(LOAD8(x + 24), wv[3], a[1]);
                    }
                }
            for (int rr = 0; rr < RW; rr++)
                for (int m = 0; m < GROUP; m++)
                    if (m0 + m < rows)
                        out[(m0 + m) * out_stride + n0 + r0 + rr] =
                            STORE(lane_sum16_halves(acc[rr * GROUP + m][0], acc[rr * GROUP + m][1]));
        }
    return;
#endif
    v16sf acc[16];
    for (int i = 0; i < 16; i++) acc[i] = (v16sf){0};
    for (int64_t c = 0, b = 0; c < k; c += QUANT_GROUP, b += block_bytes)
        for (int r = 0; r < ROWS; r++) {
            const uint8_t *block = w + (n0 + r) * row_bytes + b;
            __builtin_prefetch(block + ROWS * row_bytes, 0, 3); /* this row of the next tile (L2 hint: alike) */
            quant_pair wv = unpack_block(block, bits);
            for (int m = 0; m < MB; m++) {
                acc[r * MB + m] = fma16(LOAD16(xs[m] + c), wv.lo, acc[r * MB + m]);
                acc[r * MB + m] = fma16(LOAD16(xs[m] + c + 16), wv.hi, acc[r * MB + m]);
            }
        }
    v16sf dots = sum16(acc);
    for (int i = 0; i < 16; i++) {
        int r = SUM16_ORDER[i] / MB, m = SUM16_ORDER[i] % MB;
        if (m < rows) out[m * out_stride + n0 + r] = STORE(dots[i]);
    }
}

/* out [rows, n] = x [rows, k] @ w^T for 1-8 rows, w [n] rows of k / 32 blocks of `bits` (4, 8 or QUANT_FP8).
 * Needs k % 32 == 0 and n % 16 == 0. An orphaned `omp for`, like few_rows_for. */
static void NAME(quant_rows_for)(const T *x, int64_t x_stride, const uint8_t *w, int bits, T *out, int64_t rows,
                                 int64_t n, int64_t k) {
    const T *xs[8];
    const int64_t row_bytes = k / QUANT_GROUP * quant_block_bytes(bits);
    int mb = NAME(tile_rows)(x, x_stride, rows, xs);
#define QUANT_ROWS_CASE(MB, BITS)                                                               \
    case MB * 16 + BITS:                                                                        \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t n0 = 0; n0 < n; n0 += 16 / MB)                                             \
            NAME(quant_rows_tile)(xs, w, row_bytes, out, n, n0, k, rows, MB, 16 / MB, BITS);    \
        break;
    switch (mb * 16 + bits) {
        QUANT_ROWS_CASE(1, 4) QUANT_ROWS_CASE(2, 4) QUANT_ROWS_CASE(4, 4) QUANT_ROWS_CASE(8, 4)
        QUANT_ROWS_CASE(1, 8) QUANT_ROWS_CASE(2, 8) QUANT_ROWS_CASE(4, 8) QUANT_ROWS_CASE(8, 8)
        QUANT_ROWS_CASE(1, QUANT_FP8) QUANT_ROWS_CASE(2, QUANT_FP8) QUANT_ROWS_CASE(4, QUANT_FP8)
        QUANT_ROWS_CASE(8, QUANT_FP8)
        default: break;
    }
#undef QUANT_ROWS_CASE
}

void NAME(linear_quant_rows)(const T *x, int64_t x_stride, const uint8_t *w, int64_t bits, T *out, int64_t rows,
                             int64_t n, int64_t k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    NAME(quant_rows_for)(x, x_stride, w, (int)bits, out, rows, n, k);
}
