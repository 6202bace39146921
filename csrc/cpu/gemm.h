// Single-threaded float32 matrix products of the CPU kernels, on one BLIS-style 6 x 16
// AVX2/FMA micro-kernel: C = A . B^T over packed panels (nt_packed: the dot-product blocks of
// the scoring and kNN kernels), and A . B, A^T . B, A . B^T on row-major operands read in
// place (strided_product: the dense attention's tiles, through blas.h).
//
// Why our own: those kernels run one small GEMM per thread and per block. MKL, which torch
// links, re-packs both operands on every call and reaches ~75% of this CPU's FMA peak on
// such blocks. The scoring and kNN kernels pack panels once and reuse them (a block of
// queries against every block of centres, a block of nodes in every tile), and the loop
// order keeps C in L2. Built with function target attributes, so the library still loads on
// x86 CPUs without AVX2: callers ask available() and fall back to BLAS there (and for
// float64).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SLSG_GEMM_AVX2 1
#include <immintrin.h>
#else
#define SLSG_GEMM_AVX2 0
#endif

namespace slsg {
namespace gemm {

constexpr int64_t kMR = 6;    // rows of A per micro-tile (broadcast operand)
constexpr int64_t kNR = 16;   // rows of B per micro-tile (two 8-float vectors)
constexpr int64_t kKC = 256;  // depth of one packed panel: a B sliver (16 KiB) stays in L1
constexpr int64_t kMC = 96;   // rows of A per pass over B: their [96, n] slice of C stays in L2

// Whether the environment variable `name` is set to `value` (the kernels' off switches).
inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set && std::string(set) == value;
}

// The first 32-byte aligned float of v, grown to hold n floats from there.
inline float* aligned(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + 8) v.resize(n + 8);
  auto address = reinterpret_cast<std::uintptr_t>(v.data());
  return v.data() + ((32 - address % 32) % 32) / sizeof(float);
}

// Whether this CPU runs the AVX2/FMA kernel (checked once). SLSG_CPU_GEMM=blas in the
// environment forces the BLAS fallback (how the tests cover it on AVX2 machines).
inline bool available() {
#if SLSG_GEMM_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !env_is("SLSG_CPU_GEMM", "blas");
  return ok;
#else
  return false;
#endif
}

#if SLSG_GEMM_AVX2

// dst[8 x 8] (row stride ldd) = src[8 x 8]^T (row stride lds).
__attribute__((target("avx2"))) inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * lds);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}

// Rows [0, rows) of M (leading dimension ld), depth [p0, p0 + kc), into slivers of
// `width` rows: out[s][p][w] = M[s * width + w][p0 + p], zero beyond the last row. Full
// 8 x 8 blocks go through transpose8 (the element-wise copy wrote with a stride of `width`:
// profiled at a fifth of a one-tile kNN GEMM).
__attribute__((target("avx2"))) inline void pack(const float* M, int64_t ld, int64_t rows, int64_t p0,
                                                 int64_t kc, int64_t width, float* out) {
  for (int64_t s = 0; s < rows; s += width) {
    const int64_t w_valid = std::min(width, rows - s);
    float* dst = out + s * kc;
    int64_t w = 0;
    if (width % 8 == 0) {
      for (; w + 8 <= w_valid; w += 8) {
        const float* src = M + (s + w) * ld + p0;
        int64_t p = 0;
        for (; p + 8 <= kc; p += 8) transpose8(src + p, ld, dst + p * width + w, width);
        for (; p < kc; ++p)
          for (int64_t u = 0; u < 8; ++u) dst[p * width + w + u] = src[u * ld + p];
      }
    }
    for (; w < w_valid; ++w) {
      const float* src = M + (s + w) * ld + p0;
      for (int64_t p = 0; p < kc; ++p) dst[p * width + w] = src[p];
    }
    for (w = w_valid; w < width; ++w)
      for (int64_t p = 0; p < kc; ++p) dst[p * width + w] = 0.0f;
  }
}

// C's first rows x cols (+)= alpha times the 6 x 16 accumulators of a micro-kernel (the
// packed kernel passes alpha = 1, which is exact).
__attribute__((target("avx2,fma"), always_inline)) inline void write_micro_tile(
    float* c, int64_t ldc, float alpha, bool accumulate, int64_t rows, int64_t cols, __m256 c00, __m256 c01,
    __m256 c10, __m256 c11, __m256 c20, __m256 c21, __m256 c30, __m256 c31, __m256 c40, __m256 c41, __m256 c50,
    __m256 c51) {
  alignas(32) float tile[kMR * kNR];
  const __m256 s = _mm256_set1_ps(alpha);
  const __m256 acc[kMR * 2] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  for (int64_t v = 0; v < kMR * 2; ++v) _mm256_store_ps(tile + 8 * v, _mm256_mul_ps(s, acc[v]));
  if (cols == kNR) {
    for (int64_t r = 0; r < rows; ++r) {
      float* cr = c + r * ldc;
      __m256 lo = _mm256_load_ps(tile + r * kNR), hi = _mm256_load_ps(tile + r * kNR + 8);
      if (accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, lo), _mm256_storeu_ps(cr + 8, hi);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + tile[r * kNR + j] : tile[r * kNR + j];
}

// C[6 x 16] = alpha * A . B (+ C) over the whole depth k, with neither operand packed:
// B(p, j) = b[p * ldb + j] (16 readable floats per step: a row of a row-major matrix), and
// A(i, p) = a[i * lda + p] or, with ATrans, a[p * lda + i] (six consecutive floats per
// step: a column block of a row-major matrix used transposed). Rows beyond `rows` read
// row 0 (N) and are not written; ATrans callers must make six floats readable per step.
template <bool ATrans>
__attribute__((target("avx2,fma"))) inline void strided_micro_kernel(int64_t k, const float* a, int64_t lda,
                                                                     const float* b, int64_t ldb, float* c,
                                                                     int64_t ldc, float alpha, bool accumulate,
                                                                     int64_t rows, int64_t cols) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  // Row r's value at step p: ATrans: a[p * lda + r]; else a_r[p].
  const int64_t step = ATrans ? lda : 1;
  const int64_t r1 = ATrans ? 1 : lda * (rows > 1), r2 = ATrans ? 2 : 2 * lda * (rows > 2);
  const int64_t r3 = ATrans ? 3 : 3 * lda * (rows > 3), r4 = ATrans ? 4 : 4 * lda * (rows > 4);
  const int64_t r5 = ATrans ? 5 : 5 * lda * (rows > 5);
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(av, b0, c00), c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + r1);
    c10 = _mm256_fmadd_ps(av, b0, c10), c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + r2);
    c20 = _mm256_fmadd_ps(av, b0, c20), c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + r3);
    c30 = _mm256_fmadd_ps(av, b0, c30), c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + r4);
    c40 = _mm256_fmadd_ps(av, b0, c40), c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + r5);
    c50 = _mm256_fmadd_ps(av, b0, c50), c51 = _mm256_fmadd_ps(av, b1, c51);
    a += step;
    b += ldb;
  }
  write_micro_tile(c, ldc, alpha, accumulate, rows, cols, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51);
}

// C[6 x 16] (+)= a-sliver . b-sliver over kc steps (packed panels: six values of A, then
// sixteen of B, per step); rows/cols limit what is written.
__attribute__((target("avx2,fma"))) inline void micro_kernel(int64_t kc, const float* a, const float* b, float* c,
                                                             int64_t ldc, bool accumulate, int64_t rows,
                                                             int64_t cols) {
  strided_micro_kernel<true>(kc, a, kMR, b, kNR, c, ldc, 1.0f, accumulate, rows, cols);
}

// C[m, n] = alpha * op(A) . op(B) (+ C with `accumulate`), all row-major, with op(A) [m, k]
// and op(B) [k, n]: A is [m, k] (lda) or, with ATrans, [k, m]; B is [k, n] (ldb) or, with
// BTrans, [n, k]. A is read in place; B goes through a [k, 16] sliver of thread-local
// scratch per 16 columns (a transposing pack with BTrans, a copy of its rows with ATrans)
// or, for A . B, is read in place too.
//
// Why: in the attention tiles one operand is a [256, 512] score tile and the other is as
// narrow as a head (32-256 columns). MKL packs the large tile on every call, which cost it
// up to 40% of its time. Single thread, [256, 512] tiles, 2026-11-30 (scratch
// measurements, MKL against this): A . B 94-102 against 109-113 GFLOP/s; A^T . B at n = 32,
// 256: 57, 97 against 105, 106; A . B^T at k = 64-256: 97-103 against 102-109, and at k = 32
// 92 against 89 (callers keep MKL there). The sliver copy for A^T . B keeps B's rows out of
// the L1 sets that A^T's column reads (a row stride of 2 KiB) crowd: 88-97 without it.
// Requires available().
template <bool ATrans, bool BTrans>
__attribute__((target("avx2,fma"))) inline void strided_product(int64_t m, int64_t n, int64_t k, float alpha,
                                                                const float* a, int64_t lda, const float* b,
                                                                int64_t ldb, bool accumulate, float* c,
                                                                int64_t ldc) {
  thread_local std::vector<float> b_sliver, a_pad;
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    const int64_t cols = std::min(kNR, n - j0);
    const float* bj = b + j0;
    int64_t ldbj = ldb;
    if (BTrans) {  // B^T's columns j0.. are B's rows: transpose them into the sliver
      float* sliver = aligned(b_sliver, k * kNR);
      pack(b + j0 * ldb, ldb, cols, 0, k, kNR, sliver);
      bj = sliver, ldbj = kNR;
    } else if (ATrans || cols < kNR) {  // copied, zero-padded to 16 columns when ragged
      float* sliver = aligned(b_sliver, k * kNR);
      for (int64_t p = 0; p < k; ++p)
        for (int64_t j = 0; j < kNR; ++j) sliver[p * kNR + j] = j < cols ? b[p * ldb + j0 + j] : 0.0f;
      bj = sliver, ldbj = kNR;
    }
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int64_t rows = std::min(kMR, m - i0);
      float* ci = c + i0 * ldc + j0;
      if (!ATrans) {
        strided_micro_kernel<false>(k, a + i0 * lda, lda, bj, ldbj, ci, ldc, alpha, accumulate, rows, cols);
      } else if (rows == kMR) {
        strided_micro_kernel<true>(k, a + i0, lda, bj, ldbj, ci, ldc, alpha, accumulate, rows, cols);
      } else {  // fewer than six readable values per step: copy them, zero-padded
        float* pad = aligned(a_pad, k * kMR);
        for (int64_t p = 0; p < k; ++p)
          for (int64_t r = 0; r < kMR; ++r) pad[p * kMR + r] = r < rows ? a[p * lda + i0 + r] : 0.0f;
        strided_micro_kernel<true>(k, pad, kMR, bj, ldbj, ci, ldc, alpha, accumulate, rows, cols);
      }
    }
  }
}

// out[t] = a[t] . b[t] (each of depth d) with the arithmetic of micro_kernel under nt_packed:
// fused multiply-adds in depth order within each block of kKC, the blocks' sums added in
// order. So out[t] is bit-equal to the corresponding entry of an nt_packed product, which
// lets the screened scoring kernel compute a few chosen pairs exactly as the full product
// would. Eight pairs at a time: independent chains keep both FMA units busy.
__attribute__((target("avx2,fma"))) inline void pair_dots(const float* const* a, const float* const* b,
                                                          int64_t n, int64_t d, float* out) {
  constexpr int64_t kLanes = 8;
  for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
    const int64_t lanes = std::min(kLanes, n - t0);
    const float* pa[kLanes];
    const float* pb[kLanes];
    float total[kLanes] = {};
    for (int64_t l = 0; l < kLanes; ++l)  // idle lanes repeat the first pair
      pa[l] = a[t0 + (l < lanes ? l : 0)], pb[l] = b[t0 + (l < lanes ? l : 0)];
    for (int64_t p0 = 0; p0 < d; p0 += kKC) {
      const int64_t p1 = std::min(d, p0 + kKC);
      float acc[kLanes] = {};
      for (int64_t p = p0; p < p1; ++p) {
#pragma GCC unroll 8
        for (int64_t l = 0; l < kLanes; ++l) acc[l] = __builtin_fmaf(pa[l][p], pb[l][p], acc[l]);
      }
      for (int64_t l = 0; l < kLanes; ++l) total[l] = p0 == 0 ? acc[l] : acc[l] + total[l];
    }
    for (int64_t l = 0; l < lanes; ++l) out[t0 + l] = total[l];
  }
}

#endif  // SLSG_GEMM_AVX2

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Floats taken by pack_panel(rows, d, width).
inline int64_t panel_size(int64_t rows, int64_t d, int64_t width) {
  return round_up(rows, width) * d;
}

// Rows [0, rows) of M, all d columns, as a panel for nt_packed: for each depth block of
// kKC columns, slivers of `width` rows (kMR for the A operand, kNR for B). Callers that use
// a block of rows in many products pack it once.
inline void pack_panel(const float* M, int64_t ld, int64_t rows, int64_t d, int64_t width,
                       float* out) {
#if SLSG_GEMM_AVX2
  const int64_t rows_pad = round_up(rows, width);
  for (int64_t p0 = 0; p0 < d; p0 += kKC)
    pack(M, ld, rows, p0, std::min(kKC, d - p0), width, out + rows_pad * p0);
#else
  (void)M, (void)ld, (void)rows, (void)d, (void)width, (void)out;
#endif
}

#if SLSG_GEMM_AVX2
// The lower triangle of C [m, m] from its upper one, in 8 x 8 blocks: the element-wise
// column walk missed L1 on every read (profiled at a sixth of a one-tile kNN GEMM).
__attribute__((target("avx2"))) inline void mirror_upper(float* C, int64_t m, int64_t ldc) {
  const int64_t full = m / 8 * 8;
  for (int64_t r0 = 0; r0 < full; r0 += 8) {
    for (int64_t c0 = 0; c0 < r0; c0 += 8) transpose8(C + c0 * ldc + r0, ldc, C + r0 * ldc + c0, ldc);
    for (int64_t r = r0 + 1; r < r0 + 8; ++r)  // the diagonal block
      for (int64_t c = r0; c < r; ++c) C[r * ldc + c] = C[c * ldc + r];
  }
  for (int64_t r = full; r < m; ++r)
    for (int64_t c = 0; c < r; ++c) C[r * ldc + c] = C[c * ldc + r];
}
#endif

// The blocking of nt_packed, shared with gemm_bf16.h: C[m, n] (row stride ldc) from panels of
// depth `depth` (packed words: floats here, bfloat16 pairs there) in slivers of MR rows of
// A and NR rows of B, calling kernel(kc, a, b, c, ldc, accumulate, rows, cols) per
// micro-tile. Rows go in blocks of MC, and each block runs all depth blocks (KC words)
// before the next, so its [MC, n] slice of C stays in L2 while it accumulates (for n up to
// ~256); B slivers stay in L1 across a block's micro-tiles. With `upper_only` (m == n)
// micro-tiles wholly below the diagonal are skipped.
template <int64_t MR, int64_t NR, int64_t KC, int64_t MC, typename Kernel>
inline void for_each_micro_tile(int64_t m, int64_t n, int64_t depth, const float* ap, const float* bp,
                                float* C, int64_t ldc, bool upper_only, Kernel kernel) {
  if (depth == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
    return;
  }
  const int64_t m_pad = round_up(m, MR), n_pad = round_up(n, NR);
  for (int64_t i0 = 0; i0 < m; i0 += MC) {
    const int64_t mc = std::min(MC, m - i0);
    for (int64_t p0 = 0; p0 < depth; p0 += KC) {
      const int64_t kc = std::min(KC, depth - p0);
      const float* a = ap + m_pad * p0 + i0 * kc;
      const float* b = bp + n_pad * p0;
      for (int64_t j = 0; j < n; j += NR) {
        const int64_t cols = std::min(NR, n - j);
        for (int64_t i = 0; i < mc; i += MR) {
          if (upper_only && j + NR <= i0 + i) continue;  // wholly below the diagonal
          kernel(kc, a + i * kc, b + j * kc, C + (i0 + i) * ldc + j, ldc, p0 > 0, std::min(MR, mc - i), cols);
        }
      }
    }
  }
}

// C[m, n] (row stride ldc) = A . B^T from panels packed by pack_panel (A with kMR, B with
// kNR, 32-byte aligned). Requires available().
// With `symmetric` (A and B the same rows, m == n) only micro-tiles that reach the diagonal
// or above are computed, and the rest of C is mirrored from them: half the work. The
// mirrored values are bit-equal to computed ones (the same products in the same order).
inline void nt_packed(int64_t m, int64_t n, int64_t d, const float* ap, const float* bp, float* C,
                      int64_t ldc, bool symmetric = false) {
#if SLSG_GEMM_AVX2
  for_each_micro_tile<kMR, kNR, kKC, kMC>(m, n, d, ap, bp, C, ldc, symmetric,
                                          [](auto... tile) { micro_kernel(tile...); });
  if (symmetric && d > 0) mirror_upper(C, m, ldc);
#else
  (void)m, (void)n, (void)d, (void)ap, (void)bp, (void)C, (void)ldc, (void)symmetric;
#endif
}

}  // namespace gemm
}  // namespace slsg
