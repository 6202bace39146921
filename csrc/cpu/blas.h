// Row-major GEMM on raw pointers, C = alpha * op(A) . op(B) + beta * C, for the attention
// tiles: our strided kernel where it measured faster (below), else the BLAS that torch
// itself links, called directly.
//
// Why: the dense attention kernels run hundreds of small products per call and thread
// (tiles of 256 x 512 against head sizes down to 32), where MKL packs the large tile on every
// call; our kernel reads it in place (gemm.h, strided_product, with the measurements). The
// other products need no tensor views this way (calling MKL directly rather than through
// ATen measured no faster by itself: 88.7 against 88.5 ms, 8 heads, N = 1024, forward).
//
// The Fortran symbols (sgemm_, dgemm_: what torch's MKL and OpenBLAS builds export) are
// weak references, resolved when the library loads. Where a torch build exports none, or
// SLSG_CPU_BLAS=aten is set (how the tests cover this path), the products go through
// at::addmm_out on views of the same memory instead: same results up to rounding.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "gemm.h"  // the strided kernel, available(), env_is

// Weak undefined symbols behave this way on ELF (Linux); elsewhere the ATen path is used.
#if defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define SLSG_BLAS_DIRECT 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#else
#define SLSG_BLAS_DIRECT 0
#endif

namespace slsg {
namespace blas {

enum class Op { N, T };  // op(X) = X or X^T

// Whether products go straight to the BLAS symbols (checked once).
inline bool direct() {
#if SLSG_BLAS_DIRECT
  static const bool ok = sgemm_ != nullptr && dgemm_ != nullptr && !gemm::env_is("SLSG_CPU_BLAS", "aten");
  return ok;
#else
  return false;
#endif
}

// Our strided kernel (gemm.h) takes the float products with beta 0 or 1, except A^T . B^T
// and A . B^T of depth below this (there MKL was faster: 92 against 89 GFLOP/s at k = 32).
constexpr int64_t kStridedMinDepthNT = 64;

// op(A) is [m, k], op(B) is [k, n], C is [m, n]; each matrix row-major with leading
// dimension ld (its row stride as stored, before op). beta == 0 ignores C's old contents.
template <typename T>
void gemm(Op opa, Op opb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (alpha == T(0)) {  // as BLAS: A and B are not read (so 0 * inf gives no NaN)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
#if SLSG_GEMM_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const bool nt = opa == Op::N && opb == Op::T;
    if (gemm::available() && (beta == 0 || beta == 1) && (opb == Op::N || (nt && k >= kStridedMinDepthNT))) {
      if (nt) {
        gemm::strided_product<false, true>(m, n, k, alpha, a, lda, b, ldb, beta == 1, c, ldc);
      } else if (opa == Op::N) {
        gemm::strided_product<false, false>(m, n, k, alpha, a, lda, b, ldb, beta == 1, c, ldc);
      } else {
        gemm::strided_product<true, false>(m, n, k, alpha, a, lda, b, ldb, beta == 1, c, ldc);
      }
      return;
    }
  }
#endif
#if SLSG_BLAS_DIRECT
  const bool fits = std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX;
  if (direct() && fits && k > 0) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1));
    const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
    const char ta = opb == Op::N ? 'N' : 'T', tb = opa == Op::N ? 'N' : 'T';
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    } else {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    }
    return;
  }
#endif
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, Op op, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is [rows, cols]; X is stored [rows, cols] (N) or [cols, rows] (T).
    const at::Tensor stored = op == Op::N ? at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options)
                                          : at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options);
    return op == Op::N ? stored : stored.t();
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::addmm_out(C, C, view(a, opa, m, k, lda), view(b, opb, k, n, ldb), beta, alpha);
}

}  // namespace blas
}  // namespace slsg
