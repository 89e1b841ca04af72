/* CPU kernels for the hyper-connection sites (hyper.py): Sinkhorn-Knopp on many small n x n matrices, the
per-token stream mixing out[t] = M[t] @ Z[t] (mHC) and the diagonal write a * y + b * u (Hyperloop); each with
its exact backward.

Loaded through ctypes by hyperloop_lm/model/hc_kernels.py, which compiles this file once per machine with
-DREAL=float or -DREAL=double.

Why C: per token the matrices are tiny (n = 4 streams). In torch, Sinkhorn is ~300 vector ops, each a full
pass over the batch in memory, and the mixing is a batched matmul of thousands of 4 x 5 matrices, which
BLAS runs one small call at a time (several times slower than one pass over the stream). Here Sinkhorn keeps a
block of BT tokens in L1 for all its iterations, and the mixing is one pass over each stream. */
#include <stdint.h>
#include <stdlib.h>

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

/* ---------------------------------------------------------------- Sinkhorn

The arithmetic of the torch code in hyper.py, in the same order, but multiplying by reciprocals where that
divides: the results agree to rounding (tests/test_hc_kernels.py). Inside a block the token index is
innermost (m[k * BT + t], k = i * n + j), so every loop over t is a run of independent lanes that the
compiler vectorises without fast-math. */

enum { BT = 64, MAXN = 16 };  /* Sinkhorn: tokens per block, largest n */
/* Built with -fopenmp (hc_kernels.py) the token loops run on torch's threads: torch's OpenMP runtime is the
one already loaded, so torch.set_num_threads applies. Tokens are independent: results do not depend on the
thread count. Below PARALLEL_MIN tokens one thread is cheaper than waking the others. */
enum { PARALLEL_MIN = 256 };

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

static int64_t block_len(int64_t ntok, int64_t t0) { return ntok - t0 < BT ? ntok - t0 : BT; }

/* A block always has BT lanes: the last block's missing tokens are padding (pad = 1 keeps its sums nonzero),
so every loop over t has a fixed trip count and no remainder. */
static void gather(const real *src, real *restrict m, int64_t t0, int bt, int nn, real pad) {
    for (int t = 0; t < bt; t++)
        for (int k = 0; k < nn; k++) m[k * BT + t] = src[(t0 + t) * nn + k];
    for (int k = 0; k < nn; k++)
        for (int t = bt; t < BT; t++) m[k * BT + t] = pad;
}

static void scatter(const real *restrict m, real *dst, int64_t t0, int bt, int nn) {
    for (int t = 0; t < bt; t++)
        for (int k = 0; k < nn; k++) dst[(t0 + t) * nn + k] = m[k * BT + t];
}

/* Entry (a, b) of the block's matrices: column a, row b for a column step; row a, column b for a row step. */
INLINE int entry(int n, int cols, int a, int b) { return (cols ? b * n + a : a * n + b) * BT; }

/* One normalisation (columns or rows): the sums go to s (n x BT), then every entry is divided by its sum
(times the reciprocal: divisions would bound the speed; the result differs from x / s by at most an ulp). */
INLINE void normalise(real *restrict m, real *restrict s, int n, int cols) {
    for (int a = 0; a < n; a++) {
        real *restrict sa = s + a * BT;
        for (int t = 0; t < BT; t++) sa[t] = m[entry(n, cols, a, 0) + t];
        for (int b = 1; b < n; b++)
            for (int t = 0; t < BT; t++) sa[t] += m[entry(n, cols, a, b) + t];
        real r[BT];
        for (int t = 0; t < BT; t++) r[t] = 1 / sa[t];
        for (int b = 0; b < n; b++)
            for (int t = 0; t < BT; t++) m[entry(n, cols, a, b) + t] *= r[t];
    }
}

/* Backward of one normalisation out = in / s: g <- (g - sum(g * out)) / s, and m <- m * s (out back to in). */
INLINE void normalise_backward(real *restrict g, real *restrict m, const real *restrict s, int n, int cols) {
    real acc[BT];
    for (int a = 0; a < n; a++) {
        const real *restrict sa = s + a * BT;
        for (int t = 0; t < BT; t++) acc[t] = g[entry(n, cols, a, 0) + t] * m[entry(n, cols, a, 0) + t];
        for (int b = 1; b < n; b++)
            for (int t = 0; t < BT; t++) acc[t] += g[entry(n, cols, a, b) + t] * m[entry(n, cols, a, b) + t];
        for (int t = 0; t < BT; t++) acc[t] = -acc[t];
        real r[BT];
        for (int t = 0; t < BT; t++) r[t] = 1 / sa[t];
        for (int b = 0; b < n; b++) {
            int e = entry(n, cols, a, b);
            for (int t = 0; t < BT; t++) {
                g[e + t] = (g[e + t] + acc[t]) * r[t];
                m[e + t] *= sa[t];
            }
        }
    }
}

/* The iterations on one block: with keep, each step's sums go to their own slot of sums (for the backward). */
INLINE void iterate(real *restrict m, real *restrict sums, int n, int iters, int keep) {
    for (int it = 0; it < iters; it++) {
        normalise(m, sums + (keep ? 2 * it : 0) * n * BT, n, 1);
        normalise(m, sums + (keep ? 2 * it + 1 : 0) * n * BT, n, 0);
    }
}

INLINE void iterate_backward(real *restrict g, real *restrict m, const real *restrict sums, int n, int iters) {
    for (int it = iters - 1; it >= 0; it--) {
        normalise_backward(g, m, sums + (2 * it + 1) * n * BT, n, 0);
        normalise_backward(g, m, sums + (2 * it) * n * BT, n, 1);
    }
}

/* n = 4 (the default stream count) gets its own copy with n a constant: the loops over a and b unroll. */
#define BY_N(n, call_with_n) do { if ((n) == 4) { call_with_n(4); } else { call_with_n(n); } } while (0)

/* m0, out: (ntok, n, n) contiguous; m0 = exp(logits - max) > 0. Returns 0, or -1 if n is out of range. */
int sinkhorn_forward(const real *m0, real *out, int64_t ntok, int n, int iters) {
    if (n < 1 || n > MAXN) return -1;
#pragma omp parallel if (ntok >= PARALLEL_MIN)
    {
        real m[MAXN * MAXN * BT], s[MAXN * BT];
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < ntok; t0 += BT) {
            int bt = (int)block_len(ntok, t0);
            gather(m0, m, t0, bt, n * n, 1);
#define FORWARD(N) iterate(m, s, N, iters, 0)
            BY_N(n, FORWARD);
            scatter(m, out, t0, bt, n * n);
        }
    }
    return 0;
}

/* grad_logits = d(loss)/d(logits) given grad = d(loss)/d(out), all (ntok, n, n). The forward is recomputed
per block (cheap here) to recover every step's sums, so nothing but m0 is kept between the passes.
Returns 0, -1 if n is out of range, -2 if out of memory. */
int sinkhorn_backward(const real *grad, const real *m0, real *grad_logits, int64_t ntok, int n, int iters) {
    if (n < 1 || n > MAXN) return -1;
    int nn = n * n, rc = 0;
    size_t block = (size_t)nn * BT;
#pragma omp parallel if (ntok >= PARALLEL_MIN)
    {
        /* per thread: three blocks (m, g, e), then every step's sums (iters, 2, n, BT) */
        real *m = malloc(sizeof(real) * (3 * block + (size_t)(iters > 0 ? iters : 1) * 2 * n * BT));
        if (!m) {
#pragma omp atomic write
            rc = -2;
        }
        real *g = m + block, *e = g + block, *sums = e + block;
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < ntok; t0 += BT) {
            if (!m) continue;
            int bt = (int)block_len(ntok, t0);
            gather(m0, e, t0, bt, nn, 1);
            gather(m0, m, t0, bt, nn, 1);
            gather(grad, g, t0, bt, nn, 0);
#define BACKWARD(N) do { iterate(m, sums, N, iters, 1); iterate_backward(g, m, sums, N, iters); } while (0)
            BY_N(n, BACKWARD);
            for (size_t k = 0; k < block; k++) g[k] *= e[k];  /* through the exp; the max-subtraction has no gradient */
            scatter(g, grad_logits, t0, bt, nn);
        }
        free(m);
    }
    return rc;
}

/* ---------------------------------------------------------------- stream mixing

out[t] = M[t] @ Z[t] for every token t: M[t] is (r, k); Z[t] is k rows of length C, the k1 streams y[t]
and, when u is given, one more row u[t]. The write of an mHC site is r = n, k = n + 1 (M = [H_res | post],
Z = [y; u]); its read is r = 1, k = n (M = pre, Z = y). All arrays contiguous. */

enum { LANES = 16 };  /* partial sums per dot product: one AVX-512 or two AVX2 registers of floats */

static const real *zrow(const real *y, const real *u, int64_t t, int j, int k1, int64_t C) {
    return j < k1 ? y + (t * k1 + j) * C : u + t * C;
}

void mix_forward(const real *M, const real *y, const real *u, real *out, int64_t ntok, int r, int k1, int64_t C) {
    int k = k1 + (u != 0);
#pragma omp parallel for schedule(static) if (ntok >= PARALLEL_MIN)
    for (int64_t t = 0; t < ntok; t++) {
        const real *Mt = M + t * r * k;
        for (int i = 0; i < r; i++) {
            real *restrict o = out + (t * r + i) * C;
            const real *restrict z = zrow(y, u, t, 0, k1, C);
            real a = Mt[i * k];
            for (int64_t c = 0; c < C; c++) o[c] = a * z[c];
            for (int j = 1; j < k; j++) {
                z = zrow(y, u, t, j, k1, C);
                a = Mt[i * k + j];
                for (int64_t c = 0; c < C; c++) o[c] += a * z[c];
            }
        }
    }
}

/* Sum of LANES partial sums as a tree (a fixed order, log2(LANES) dependent adds, each level vectorised):
a left-to-right sum would be a chain of LANES dependent scalar adds per dot product, the slowest part. */
static real tree_sum(real *restrict lanes) {
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
    return lanes[0];
}

/* <x, z> over C: LANES independent partial sums (the compiler vectorises them), then their tree sum. */
static real dot(const real *restrict x, const real *restrict z, int64_t C) {
    real lanes[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += x[c + l] * z[c + l];
    real tail = 0;
    for (; c < C; c++) tail += x[c] * z[c];
    return tree_sum(lanes) + tail;
}

/* dM[t] = dout[t] @ Z[t]^T (r x k dot products over C); dZ[t] = M[t]^T @ dout[t], into dy (and du). */
void mix_backward(const real *M, const real *y, const real *u, const real *dout, real *dM, real *dy, real *du,
                  int64_t ntok, int r, int k1, int64_t C) {
    int k = k1 + (u != 0);
#pragma omp parallel for schedule(static) if (ntok >= PARALLEL_MIN)
    for (int64_t t = 0; t < ntok; t++) {
        const real *Mt = M + t * r * k;
        const real *dt = dout + t * r * C;
        for (int i = 0; i < r; i++)
            for (int j = 0; j < k; j++) dM[(t * r + i) * k + j] = dot(dt + i * C, zrow(y, u, t, j, k1, C), C);
        for (int j = 0; j < k; j++) {
            real *restrict dz = j < k1 ? dy + (t * k1 + j) * C : du + t * C;
            real a = Mt[j];
            for (int64_t c = 0; c < C; c++) dz[c] = a * dt[c];
            for (int i = 1; i < r; i++) {
                const real *restrict d = dt + i * C;
                a = Mt[i * k + j];
                for (int64_t c = 0; c < C; c++) dz[c] += a * d[c];
            }
        }
    }
}

/* ---------------------------------------------------------------- diagonal write

The write of a Hyperloop site: out[t, i] = a[t, i] y[t, i] + b[t, i] u[t] for each of the n streams, where
a is the per-stream decay (NULL: 1, the identity) and b the post gains. One pass over the streams where
autograd makes about ten (a product, a broadcast multiply-add, and in the backward four products and three
reductions, each over all of them). */

void scale_add_forward(const real *a, const real *b, const real *y, const real *u, real *out, int64_t ntok, int n,
                       int64_t C) {
#pragma omp parallel for schedule(static) if (ntok >= PARALLEL_MIN)
    for (int64_t t = 0; t < ntok; t++)
        for (int i = 0; i < n; i++) {
            const real *restrict yi = y + (t * n + i) * C, *restrict ut = u + t * C;
            real *restrict o = out + (t * n + i) * C, ai = a ? a[t * n + i] : 1, bi = b[t * n + i];
            for (int64_t c = 0; c < C; c++) o[c] = yi[c] * ai + ut[c] * bi;
        }
}

/* Given dout: da[t, i] = <dout[t, i], y[t, i]> and dy[t, i] = a[t, i] dout[t, i] (both only if a: for the
identity dy is dout itself), db[t, i] = <dout[t, i], u[t]>, du[t] = sum_i b[t, i] dout[t, i]. */
void scale_add_backward(const real *a, const real *b, const real *y, const real *u, const real *dout, real *da,
                        real *db, real *dy, real *du, int64_t ntok, int n, int64_t C) {
#pragma omp parallel for schedule(static) if (ntok >= PARALLEL_MIN)
    for (int64_t t = 0; t < ntok; t++) {
        const real *restrict ut = u + t * C;
        real *restrict dut = du + t * C;
        for (int i = 0; i < n; i++) {
            const real *restrict d = dout + (t * n + i) * C;
            real bi = b[t * n + i];
            db[t * n + i] = dot(d, ut, C);
            if (i == 0)
                for (int64_t c = 0; c < C; c++) dut[c] = bi * d[c];
            else
                for (int64_t c = 0; c < C; c++) dut[c] += bi * d[c];
            if (a) {
                const real *restrict yi = y + (t * n + i) * C;
                real ai = a[t * n + i], *restrict dyi = dy + (t * n + i) * C;
                da[t * n + i] = dot(d, yi, C);
                for (int64_t c = 0; c < C; c++) dyi[c] = ai * d[c];
            }
        }
    }
}
