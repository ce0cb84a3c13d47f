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
 */
#include <stdint.h>
#include <stdlib.h>
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
