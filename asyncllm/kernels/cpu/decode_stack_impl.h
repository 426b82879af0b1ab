/* The whole decoder stack for a decode step of a few sequences, in one call; included by
 * kernels.c once per element type after kernels_impl.h, whose row functions it uses.
 *
 * At 1-8 rows a step is bound by reading the weights (~540 MB in fp32 for the default model),
 * and the per-op path spends ~20% of a batch-1 step between the matmuls: ~10 Python-level
 * calls and as many OpenMP fork/joins per layer for ops that take a few microseconds each.
 * Here one parallel region runs every layer; the small ops (row by row: the threads share the
 * rows, which measured ~0.2 ms of an 8-row step faster than one thread under `omp single`), the
 * matmuls and attention are shared out (`omp for`), with a barrier after each. The ops,
 * their order and their rounding are the per-op C path's (same row functions, same matmul
 * tiles), so both give the same bits. */

#ifndef DECODE_STACK_TYPES
#define DECODE_STACK_TYPES
/* One layer's tensors (element type T; NULL where the model has none). A projection with blocks
 * (quant_rows_impl.h, DecodeStack.quant_bits wide) is read from them instead of its dense weight;
 * else one with a panel copy (pack_panels_f32, or pack_panels_bf16's words in bf16) is read from
 * that in steps of at least DecodeStack.panel_min_rows rows, as the per-op path does.
 * Mirrored by ctypes in cpu_kernels/decode_stack.py: keep the field order. */
typedef struct {
    const void *input_norm, *qkv, *qkv_bias, *q_norm, *k_norm, *o, *post_norm, *gate_up, *gate_up_bias, *down,
        *down_bias;
    const uint8_t *qkv_quant, *o_quant, *gate_up_quant, *down_quant;
    const void *qkv_panels, *o_panels, *gate_up_panels, *down_panels;
    void *k_cache, *v_cache; /* [num_blocks, block_size, kv_heads, head_dim] each */
    /* LoRA of the step's adapters per projection (qkv, o, gate_up, down; NULL: none targets it), T:
     * a [adapters, parts * lora_rank, in], b [adapters, lora_rank, out] (B^T, part p's columns with
     * the rank-sized slice p of the shrink; ranks zero-padded to DecodeStack.lora_rank). */
    const void *lora_a[4], *lora_b[4];
} DecodeLayer;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate, block_size, window;
    int64_t quant_bits; /* of every layer's blocks: 4, 8 or QUANT_FP8 (0: none) */
    int64_t panel_min_rows; /* fewest rows read from panel copies (cpu_kernels.PANEL_MIN_ROWS) */
    double eps, scale;
    const float *cos, *sin; /* [max_positions, head_dim] */
    const void *final_norm;
    const DecodeLayer *layers;
    const int64_t *lora_index; /* [rows]: each row's adapter in lora_a/lora_b, -1 none; NULL: no LoRA */
    int64_t lora_rank;
} DecodeStack;

#define LORA_CHUNK 64 /* output columns per expand task */

static void panel_linear_for(const float *x, int64_t x_stride, int64_t rows, const float *packed, const float *bias,
                             float *out, int64_t n, int64_t k); /* panel_gemm_impl.h */
static void panel_linear_bf16_for(const bf16_t *x, int64_t x_stride, int64_t rows, const uint32_t *packed,
                                  const bf16_t *bias, bf16_t *out, int64_t n, int64_t k); /* panel_gemm_bf16_impl.h */
#endif

static inline void NAME(add_bias_row)(T *row, const T *bias, int64_t n) {
    for (int64_t i = 0; i < n; i++) row[i] = STORE(LOAD(row[i]) + LOAD(bias[i]));
}

/* out [rows, n] = x @ w^T (+ bias, or NULL) from the `bits`-bit blocks when there are some, else
 * from the panel copy for steps of at least m->panel_min_rows rows, else from the dense weight.
 * As the per-op path (layers/linear.py): the panel kernel adds the bias to its fp32 sums before
 * the one rounding to T; the others' outputs get it added after (before any LoRA product). */
static inline void NAME(project_for)(const DecodeStack *m, const T *x, int64_t x_stride, const void *dense,
                                     const uint8_t *blocks, const void *panels, const T *bias, T *out, int64_t rows,
                                     int64_t n, int64_t k) {
    if (blocks == NULL && panels != NULL && rows >= m->panel_min_rows) {
        PANEL_LINEAR_FOR(x, x_stride, rows, panels, bias, out, n, k);
        return;
    }
    if (blocks != NULL)
        NAME(quant_rows_for)(x, x_stride, blocks, (int)m->quant_bits, out, rows, n, k);
    else
        NAME(few_rows_for)(x, x_stride, dense, out, rows, n, k);
    if (bias != NULL) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) NAME(add_bias_row)(out + r * n, bias, n);
    }
}

/* out [rows, n] (row stride out_stride) += each row's LoRA product: for row r with adapter j =
 * index[r] >= 0, s = a_j x_r (the shrink, parts * rank values), then column c of part p
 * gets sum_k b_j[k][c] s[p * rank + k] (the expand). part_ends: each part's last column + 1.
 * Punica's BGMV on the CPU: each row reads its own adapter; a row's sums are its own, in a fixed
 * order, so its result does not depend on the other rows. s: rows * parts * rank floats. */
static void NAME(lora_for)(const int64_t *index, int64_t rank, const T *x, int64_t x_stride, int64_t rows,
                           const T *a, const T *b, int64_t parts, const int64_t *part_ends, T *out,
                           int64_t out_stride, int64_t n, int64_t k_in, float *s) {
    const int64_t width = parts * rank, chunks = (n + LORA_CHUNK - 1) / LORA_CHUNK;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * width; t++) { /* rows innermost: rows of one adapter reuse its A row */
        const int64_t r = t % rows, col = t / rows;
        if (index[r] < 0) continue;
        const T *ar = a + (index[r] * width + col) * k_in;
        const T *xr = x + r * x_stride;
        float lanes[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= k_in; i += 16)
            for (int l = 0; l < 16; l++) lanes[l] += LOAD(ar[i + l]) * LOAD(xr[i + l]);
        float acc = 0.0f;
        for (int l = 0; l < 16; l++) acc += lanes[l];
        for (; i < k_in; i++) acc += LOAD(ar[i]) * LOAD(xr[i]);
        s[r * width + col] = acc;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * chunks; t++) { /* rows innermost again: B's chunk is reused */
        const int64_t r = t % rows, c0 = (t / rows) * LORA_CHUNK, c1 = c0 + LORA_CHUNK < n ? c0 + LORA_CHUNK : n;
        const int64_t j = index[r];
        if (j < 0) continue;
        float acc[LORA_CHUNK] = {0};
        for (int64_t c = c0, p = 0; c < c1;) {
            while (c >= part_ends[p]) p++;
            const int64_t end = part_ends[p] < c1 ? part_ends[p] : c1;
            const float *sp = s + r * width + p * rank;
            for (int64_t k = 0; k < rank; k++) {
                const float sk = sp[k];
                const T *bk = b + (j * rank + k) * n;
                for (int64_t cc = c; cc < end; cc++) acc[cc - c0] += sk * LOAD(bk[cc]);
            }
            c = end;
        }
        T *o = out + r * out_stride;
        for (int64_t c = c0; c < c1; c++) o[c] = STORE(LOAD(o[c]) + acc[c - c0]);
    }
}

/* lora_for with projection i's adapters of a decode stack layer. */
static void NAME(layer_lora)(const DecodeStack *m, const DecodeLayer *layer, int i, const T *x, int64_t x_stride,
                             int64_t rows, int64_t parts, const int64_t *part_ends, T *out, int64_t out_stride,
                             int64_t n, int64_t k_in, float *s) {
    NAME(lora_for)(m->lora_index, m->lora_rank, x, x_stride, rows, (const T *)layer->lora_a[i],
                   (const T *)layer->lora_b[i], parts, part_ends, out, out_stride, n, k_in, s);
}

/* The per-op path's LoRA hook for a projection of 1-8 rows (lora_for in its own parallel region):
 * a [adapters, parts * rank, in] and b [adapters, rank, n] (type T) as in DecodeLayer.lora_a / lora_b. */
void NAME(lora_rows)(const T *x, int64_t x_stride, int64_t rows, const int64_t *index, int64_t rank,
                     const T *a, const T *b, int64_t parts, const int64_t *part_ends, T *out,
                     int64_t out_stride, int64_t n, int64_t k_in, int num_threads) {
    float *s = malloc(sizeof(float) * rows * parts * rank);
#pragma omp parallel num_threads(num_threads)
    NAME(lora_for)(index, rank, x, x_stride, rows, a, b, parts, part_ends, out, out_stride, n, k_in, s);
    free(s);
}

/* Elements of scratch decode_stack needs per row. */
int64_t NAME(decode_stack_scratch)(const DecodeStack *m) {
    int64_t q_size = m->heads * m->head_dim, qkv_n = q_size + 2 * m->kv_heads * m->head_dim;
    return 2 * m->hidden + qkv_n + q_size + 3 * m->intermediate;
}

/* h: [rows, hidden] the step's embeddings (overwritten); one token per sequence at positions[r],
 * written to cache slot slots[r] (< 0: not written); block_tables [rows, bt_stride] and seq_lens
 * [rows] as paged_decode_attention takes them. out [rows, hidden]: the final norm's output.
 * scratch: rows * decode_stack_scratch(m) elements. */
void NAME(decode_stack)(const DecodeStack *m, T *h, int64_t rows, const int64_t *positions, const int64_t *slots,
                        const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens, T *scratch,
                        T *out, int num_threads) {
    const int64_t hidden = m->hidden, heads = m->heads, kv_heads = m->kv_heads, dim = m->head_dim;
    const int64_t inter = m->intermediate, q_size = heads * dim, kv_size = kv_heads * dim;
    const int64_t qkv_n = q_size + 2 * kv_size;
    T *residual = scratch, *x = residual + rows * hidden, *qkv = x + rows * hidden, *attn = qkv + rows * qkv_n;
    T *gate_up = attn + rows * q_size, *act = gate_up + rows * 2 * inter;
    const int64_t max_len = max_seq_len(seq_lens, rows);
    const int64_t heads_per_task = attention_heads_per_task(rows, kv_heads, num_threads);
    const float eps = (float)m->eps, scale = (float)m->scale;
    const int64_t qkv_ends[3] = {q_size, q_size + kv_size, qkv_n}, o_ends[1] = {hidden};
    const int64_t gate_up_ends[2] = {inter, 2 * inter};
    float *lora_s = m->lora_index != NULL ? malloc(sizeof(float) * rows * 3 * m->lora_rank) : NULL;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = malloc(sizeof(float) * q_size), *acc = malloc(sizeof(float) * q_size);
        float *probs = malloc(sizeof(float) * heads * max_len);
        for (int64_t l = 0; l < m->num_layers; l++) {
            const DecodeLayer *layer = &m->layers[l];
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                T *hr = h + r * hidden, *rr = residual + r * hidden, *xr = x + r * hidden;
                if (l == 0) { /* the embeddings start the residual stream: no add */
                    memcpy(rr, hr, sizeof(T) * hidden);
                    NAME(rms_norm_row)(rr, NULL, NULL, xr, layer->input_norm, hidden, eps);
                } else {
                    NAME(rms_norm_row)(hr, rr, rr, xr, layer->input_norm, hidden, eps);
                }
            }
            NAME(project_for)(m, x, hidden, layer->qkv, layer->qkv_quant, layer->qkv_panels, layer->qkv_bias, qkv, rows,
                              qkv_n, hidden);
            if (lora_s != NULL && layer->lora_a[0] != NULL)
                NAME(layer_lora)(m, layer, 0, x, hidden, rows, 3, qkv_ends, qkv, qkv_n, qkv_n, hidden, lora_s);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                T *q = qkv + r * qkv_n, *k = q + q_size, *v = k + kv_size;
                if (layer->q_norm != NULL) {
                    for (int64_t i = 0; i < heads; i++)
                        NAME(rms_norm_row)(q + i * dim, NULL, NULL, q + i * dim, layer->q_norm, dim, eps);
                    for (int64_t i = 0; i < kv_heads; i++)
                        NAME(rms_norm_row)(k + i * dim, NULL, NULL, k + i * dim, layer->k_norm, dim, eps);
                }
                NAME(rotary_token)(q, heads, k, kv_heads, positions[r], m->cos, m->sin, dim);
                if (slots[r] >= 0) {
                    memcpy((T *)layer->k_cache + slots[r] * kv_size, k, sizeof(T) * kv_size);
                    memcpy((T *)layer->v_cache + slots[r] * kv_size, v, sizeof(T) * kv_size);
                }
            }
            NAME(decode_attention_for)(qkv, qkv_n, layer->k_cache, layer->v_cache, block_tables, bt_stride, seq_lens,
                                       attn, rows, heads, kv_heads, dim, m->block_size, scale, m->window,
                                       heads_per_task, qf, acc, probs);
            NAME(project_for)(m, attn, q_size, layer->o, layer->o_quant, layer->o_panels, NULL, h, rows, hidden, q_size);
            if (lora_s != NULL && layer->lora_a[1] != NULL)
                NAME(layer_lora)(m, layer, 1, attn, q_size, rows, 1, o_ends, h, hidden, hidden, q_size, lora_s);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                NAME(rms_norm_row)(h + r * hidden, residual + r * hidden, residual + r * hidden, x + r * hidden,
                                   layer->post_norm, hidden, eps);
            NAME(project_for)(m, x, hidden, layer->gate_up, layer->gate_up_quant, layer->gate_up_panels,
                              layer->gate_up_bias, gate_up, rows, 2 * inter, hidden);
            if (lora_s != NULL && layer->lora_a[2] != NULL)
                NAME(layer_lora)(m, layer, 2, x, hidden, rows, 2, gate_up_ends, gate_up, 2 * inter, 2 * inter, hidden,
                                 lora_s);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                T *gu = gate_up + r * 2 * inter;
                NAME(silu_and_mul_row)(gu, gu + inter, act + r * inter, inter);
            }
            NAME(project_for)(m, act, inter, layer->down, layer->down_quant, layer->down_panels, layer->down_bias, h,
                              rows, hidden, inter);
            if (lora_s != NULL && layer->lora_a[3] != NULL)
                NAME(layer_lora)(m, layer, 3, act, inter, rows, 1, o_ends, h, hidden, hidden, inter, lora_s);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            NAME(rms_norm_row)(h + r * hidden, residual + r * hidden, residual + r * hidden, out + r * hidden,
                               m->final_norm, hidden, eps);
        free(qf);
        free(acc);
        free(probs);
    }
    free(lora_s);
}
