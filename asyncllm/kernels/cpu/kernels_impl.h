/* Kernels for one element type; included by kernels.c with T, SUFFIX, LOAD and STORE defined
 * (NAME(x) is x_SUFFIX).
 * Statistics and accumulations run in fp32 whatever T is. */

/* h = x + residual (rounded to T, as torch adds in T), residual_out = h,
 * out = weight * T(h * rsqrt(mean(h^2) + eps)): transformers' LlamaRMSNorm with vLLM's fused add.
 * residual may be NULL (no add); residual_out may alias residual. One row of `hidden` values. */
static inline void NAME(rms_norm_row)(const T *xr, const T *rr, T *ror, T *outr, const T *weight, int64_t hidden,
                                      float eps) {
    float sum = 0.0f;
    if (rr != NULL) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) {
            float h = LOAD(STORE(LOAD(xr[i]) + LOAD(rr[i])));
            ror[i] = STORE(h);
            sum += h * h;
        }
        xr = ror;
    } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) {
            float h = LOAD(xr[i]);
            sum += h * h;
        }
    }
    float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; i++) {
        float normed = LOAD(STORE(LOAD(xr[i]) * inv));
        outr[i] = STORE(LOAD(weight[i]) * normed);
    }
}

/* rms_norm_row over contiguous rows. */
void NAME(rms_norm)(const T *x, const T *residual, T *residual_out, T *out, const T *weight,
                    int64_t rows, int64_t hidden, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= 8) schedule(static)
    for (int64_t row = 0; row < rows; row++)
        NAME(rms_norm_row)(x + row * hidden, residual == NULL ? NULL : residual + row * hidden,
                           residual == NULL ? NULL : residual_out + row * hidden, out + row * hidden, weight,
                           hidden, eps);
}

/* out[m][n0 + r] = x[m] . w[n0 + r] for r < ROWS weight rows and m < MB activation rows, as
 * ROWS * MB = 16 vector accumulators summed by one sum16. x rows beyond `rows` repeat row 0
 * (computed, not stored) so every tile has the same shape. The weight row FEW_ROWS_PREFETCH
 * rows ahead is prefetched: the loop is FMA-heavy enough at 8 rows that the hardware
 * prefetcher alone left the stream from DRAM at ~15 GB/s (21 GB/s with it). Into L2, not L1:
 * at 8 rows x (up to 8 x 1536 floats) fills L1, and weight lines prefetched there evicted it
 * (the default model's projections + logits at 8 rows: 26.5 -> 23.5 ms; 1-4 rows alike). */
static inline __attribute__((always_inline)) void NAME(few_rows_tile)(
        const T *const *xs, const T *w, T *out, int64_t out_stride, int64_t n0, int64_t k, int64_t rows,
        const int MB, const int ROWS) {
    v16sf acc[16];
    for (int i = 0; i < 16; i++) acc[i] = (v16sf){0};
    for (int64_t c = 0; c < k; c += 16)
        for (int r = 0; r < ROWS; r++) {
            v16sf wv = LOAD16(w + (n0 + r) * k + c);
            __builtin_prefetch(w + (n0 + r + FEW_ROWS_PREFETCH) * k + c, 0, 2);
            for (int m = 0; m < MB; m++) acc[r * MB + m] = fma16(LOAD16(xs[m] + c), wv, acc[r * MB + m]);
        }
    v16sf dots = sum16(acc);
    for (int i = 0; i < 16; i++) {
        int r = SUM16_ORDER[i] / MB, m = SUM16_ORDER[i] % MB;
        if (m < rows) out[m * out_stride + n0 + r] = STORE(dots[i]);
    }
}

/* The 8 activation row pointers a tile reads (rows past `rows` repeat row 0) → the tile height
 * for `rows` rows: 1, 2, 4 or 8. */
static inline int NAME(tile_rows)(const T *x, int64_t x_stride, int64_t rows, const T **xs) {
    for (int m = 0; m < 8; m++) xs[m] = x + (m < rows ? m : 0) * x_stride;
    return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

/* out [rows, n] = x [rows, k] @ w [n, k]^T for the 1-8 rows of a decode step (nn.Linear's
 * layout, no bias). Such a step is bound by reading the weight: each weight row is read once
 * and multiplied by every activation row while it is in registers; x stays in L1. Needs
 * k % 16 == 0 and n % 16 == 0; rows of x and out are `x_stride` / `n` elements apart.
 * An orphaned `omp for`: the calling parallel region's threads share the weight rows. */
static void NAME(few_rows_for)(const T *x, int64_t x_stride, const T *w, T *out, int64_t rows, int64_t n,
                               int64_t k) {
    const T *xs[8];
    int mb = NAME(tile_rows)(x, x_stride, rows, xs);
#define FEW_ROWS_CASE(MB)                                                                       \
    case MB:                                                                                    \
        _Pragma("omp for schedule(static)")                                                     \
        for (int64_t n0 = 0; n0 < n; n0 += 16 / MB)                                             \
            NAME(few_rows_tile)(xs, w, out, n, n0, k, rows, MB, 16 / MB);                        \
        break;
    switch (mb) {
        FEW_ROWS_CASE(1)
        FEW_ROWS_CASE(2)
        FEW_ROWS_CASE(4)
        FEW_ROWS_CASE(8)
    }
#undef FEW_ROWS_CASE
}

void NAME(linear_few_rows)(const T *x, int64_t x_stride, const T *w, T *out, int64_t rows, int64_t n,
                           int64_t k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    NAME(few_rows_for)(x, x_stride, w, out, rows, n, k);
}

/* Rotary embedding (rotate-half layout) in place on q [tokens, q_heads, dim] and k [tokens,
 * k_heads, dim] (rows `q_stride` / `k_stride` elements apart, heads contiguous), with fp32
 * cos/sin tables [max_positions, dim]. Rounds like torch's q * cos + rotate_half(q) * sin in T. */
static inline void NAME(rotate_head)(T *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = LOAD(x[i]), b = LOAD(x[i + half]);
        float c1 = LOAD(STORE(cos[i])), s1 = LOAD(STORE(sin[i]));
        float c2 = LOAD(STORE(cos[i + half])), s2 = LOAD(STORE(sin[i + half]));
        float first = LOAD(STORE(a * c1)) + LOAD(STORE(-b * s1));
        float second = LOAD(STORE(b * c2)) + LOAD(STORE(a * s2));
        x[i] = STORE(first);
        x[i + half] = STORE(second);
    }
}

/* One token's query heads q [q_heads, dim] and key heads k [k_heads, dim] at `position`. */
static inline void NAME(rotary_token)(T *q, int64_t q_heads, T *k, int64_t k_heads, int64_t position,
                                      const float *cos, const float *sin, int64_t dim) {
    const float *c = cos + position * dim, *s = sin + position * dim;
    for (int64_t h = 0; h < q_heads; h++) NAME(rotate_head)(q + h * dim, c, s, dim / 2);
    for (int64_t h = 0; h < k_heads; h++) NAME(rotate_head)(k + h * dim, c, s, dim / 2);
}

void NAME(rotary)(T *q, int64_t q_stride, int64_t q_heads, T *k, int64_t k_stride, int64_t k_heads,
                  const int64_t *positions, const float *cos, const float *sin, int64_t tokens,
                  int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (tokens >= 16) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        NAME(rotary_token)(q + t * q_stride, q_heads, k + t * k_stride, k_heads, positions[t], cos, sin, dim);
}

/* out = silu(gate) * up for gate_up [rows, 2 * inter] (the fused projection: gate, then up),
 * rounded like torch's F.silu(gate) * up in T. silu(g) = g / (1 + e^-g), written with
 * z = e^-|g| <= 1 so the vectorised exp never overflows. */
static inline void NAME(silu_and_mul_row)(const T *gate, const T *up, T *o, int64_t inter) {
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        float g = LOAD(gate[i]);
        float z = exp_nonpositive(-fabsf(g));
        float silu = (g >= 0.0f ? g : g * z) / (1.0f + z);
        o[i] = STORE(LOAD(STORE(silu)) * LOAD(up[i]));
    }
}

void NAME(silu_and_mul)(const T *gate_up, T *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * inter >= 65536) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        NAME(silu_and_mul_row)(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter, inter);
}

/* Asks for part `part` of `parts` of the next cache block (NULL: none) while this one is worked
 * on: blocks lie at random places, so the hardware prefetcher cannot guess the jump. A piece per
 * head rather than the whole block at once (a 12 KB burst outran what a core keeps in flight),
 * into L2 (as in few_rows_tile): batch-64 attention over 572 MB of K/V, 35.7 -> 32 ms; two or
 * three blocks ahead instead of one measured alike. */
static inline void NAME(prefetch_part)(const T *next, int64_t bytes, int64_t part, int64_t parts) {
    if (next == NULL) return;
    const char *base = (const char *)next;
    for (int64_t i = part * bytes / parts / 64 * 64; i < (part + 1) * bytes / parts; i += 64)
        __builtin_prefetch(base + i, 0, 2);
}

#ifdef KERNELS_AVX2
/* KEYS (1-4) keys' scores from t on, as the 16-lane loop below computes each: a 16-lane vector of
 * partial products over the head's dims (here its lanes 0-7 and 8-15 as two ymm), summed in
 * sum16's order, times the scale. Eight ymm accumulators at most, so nothing spills. */
static inline __attribute__((always_inline)) void NAME(score_keys8)(
        const float *qh, const T *keys, int64_t t, int64_t dim, int64_t token_stride, float scale, float *scores,
        const int KEYS) {
    __m256 acc[4][2];
    for (int u = 0; u < 4; u++) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16) {
        __m256 q0 = _mm256_loadu_ps(qh + c), q1 = _mm256_loadu_ps(qh + c + 8);
        for (int u = 0; u < KEYS; u++) {
            const T *key = keys + (t + u) * token_stride + c;
            acc[u][0] = _mm256_fmadd_ps(q0, LOAD8(key), acc[u][0]);
            acc[u][1] = _mm256_fmadd_ps(q1, LOAD8(key + 8), acc[u][1]);
        }
    }
    for (int u = 0; u < KEYS; u++) scores[t + u] = lane_sum16_halves(acc[u][0], acc[u][1]) * scale;
}
#endif

/* scores[h][off] = scale * q_h . key(off) for query heads [h0, h1) and the block rows [lo, hi)
 * (`rows`: the block's first row; scores: [heads][n], already offset to the block's tokens). */
static inline __attribute__((always_inline)) void NAME(block_scores)(
        const float *qf, const T *rows, int64_t lo, int64_t hi, int64_t h0, int64_t h1, int64_t group,
        int64_t dim, int64_t token_stride, float scale, float *scores, int64_t n, const T *next, int64_t next_bytes) {
    for (int64_t h = h0; h < h1; h++) {
        NAME(prefetch_part)(next, next_bytes, h - h0, h1 - h0);
        const float *qh = qf + h * dim;
        const T *keys = rows + (h / group) * dim;
#ifdef KERNELS_AVX2
        if (dim % 16 == 0 && dim <= 256) {
            int64_t t = lo;
            for (; t + 4 <= hi; t += 4) NAME(score_keys8)(qh, keys, t, dim, token_stride, scale, scores + h * n, 4);
            for (; t < hi; t++) NAME(score_keys8)(qh, keys, t, dim, token_stride, scale, scores + h * n, 1);
            continue;
        }
#endif
        if (dim % 16 == 0 && dim <= 256) {
            /* The query in registers (loaded once: the score stores below may alias qf, so the
             * compiler reloaded it for every key); sixteen keys at a time, per-key vectors of
             * partial products, then one sum16. */
            v16sf qv[16];
            for (int64_t c = 0; c < dim; c += 16) qv[c / 16] = load16_f32(qh + c);
            for (int64_t t0 = lo; t0 < hi; t0 += 16) {
                int64_t m = hi - t0 < 16 ? hi - t0 : 16;
                v16sf part[16];
                for (int64_t u = 0; u < 16; u++) {
                    v16sf sum = {0};
                    if (u < m)
                        for (int64_t c = 0; c < dim; c += 16)
                            sum = fma16(qv[c / 16], LOAD16(keys + (t0 + u) * token_stride + c), sum);
                    part[u] = sum;
                }
                v16sf dots = sum16(part);
                for (int i = 0; i < 16; i++)
                    if (SUM16_ORDER[i] < m) scores[h * n + t0 + SUM16_ORDER[i]] = dots[i] * scale;
            }
            continue;
        }
        for (int64_t off = lo; off < hi; off++) {
            const T *key = keys + off * token_stride;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; d++) dot += qh[d] * LOAD(key[d]);
            scores[h * n + off] = dot * scale;
        }
    }
}

/* acc_h += sum over the block rows [lo, hi) of probs[h][off] * value(off), heads [h0, h1). */
static inline __attribute__((always_inline)) void NAME(block_mix)(
        const float *probs, int64_t n, const T *rows, int64_t lo, int64_t hi, int64_t h0, int64_t h1,
        int64_t group, int64_t dim, int64_t token_stride, float *acc, const T *next, int64_t next_bytes) {
    for (int64_t h = h0; h < h1; h++) {
        NAME(prefetch_part)(next, next_bytes, h - h0, h1 - h0);
        float *ah = acc + h * dim;
        const float *weights = probs + h * n;
        const T *values = rows + (h / group) * dim;
#ifdef KERNELS_AVX2
        if (dim % 16 == 0 && dim <= 256) {
            /* 64 dims at a time in 8 ymm registers: each lane the same multiply-add chain over
             * the block's values in order as in the 16-lane loop below. */
            for (int64_t c0 = 0; c0 < dim; c0 += 64) {
                const int64_t vectors = dim - c0 < 64 ? (dim - c0) / 8 : 8;
                __m256 sums[8];
                for (int64_t j = 0; j < vectors; j++) sums[j] = _mm256_loadu_ps(ah + c0 + 8 * j);
                for (int64_t off = lo; off < hi; off++) {
                    const __m256 weight = _mm256_set1_ps(weights[off]);
                    const T *value = values + off * token_stride + c0;
                    for (int64_t j = 0; j < vectors; j++)
                        sums[j] = _mm256_fmadd_ps(weight, LOAD8(value + 8 * j), sums[j]);
                }
                for (int64_t j = 0; j < vectors; j++) _mm256_storeu_ps(ah + c0 + 8 * j, sums[j]);
            }
            continue;
        }
#endif
        if (dim % 16 == 0 && dim <= 256) {
            /* The head's accumulator stays in registers across the block's values. */
            v16sf sums[16];
            for (int64_t c = 0; c < dim; c += 16) sums[c / 16] = load16_f32(ah + c);
            for (int64_t off = lo; off < hi; off++)
                for (int64_t c = 0; c < dim; c += 16)
                    sums[c / 16] = fma16(splat16(weights[off]), LOAD16(values + off * token_stride + c), sums[c / 16]);
            for (int64_t c = 0; c < dim; c += 16) memcpy(ah + c, &sums[c / 16], sizeof(v16sf));
            continue;
        }
        for (int64_t off = lo; off < hi; off++) {
            const T *value = values + off * token_stride;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) ah[d] += weights[off] * LOAD(value[d]);
        }
    }
}

/* Decode attention for one sequence and KV heads [g0, g1), for every query head sharing them:
 * scores block by block, a softmax as torch computes it (max, exp, sum, divide), then P @ V
 * block by block; each K and V row of those heads is read from memory once. Inlined with `dim`
 * a constant for the common head sizes, so the inner loops unroll. q, out: this sequence's
 * [heads, dim]; qf, acc: [heads * dim] scratch; probs: [heads * (len - first)] scratch. */
static inline __attribute__((always_inline)) void NAME(attend)(
        const T *q, const T *k_cache, const T *v_cache, const int64_t *table, int64_t first, int64_t len,
        T *out, int64_t g0, int64_t g1, int64_t group, int64_t dim, int64_t token_stride, int64_t block_stride,
        int64_t block_size, float scale, float *qf, float *acc, float *probs) {
    int64_t n = len - first;
    int64_t h0 = g0 * group, h1 = g1 * group;
    int64_t first_block = first / block_size, end_block = (len + block_size - 1) / block_size;
    for (int64_t i = h0 * dim; i < h1 * dim; i++) qf[i] = LOAD(q[i]);
    for (int64_t i = h0 * dim; i < h1 * dim; i++) acc[i] = 0.0f;
    for (int pass = 0; pass < 2; pass++) {  /* 0: scores from K; 1: P @ V */
        const T *cache = pass == 0 ? k_cache : v_cache;
        for (int64_t blk = first_block; blk < end_block; blk++) {
            /* Block `blk` holds tokens blk * block_size + [lo, hi) of the visible range. */
            int64_t lo = blk * block_size < first ? first - blk * block_size : 0;
            int64_t hi = (blk + 1) * block_size > len ? len - blk * block_size : block_size;
            /* The next block of this pass; after the last K block, the first V block. */
            const T *next = blk + 1 < end_block ? cache + table[blk + 1] * block_stride
                            : pass == 0         ? v_cache + table[first_block] * block_stride
                                                : NULL;
            const int64_t next_bytes = block_stride * (int64_t)sizeof(T);
            const T *rows = cache + table[blk] * block_stride;
            float *block_probs = probs + blk * block_size - first;
            if (pass == 0)
                NAME(block_scores)(qf, rows, lo, hi, h0, h1, group, dim, token_stride, scale, block_probs, n, next,
                                   next_bytes);
            else
                NAME(block_mix)(block_probs, n, rows, lo, hi, h0, h1, group, dim, token_stride, acc, next, next_bytes);
        }
        if (pass == 0)
            for (int64_t h = h0; h < h1; h++) softmax_row(probs + h * n, n);
    }
    for (int64_t i = h0 * dim; i < h1 * dim; i++) out[i] = STORE(acc[i]);
}

/* The tasks of paged_decode_attention as an orphaned `omp for` (the calling parallel region's
 * threads share them); qf, acc: [heads * dim], probs: [heads * max_len] scratch of this thread. */
static void NAME(decode_attention_for)(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,
                                       const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                                       T *out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                                       int64_t block_size, float scale, int64_t window, int64_t heads_per_task,
                                       float *qf, float *acc, float *probs) {
    int64_t group = heads / kv_heads;
    int64_t token_stride = kv_heads * dim, block_stride = block_size * token_stride;
    int64_t tasks = seqs * (kv_heads / heads_per_task);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task * heads_per_task / kv_heads;
        int64_t g0 = task * heads_per_task % kv_heads, g1 = g0 + heads_per_task;
        int64_t len = seq_lens[b];
        int64_t first = (window > 0 && len > window) ? len - window : 0;
        const T *qb = q + b * q_stride;
        const int64_t *table = block_tables + b * bt_stride;
        T *ob = out + b * heads * dim;
        if (dim == 64)
            NAME(attend)(qb, k_cache, v_cache, table, first, len, ob, g0, g1, group, 64, token_stride,
                         block_stride, block_size, scale, qf, acc, probs);
        else if (dim == 128)
            NAME(attend)(qb, k_cache, v_cache, table, first, len, ob, g0, g1, group, 128, token_stride,
                         block_stride, block_size, scale, qf, acc, probs);
        else
            NAME(attend)(qb, k_cache, v_cache, table, first, len, ob, g0, g1, group, dim, token_stride,
                         block_stride, block_size, scale, qf, acc, probs);
    }
}

/* Decode attention over the paged cache, one query token per sequence.
 * q: [seqs, heads, dim] rows q_stride apart; caches: [num_blocks, block_size, kv_heads, dim];
 * block_tables: [seqs, bt_stride]; seq_lens: [seqs] (context incl. the new token);
 * window > 0 keeps the last `window` keys. out: [seqs, heads, dim] contiguous. */
void NAME(paged_decode_attention)(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,
                                  const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                                  T *out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                                  int64_t block_size, float scale, int64_t window, int num_threads) {
    int64_t max_len = max_seq_len(seq_lens, seqs);
    int64_t heads_per_task = attention_heads_per_task(seqs, kv_heads, num_threads);
    int64_t tasks = seqs * (kv_heads / heads_per_task);
#pragma omp parallel num_threads(num_threads) if (tasks > 1)
    {
        float *qf = malloc(sizeof(float) * heads * dim);
        float *acc = malloc(sizeof(float) * heads * dim);
        float *probs = malloc(sizeof(float) * heads * max_len);
        NAME(decode_attention_for)(q, q_stride, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, seqs,
                                   heads, kv_heads, dim, block_size, scale, window, heads_per_task, qf, acc, probs);
        free(qf);
        free(acc);
        free(probs);
    }
}

