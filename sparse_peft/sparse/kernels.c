/* CPU kernels of sparse_peft's entry-sparse deltas, compiled on first use by sparse_peft/sparse/cpu_kernel.py.
 *
 * 1. sparse_peft_add_entries_f32 / sparse_peft_put_entries_f32: W_eff = W + scatter(values) in W's own storage and
 *    the bitwise restore of W after the GEMM (the k original entries saved, then written back).
 * 2. sparse_peft_sddmm_f32, the values' gradient:
 *
 *   out[slot[e]] = sum_t g[t, row(e)] * x[t, col[e]]    for every CSR entry e
 *
 * g is (T, m) and x is (T, n), both float32 row-major (a linear layer's output gradient and input, as autograd hands
 * them over); the entries are in CSR order (crow: m + 1 row pointers, col: their columns) and slot maps each CSR entry
 * to its place in the caller's value vector. The tokens are split into equal shares between OpenMP threads, and each
 * share is walked in equal chunks of at most `chunk` tokens: each chunk of x and of g is transposed into two small
 * buffers that stay in the core's L2 cache, and every entry's dot product over the chunk runs from there, eight
 * entries of a row at a time (then four, then one), so the inner loop loads g once for eight products. Each thread
 * sums into its own vector (added up at the end) and transposes only its own tokens of x and g, where a split by rows
 * would transpose all of x in every thread. Built with -fopenmp, the library binds to the libgomp.so.1 that torch
 * has already loaded, so it shares torch's thread pool; built without, it runs on one thread.
 *
 * Returns 0, or nonzero when a thread could not allocate its two buffers.
 *
 * 3. SNELL's kernelised delta (sparse_peft/sparse/kernel_delta.py), section at the end of this file.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX__)
#include <immintrin.h>
static inline void transpose_8x8(const float *src, int64_t ld, float *dst, int64_t chunk) {
    /* dst[j * chunk + t] = src[t * ld + j] for t, j < 8 (unpack, shuffle, then swap 128-bit lanes). */
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld), r2 = _mm256_loadu_ps(src + 2 * ld);
    __m256 r3 = _mm256_loadu_ps(src + 3 * ld), r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + chunk, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * chunk, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * chunk, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * chunk, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * chunk, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * chunk, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * chunk, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#define BLOCK 8
#else
#define BLOCK 0
#endif

static void transpose_chunk(const float *src, int64_t ld, int64_t c, int64_t lo, int64_t hi, float *dst,
                            int64_t chunk) {
    /* dst[(j - lo) * chunk + t] = src[t * ld + j] for t < c and lo <= j < hi: 8 x 8 blocks in AVX registers where
       the CPU has them, the ragged edges (and every block without AVX) element by element. */
    int64_t t_full = 0, j_full = lo;
#if BLOCK
    t_full = c - c % BLOCK;
    j_full = hi - (hi - lo) % BLOCK;
    for (int64_t t = 0; t < t_full; t += BLOCK)
        for (int64_t j = lo; j < j_full; j += BLOCK)
            transpose_8x8(src + t * ld + j, ld, dst + (j - lo) * chunk + t, chunk);
#endif
    for (int64_t t = 0; t < c; t++) {
        int64_t j_start = t < t_full ? j_full : lo;
        for (int64_t j = j_start; j < hi; j++) dst[(j - lo) * chunk + t] = src[t * ld + j];
    }
}

static void row_dots(const float *g, const float *xb, const int64_t *col, const int64_t *slot, float *out,
                     int64_t e, int64_t end, int64_t chunk, int64_t c) {
    /* out[slot[e]] += sum_{t < c} g[t] * xb[col[e] * chunk + t] for the entries e of one row. */
    for (; e + 8 <= end; e += 8) {
        const float *x0 = xb + col[e] * chunk, *x1 = xb + col[e + 1] * chunk;
        const float *x2 = xb + col[e + 2] * chunk, *x3 = xb + col[e + 3] * chunk;
        const float *x4 = xb + col[e + 4] * chunk, *x5 = xb + col[e + 5] * chunk;
        const float *x6 = xb + col[e + 6] * chunk, *x7 = xb + col[e + 7] * chunk;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
        for (int64_t t = 0; t < c; t++) {
            float gv = g[t];
            a0 += gv * x0[t];
            a1 += gv * x1[t];
            a2 += gv * x2[t];
            a3 += gv * x3[t];
            a4 += gv * x4[t];
            a5 += gv * x5[t];
            a6 += gv * x6[t];
            a7 += gv * x7[t];
        }
        out[slot[e]] += a0;
        out[slot[e + 1]] += a1;
        out[slot[e + 2]] += a2;
        out[slot[e + 3]] += a3;
        out[slot[e + 4]] += a4;
        out[slot[e + 5]] += a5;
        out[slot[e + 6]] += a6;
        out[slot[e + 7]] += a7;
    }
    for (; e + 4 <= end; e += 4) {
        const float *x0 = xb + col[e] * chunk, *x1 = xb + col[e + 1] * chunk;
        const float *x2 = xb + col[e + 2] * chunk, *x3 = xb + col[e + 3] * chunk;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t t = 0; t < c; t++) {
            float gv = g[t];
            a0 += gv * x0[t];
            a1 += gv * x1[t];
            a2 += gv * x2[t];
            a3 += gv * x3[t];
        }
        out[slot[e]] += a0;
        out[slot[e + 1]] += a1;
        out[slot[e + 2]] += a2;
        out[slot[e + 3]] += a3;
    }
    for (; e < end; e++) {
        const float *x0 = xb + col[e] * chunk;
        float a0 = 0.f;
#pragma omp simd reduction(+ : a0)
        for (int64_t t = 0; t < c; t++) a0 += g[t] * x0[t];
        out[slot[e]] += a0;
    }
}

static int sddmm_tokens(const float *g, const float *x, const int64_t *crow, const int64_t *col, const int64_t *slot,
                        float *out, int64_t m, int64_t n, int64_t t_lo, int64_t t_hi, int64_t chunk) {
    /* out[slot[e]] = sum over tokens [t_lo, t_hi) for every entry, chunk by chunk. */
    float *xb = malloc(sizeof(float) * (size_t)(n * chunk + 1));
    float *gb = malloc(sizeof(float) * (size_t)(m * chunk + 1));
    if (!xb || !gb) {
        free(xb);
        free(gb);
        return 1;
    }
    for (int64_t e = 0; e < crow[m]; e++) out[e] = 0.f;
    /* As few chunks as `chunk` allows, all of one size (no short tail chunk). */
    int64_t pieces = (t_hi - t_lo + chunk - 1) / chunk;
    int64_t step = pieces > 0 ? (t_hi - t_lo + pieces - 1) / pieces : chunk;
    for (int64_t t0 = t_lo; t0 < t_hi; t0 += step) {
        int64_t c = t_hi - t0 < step ? t_hi - t0 : step;
        transpose_chunk(x + t0 * n, n, c, 0, n, xb, chunk);
        transpose_chunk(g + t0 * m, m, c, 0, m, gb, chunk);
        for (int64_t i = 0; i < m; i++)
            if (crow[i + 1] > crow[i]) row_dots(gb + i * chunk, xb, col, slot, out, crow[i], crow[i + 1], chunk, c);
    }
    free(xb);
    free(gb);
    return 0;
}

int sparse_peft_sddmm_f32(const float *g, const float *x, const int64_t *crow, const int64_t *col,
                          const int64_t *slot, float *out, int64_t m, int64_t n, int64_t tokens, int64_t chunk,
                          int64_t threads) {
    /* out holds `threads` vectors of crow[m] floats; the result is the first. */
    int64_t nnz = crow[m], used = 1;
    int failed = 0;
    if (threads > tokens) threads = tokens;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        if (tid == 0) used = nt;
        int64_t lo = tokens * tid / nt, hi = tokens * (tid + 1) / nt; /* equal shares of the tokens */
        failed |= sddmm_tokens(g, x, crow, col, slot, out + tid * nnz, m, n, lo, hi, chunk);
    }
    for (int64_t part = 1; part < used; part++)
        for (int64_t e = 0; e < nnz; e++) out[e] += out[part * nnz + e];
    return failed;
}

void sparse_peft_add_entries_f32(float *w, const int64_t *idx, const float *values, float *saved, int64_t k) {
    /* saved[e] = w[idx[e]]; w[idx[e]] = saved[e] + values[e], in index order: the float adds of index_add_. */
    for (int64_t e = 0; e < k; e++) {
        float original = w[idx[e]];
        saved[e] = original;
        w[idx[e]] = original + values[e];
    }
}

void sparse_peft_put_entries_f32(float *w, const int64_t *idx, const float *saved, int64_t k) {
    /* w[idx[e]] = saved[e] in reverse order: where a position repeats (LIFT's frozen entries may share one with an
       active entry), its first occurrence saved the true original and is written last. */
    for (int64_t e = k; e-- > 0;) w[idx[e]] = saved[e];
}

/* ---- 3. SNELL ------------------------------------------------------------------------------------------------------
 * Factors of one kernel term: at = (2, h, n), the input-side A_p transposed (at[p][k][i] = A_p[i][k]), and
 * b = (2, m, h), the output side. For every entry (o, i) of the (m, n) weight:
 *
 *   d_p[o, i] = ||B_p[o] - A_p[i]||,   delta[o, i] = c * (d_0 - d_1)
 *   tau = the k-th smallest |delta| (k = round(s * m * n)),   delta_s = delta * |delta| * [|delta| > tau]
 *
 * A row's distances come from h passes over two n-float buffers (vectorised over i), so no (m, n) distance matrix is
 * ever stored; forward and backward evaluate delta with the same code, so the survivors of both passes agree bitwise.
 * The backward pass gets the dense dL/d(delta_s) = g^T x (one GEMM, torch) and accumulates the factors' gradients
 *
 *   M_0 = c * G * |delta| * keep / d_0,   M_1 = -c * G * |delta| * keep / d_1       (0 where d_p = 0)
 *   dL/dB_p[o] = sum_i M_p[o, i] (B_p[o] - A_p[i]),   dL/dA_p[i] = sum_o M_p[o, i] (A_p[i] - B_p[o])
 *
 * in the same sweep that rebuilds W + delta_s for dL/dx. Rows are split between OpenMP threads; each thread sums its
 * rows' dL/dA into its own (2, h, n) block of grad_at (added up at the end). */

static void snell_sqrt(float *v, int64_t n) {
    int64_t i = 0;
#if defined(__AVX__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_sqrt_ps(_mm256_loadu_ps(v + i)));
#endif
    for (; i < n; i++) v[i] = sqrtf(v[i]);
}

static void snell_distances(const float *at, const float *b, int64_t o, int64_t m, int64_t n, int64_t h, float *d0,
                            float *d1) {
    /* d_p[i] = ||B_p[o] - A_p[i]|| for every i. */
    const float *a0 = at, *a1 = at + h * n, *b0 = b + o * h, *b1 = b + (m + o) * h;
    for (int64_t i = 0; i < n; i++) d0[i] = d1[i] = 0.0f;
    for (int64_t k = 0; k < h; k++) {
        const float u = b0[k], v = b1[k], *x0 = a0 + k * n, *x1 = a1 + k * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float e0 = u - x0[i], e1 = v - x1[i];
            d0[i] += e0 * e0;
            d1[i] += e1 * e1;
        }
    }
    snell_sqrt(d0, n);
    snell_sqrt(d1, n);
}

/* Every function that needs a row's distances runs through snell_rows: rows split between the threads, each thread
   with its own 2n-float distance buffer and `scratch` floats of its own. */
typedef struct {
    const float *at, *b;
    int64_t m, n, h;
    float scale, tau;
} snell_term;

typedef void (*snell_row_fn)(const snell_term *t, int64_t o, const float *d0, const float *d1, float *scratch,
                             int64_t tid, void *ctx);

static int snell_rows(const snell_term *t, int64_t scratch, int64_t threads, snell_row_fn fn, void *ctx,
                      int64_t *used) {
    /* fn(t, o, d_0, d_1, scratch, tid, ctx) for every row o; *used = the threads that ran. Returns nonzero when a
       thread could not allocate its buffers. */
    int failed = 0;
    int64_t ran = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        if (tid == 0) ran = omp_get_num_threads();
#endif
        float *d0 = malloc((2 * t->n + scratch) * sizeof(float));
        if (!d0) failed = 1;
#pragma omp for schedule(static)
        for (int64_t o = 0; o < t->m; o++) {
            if (!d0) continue;
            snell_distances(t->at, t->b, o, t->m, t->n, t->h, d0, d0 + t->n);
            fn(t, o, d0, d0 + t->n, d0 + 2 * t->n, tid, ctx);
        }
        free(d0);
    }
    if (used) *used = ran;
    return failed;
}

static void delta_row(const snell_term *t, int64_t o, const float *d0, const float *d1, float *scratch, int64_t tid,
                      void *ctx) {
    float *row = (float *)ctx + o * t->n;
    const float scale = t->scale;
    (void)scratch, (void)tid;
#pragma omp simd
    for (int64_t i = 0; i < t->n; i++) row[i] = scale * (d0[i] - d1[i]);
}

int sparse_peft_snell_delta_f32(const float *at, const float *b, int64_t m, int64_t n, int64_t h, float scale,
                                float *delta, int64_t threads) {
    /* delta[o * n + i] = c * (d_0 - d_1). Returns nonzero when a thread could not allocate its buffers. */
    snell_term t = {at, b, m, n, h, scale, 0.0f};
    return snell_rows(&t, 0, threads, delta_row, delta, NULL);
}

static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x7fffffffu; /* |v|: for non-negative floats the bit patterns sort as the values do */
}

float sparse_peft_kth_abs_f32(const float *v, int64_t count, int64_t k, int64_t threads) {
    /* The k-th smallest |v[j]| (1 <= k <= count), exactly, by a three-pass radix select on the 31 bits of |v|
       (11 + 11 + 9 bits); each pass counts the entries that share the prefix found so far. */
    static const int shifts[3] = {20, 9, 0}, widths[3] = {11, 11, 9};
    uint32_t prefix = 0, known = 0;
    for (int pass = 0; pass < 3; pass++) {
        const int shift = shifts[pass], bins = 1 << widths[pass];
        int64_t hist[2048] = {0};
#pragma omp parallel num_threads(threads)
        {
            int64_t local[2048] = {0};
#pragma omp for schedule(static)
            for (int64_t j = 0; j < count; j++) {
                uint32_t u = abs_bits(v[j]);
                if ((u & known) == prefix) local[(u >> shift) & (uint32_t)(bins - 1)]++;
            }
#pragma omp critical
            for (int bin = 0; bin < bins; bin++) hist[bin] += local[bin];
        }
        int bin = 0;
        while (bin < bins - 1 && k > hist[bin]) k -= hist[bin++];
        prefix |= (uint32_t)bin << shift;
        known |= (uint32_t)(bins - 1) << shift;
    }
    float out;
    memcpy(&out, &prefix, sizeof out);
    return out;
}

void sparse_peft_snell_apply_f32(const float *delta, float tau, const float *base, float *out, int64_t count,
                                 int64_t threads) {
    /* out = base + delta * |delta| * [|delta| > tau] (out may be base: a second term adds to the first). */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < count; j++) {
        float d = delta[j], a = fabsf(d);
        out[j] = base[j] + (a > tau ? d * a : 0.0f);
    }
}

static void snell_factor_grads(const float *mp, const float *ap, const float *bp, int64_t n, int64_t h, float *gat,
                               float *gb) {
    /* One pair's contributions of row o: gb[k] = B[o][k] * sum_i M[i] - sum_i M[i] A[i][k];
       gat[k][i] += M[i] * (A[i][k] - B[o][k]). */
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) total += mp[i];
    for (int64_t k = 0; k < h; k++) {
        const float bk = bp[k], *a = ap + k * n;
        float *ga = gat + k * n, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < n; i++) {
            dot += mp[i] * a[i];
            ga[i] += mp[i] * (a[i] - bk);
        }
        gb[k] = bk * total - dot;
    }
}

typedef struct {
    const float *grad, *base;
    float *out, *grad_at, *grad_b;
} backward_ctx;

static void backward_row(const snell_term *t, int64_t o, const float *d0, const float *d1, float *scratch,
                         int64_t tid, void *ctx) {
    const backward_ctx *c = ctx;
    const int64_t n = t->n, h = t->h;
    const float scale = t->scale, tau = t->tau;
    const float *g = c->grad ? c->grad + o * n : NULL, *w = c->base ? c->base + o * n : NULL;
    float *row = c->out ? c->out + o * n : NULL, *m0 = scratch, *m1 = scratch + n;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float d = scale * (d0[i] - d1[i]), a = fabsf(d);
        int keep = a > tau;
        if (row) row[i] = w[i] + (keep ? d * a : 0.0f);
        if (g) {
            float gd = keep ? g[i] * a : 0.0f;
            m0[i] = d0[i] > 0.0f ? scale * gd / d0[i] : 0.0f;
            m1[i] = d1[i] > 0.0f ? -scale * gd / d1[i] : 0.0f;
        }
    }
    if (!g) return;
    float *gat = c->grad_at + tid * 2 * h * n;
    snell_factor_grads(m0, t->at, t->b + o * h, n, h, gat, c->grad_b + o * h);
    snell_factor_grads(m1, t->at + h * n, t->b + (t->m + o) * h, n, h, gat + h * n, c->grad_b + (t->m + o) * h);
}

int sparse_peft_snell_backward_f32(const float *grad, const float *at, const float *b, int64_t m, int64_t n,
                                   int64_t h, float scale, float tau, const float *base, float *out, float *grad_at,
                                   float *grad_b, int64_t threads) {
    /* With grad (the dense (m, n) dL/d(delta_s)): grad_b = dL/dB (2, m, h) and grad_at = `threads` blocks of
       (2, h, n), zeroed by the caller, summed here into the first: dL/dA transposed. With out: out = base + delta_s.
       Either may be NULL. Returns nonzero when a thread could not allocate its buffers. */
    snell_term t = {at, b, m, n, h, scale, tau};
    backward_ctx c = {grad, base, out, grad_at, grad_b};
    int64_t used = 1, block = 2 * h * n;
    int failed = snell_rows(&t, 2 * n, threads, backward_row, &c, &used);
    if (grad_at)
        for (int64_t part = 1; part < used; part++)
            for (int64_t e = 0; e < block; e++) grad_at[e] += grad_at[part * block + e];
    return failed;
}

/* Sparse backward (few survivors): the survivors of each row in CSR order, so that dL/d(delta_s) is needed only at
 * them (an SDDMM, section 2) instead of the dense g^T x. coef_p[e] = +-c * |delta| / d_p at survivor e (0 where
 * d_p = 0), so that M_p[e] = G[e] * coef_p[e]. */

static void count_row(const snell_term *t, int64_t o, const float *d0, const float *d1, float *scratch, int64_t tid,
                      void *ctx) {
    int64_t kept = 0;
    const float scale = t->scale, tau = t->tau;
    (void)scratch, (void)tid;
#pragma omp simd reduction(+ : kept)
    for (int64_t i = 0; i < t->n; i++) kept += fabsf(scale * (d0[i] - d1[i])) > tau;
    ((int64_t *)ctx)[o + 1] = kept;
}

int64_t sparse_peft_snell_count_f32(const float *at, const float *b, int64_t m, int64_t n, int64_t h, float scale,
                                    float tau, int64_t *crow, int64_t threads) {
    /* crow[o + 1] = survivors of row o, then the prefix sums (crow[0] = 0); returns the total, or -1 when a thread
       could not allocate its buffers. */
    snell_term t = {at, b, m, n, h, scale, tau};
    if (snell_rows(&t, 0, threads, count_row, crow, NULL)) return -1;
    crow[0] = 0;
    for (int64_t o = 0; o < m; o++) crow[o + 1] += crow[o];
    return crow[m];
}

typedef struct {
    const int64_t *crow;
    int64_t *col;
    float *coef0, *coef1;
    const float *base;
    float *out;
} fill_ctx;

static void fill_row(const snell_term *t, int64_t o, const float *d0, const float *d1, float *scratch, int64_t tid,
                     void *ctx) {
    const fill_ctx *c = ctx;
    const float scale = t->scale, tau = t->tau;
    float *row = c->out ? c->out + o * t->n : NULL;
    const float *w = c->base ? c->base + o * t->n : NULL;
    int64_t e = c->crow[o];
    (void)scratch, (void)tid;
    for (int64_t i = 0; i < t->n; i++) {
        float d = scale * (d0[i] - d1[i]), a = fabsf(d);
        if (row) row[i] = w[i] + (a > tau ? d * a : 0.0f);
        if (!(a > tau)) continue;
        c->col[e] = i;
        c->coef0[e] = d0[i] > 0.0f ? scale * a / d0[i] : 0.0f;
        c->coef1[e] = d1[i] > 0.0f ? -scale * a / d1[i] : 0.0f;
        e++;
    }
}

int sparse_peft_snell_fill_f32(const float *at, const float *b, int64_t m, int64_t n, int64_t h, float scale,
                               float tau, const int64_t *crow, int64_t *col, float *coef0, float *coef1,
                               const float *base, float *out, int64_t threads) {
    /* The survivors' columns and coefficients in CSR order (crow from sparse_peft_snell_count_f32) and, with out,
       out = base + delta_s. */
    snell_term t = {at, b, m, n, h, scale, tau};
    fill_ctx c = {crow, col, coef0, coef1, base, out};
    return snell_rows(&t, 0, threads, fill_row, &c, NULL);
}

void sparse_peft_snell_sparse_grads_f32(const float *gk, const int64_t *crow, const int64_t *col, const float *coef0,
                                        const float *coef1, const float *a, const float *b, int64_t m, int64_t n,
                                        int64_t h, float *grad_a, float *grad_b, int64_t threads) {
    /* a = (2, n, h) and b = (2, m, h) row-major; grad_b (2, m, h) written row by row; grad_a = `threads` blocks of
       (2, n, h), zeroed by the caller, summed here into the first. */
    int64_t used = 1, block = 2 * n * h;
#pragma omp parallel num_threads(threads)
    {
        int64_t tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        if (tid == 0) used = omp_get_num_threads();
#endif
        float *ga = grad_a + tid * block;
#pragma omp for schedule(static)
        for (int64_t o = 0; o < m; o++) {
            for (int p = 0; p < 2; p++) {
                const float *bp = b + (p * m + o) * h, *coef = p ? coef1 : coef0;
                const float *ap = a + p * n * h;
                float *gb = grad_b + (p * m + o) * h, *gap = ga + p * n * h;
                for (int64_t k = 0; k < h; k++) gb[k] = 0.0f;
                for (int64_t e = crow[o]; e < crow[o + 1]; e++) {
                    const float mv = gk[e] * coef[e], *ai = ap + col[e] * h;
                    float *gai = gap + col[e] * h;
                    for (int64_t k = 0; k < h; k++) {
                        float diff = bp[k] - ai[k];
                        gb[k] += mv * diff;
                        gai[k] -= mv * diff;
                    }
                }
            }
        }
    }
    for (int64_t part = 1; part < used; part++)
        for (int64_t e = 0; e < block; e++) grad_a[e] += grad_a[part * block + e];
}
