// Single-threaded C ~= A . B^T with both operands rounded to bfloat16 and float32
// accumulation, for row-major float32 A [m, d] and B [n, d]: the screening products of
// sphere_distance (scoring.cpp).
//
// Why: AVX-512 BF16's vdpbf16ps does two multiply-adds per float32 lane, twice the work of
// a float32 FMA per instruction, so the screen runs at about twice the speed of the exact
// product (gemm.h) on CPUs that have it (AMD Zen 4 and later, Intel Cooper Lake, Sapphire
// Rapids and later). Its values are approximate: callers bound their error (8 significant
// bits per operand, float32 sums) and compute the few candidates that the bound cannot
// rule out exactly. Built with function target attributes; callers ask available().
//
// Layout: an operand is first rounded to bfloat16 row by row, two depth values (a "pair")
// per 32-bit word, then packed like gemm.h's panels, with pairs in place of floats: the
// packing code is gemm::pack, which only moves 32-bit words.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "gemm.h"

// Compilers that know the AVX-512 BF16 intrinsics (GCC 10, Clang 11); older ones build
// without the screen.
#if SLSG_GEMM_AVX2 && ((defined(__clang__) && __clang_major__ >= 11) || \
                       (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define SLSG_GEMM_BF16 1
#else
#define SLSG_GEMM_BF16 0
#endif

namespace slsg {
namespace gemm_bf16 {

constexpr int64_t kMR = 12;   // rows of A per micro-tile (broadcast pairs)
constexpr int64_t kNR = 32;   // rows of B per micro-tile (two 16-lane vectors)
constexpr int64_t kKC = 128;  // pairs per packed depth block: a B sliver (16 KiB) stays in L1
constexpr int64_t kMC = 96;   // rows of A per pass over B: their [96, n] slice of C stays in L2

inline int64_t pairs(int64_t d) { return (d + 1) / 2; }

// Whether this CPU runs the AVX-512 BF16 kernel (checked once). SLSG_CPU_SCREEN=off in the
// environment turns the screen off (how the tests compare screened and exact results).
inline bool available() {
#if SLSG_GEMM_BF16
  static const bool ok = gemm::available() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16") && !gemm::env_is("SLSG_CPU_SCREEN", "off");
  return ok;
#else
  return false;
#endif
}

// 32-bit words taken by pack_panel(rows, d, width).
inline int64_t panel_size(int64_t rows, int64_t d, int64_t width) {
  return gemm::round_up(rows, width) * pairs(d);
}

#if SLSG_GEMM_BF16

// Rows [0, rows) of M (leading dimension ld, d columns) minus shift[0, d) (in float32),
// rounded to bfloat16 (round to nearest even; the instruction flushes subnormal inputs to
// zero) into out: row r holds pairs(d) 32-bit words at out + r * pairs(d), an odd d padded
// with a zero.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void round_rows(
    const float* M, int64_t ld, int64_t rows, int64_t d, const float* shift, float* out) {
  const int64_t width = 2 * pairs(d);  // bfloat16 values per output row
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = M + r * ld;
    auto* dst = reinterpret_cast<char*>(out + r * pairs(d));
    int64_t p = 0;
    for (; p + 16 <= d; p += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_sub_ps(_mm512_loadu_ps(src + p), _mm512_loadu_ps(shift + p)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * p), (__m256i)v);
    }
    if (p < width) {
      const __mmask16 valid = static_cast<__mmask16>((1u << (d - p)) - 1);
      const __m512 tail = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, src + p), _mm512_maskz_loadu_ps(valid, shift + p));
      const __m256bh v = _mm512_cvtneps_pbh(tail);
      _mm256_mask_storeu_epi16(dst + 2 * p, static_cast<__mmask16>((1u << (width - p)) - 1), (__m256i)v);
    }
  }
}

// C[12 x 32] (+)= a-sliver . b-sliver over kc pairs; rows/cols limit what is written.
__attribute__((target("avx512f,avx512bf16"))) inline void micro_kernel(int64_t kc, const float* a,
                                                                       const float* b, float* c,
                                                                       int64_t ldc, bool accumulate,
                                                                       int64_t rows, int64_t cols) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_ps(b), b1 = (__m512bh)_mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_ps(a[r]);  // the pair of row r, in every lane
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
    a += kMR;
    b += kNR;
  }
  const __mmask16 lo = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __mmask16 hi = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) {
    if (r >= rows) break;
    float* cr = c + r * ldc;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, cr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, lo, v0);
    _mm512_mask_storeu_ps(cr + 16, hi, v1);
  }
}

#endif  // SLSG_GEMM_BF16

// Rows [0, rows) of M minus shift as a panel for nt_packed (width kMR for A, kNR for B);
// `scratch` holds the rounded rows on the way.
inline void pack_panel(const float* M, int64_t ld, int64_t rows, int64_t d, int64_t width,
                       const float* shift, std::vector<float>& scratch, float* out) {
#if SLSG_GEMM_BF16
  const int64_t dp = pairs(d);
  if (static_cast<int64_t>(scratch.size()) < rows * dp) scratch.resize(rows * dp);
  round_rows(M, ld, rows, d, shift, scratch.data());
  const int64_t rows_pad = gemm::round_up(rows, width);
  for (int64_t p0 = 0; p0 < dp; p0 += kKC)
    gemm::pack(scratch.data(), dp, rows, p0, std::min(kKC, dp - p0), width, out + rows_pad * p0);
#else
  (void)M, (void)ld, (void)rows, (void)d, (void)width, (void)shift, (void)scratch, (void)out;
#endif
}

// C[m, n] (row stride ldc) ~= A . B^T from panels packed by pack_panel (A with kMR, B with
// kNR) of depth d. Requires available(). The loop order is gemm::nt_packed's.
inline void nt_packed(int64_t m, int64_t n, int64_t d, const float* ap, const float* bp, float* C,
                      int64_t ldc) {
#if SLSG_GEMM_BF16
  gemm::for_each_micro_tile<kMR, kNR, kKC, kMC>(m, n, pairs(d), ap, bp, C, ldc, false,
                                                [](auto... tile) { micro_kernel(tile...); });
#else
  (void)m, (void)n, (void)d, (void)ap, (void)bp, (void)C, (void)ldc;
#endif
}

}  // namespace gemm_bf16
}  // namespace slsg
