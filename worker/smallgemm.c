/* cblas_sgemm for the products of a decode step, preloaded ahead of OpenBLAS.
 *
 * A decode step multiplies a few rows of activations (one per request in the
 * batch) by every weight of the model: C = X W^T, X of M rows, W of N rows,
 * both along K. OpenBLAS copies W into its own packed layout on every call,
 * which costs about as much as the arithmetic when M is small. This kernel
 * reads W where it is, once, and keeps X (small) packed instead:
 *
 *   - X is copied to a buffer as tiles of RM rows, interleaved by blocks of
 *     VW floats along K, so that a tile's vectors sit side by side;
 *   - each thread takes a run of RN rows of W at a time and, chunk by chunk of
 *     K, multiplies it with every tile of X: RM x RN vector accumulators, each
 *     a dot product's partial sums, added up across lanes at the end.
 *
 * A row of C is summed in the same order whatever M is and wherever the row
 * sits, so a request's result does not depend on the other rows of its batch.
 * It takes the products of X W^T with K of at least 256 while
 * mlxq_smallgemm_rows is set and M is at most that. It also takes, in plain
 * loops on the calling thread, the step's attention products of up to FEW_M
 * rows: MLX calls cblas_sgemm once per row's head there, one call after
 * another on one thread, and OpenBLAS's set-up per call cost twice the
 * product itself (few_xwt: the scores, X W^T with a short K; few_xv: the
 * weights times the values, X V with V as stored). The engine sets the limit
 * around a decode step only (mlxq.worker.smallgemm.decoding), so that prompt
 * processing, which must compute a position's keys and values the same way
 * whatever else it batches, stays with OpenBLAS. Every other call goes to the
 * next cblas_sgemm in the process, OpenBLAS's.
 *
 * The same library holds kernels that mlxq.worker.fastmath calls through
 * ctypes on MLX arrays' memory, all on a vector exp: a softmax over each row's
 * visible prefix (attention's), SiLU(gate) * up (the MLP's), a decode
 * step's attention fused (scores, softmax and values in one pass over a row's
 * keys and values), cascade attention's shared part (the rows that share a
 * prompt prefix, over its keys and values at once), and a sampler's weights at
 * a temperature with their block sums.
 *
 * Built by mlxq.worker.smallgemm with -O3 -march=native -fopenmp, for x86-64
 * CPUs with AVX-512 (32 vector registers: 24 accumulators, 4 rows of X, 1 of W)
 * or with AVX2 and FMA (16 registers: 12 accumulators, 2 rows of X, 1 of W).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

#if defined(__AVX512F__)
#define VW 16      /* floats in a vector */
#define RM 4       /* rows of X in a tile */
#define RN 6       /* rows of W in a tile */
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define RM 2       /* 2 x 6 rather than 3 x 4: X's rows come from L2 once per RN rows of W */
#define RN 6
#ifndef KC          /* -DKC=... to compare (benchmarks/kernel_ab.py) */
#define KC 1024    /* Zen 3 EPYC, one token's products of the 0.5B shape: 0.92-0.98x the time of 512 at 32 rows,
                      0.94x at 8; 2048 and 4096 the same as 1024 */
#endif
#else
#error "smallgemm.c needs AVX-512, or AVX2 and FMA"
#endif
#ifndef KC
#define KC 512     /* floats of K in a chunk: a tile of W stays in the L1 cache across X's tiles */
#endif
#define MIN_K 256  /* shorter products (attention's) go to few_xwt */
#define FEW_M 8    /* the most rows few_xwt and few_xv take (a decode step's attention has heads per KV head) */
#ifndef RUNS
#define RUNS 32   /* runs of W a thread takes at a time (see small_gemm) */
#endif
#define PARALLEL_FLOATS 65536 /* a smaller W is not worth waking a second thread */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));

/* Set through ctypes: the most rows of X this kernel takes (0: none, every product to OpenBLAS). */
int mlxq_smallgemm_rows;
/* Products this kernel has taken, for tests and diagnostics. */
unsigned long mlxq_smallgemm_calls;

static sgemm_fn next_sgemm;
static __thread vf *packed, *accs;
static __thread size_t packed_size, accs_size;

static inline vf load(const float *p) {
  vf v;
  memcpy(&v, p, sizeof v); /* unaligned */
  return v;
}

#if VW == 16
static inline float lane_sum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline float lane_sum(vf v) {
  __m256 x = (__m256)v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* p[lo] .. p[hi - 1] in lanes lo .. hi - 1, 0 in the others; nothing else of p is read. */
static inline vf load_lanes(const float *p, int lo, int hi) {
#if VW == 16
  return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << hi) - (1u << lo)), p);
#else
  __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1)),
                                _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
  return (vf)_mm256_maskload_ps(p, in);
#endif
}

/* A row's K floats outside the aligned blocks, as one vector: its last `shift` floats in the
 * first lanes, its first VW - shift after them (see small_gemm). */
static inline vf edge(const float *row, int K, int shift) {
  return load_lanes(row + K - shift, 0, shift) + load_lanes(row - shift, shift, VW);
}

/* s[0 .. rn) = the sums of a[0 .. rn)'s lanes, each in the same order: a vector's halves down to
 * 8 lanes, then neighbours, pairs of them, and the two halves of 4 (horizontal adds of 6 vectors at
 * once, where a lane_sum each took 13% of a product's time at 32 rows). */
_Static_assert(RN == 6, "lane_sums adds up six accumulators");
static inline __attribute__((always_inline)) void lane_sums(const int rn, const vf *a, float *s) {
  __m256 h[6];
#pragma GCC unroll 6
  for (int j = 0; j < 6; j++) {
#if VW == 16
    h[j] = j < rn ? (__m256)(__builtin_shufflevector(a[j], a[j], 0, 1, 2, 3, 4, 5, 6, 7) +
                             __builtin_shufflevector(a[j], a[j], 8, 9, 10, 11, 12, 13, 14, 15))
                  : _mm256_setzero_ps();
#else
    h[j] = j < rn ? (__m256)a[j] : _mm256_setzero_ps();
#endif
  }
  __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  __m256 q1 = _mm256_hadd_ps(h[4], h[5]);
  q1 = _mm256_hadd_ps(q1, q1);
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(q0), _mm256_extractf128_ps(q0, 1)));
  _mm_storel_pi((__m64 *)(s + 4), _mm_add_ps(_mm256_castps256_ps128(q1), _mm256_extractf128_ps(q1, 1)));
}

/* What a tile's last chunk of K needs to finish its rows of C. */
struct tile_end {
  const vf *x_edge, *w_edge; /* the tile's edge block of X (NULL: none) and the run's of W (edge()) */
  const float *X, *W;        /* the tile's first row of X and the run's of W, for K's tail */
  int ldx, ldw, tail, K;     /* K's floats from tail on have no block: they are added one by one */
  int rows;                  /* the tile's rows inside M */
  float *C;                  /* C at the tile's first row and the run's first column */
  int ldc;
  float alpha, beta;
};

/* Blocks [kb0, kb1) of K for one tile of X (packed) and rn rows of W. Partial sums go to acc_out, or
 * where this is K's last chunk (end), the sums to C. It also asks for the same blocks of the rows
 * of W from ahead to ahead_end, ahead_step apart (the next run's rows this tile fetches), to be
 * brought into L2 (fetch 0: none; 1: the row at ahead alone; 2: all of them): see column_run. */
static inline __attribute__((always_inline)) void chunk(const int rn, const int fetch, int kb0, int kb1,
                                                        const vf *x, const float *W, int ldw, vf *acc_out,
                                                        const float *ahead, const float *ahead_end,
                                                        long ahead_step, const struct tile_end *end) {
  vf acc[RM][RN];
#pragma GCC unroll 4
  for (int i = 0; i < RM; i++)
#pragma GCC unroll 8
    for (int j = 0; j < rn; j++) acc[i][j] = kb0 == 0 ? (vf){0} : acc_out[i * RN + j];
  for (int kb = kb0; kb < kb1; kb++) {
    vf xs[RM];
    if (fetch == 1)
      __builtin_prefetch(ahead + kb * VW, 0, 2);
    else if (fetch)
      for (const float *p = ahead; p < ahead_end; p += ahead_step) __builtin_prefetch(p + kb * VW, 0, 2);
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) xs[i] = x[kb * RM + i];
#pragma GCC unroll 8
    for (int j = 0; j < rn; j++) {
      vf w = load(W + (long)j * ldw + kb * VW);
      __asm__("" : "+v"(w)); /* one load of w into a register, not one per row of X */
#pragma GCC unroll 4
      for (int i = 0; i < RM; i++) acc[i][j] += xs[i] * w;
    }
  }
  if (!end) {
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++)
#pragma GCC unroll 8
      for (int j = 0; j < rn; j++) acc_out[i * RN + j] = acc[i][j];
    return;
  }
#pragma GCC unroll 4
  for (int i = 0; i < RM; i++) {
    if (i >= end->rows) break;
    float s[8];
    if (end->x_edge)
#pragma GCC unroll 8
      for (int j = 0; j < rn; j++) acc[i][j] += end->x_edge[i] * end->w_edge[j];
    lane_sums(rn, acc[i], s);
    for (int j = 0; j < rn; j++) {
      for (int k = end->tail; k < end->K; k++)
        s[j] += end->X[(long)i * end->ldx + k] * end->W[(long)j * end->ldw + k];
      float *c = end->C + (long)i * end->ldc + j;
      *c = end->beta == 0.f ? end->alpha * s[j] : end->alpha * s[j] + end->beta * *c;
    }
  }
}

/* C[:, 0:rn] = alpha * X W[0:rn]^T + beta * C for all M rows of X.
 *
 * W comes from memory once, and the hardware's prefetchers, which follow one
 * stream of addresses at a time, start late on RN rows read side by side: the
 * products ran about 20% slower than with W in cache. So while it works on
 * these rows, the run asks for the next run's (next, RN rows from there; NULL
 * for none) to be brought into L2, spread over the tiles: tile t asks for rows
 * t, t + tiles, ... of it, block by block of K as it goes. */
static void column_run(int M, int rn, int K, int shift, const vf *xp, vf *acc, const float *X, int ldx,
                       const float *W, int ldw, float alpha, float beta, float *C, int ldc,
                       const float *next) {
  int head = shift ? VW - shift : 0, kbs = (K - head) / VW, blocks = kbs + (shift > 0);
  int tiles = (M + RM - 1) / RM, tail = shift ? K : head + kbs * VW;
  const float *Wb = W + head, *nextb = next ? next + head : NULL;
  vf w_edge[RN];
  for (int j = 0; j < rn; j++) w_edge[j] = shift ? edge(W + (long)j * ldw, K, shift) : (vf){0};
  for (int kb0 = 0; kb0 < kbs; kb0 += KC / VW) {
    int kb1 = kb0 + KC / VW < kbs ? kb0 + KC / VW : kbs;
    for (int t = 0; t < tiles; t++) {
      const vf *x = xp + (long)t * blocks * RM;
      vf *a = acc + t * RM * RN;
      const float *ahead = nextb && t < RN ? nextb + (long)t * ldw : NULL;
      const float *ahead_end = ahead ? nextb + (long)RN * ldw : NULL;
      long ahead_step = (long)tiles * ldw;
      struct tile_end end = {shift ? x + (long)kbs * RM : NULL, w_edge, X + (long)t * RM * ldx, W,
                             ldx, ldw, tail, K, M - t * RM < RM ? M - t * RM : RM,
                             C + (long)t * RM * ldc, ldc, alpha, beta};
      const struct tile_end *e = kb1 == kbs ? &end : NULL;
#define CHUNK(n)                                                                      \
  (!ahead                                ? chunk(n, 0, kb0, kb1, x, Wb, ldw, a, NULL, NULL, 0, e) \
   : ahead + ahead_step >= ahead_end ? chunk(n, 1, kb0, kb1, x, Wb, ldw, a, ahead, NULL, 0, e) \
                                         : chunk(n, 2, kb0, kb1, x, Wb, ldw, a, ahead, ahead_end, ahead_step, e))
      switch (rn) {
        case 6: CHUNK(6); break;
        case 5: CHUNK(5); break;
        case 4: CHUNK(4); break;
        case 3: CHUNK(3); break;
        case 2: CHUNK(2); break;
        default: CHUNK(1); break;
      }
#undef CHUNK
    }
  }
}

/* A thread-local buffer of at least n vectors, or NULL. */
static vf *reserve(vf **buf, size_t *size, size_t n) {
  if (n > *size) {
    free(*buf);
    *buf = aligned_alloc(sizeof(vf), n * sizeof(vf));
    *size = *buf ? n : 0;
  }
  return *buf;
}

/* C = alpha * X W^T + beta * C; 0 if a buffer could not be had (C untouched then).
 *
 * Each thread of the team packs X into a buffer of its own and keeps its
 * partial sums in its own: on a Cascade Lake Xeon, reading the calling
 * thread's copy of them from the other core made one token's products of the
 * 0.5B shape take 1.09-1.10x the time at 32 rows (benchmarks/kernel_ab.py).
 *
 * MLX's arrays start 24 bytes past a cache line, so a load of a block of W
 * from a row's start would span two lines; on that Xeon such loads made a
 * product with W in cache take 1.11-1.14x the time, and one token's products
 * 1.05-1.07x. Where every row of W starts at the same offset from a line (ldw
 * and K multiples of VW), the blocks start VW - shift floats into each row, on
 * a vector's boundary, and each row's first VW - shift floats and last shift
 * floats make one more block (edge(); X's too), added to the accumulators
 * before their lanes are.
 *
 * The threads take runs of W RUNS at a time, as each finishes its last: on
 * these shared machines one core often runs slower than the other, and with
 * half the runs each the faster waited for it. A run asks for the next run's
 * rows only within its own RUNS. */
static int small_gemm(int M, int N, int K, float alpha, const float *X, int ldx, const float *W,
                      int ldw, float beta, float *C, int ldc) {
  int shift = ldw % VW == 0 && K % VW == 0 ? (int)((uintptr_t)W / sizeof(float) % VW) : 0;
  int head = shift ? VW - shift : 0, kbs = (K - head) / VW, blocks = kbs + (shift > 0);
  int tiles = (M + RM - 1) / RM, runs = (N + RN - 1) / RN;
  int threads = (long)N * K >= PARALLEL_FLOATS ? omp_get_max_threads() : 1, ok = 1;
#pragma omp parallel num_threads(threads)
  {
    vf *xp = reserve(&packed, &packed_size, (size_t)tiles * blocks * RM);
    vf *acc = reserve(&accs, &accs_size, (size_t)tiles * RM * RN);
    if (!xp || !acc) {
#pragma omp atomic write
      ok = 0;
    }
#pragma omp barrier
    if (ok) {
      for (int t = 0; t < tiles; t++)
        for (int i = 0; i < RM; i++) {
          int m = t * RM + i;
          const float *x = X + (long)m * ldx;
          for (int kb = 0; kb < kbs; kb++)
            xp[((long)t * blocks + kb) * RM + i] = m < M ? load(x + head + kb * VW) : (vf){0};
          if (shift) xp[((long)t * blocks + kbs) * RM + i] = m < M ? edge(x, K, shift) : (vf){0};
        }
#pragma omp for schedule(dynamic, RUNS)
      for (int r = 0; r < runs; r++) {
        int n = r * RN, rn = N - n < RN ? N - n : RN;
        column_run(M, rn, K, shift, xp, acc, X, ldx, W + (long)n * ldw, ldw, alpha, beta, C + n, ldc,
                   n + 2 * RN <= N && (r + 1) % RUNS ? W + (long)(n + RN) * ldw : NULL);
      }
    }
  }
  return ok;
}

static inline void store(float *c, float s, float alpha, float beta) {
  *c = beta == 0.f ? alpha * s : alpha * s + beta * *c;
}

/* x . w over K: vector partial sums, added across lanes, then K's tail. */
static inline float dot(const float *x, const float *w, int K) {
  int kv = K / VW * VW;
  vf a = {0};
  for (int k = 0; k < kv; k += VW) a += load(x + k) * load(w + k);
  float s = lane_sum(a);
  for (int k = kv; k < K; k++) s += x[k] * w[k];
  return s;
}

/* C = alpha * X W^T + beta * C for a few rows and a short K (a decode step's attention scores,
 * one row's head at a time): one thread, W read once, four of its rows side by side. */
static void few_xwt(int M, int N, int K, float alpha, const float *X, int ldx, const float *W, int ldw,
                    float beta, float *C, int ldc) {
  int kv = K / VW * VW;
  for (int m = 0; m < M; m++) {
    const float *x = X + (long)m * ldx;
    float *c = C + (long)m * ldc;
    int n = 0;
    for (; n + 4 <= N; n += 4) {
      const float *w = W + (long)n * ldw;
      vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int k = 0; k < kv; k += VW) {
        vf xv = load(x + k);
        a0 += xv * load(w + k);
        a1 += xv * load(w + ldw + k);
        a2 += xv * load(w + 2L * ldw + k);
        a3 += xv * load(w + 3L * ldw + k);
      }
      float s[4] = {lane_sum(a0), lane_sum(a1), lane_sum(a2), lane_sum(a3)};
      for (int j = 0; j < 4; j++) {
        for (int k = kv; k < K; k++) s[j] += x[k] * w[(long)j * ldw + k];
        store(c + n + j, s[j], alpha, beta);
      }
    }
    for (; n < N; n++) store(c + n, dot(x, W + (long)n * ldw, K), alpha, beta); /* the same sums as above */
  }
}

/* nv vectors of a row of C: sum over k of x[k] * V[k, n0 : n0 + nv * VW]. */
static inline __attribute__((always_inline)) void few_xv_block(const int nv, int K, const float *x,
                                                               const float *V, int ldv, vf *out) {
  vf acc[8];
#pragma GCC unroll 8
  for (int j = 0; j < nv; j++) acc[j] = (vf){0};
  for (int k = 0; k < K; k++) {
    vf xb = (vf){0} + x[k];
    const float *v = V + (long)k * ldv;
#pragma GCC unroll 8
    for (int j = 0; j < nv; j++) acc[j] += xb * load(v + j * VW);
  }
#pragma GCC unroll 8
  for (int j = 0; j < nv; j++) out[j] = acc[j];
}

/* C = alpha * X V + beta * C for a few rows (a decode step's attention weights times the values,
 * one row's head at a time): one thread, V read once per row of X. */
static void few_xv(int M, int N, int K, float alpha, const float *X, int ldx, const float *V, int ldv,
                   float beta, float *C, int ldc) {
  for (int m = 0; m < M; m++) {
    const float *x = X + (long)m * ldx;
    float *c = C + (long)m * ldc;
    int n0 = 0;
    for (; n0 + VW <= N; n0 += 8 * VW) {
      int nv = (N - n0) / VW < 8 ? (N - n0) / VW : 8;
      vf out[8];
      switch (nv) {
        case 8: few_xv_block(8, K, x, V + n0, ldv, out); break;
        case 7: few_xv_block(7, K, x, V + n0, ldv, out); break;
        case 6: few_xv_block(6, K, x, V + n0, ldv, out); break;
        case 5: few_xv_block(5, K, x, V + n0, ldv, out); break;
        case 4: few_xv_block(4, K, x, V + n0, ldv, out); break;
        case 3: few_xv_block(3, K, x, V + n0, ldv, out); break;
        case 2: few_xv_block(2, K, x, V + n0, ldv, out); break;
        default: few_xv_block(1, K, x, V + n0, ldv, out); break;
      }
      for (int j = 0; j < nv * VW; j++) store(c + n0 + j, ((float *)out)[j], alpha, beta);
      if (nv < 8) {
        n0 += nv * VW;
        break;
      }
    }
    for (int n = n0; n < N; n++) { /* N's tail, fewer than VW columns */
      float s = 0.f;
      for (int k = 0; k < K; k++) s += x[k] * V[(long)k * ldv + n];
      store(c + n, s, alpha, beta);
    }
  }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  int rows = __atomic_load_n(&mlxq_smallgemm_rows, __ATOMIC_RELAXED);
  if (order == ROW_MAJOR && trans_a == NO_TRANS && M >= 1 && M <= rows && N >= 1 && K >= 1) {
    int taken = 1;
    if (trans_b == TRANS && K >= MIN_K)
      taken = small_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); /* 0: no buffer, to OpenBLAS */
    else if (M <= FEW_M && trans_b == TRANS && K < MIN_K)
      few_xwt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else if (M <= FEW_M && trans_b == NO_TRANS)
      few_xv(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else
      taken = 0;
    if (taken) {
      __atomic_fetch_add(&mlxq_smallgemm_calls, 1, __ATOMIC_RELAXED);
      return;
    }
  }
  if (!next_sgemm) next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  next_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- Elementwise kernels for MLX arrays, called through ctypes (mlxq.worker.fastmath) ----
 *
 * MLX's CPU exp is scalar and its compiled kernels split a long expression into
 * several passes over memory; these run the same Cephes expf as
 * mlxq.worker.fastmath (range reduction by ln 2, a degree-7 polynomial, the
 * power of two built in the exponent bits) a vector at a time, in one pass. */

static inline vf vexp(vf x) {
  const vf lo = (vf){0} - 87.f, hi = (vf){0} + 88.f;
#if VW == 16
  x = (vf)_mm512_min_ps(_mm512_max_ps((__m512)x, (__m512)lo), (__m512)hi);
  vf k = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f + 0.5f), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  vf two_k = (vf)_mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32((__m512)k), _mm512_set1_epi32(127)), 23));
#else
  x = (vf)_mm256_min_ps(_mm256_max_ps((__m256)x, (__m256)lo), (__m256)hi);
  vf k = (vf)_mm256_floor_ps((__m256)(x * 1.44269504088896341f + 0.5f));
  vf two_k = (vf)_mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32((__m256)k), _mm256_set1_epi32(127)), 23));
#endif
  vf r = x - k * 0.693359375f - k * -2.12194440e-4f;
  vf y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  return y * two_k;
}

#if VW == 16
static inline float lane_max(vf v) { return _mm512_reduce_max_ps((__m512)v); }
static inline vf vmaxv(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline float lane_max(vf v) {
  __m256 x = (__m256)v;
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vmaxv(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#endif

static inline void store_v(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* One row's softmax over its first `valid` entries, in place; the rest become 0.
 * With top and total, the row's max and its sum of exp(x - max) go there and the
 * row keeps exp(x - max) unnormalised (for attention joined from parts). */
/* The max of x[0:n] * t (t > 0; by 1, exactly x's max). */
static float scaled_max(const float *x, long n, float t) {
  vf mv = (vf){0} - __builtin_inff(), tv = (vf){0} + t;
  long i;
  for (i = 0; i + VW <= n; i += VW) mv = vmaxv(mv, load(x + i) * tv);
  float m = lane_max(mv);
  for (; i < n; i++) m = x[i] * t > m ? x[i] * t : m;
  return m;
}

/* w[j] = exp(x[j] * t - m) for the fewer than VW floats of a row's tail, through a padded
 * vector (the same exp as the rest of the row); their sum. w may be x. */
static float exp_tail(const float *x, float *w, long rest, float t, float m) {
  float u[VW], s = 0.f;
  for (long j = 0; j < VW; j++) u[j] = j < rest ? x[j] * t - m : -100.f;
  vf e = vexp(load(u));
  memcpy(u, &e, sizeof e);
  for (long j = 0; j < rest; j++) w[j] = u[j], s += u[j];
  return s;
}

static void softmax_row(float *x, long n, long valid, float *top, float *total) {
  long v = valid < n ? valid : n, i;
  if (v <= 0) {
    memset(x, 0, n * sizeof(float));
    if (top) *top = -__builtin_inff(), *total = 0.f;
    return;
  }
  float m = scaled_max(x, v, 1.f);
  vf sv = {0}, mb = (vf){0} + m;
  for (i = 0; i + VW <= v; i += VW) {
    vf e = vexp(load(x + i) - mb);
    store_v(x + i, e);
    sv += e;
  }
  float s = lane_sum(sv);
  if (i < v) s += exp_tail(x + i, x + i, v - i, 1.f, m);
  if (v < n) memset(x + v, 0, (n - v) * sizeof(float));
  if (top) {
    *top = m, *total = s;
    return;
  }
  vf inv = (vf){0} + 1.f / s;
  for (i = 0; i + VW <= v; i += VW) store_v(x + i, load(x + i) * inv);
  for (; i < v; i++) x[i] *= 1.f / s;
}

/* Softmax of `rows` rows of `n` floats in place, row r over its first valid[r]
 * entries (attention's masks are prefixes: causal, or a row's length). Rows
 * are independent: a row's result does not depend on the others. */
void mlxq_softmax(float *x, long rows, long n, const int *valid, float *top, float *total) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FLOATS * 4)
  for (long r = 0; r < rows; r++)
    softmax_row(x + r * n, n, valid[r], top ? top + r : 0, top ? total + r : 0);
}

/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise over n floats
 * (out may be gate or up). */
void mlxq_swiglu(const float *gate, const float *up, float *out, long n) {
  long blocks = n / VW;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_FLOATS * 4)
  for (long b = 0; b < blocks; b++) {
    vf g = load(gate + b * VW);
    store_v(out + b * VW, g / (1.f + vexp((vf){0} - g)) * load(up + b * VW));
  }
  if (blocks * VW < n) {
    float g[VW] = {0}, u[VW] = {0};
    long rest = n - blocks * VW;
    memcpy(g, gate + blocks * VW, rest * sizeof(float));
    memcpy(u, up + blocks * VW, rest * sizeof(float));
    vf gv = load(g), r = gv / (1.f + vexp((vf){0} - gv)) * load(u);
    memcpy(g, &r, sizeof r);
    memcpy(out + blocks * VW, g, rest * sizeof(float));
  }
}

/* A sampler's weights at a temperature: for each row r of logits (rows x n, rows ld floats
 * apart), w = exp(x * inv_t[r] - max(x * inv_t[r])) into weights (rows x n), and the sum of
 * each block of `block` weights (a multiple of VW; the last block may be shorter), in float64,
 * into sums (rows x the blocks). */
void mlxq_sample_weights(const float *logits, long rows, long n, long ld, const float *inv_t, float *weights,
                         double *sums, long block) {
  const long blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FLOATS * 4)
  for (long r = 0; r < rows; r++) {
    const float *x = logits + r * ld;
    float *w = weights + r * n;
    const float t = inv_t[r], m = scaled_max(x, n, t);
    const vf tv = (vf){0} + t, mb = (vf){0} + m;
    for (long b = 0; b < blocks; b++) {
      const long lo = b * block, hi = lo + block < n ? lo + block : n;
      vf acc = {0};
      long i;
      for (i = lo; i + VW <= hi; i += VW) {
        vf e = vexp(load(x + i) * tv - mb);
        store_v(w + i, e);
        acc += e;
      }
      double s = lane_sum(acc);
      if (i < hi) s += exp_tail(x + i, w + i, hi - i, t, m);
      sums[r * blocks + b] = s;
    }
  }
}

/* Decode attention, fused: for each row and query head, scores over the row's
 * positions start[r] to valid[r] - 1 (start NULL: from 0), their softmax and
 * the weighted sum of the values, reading each key and value once (query heads
 * that share a KV head share the reads). q and out: rows x heads x dim; keys
 * and values: position p of KV head h of row r at r * row_stride + h *
 * head_stride + p * dim. With seeds (a part over other positions, as cascade
 * attention has it: per row and query head its scores' max, the sum of their
 * exp(score - max) and those weights times the values, unnormalised; rows x
 * heads, rows x heads and rows x heads x dim), the result is the softmax over
 * both parts. Each row's head is summed in the same order whatever the other
 * rows are. */
static __thread float *att_scratch;
static __thread size_t att_scratch_size;

static inline __attribute__((always_inline)) void attend_head(const long dv, const float *q, const float *k,
                                                             const float *v, float *out, long per, long n,
                                                             float scale, float *s, const float *seed_top,
                                                             const float *seed_total, const float *seed_out) {
  const long dim = dv * VW;
  for (long h = 0; h < per; h++) {
    const float *qh = q + h * dim;
    float *sh = s + h * n;
    vf qv[dv];
    for (long c = 0; c < dv; c++) qv[c] = load(qh + c * VW) * scale;
    for (long p = 0; p < n; p++) {
      const float *kp = k + p * dim;
      vf acc = qv[0] * load(kp);
      for (long c = 1; c < dv; c++) acc += qv[c] * load(kp + c * VW);
      sh[p] = lane_sum(acc);
    }
  }
  for (long h = 0; h < per; h++) {
    float top, total;
    softmax_row(s + h * n, n, n, &top, &total);
    vf acc[dv];
    for (long c = 0; c < dv; c++) acc[c] = (vf){0};
    const float *w = s + h * n;
    for (long p = 0; p < n; p++) {
      const float *vp = v + p * dim;
      vf wp = (vf){0} + w[p];
      for (long c = 0; c < dv; c++) acc[c] += wp * load(vp + c * VW);
    }
    if (seed_total && seed_total[h] > 0.f) { /* join the two parts by their maxima */
      const float m = seed_top[h] > top ? seed_top[h] : top;
      const float a = expf(seed_top[h] - m), b = n > 0 ? expf(top - m) : 0.f;
      total = seed_total[h] * a + total * b;
      vf av = (vf){0} + a, bv = (vf){0} + b;
      for (long c = 0; c < dv; c++) acc[c] = load(seed_out + h * dim + c * VW) * av + acc[c] * bv;
    }
    vf inv = (vf){0} + (total > 0.f ? 1.f / total : 0.f);
    for (long c = 0; c < dv; c++) store_v(out + h * dim + c * VW, acc[c] * inv);
  }
}

/* 0 when done; -1 (nothing done) unless a head is 1, 2, 4, 8 or 16 vectors. */
int mlxq_decode_attention(const float *q, const float *keys, const float *values, float *out, long rows,
                          long heads, long kv_heads, long dim, long row_stride, long head_stride,
                          const int *start, const int *valid, float scale, const float *seed_top,
                          const float *seed_total, const float *seed_out) {
  const long dv = dim / VW;
  if (dim % VW || (dv != 1 && dv != 2 && dv != 4 && dv != 8 && dv != 16) || heads % kv_heads) return -1;
  const long per = heads / kv_heads;
  long most = 1;
  for (long r = 0; r < rows; r++) {
    const long n = valid[r] - (start ? start[r] : 0);
    most = n > most ? n : most;
  }
#pragma omp parallel for schedule(dynamic, 1) if (rows * kv_heads > 1 && most * dim * rows * kv_heads >= PARALLEL_FLOATS)
  for (long i = 0; i < rows * kv_heads; i++) {
    const long r = i / kv_heads, h = i % kv_heads, first = start ? start[r] : 0;
    const size_t need = (size_t)per * most * sizeof(float);
    if (att_scratch_size < need) {
      free(att_scratch);
      att_scratch = malloc(need);
      att_scratch_size = att_scratch ? need : 0;
    }
    const long head = r * heads + h * per;
    float *o = out + head * dim;
    const long n = valid[r] - first;
    const int seeded = seed_total != 0;
    if ((n <= 0 && !seeded) || !att_scratch) {
      memset(o, 0, per * dim * sizeof(float));
      continue;
    }
    const float *qh = q + head * dim, *k = keys + r * row_stride + h * head_stride + first * dim,
                *v = values + r * row_stride + h * head_stride + first * dim;
    const float *st = seeded ? seed_top + head : 0, *ss = seeded ? seed_total + head : 0,
                *so = seeded ? seed_out + head * dim : 0;
    const long m = n > 0 ? n : 0;
    switch (dim / VW) { /* a constant count of vectors a head, so that they stay in registers */
      case 1: attend_head(1, qh, k, v, o, per, m, scale, att_scratch, st, ss, so); break;
      case 2: attend_head(2, qh, k, v, o, per, m, scale, att_scratch, st, ss, so); break;
      case 4: attend_head(4, qh, k, v, o, per, m, scale, att_scratch, st, ss, so); break;
      case 8: attend_head(8, qh, k, v, o, per, m, scale, att_scratch, st, ss, so); break;
      case 16: attend_head(16, qh, k, v, o, per, m, scale, att_scratch, st, ss, so); break;
    }
  }
  return 0;
}

/* Cascade attention's shared part: the attention of `rows` rows' queries (q: rows x heads x
 * dim) over the first n positions of one row's keys and values, which those rows share (KV
 * head h's position p at h * head_stride + p * dim). Per row and query head: the max of its
 * scores, the sum of their exp(score - max) and those weights times the values, unnormalised,
 * into top and total (rows x heads) and out (rows x heads x dim), as mlxq_decode_attention
 * takes them for seeds.
 *
 * Each KV head's queries (all rows' heads that share it, rows x heads per KV head) take the
 * keys and values where they are, a block of SHARED_BLOCK positions at a time, as two small
 * products on tiles held in registers: the block's scores K Q^T (a query's scores in a column,
 * so that its softmax statistics are per lane), then the weights times the values. A running
 * max and sum join the blocks, as flash attention does. A query's result is summed in the
 * same order whatever the other rows are. */
#define SHARED_BLOCK 64
#define SP 6 /* positions in a tile of scores, by 2 vectors of queries */
#define SV 6 /* queries in a tile of the weights times the values, by 2 vectors of a head */

/* *p in every lane, loaded so (adding it to a vector of zeros costs an add and a shuffle). */
static inline vf splat(const float *p) {
#if VW == 16
  return (vf)_mm512_set1_ps(*p);
#else
  return (vf)_mm256_broadcast_ss(p);
#endif
}

static __thread float *shared_scratch;
static __thread size_t shared_scratch_size;

/* c[r][0 : nv * VW] = c0[r] + sum over k < kn of a[r * ar + k * ak] * b[k][0 : nv * VW], for r < mr (b: ldb
 * apart, c: ldc apart), where c0[r] is 0 (scale NULL) or c[r] * scale[r]: a tile of a product held in
 * registers, a's entries broadcast. Both of the shared part's products are one: the scores (a: the keys, b:
 * the queries transposed) and the weights times the values (a: the weights, b: the values). */
static inline __attribute__((always_inline)) void broadcast_tile(const int mr, const int nv, const float *a, long ar,
                                                                 long ak, const float *b, long ldb, long kn, float *c,
                                                                 long ldc, const float *scale) {
  vf acc[SP > SV ? SP : SV][2];
  for (int r = 0; r < mr; r++) {
    const vf sc = scale ? splat(scale + r) : (vf){0};
    for (int v = 0; v < nv; v++) acc[r][v] = scale ? load(c + r * ldc + v * VW) * sc : (vf){0};
  }
  for (long k = 0; k < kn; k++) {
    vf bv[2];
    for (int v = 0; v < nv; v++) bv[v] = load(b + k * ldb + v * VW);
    for (int r = 0; r < mr; r++) {
      const vf x = splat(a + r * ar + k * ak);
      for (int v = 0; v < nv; v++) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) store_v(c + r * ldc + v * VW, acc[r][v]);
}

#define SCORE_CASE(mr, nv) case (mr) * 8 + (nv): \
  broadcast_tile(mr, nv, kp, dim, 1, qt + v0 * VW, ld, dim, s + (p - p0) * ld + v0 * VW, ld, 0); break;
#define VALUE_CASE(nq, cv) case (nq) * 8 + (cv): \
  broadcast_tile(nq, cv, s + i, 1, ld, vb + c0 * VW, dim, bw, acc + i * dim + c0 * VW, dim, alpha + i); break;

/* One KV head's queries i0 .. i1 - 1 (query i: row i / per, head h * per + i % per). */
static int shared_head(const float *q, const float *k, const float *v, long heads, long per, long h, long dim,
                        long i0, long i1, long n, float scale, float *top, float *total, float *out) {
  const long mc = i1 - i0, ld = (mc + VW - 1) / VW * VW, nvec = ld / VW, dv = dim / VW, cv = dv < 2 ? dv : 2;
  const size_t need = ((size_t)dim * ld + (size_t)SHARED_BLOCK * ld + (size_t)ld * dim + 3 * (size_t)ld) * sizeof(float);
  if (shared_scratch_size < need) {
    free(shared_scratch);
    shared_scratch = malloc(need);
    shared_scratch_size = shared_scratch ? need : 0;
    if (!shared_scratch) return -1;
  }
  float *qt = shared_scratch, *s = qt + dim * ld, *acc = s + SHARED_BLOCK * ld, *m = acc + ld * dim, *l = m + ld,
        *alpha = l + ld;
  for (long i = 0; i < ld; i++) { /* the queries, scaled, a column each; columns past mc are 0 */
    const float *qi = i < mc ? q + ((i0 + i) / per * heads + h * per + (i0 + i) % per) * dim : 0;
    for (long c = 0; c < dim; c++) qt[c * ld + i] = qi ? qi[c] * scale : 0.f;
    m[i] = -__builtin_inff(), l[i] = 0.f;
  }
  memset(acc, 0, (size_t)ld * dim * sizeof(float));
  for (long p0 = 0; p0 < n; p0 += SHARED_BLOCK) {
    const long bw = n - p0 < SHARED_BLOCK ? n - p0 : SHARED_BLOCK;
    for (long p = p0; p < p0 + bw; p += SP) {
      const long mr = p0 + bw - p < SP ? p0 + bw - p : SP;
      const float *kp = k + p * dim;
      for (long v0 = 0; v0 < nvec; v0 += 2) {
        switch (mr * 8 + (nvec - v0 < 2 ? 1 : 2)) {
          SCORE_CASE(1, 1) SCORE_CASE(1, 2) SCORE_CASE(2, 1) SCORE_CASE(2, 2) SCORE_CASE(3, 1) SCORE_CASE(3, 2)
          SCORE_CASE(4, 1) SCORE_CASE(4, 2) SCORE_CASE(5, 1) SCORE_CASE(5, 2) SCORE_CASE(6, 1) SCORE_CASE(6, 2)
        }
      }
    }
    /* The running max and sum, a vector of queries at a time; the block's weights in place. */
    for (long i = 0; i < ld; i += VW) {
      vf bm = load(s + i);
      for (long p = 1; p < bw; p++) bm = vmaxv(bm, load(s + p * ld + i));
      const vf mo = load(m + i), mn = vmaxv(mo, bm), al = vexp(mo - mn);
      vf sum = {0};
      for (long p = 0; p < bw; p++) {
        const vf e = vexp(load(s + p * ld + i) - mn);
        store_v(s + p * ld + i, e);
        sum += e;
      }
      store_v(l + i, load(l + i) * al + sum);
      store_v(m + i, mn);
      store_v(alpha + i, al);
    }
    const float *vb = v + p0 * dim;
    for (long i = 0; i < mc; i += SV) {
      const long nq = mc - i < SV ? mc - i : SV;
      for (long c0 = 0; c0 < dv; c0 += cv) switch (nq * 8 + cv) {
          VALUE_CASE(1, 1) VALUE_CASE(1, 2) VALUE_CASE(2, 1) VALUE_CASE(2, 2) VALUE_CASE(3, 1) VALUE_CASE(3, 2)
          VALUE_CASE(4, 1) VALUE_CASE(4, 2) VALUE_CASE(5, 1) VALUE_CASE(5, 2) VALUE_CASE(6, 1) VALUE_CASE(6, 2)
        }
    }
  }
  for (long i = 0; i < mc; i++) {
    const long at = (i0 + i) / per * heads + h * per + (i0 + i) % per;
    top[at] = m[i], total[at] = l[i];
    memcpy(out + at * dim, acc + i * dim, dim * sizeof(float));
  }
  return 0;
}

/* 0 when done; -1 unless a head is 1, 2, 4, 8 or 16 vectors (nothing done) or where memory ran out. */
int mlxq_shared_attention(const float *q, const float *keys, const float *values, long rows, long heads,
                          long kv_heads, long dim, long head_stride, long n, float scale, float *top, float *total,
                          float *out) {
  const long dv = dim / VW;
  if (dim % VW || (dv != 1 && dv != 2 && dv != 4 && dv != 8 && dv != 16) || heads % kv_heads || n <= 0) return -1;
  const long per = heads / kv_heads, queries = rows * per;
  const int threads = (double)queries * n * dim >= PARALLEL_FLOATS ? omp_get_max_threads() : 1;
  /* Enough pieces for every thread: each KV head's queries split in runs of whole vectors. */
  const long split = kv_heads >= threads ? 1 : (threads + kv_heads - 1) / kv_heads;
  const long piece = ((queries + split - 1) / split + VW - 1) / VW * VW;
  const long pieces = (queries + piece - 1) / piece;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
  for (long u = 0; u < kv_heads * pieces; u++) {
    const long h = u / pieces, i0 = u % pieces * piece, i1 = i0 + piece < queries ? i0 + piece : queries;
    failed |= shared_head(q, keys + h * head_stride, values + h * head_stride, heads, per, h, dim, i0, i1, n, scale,
                          top, total, out) != 0;
  }
  return failed ? -1 : 0;
}
