// Device helpers shared by the CUDA graph kernels (graph.cu, graph_attention.cu).
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

namespace slsg {
namespace graph_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(a - b) that is 0 (not NaN) when a is -inf, including when b is -inf too.
template <typename T>
__device__ __forceinline__ T exp_shifted(T a, T b) {
  return a == neg_inf<T>() ? T(0) : exp(a - b);
}

// A softmax shift: m itself, or 0 when m is -inf (a fully masked row or tile), so that
// exp_shifted gives 0 there rather than NaN (the CPU kernels' finite_or_zero).
template <typename T>
__device__ __forceinline__ T shift_or_zero(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// float32 accumulation for float32 / float16 / bfloat16; float64 for float64.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline unsigned blocks_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "graph op: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Calls f(std::integral_constant<int, V>) with V the smallest power of two in {1, 2, 4, 8},
// capped at max_v, such that 32 * V covers `width` features per lane group.
template <typename F>
void dispatch_values_per_lane(int64_t width, int max_v, F&& f) {
  int v = 1;
  while (v < max_v && 32 * v < width) v *= 2;
  switch (v) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace graph_cuda
}  // namespace slsg
