/* bf16 matmul for steps of any number of rows against a weight packed once into column panels of
 * bf16 pairs, accumulated in fp32. Included once by kernels.c after panel_gemm_impl.h (its
 * PANEL_* shape, panel_vec and prefetch scheme).
 *
 * Why (issue 26): torch's bf16 linear (oneDNN) picks its blocking, and so its reduction order, by
 * the number of rows, so a bf16 model's greedy output depended on who else was in the batch and
 * on prompt chunking. Here each output is one chain over k in a fixed order whatever the rows,
 * the thread count or the row's place in the call: batch-invariant by construction, as
 * panel_linear_f32 is in fp32.
 *
 * Layout: packed[p][c][j] = the 32-bit word (w[p * PANEL_WIDTH + j][2c], w[..][2c + 1]) (zero past
 * n): one k-pair step loads PANEL_VECS vectors of words and broadcasts one word (two bf16) per
 * activation row. With AVX512_BF16 a step is one vdpbf16ps per accumulator: acc += x[2c + 1] *
 * w[2c + 1], then + x[2c] * w[2c], each product exact in fp32 and each sum rounded (Intel's
 * definition; denormal inputs read as zero). Elsewhere the same two fused multiply-adds per step
 * in the same order give the same bits (denormals apart), so results agree across ISAs too. */

#if defined(__AVX512BF16__) && PANEL_LANES == 16
#define BF16_DOT_NATIVE 1
#else
#define BF16_DOT_NATIVE 0
#endif

/* w [n, k] bf16 (rows `w_stride` apart, k even) → packed [ceil(n / PANEL_WIDTH)][k / 2][PANEL_WIDTH] words. */
void pack_panels_bf16(const bf16_t *w, int64_t w_stride, uint32_t *packed, int64_t n, int64_t k, int num_threads) {
    const int64_t panels = (n + PANEL_WIDTH - 1) / PANEL_WIDTH, pairs = k / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < pairs; c++)
            for (int64_t j = 0; j < PANEL_WIDTH; j++) {
                int64_t col = p * PANEL_WIDTH + j;
                uint32_t word = 0;
                if (col < n)
                    word = (uint32_t)w[col * w_stride + 2 * c] | (uint32_t)w[col * w_stride + 2 * c + 1] << 16;
                packed[(p * pairs + c) * PANEL_WIDTH + j] = word;
            }
}

static inline uint32_t bf16_pair(const bf16_t *x) {
    uint32_t word;
    memcpy(&word, x, sizeof word);
    return word;
}

/* out[m][0:cols] = x[m] @ panel (+ bias), rounded to bf16, for `ROWS` rows; the `share` words
 * from `next` go to L2 meanwhile (panel_tile's scheme). */
static inline __attribute__((always_inline)) void bf16_panel_tile(
        const bf16_t *x, int64_t x_stride, const uint32_t *panel, const bf16_t *bias, bf16_t *out,
        int64_t out_stride, int64_t pairs, int64_t cols, const uint32_t *next, int64_t share, const int ROWS) {
    panel_vec acc[PANEL_ROWS][PANEL_VECS];
    for (int m = 0; m < ROWS; m++)
        for (int v = 0; v < PANEL_VECS; v++) acc[m][v] = (panel_vec){0};
    int64_t issued = 0;
    for (int64_t c = 0; c < pairs; c++) {
        const uint32_t *step = panel + c * PANEL_WIDTH;
        __builtin_prefetch(step + PANEL_PREFETCH_STEPS * PANEL_WIDTH, 0, 3);
        for (int64_t want = (c + 1) * share / pairs; issued < want; issued += 16) __builtin_prefetch(next + issued, 0, 2);
#if BF16_DOT_NATIVE
        __m512i w[PANEL_VECS];
        for (int v = 0; v < PANEL_VECS; v++) w[v] = _mm512_loadu_si512(step + v * PANEL_LANES);
        for (int m = 0; m < ROWS; m++) {
            __m512i b = _mm512_set1_epi32((int)bf16_pair(x + m * x_stride + 2 * c));
            for (int v = 0; v < PANEL_VECS; v++)
                acc[m][v] = (panel_vec)_mm512_dpbf16_ps((__m512)acc[m][v], (__m512bh)w[v], (__m512bh)b);
        }
#else
        panel_vec even[PANEL_VECS], odd[PANEL_VECS];
        for (int v = 0; v < PANEL_VECS; v++) {
            uint32_t words[PANEL_LANES], lo[PANEL_LANES], hi[PANEL_LANES];
            memcpy(words, step + v * PANEL_LANES, sizeof words);
            for (int i = 0; i < PANEL_LANES; i++) lo[i] = words[i] << 16, hi[i] = words[i] & 0xffff0000u;
            memcpy(&even[v], lo, sizeof lo);
            memcpy(&odd[v], hi, sizeof hi);
        }
        for (int m = 0; m < ROWS; m++) {
            const bf16_t *pair = x + m * x_stride + 2 * c;
            panel_vec b0 = panel_splat(bf16_to_float(pair[0])), b1 = panel_splat(bf16_to_float(pair[1]));
            for (int v = 0; v < PANEL_VECS; v++)
                acc[m][v] = panel_fma(even[v], b0, panel_fma(odd[v], b1, acc[m][v]));
        }
#endif
    }
    for (int m = 0; m < ROWS; m++) {
        float row[PANEL_WIDTH];
        for (int v = 0; v < PANEL_VECS; v++) panel_store(row + v * PANEL_LANES, acc[m][v]);
        bf16_t *o = out + m * out_stride;
        for (int64_t j = 0; j < cols; j++) o[j] = float_to_bf16(bias != NULL ? row[j] + bf16_to_float(bias[j]) : row[j]);
    }
}

static inline __attribute__((always_inline)) void bf16_panel_rows(
        const bf16_t *x, int64_t x_stride, int64_t rows, const uint32_t *panel, const bf16_t *bias, bf16_t *out,
        int64_t out_stride, int64_t pairs, int64_t cols, const uint32_t *next) {
    int64_t passes = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
    int64_t share = (PANEL_WIDTH * pairs / passes + 15) / 16 * 16;
    for (int64_t pass = 0; pass < passes; pass++) {
        int64_t m = pass * PANEL_ROWS, left = rows - m < PANEL_ROWS ? rows - m : PANEL_ROWS;
        const bf16_t *xm = x + m * x_stride;
        bf16_t *om = out + m * out_stride;
        const uint32_t *ahead = next + pass * share;
#define BF16_TILE_CASE(R) \
    case R: bf16_panel_tile(xm, x_stride, panel, bias, om, out_stride, pairs, cols, ahead, share, R); break;
        PANEL_ROWS_SWITCH(left, BF16_TILE_CASE)
#undef BF16_TILE_CASE
    }
}

/* out [rows, n] = x [rows, k] (rows `x_stride` apart) @ w^T (+ bias [n] or NULL), bf16 in and out,
 * w packed by pack_panels_bf16. The threads share out the panels; rows go in chunks of
 * PANEL_CHUNK_ROWS (panel_linear_for's schedule). An orphaned `omp for`, as panel_linear_for:
 * decode_stack runs it inside its own region. */
static void panel_linear_bf16_for(const bf16_t *x, int64_t x_stride, int64_t rows, const uint32_t *packed,
                                  const bf16_t *bias, bf16_t *out, int64_t n, int64_t k) {
    const int64_t panels = (n + PANEL_WIDTH - 1) / PANEL_WIDTH, pairs = k / 2, panel_words = pairs * PANEL_WIDTH;
    for (int64_t m0 = 0; m0 < rows; m0 += PANEL_CHUNK_ROWS) {
        int64_t chunk = rows - m0 < PANEL_CHUNK_ROWS ? rows - m0 : PANEL_CHUNK_ROWS;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const uint32_t *panel = packed + p * panel_words;
            const uint32_t *next = p + 1 < panels ? panel + panel_words : panel;
            int64_t cols = n - p * PANEL_WIDTH < PANEL_WIDTH ? n - p * PANEL_WIDTH : PANEL_WIDTH;
            bf16_panel_rows(x + m0 * x_stride, x_stride, chunk, panel, bias == NULL ? NULL : bias + p * PANEL_WIDTH,
                            out + m0 * n + p * PANEL_WIDTH, n, pairs, cols, next);
        }
    }
}

void panel_linear_bf16(const bf16_t *x, int64_t x_stride, int64_t rows, const uint32_t *packed, const bf16_t *bias,
                       bf16_t *out, int64_t n, int64_t k, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    panel_linear_bf16_for(x, x_stride, rows, packed, bias, out, n, k);
}
