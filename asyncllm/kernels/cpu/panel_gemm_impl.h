/* fp32 matmul for steps of more than a few rows (batched decode, prompt chunks) against a weight
 * packed once into column panels. Included once by kernels.c.
 *
 * Why not oneDNN's packed GEMM (layers/linear.py): at the 16-128 rows of batched decoding it ran
 * the default model's projection stack at ~120-280 GFLOPS here, well below this CPU's fp32 peak,
 * because a step reads each weight once from DRAM and that stream was not overlapped with the
 * arithmetic. Here each panel of PANEL_WIDTH weight columns is read from DRAM while the previous
 * panel is being used: every pass over a panel (one per PANEL_ROWS activation rows) also
 * prefetches its share of the next panel into L2.
 *
 * Layout: packed[p][c][j] = w[p * PANEL_WIDTH + j][c] (zero past n): the weight columns of one
 * panel side by side, so one k step loads PANEL_VECS vectors of weights and broadcasts one value
 * per activation row. Each output is one fused multiply-add chain over k in order, so a row's
 * result never depends on how many rows the call has or where the row sits in it.
 */

#ifdef __AVX512F__
#define PANEL_LANES 16
#define PANEL_VECS 3 /* 48 columns */
#define PANEL_ROWS 8 /* 24 accumulators + 3 weight vectors + 1 broadcast of 32 registers */
typedef float panel_vec __attribute__((vector_size(64)));
static inline panel_vec panel_splat(float s) { return (panel_vec)_mm512_set1_ps(s); }
static inline panel_vec panel_fma(panel_vec a, panel_vec b, panel_vec c) {
    return (panel_vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#else
#define PANEL_LANES 8
#define PANEL_VECS 2 /* 16 columns */
#define PANEL_ROWS 6 /* 12 accumulators + 2 + 1 of AVX2's 16 registers */
typedef float panel_vec __attribute__((vector_size(32)));
static inline panel_vec panel_splat(float s) { return (panel_vec){s, s, s, s, s, s, s, s}; }
static inline panel_vec panel_fma(panel_vec a, panel_vec b, panel_vec c) {
#ifdef __FMA__
    return (panel_vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
#endif
#define PANEL_WIDTH (PANEL_LANES * PANEL_VECS)

/* By value: taking the accumulators' addresses would keep them in memory instead of registers. */
static inline void panel_store(float *p, panel_vec v) { memcpy(p, &v, sizeof v); }
static inline panel_vec panel_load(const float *p) {
    panel_vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
/* Activation rows per pass over all panels: their x (up to 256 x 1536 floats) stays in L2 while
 * the panels stream past; measured 128-512 alike at 1024 rows. */
#define PANEL_CHUNK_ROWS 256
#define PANEL_PREFETCH_STEPS 16 /* k steps ahead, into L1, within the current panel */

int64_t panel_width(void) { return PANEL_WIDTH; }

/* w [n, k] (nn.Linear's layout, rows `w_stride` apart) → packed [ceil(n / PANEL_WIDTH)][k][PANEL_WIDTH]. */
void pack_panels_f32(const float *w, int64_t w_stride, float *packed, int64_t n, int64_t k, int num_threads) {
    int64_t panels = (n + PANEL_WIDTH - 1) / PANEL_WIDTH;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < k; c++)
            for (int64_t j = 0; j < PANEL_WIDTH; j++) {
                int64_t col = p * PANEL_WIDTH + j;
                packed[(p * k + c) * PANEL_WIDTH + j] = col < n ? w[col * w_stride + c] : 0.0f;
            }
}

/* out[m][0:cols] = x[m] @ panel (+ bias) for `ROWS` rows, one accumulator chain per output.
 * Along the way the `share` floats from `next` (the caller's part of the next panel) go to L2. */
static inline __attribute__((always_inline)) void panel_tile(
        const float *x, int64_t x_stride, const float *panel, const float *bias, float *out, int64_t out_stride,
        int64_t k, int64_t cols, const float *next, int64_t share, const int ROWS) {
    panel_vec acc[PANEL_ROWS][PANEL_VECS];
    for (int m = 0; m < ROWS; m++)
        for (int v = 0; v < PANEL_VECS; v++) acc[m][v] = (panel_vec){0};
    int64_t issued = 0;
    for (int64_t c = 0; c < k; c++) {
        panel_vec w[PANEL_VECS];
        for (int v = 0; v < PANEL_VECS; v++) w[v] = panel_load(panel + c * PANEL_WIDTH + v * PANEL_LANES);
        __builtin_prefetch(panel + (c + PANEL_PREFETCH_STEPS) * PANEL_WIDTH, 0, 3);
        /* Spread evenly: by the end of step c, (c + 1) / k of the share has been asked for. */
        for (int64_t want = (c + 1) * share / k; issued < want; issued += 16) __builtin_prefetch(next + issued, 0, 2);
        for (int m = 0; m < ROWS; m++) {
            panel_vec b = panel_splat(x[m * x_stride + c]);
            for (int v = 0; v < PANEL_VECS; v++) acc[m][v] = panel_fma(w[v], b, acc[m][v]);
        }
    }
    for (int m = 0; m < ROWS; m++) {
        float row[PANEL_WIDTH];
        for (int v = 0; v < PANEL_VECS; v++) panel_store(row + v * PANEL_LANES, acc[m][v]);
        float *o = out + m * out_stride;
        if (bias != NULL)
            for (int64_t j = 0; j < cols; j++) o[j] = row[j] + bias[j];
        else
            memcpy(o, row, (size_t)cols * sizeof(float));
    }
}

/* switch (rows) with CASE(R) for R = 1..PANEL_ROWS: each row count a compile-time constant of a
 * tile function (its own unrolled code). */
#if PANEL_ROWS == 8
#define PANEL_ROWS_SWITCH(rows, CASE) \
    switch (rows) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) default: break; }
#else
#define PANEL_ROWS_SWITCH(rows, CASE) \
    switch (rows) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) default: break; }
#endif

/* panel_tile for 1..PANEL_ROWS rows. */
static inline __attribute__((always_inline)) void panel_tile_rows(
        const float *x, int64_t x_stride, const float *panel, const float *bias, float *out, int64_t out_stride,
        int64_t k, int64_t cols, const float *next, int64_t share, int64_t rows) {
#define PANEL_TILE_CASE(R) \
    case R: panel_tile(x, x_stride, panel, bias, out, out_stride, k, cols, next, share, R); break;
    PANEL_ROWS_SWITCH(rows, PANEL_TILE_CASE)
#undef PANEL_TILE_CASE
}

/* One panel past `rows` rows of x (x_stride apart) into out (rows out_stride apart), PANEL_ROWS
 * at a time. The passes together prefetch the next panel's PANEL_WIDTH * k floats at `next` (NULL:
 * none) into L2, 1 / passes each, in whole lines. */
static inline __attribute__((always_inline)) void panel_rows(
        const float *x, int64_t x_stride, int64_t rows, const float *panel, const float *bias, float *out,
        int64_t out_stride, int64_t k, int64_t cols, const float *next) {
    int64_t passes = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    int64_t share = next == NULL ? 0 : (PANEL_WIDTH * k / passes + 15) / 16 * 16;
    for (int64_t pass = 0; pass < passes; pass++) {
        int64_t m = pass * PANEL_ROWS, left = rows - m < PANEL_ROWS ? rows - m : PANEL_ROWS;
        panel_tile_rows(x + m * x_stride, x_stride, panel, bias, out + m * out_stride, out_stride, k, cols,
                        next == NULL ? panel : next + pass * share, share, left);
    }
}

/* out [rows, n] = x [rows, k] (rows `x_stride` apart) @ w^T (+ bias [n] or NULL), w packed by
 * pack_panels_f32. The threads share out the panels; rows go in chunks of PANEL_CHUNK_ROWS.
 * An orphaned `omp for` (as few_rows_for): every thread of the calling parallel region calls it,
 * so decode_stack runs it inside its own region. */
static void panel_linear_for(const float *x, int64_t x_stride, int64_t rows, const float *packed, const float *bias,
                             float *out, int64_t n, int64_t k) {
    int64_t panels = (n + PANEL_WIDTH - 1) / PANEL_WIDTH;
    for (int64_t m0 = 0; m0 < rows; m0 += PANEL_CHUNK_ROWS) {
        int64_t chunk = rows - m0 < PANEL_CHUNK_ROWS ? rows - m0 : PANEL_CHUNK_ROWS;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const float *panel = packed + p * k * PANEL_WIDTH;
            const float *next = p + 1 < panels ? panel + k * PANEL_WIDTH : panel;
            int64_t cols = n - p * PANEL_WIDTH < PANEL_WIDTH ? n - p * PANEL_WIDTH : PANEL_WIDTH;
            const float *b = bias == NULL ? NULL : bias + p * PANEL_WIDTH;
            panel_rows(x + m0 * x_stride, x_stride, chunk, panel, b, out + m0 * n + p * PANEL_WIDTH, n, k, cols, next);
        }
    }
}

void panel_linear_f32(const float *x, int64_t x_stride, int64_t rows, const float *packed, const float *bias,
                      float *out, int64_t n, int64_t k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    panel_linear_for(x, x_stride, rows, packed, bias, out, n, k);
}

/* out [rows, inter] = silu(gate) * up, where [gate | up] = x @ w^T (+ bias) is the fused gate/up
 * projection (w [2 * inter, k] packed by pack_panels_f32, inter a multiple of PANEL_WIDTH, so gate
 * panel p and up panel p + inter / PANEL_WIDTH hold matching columns). For each pair of panels a
 * thread runs a chunk's rows past the gate panel, then past the up panel, into its own buffer (two
 * PANEL_CHUNK_ROWS x PANEL_WIDTH tiles, 96 KB, in L2), and writes only silu(gate) * up: the
 * [rows, 2 * inter] gate/up activation (12 MB for a 1024-token prompt chunk of the default model)
 * is never written out and read back. The same accumulator chains as panel_linear_f32 and then
 * silu_and_mul_row, so the same bits as the two calls. (Multiplying after every 8-row pass, both
 * tiles in L1, was slower than the two calls: that epilogue between the tiles broke the panel
 * stream.) → 1 when a thread had no memory for its buffer. */
int64_t panel_linear_silu_f32(const float *x, int64_t x_stride, int64_t rows, const float *packed, const float *bias,
                              float *out, int64_t inter, int64_t k, int num_threads) {
    const int64_t pairs = inter / PANEL_WIDTH, panel_floats = k * PANEL_WIDTH;
    int64_t failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *tiles = aligned_alloc(64, 2 * PANEL_CHUNK_ROWS * PANEL_WIDTH * sizeof(float));
        if (tiles == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t m0 = 0; m0 < rows; m0 += PANEL_CHUNK_ROWS) {
            int64_t chunk = rows - m0 < PANEL_CHUNK_ROWS ? rows - m0 : PANEL_CHUNK_ROWS;
#pragma omp for schedule(static)
            for (int64_t q = 0; q < pairs; q++) {
                if (tiles == NULL) continue; /* reported below: the caller raises */
                for (int half = 0; half < 2; half++) { /* gate panel q, then up panel q + pairs */
                    int64_t index = half ? q + pairs : q;
                    const float *panel = packed + index * panel_floats;
                    /* prefetched meanwhile: the up panel, then the next pair's gate panel */
                    const float *next = packed + (half ? (q + 1 < pairs ? q + 1 : q) : q + pairs) * panel_floats;
                    const float *b = bias == NULL ? NULL : bias + index * PANEL_WIDTH;
                    panel_rows(x + m0 * x_stride, x_stride, chunk, panel, b,
                               tiles + half * PANEL_CHUNK_ROWS * PANEL_WIDTH, PANEL_WIDTH, k, PANEL_WIDTH, next);
                }
                for (int64_t r = 0; r < chunk; r++)
                    silu_and_mul_row_f32(tiles + r * PANEL_WIDTH, tiles + (PANEL_CHUNK_ROWS + r) * PANEL_WIDTH,
                                         out + (m0 + r) * inter + q * PANEL_WIDTH, PANEL_WIDTH);
            }
        }
        free(tiles);
    }
    return failed;
}

#ifdef __AVX512F__
/* r[i][j] → r[j][i] for 16 vectors of 16 floats: pairs interleaved, then 4 x 4 within each 128-bit
 * lane, then the lanes themselves. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* Now r[4i + c], lane L: rows 4i..4i+3 at column 4L + c. */
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; c++) {
        __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
        __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
        t[c] = _mm512_shuffle_f32x4(u0, u2, _MM_SHUFFLE(2, 0, 2, 0));
        t[4 + c] = _mm512_shuffle_f32x4(u0, u2, _MM_SHUFFLE(3, 1, 3, 1));
        t[8 + c] = _mm512_shuffle_f32x4(u1, u3, _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + c] = _mm512_shuffle_f32x4(u1, u3, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}
#endif

/* Group g of weight row `col` unpacked (zeros past the last row: the panel's padding). */
static inline quant_pair unpack_column(const uint8_t *blocks, int64_t n, int64_t groups, int64_t block_bytes,
                                       int64_t col, int64_t g, int bits) {
    if (col < n) return unpack_block(blocks + (col * groups + g) * block_bytes, bits);
    quant_pair zeros = {{0}, {0}};
    return zeros;
}

/* Panel p of the weight that quantised blocks [n][k / 32 * quant_block_bytes(bits)] hold
 * (quant_rows_impl.h), in pack_panels_f32's layout: each w exactly as unpack_block computes it for
 * the block kernel. A group's 32 x PANEL_WIDTH tile (6 KB) is filled in L1: with AVX-512, 16
 * weight rows' blocks at a time, transposed in registers (storing each weight on its own made
 * the unpacking ~15 ms of every big step for the default model). */
static void dequantize_panel(const uint8_t *blocks, int64_t n, int64_t k, int bits, int64_t p, float *panel) {
    const int64_t block_bytes = quant_block_bytes(bits), groups = k / QUANT_GROUP;
    for (int64_t g = 0; g < groups; g++) {
        float *tile = panel + g * QUANT_GROUP * PANEL_WIDTH;
#if defined(__AVX512F__) && PANEL_LANES == 16
        for (int64_t j0 = 0; j0 < PANEL_WIDTH; j0 += 16) {
            __m512 lo[16], hi[16];
            for (int j = 0; j < 16; j++) {
                quant_pair pair = unpack_column(blocks, n, groups, block_bytes, p * PANEL_WIDTH + j0 + j, g, bits);
                lo[j] = (__m512)pair.lo;
                hi[j] = (__m512)pair.hi;
            }
            transpose16(lo);
            transpose16(hi);
            for (int t = 0; t < 16; t++) {
                _mm512_storeu_ps(tile + t * PANEL_WIDTH + j0, lo[t]);
                _mm512_storeu_ps(tile + (16 + t) * PANEL_WIDTH + j0, hi[t]);
            }
        }
#else
        for (int64_t j = 0; j < PANEL_WIDTH; j++) {
            quant_pair pair = unpack_column(blocks, n, groups, block_bytes, p * PANEL_WIDTH + j, g, bits);
            float w[QUANT_GROUP];
            memcpy(w, &pair.lo, sizeof pair.lo);
            memcpy(w + 16, &pair.hi, sizeof pair.hi);
            for (int t = 0; t < QUANT_GROUP; t++) tile[t * PANEL_WIDTH + j] = w[t];
        }
#endif
    }
}

/* panel_linear_f32 against quantised blocks instead of packed panels (EngineArgs.
 * quantized_weights_only, where the dense weight is not kept): each thread unpacks one panel at a
 * time into its own buffer (PANEL_WIDTH x k floats: 110-300 KB, in L2) and runs every row past it
 * before the next. Each output is the same multiply-add chain as panel_linear_f32's against
 * pack_panels_f32 of the dequantised weight, so the results are the same bits. Writing the whole
 * dequantised weight out and packing it instead cost ~37 ms per step for the default model. */
int64_t panel_linear_blocks_f32(const float *x, int64_t x_stride, int64_t rows, const uint8_t *blocks, int64_t bits,
                                const float *bias, float *out, int64_t n, int64_t k, int num_threads) {
    int64_t panels = (n + PANEL_WIDTH - 1) / PANEL_WIDTH, failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *panel = aligned_alloc(64, (size_t)k * PANEL_WIDTH * sizeof(float));
        if (panel == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (panel == NULL) continue; /* reported below: the caller raises */
            dequantize_panel(blocks, n, k, (int)bits, p, panel);
            int64_t cols = n - p * PANEL_WIDTH < PANEL_WIDTH ? n - p * PANEL_WIDTH : PANEL_WIDTH;
            const float *b = bias == NULL ? NULL : bias + p * PANEL_WIDTH;
            panel_rows(x, x_stride, rows, panel, b, out + p * PANEL_WIDTH, n, k, cols, NULL);
        }
        free(panel);
    }
    return failed; /* 1: a thread had no memory for its panel buffer */
}
