/* Prompt attention over the paged cache (fp32 arithmetic): every query token of a prompt chunk attends to
 * the keys before it (its own included; the last `window` with a sliding window), read from the
 * cache blocks its request holds. Included once by kernels.c after panel_gemm_impl.h, whose
 * register tiles do both matmuls.
 *
 * Why not torch's SDPA (what the per-op path called): its CPU flash kernel took ~56 ms of a
 * 7 x 128-token prompt step's ~500 ms for the default model (9 heads of 64; about 35 GFLOPS), and
 * it needs the KV heads repeated for every query head first (another ~4.5 ms of copies) and
 * cached context gathered out of the blocks. Here, one KV head at a time, each request's keys
 * and values are copied once out of the blocks (keys as fp32 rows, values as the "weight rows"
 * of q_out = P @ V; one buffer for the call, kept in the heap by the engine's malloc settings),
 * then a task is (request, tile of PREFILL_TILE query rows) and every query head of the group
 * runs over them; keys past a row's causal limit (or before its window) are skipped.
 *
 * bf16 models' q, cache and output are converted on the way in and out (the copies above, the
 * task's queries, its outputs): the arithmetic is fp32 either way.
 *
 * Rounding: a query row's result is the same bits here as in decode attention (kernels_impl.h),
 * so a token's attention does not depend on whether it was computed in a prompt chunk (whole,
 * chunked, after a prefix-cache hit, recomputed after preemption) or in a decode step (issue
 * 26): each score is block_scores' (per-key vectors of partial products over the head's dims,
 * one sum16, times the scale; head sizes that are multiples of 16), each row's softmax is
 * softmax_row over the keys it sees, and each output is one multiply-add chain over those keys
 * in order (zeros stand for the keys a row does not see in the tile, and adding 0 * v leaves a
 * sum unchanged). Scores by register tiles over key panels (one chain over the dims) were 1.1x
 * (8 x 128-token prompts) to 1.6x (one of 2k tokens) faster, but gave other bits than decode. */

#define PREFILL_TILE 32 /* query rows per task */
#define PREFILL_SCORE_KEYS 64 /* keys scored for all of a register tile's rows at a time (16 KB at 64 dims) */

/* Element i of an fp32 or (bf16 != 0) bf16 array, as fp32. */
static inline float prefill_element(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const bf16_t *)base)[i]) : ((const float *)base)[i];
}

/* Keys [kstart, kstart + nk) of KV head g, out of the blocks `table` lists, as fp32 rows:
 * kr[t][d] = key(kstart + t)[d] (block_scores' layout, token stride `dim`). */
static void pack_key_rows(const void *k_cache, int bf16, const int64_t *table, int64_t block_size,
                          int64_t token_stride, int64_t g, int64_t dim, int64_t kstart, int64_t nk, float *kr) {
    for (int64_t t = 0; t < nk; t++) {
        int64_t pos = kstart + t;
        int64_t key = (table[pos / block_size] * block_size + pos % block_size) * token_stride + g * dim;
        if (!bf16)
            memcpy(kr + t * dim, (const float *)k_cache + key, (size_t)dim * sizeof(float));
        else
            for (int64_t d = 0; d < dim; d++) kr[t * dim + d] = prefill_element(k_cache, key + d, 1);
    }
}

/* Values [kstart + t0, kstart + t1) of KV head g into vp, the panels of `width` dims (PANEL_WIDTH,
 * or the head size for value_tile) of keys [kstart, kstart + nk): vp[p][t][j] = value(kstart +
 * t)[p * width + j], zero past dim. */
static void pack_value_panels(const void *v_cache, int bf16, const int64_t *table, int64_t block_size,
                              int64_t token_stride, int64_t g, int64_t dim, int64_t kstart, int64_t nk, int64_t t0,
                              int64_t t1, int64_t width, float *vp) {
    int64_t panels = (dim + width - 1) / width;
    for (int64_t t = t0; t < t1; t++) {
        int64_t pos = kstart + t;
        int64_t value = (table[pos / block_size] * block_size + pos % block_size) * token_stride + g * dim;
        for (int64_t p = 0; p < panels; p++) {
            float *row = vp + (p * nk + t) * width;
            int64_t cols = dim - p * width < width ? dim - p * width : width;
            if (!bf16)
                memcpy(row, (const float *)v_cache + value + p * width, (size_t)cols * sizeof(float));
            else
                for (int64_t j = 0; j < cols; j++) row[j] = prefill_element(v_cache, value + p * width + j, 1);
            for (int64_t j = cols; j < width; j++) row[j] = 0.0f;
        }
    }
}

/* Heads of 64 or 128 dims (AVX-512): out[m][0:dim] = p[m] @ v over k keys with v [k][dim] rows
 * as they are, ROWS x VECS accumulators, instead of PANEL_WIDTH-wide panels (64 dims would fill
 * two 48-wide panels: a third of the products on padding). The same chain per output as
 * panel_tile (acc = v * p + acc over the keys in order), so the same bits. */
#if defined(__AVX512F__) && PANEL_LANES == 16
#define VALUE_TILE 1
static inline __attribute__((always_inline)) void value_tile(const float *p, int64_t p_stride, const float *v,
                                                             float *out, int64_t out_stride, int64_t k,
                                                             const int ROWS, const int VECS) {
    panel_vec acc[6][8];
    for (int m = 0; m < ROWS; m++)
        for (int j = 0; j < VECS; j++) acc[m][j] = (panel_vec){0};
    for (int64_t c = 0; c < k; c++) {
        panel_vec w[8];
        for (int j = 0; j < VECS; j++) w[j] = panel_load(v + c * VECS * 16 + j * 16);
        for (int m = 0; m < ROWS; m++) {
            panel_vec b = panel_splat(p[m * p_stride + c]);
            for (int j = 0; j < VECS; j++) acc[m][j] = panel_fma(w[j], b, acc[m][j]);
        }
    }
    for (int m = 0; m < ROWS; m++)
        for (int j = 0; j < VECS; j++) panel_store(out + m * out_stride + j * 16, acc[m][j]);
}

static inline int64_t value_tile_rows(int64_t dim) { return dim == 64 ? 6 : dim == 128 ? 3 : 0; }

static void value_tile_any(const float *p, int64_t p_stride, const float *v, float *out, int64_t out_stride, int64_t k,
                           int64_t rows, int64_t dim) {
#define VALUE_TILE_CASE(R, VECS) \
    case R: value_tile(p, p_stride, v, out, out_stride, k, R, VECS); break;
    if (dim == 64) {
        switch (rows) { VALUE_TILE_CASE(1, 4) VALUE_TILE_CASE(2, 4) VALUE_TILE_CASE(3, 4) VALUE_TILE_CASE(4, 4)
                        VALUE_TILE_CASE(5, 4) VALUE_TILE_CASE(6, 4) default: break; }
    } else {
        switch (rows) { VALUE_TILE_CASE(1, 8) VALUE_TILE_CASE(2, 8) VALUE_TILE_CASE(3, 8) default: break; }
    }
#undef VALUE_TILE_CASE
}
#else
#define VALUE_TILE 0
static inline int64_t value_tile_rows(int64_t dim) { (void)dim; return 0; }
#endif

typedef struct {
    int64_t request, tile, cost;
} prefill_task;

static int prefill_task_heavier(const void *a, const void *b) {
    int64_t ca = ((const prefill_task *)a)->cost, cb = ((const prefill_task *)b)->cost;
    return ca < cb ? 1 : ca > cb ? -1 : 0;
}

/* The first key query row r of a request (position ctx + r) sees. */
static inline int64_t prefill_first_key(int64_t position, int64_t window) {
    return window > 0 && position + 1 > window ? position + 1 - window : 0;
}

/* One task: query rows [r0, r1) of a request (positions ctx + r), KV head g and its `group`
 * query heads. kr, vp: the keys and values [kbase, kbase + knum) of the request and head, packed
 * (pack_key_rows, pack_value_panels); scores: PANEL_ROWS rows of it; qf, of: [PREFILL_TILE]
 * [group * dim], the task's queries and outputs in fp32. Each register tile of rows runs scores,
 * softmax and P @ V before the next. (Going over the keys in L2-sized blocks measured alike at
 * 2k and 8k tokens: 18.4 vs 18.5, 316 vs 324 ms per layer.) */
static void prefill_attend_tile(const void *q, int64_t q_stride, int bf16, int64_t ctx, int64_t r0, int64_t r1,
                                int64_t g, int64_t group, int64_t heads, int64_t dim, float scale, int64_t window,
                                void *out, const float *kr, const float *vp, int64_t kbase, int64_t knum,
                                float *scores, float *qf, float *of) {
    const int64_t width = group * dim; /* qf, of: [PREFILL_TILE][width] */
    /* The group's query heads are adjacent in each q row: copied (converted) once. */
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < width; i++)
            qf[(r - r0) * width + i] = prefill_element(q, r * q_stride + g * width + i, bf16);
    /* Scores rows span the keys up to the tile's last row's. */
    const int64_t key_panels = (ctx + r1 - kbase + PANEL_WIDTH - 1) / PANEL_WIDTH, stride = key_panels * PANEL_WIDTH;
    const int64_t value_panels = (dim + PANEL_WIDTH - 1) / PANEL_WIDTH;
    const int64_t vrows = value_tile_rows(dim); /* > 0: value_tile's rows; 0: PANEL_WIDTH panels */
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        const float *qh = qf + (h - g * group) * dim;
        float *oh = of + (h - g * group) * dim;
        for (int64_t m0 = r0; m0 < r1; m0 += PANEL_ROWS) {
            /* One register tile of rows: the keys [lo, hi) cover every row of it. */
            int64_t rows = r1 - m0 < PANEL_ROWS ? r1 - m0 : PANEL_ROWS;
            int64_t lo = prefill_first_key(ctx + m0, window) - kbase, hi = ctx + m0 + rows - kbase;
            const float *x = qh + (m0 - r0) * width;
            float *out_rows = oh + (m0 - r0) * width;
            int64_t first[PANEL_ROWS], last[PANEL_ROWS]; /* each row's keys: [first, last) */
            for (int64_t i = 0; i < rows; i++) {
                first[i] = prefill_first_key(ctx + m0 + i, window) - kbase;
                last[i] = ctx + m0 + i + 1 - kbase;
            }
            /* Each row's scale * q @ K^T over the keys it sees, as decode attention computes it
             * (block_scores_f32: each key's score on its own, so splitting the keys changes no
             * bit), PREFILL_SCORE_KEYS keys at a time for all the rows, so those keys stay in L1
             * (row by row over all the keys took 1.6x as long at 2k tokens). */
            for (int64_t t0 = lo; t0 < hi; t0 += PREFILL_SCORE_KEYS)
                for (int64_t i = 0; i < rows; i++) {
                    int64_t a = first[i] > t0 ? first[i] : t0, z = t0 + PREFILL_SCORE_KEYS;
                    z = last[i] < z ? last[i] : z;
                    if (a < z)
                        block_scores_f32(x + i * width, kr, a, z, 0, 1, 1, dim, dim, scale, scores + i * stride, 0,
                                         NULL, 0);
                }
            /* Each row's softmax over the keys it sees (softmax_row, as decode attention); zeros for
             * the other keys the tile spans. */
            for (int64_t i = 0; i < rows; i++) {
                float *row = scores + i * stride;
                softmax_row(row + first[i], last[i] - first[i]);
                for (int64_t j = lo; j < first[i]; j++) row[j] = 0.0f;
                for (int64_t j = last[i]; j < hi; j++) row[j] = 0.0f;
            }
            /* out = P @ V over [lo, hi) */
#if VALUE_TILE
            /* Rows past a row's keys hold zeros in P, so sub-tiles may span all of [lo, hi):
             * 0 * v added to a chain changes no bit. */
            for (int64_t m1 = 0; vrows && m1 < rows; m1 += vrows)
                value_tile_any(scores + m1 * stride + lo, stride, vp + lo * dim, out_rows + m1 * width, width,
                               hi - lo, rows - m1 < vrows ? rows - m1 : vrows, dim);
            if (vrows) continue;
#endif
            for (int64_t p = 0; p < value_panels; p++) {
                int64_t cols = dim - p * PANEL_WIDTH < PANEL_WIDTH ? dim - p * PANEL_WIDTH : PANEL_WIDTH;
                panel_tile_rows(scores + lo, stride, vp + (p * knum + lo) * PANEL_WIDTH, NULL,
                                out_rows + p * PANEL_WIDTH, width, hi - lo, cols, NULL, 0, rows);
            }
        }
    }
    /* The group's heads are adjacent in each output row. */
    for (int64_t r = r0; r < r1; r++) {
        const float *src = of + (r - r0) * width;
        if (bf16) {
            bf16_t *dst = (bf16_t *)out + r * heads * dim + g * width;
            for (int64_t i = 0; i < width; i++) dst[i] = float_to_bf16(src[i]);
        } else {
            memcpy((float *)out + r * heads * dim + g * width, src, (size_t)width * sizeof(float));
        }
    }
}

#define PREFILL_PACK_KEYS (8 * PANEL_WIDTH) /* keys per packing job: whole key panels */

/* q [tokens, heads, dim] (rows q_stride apart, heads adjacent) → out [tokens, heads, dim]
 * contiguous, for `requests` prompt chunks laid end to end: request b's queries are rows
 * [query_starts[b], query_starts[b + 1]), the last of its seq_lens[b] positions; its keys and
 * values (this step's already written) lie in the cache blocks block_tables[b] lists
 * ([num_blocks, block_size, kv_heads, dim] each). q, the cache and out are fp32, or bf16 when
 * `bf16` is set. → 1 when there was no memory for the buffers.
 *
 * One KV head at a time: first every request's keys and values for it are copied out of the
 * blocks once (jobs of PREFILL_PACK_KEYS keys), then the tasks (request, tile of query rows) run
 * over them. Packing per task instead copied a 2k-token prompt's keys 32 times over (each tile
 * of 32 rows packed every key before it): a fifth of its attention time. */
int64_t prefill_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                          const int64_t *block_tables, int64_t bt_stride, const int64_t *query_starts,
                          const int64_t *seq_lens, int64_t requests, int64_t heads, int64_t kv_heads, int64_t dim,
                          int64_t block_size, float scale, int64_t window, void *out, int64_t bf16, int num_threads) {
    const int64_t group = heads / kv_heads, token_stride = kv_heads * dim;
    const int64_t vwidth = value_tile_rows(dim) ? dim : PANEL_WIDTH, value_panels = (dim + vwidth - 1) / vwidth;
    int64_t num_tasks = 0, num_jobs = 0, longest = 1, floats = 0, failed = 0;
    /* Per request: its first key (kbase), key count, and where its keys and values lie in kv. */
    int64_t *layout = malloc(sizeof(int64_t) * (size_t)(4 * requests + 1));
    if (layout == NULL) return 1;
    int64_t *kbase = layout, *knum = layout + requests, *koff = layout + 2 * requests, *voff = layout + 3 * requests;
    for (int64_t b = 0; b < requests; b++) {
        int64_t len = query_starts[b + 1] - query_starts[b];
        num_tasks += (len + PREFILL_TILE - 1) / PREFILL_TILE;
        longest = seq_lens[b] > longest ? seq_lens[b] : longest;
        kbase[b] = prefill_first_key(seq_lens[b] - len, window);
        knum[b] = seq_lens[b] - kbase[b];
        num_jobs += (knum[b] + PREFILL_PACK_KEYS - 1) / PREFILL_PACK_KEYS;
        koff[b] = floats;
        floats += knum[b] * dim; /* keys as rows (pack_key_rows) */
        voff[b] = floats;
        floats += value_panels * knum[b] * vwidth;
    }
    prefill_task *tasks = malloc(sizeof(prefill_task) * (size_t)(num_tasks > 0 ? num_tasks : 1));
    int64_t *jobs = malloc(sizeof(int64_t) * (size_t)(2 * num_jobs + 1)); /* (request, first key) */
    float *kv = malloc(sizeof(float) * (size_t)(floats > 0 ? floats : 1));
    if (tasks == NULL || jobs == NULL || kv == NULL) {
        free(layout), free(tasks), free(jobs), free(kv);
        return 1;
    }
    int64_t n = 0, j = 0;
    for (int64_t b = 0; b < requests; b++) {
        int64_t len = query_starts[b + 1] - query_starts[b], ctx = seq_lens[b] - len;
        for (int64_t tile = 0; tile * PREFILL_TILE < len; tile++) {
            int64_t r1 = (tile + 1) * PREFILL_TILE < len ? (tile + 1) * PREFILL_TILE : len;
            int64_t keys = ctx + r1 - prefill_first_key(ctx + tile * PREFILL_TILE, window);
            tasks[n++] = (prefill_task){b, tile, keys * (r1 - tile * PREFILL_TILE)};
        }
        for (int64_t c0 = 0; c0 < knum[b]; c0 += PREFILL_PACK_KEYS) {
            jobs[j++] = b;
            jobs[j++] = c0;
        }
    }
    /* Heaviest first, so the dynamic schedule ends with small tasks to even out the threads. */
    qsort(tasks, (size_t)num_tasks, sizeof(prefill_task), prefill_task_heavier);
    const int64_t padded = (longest + PANEL_WIDTH - 1) / PANEL_WIDTH * PANEL_WIDTH;
    const size_t size = bf16 ? sizeof(bf16_t) : sizeof(float);
#pragma omp parallel num_threads(num_threads) if (num_tasks > 1 || kv_heads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)(PANEL_ROWS * padded));
        float *qf = malloc(sizeof(float) * (size_t)(PREFILL_TILE * group * dim));
        float *of = malloc(sizeof(float) * (size_t)(PREFILL_TILE * group * dim));
        int ready = scores != NULL && qf != NULL && of != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t g = 0; g < kv_heads; g++) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < num_jobs; i++) {
                int64_t b = jobs[2 * i], c0 = jobs[2 * i + 1];
                int64_t count = knum[b] - c0 < PREFILL_PACK_KEYS ? knum[b] - c0 : PREFILL_PACK_KEYS;
                const int64_t *table = block_tables + b * bt_stride;
                pack_key_rows(k_cache, (int)bf16, table, block_size, token_stride, g, dim, kbase[b] + c0, count,
                              kv + koff[b] + c0 * dim);
                pack_value_panels(v_cache, (int)bf16, table, block_size, token_stride, g, dim, kbase[b], knum[b], c0,
                                  c0 + count, vwidth, kv + voff[b]);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < num_tasks; i++) {
                if (!ready) continue; /* reported below: the caller raises */
                const prefill_task *task = &tasks[i];
                int64_t b = task->request, start = query_starts[b], len = query_starts[b + 1] - start;
                int64_t r0 = task->tile * PREFILL_TILE, r1 = r0 + PREFILL_TILE < len ? r0 + PREFILL_TILE : len;
                prefill_attend_tile((const char *)q + start * q_stride * size, q_stride, (int)bf16, seq_lens[b] - len,
                                    r0, r1, g, group, heads, dim, scale, window, (char *)out + start * heads * dim * size,
                                    kv + koff[b], kv + voff[b], kbase[b], knum[b], scores, qf, of);
            }
        }
        free(scores);
        free(qf);
        free(of);
    }
    free(layout);
    free(tasks);
    free(jobs);
    free(kv);
    return failed;
}
