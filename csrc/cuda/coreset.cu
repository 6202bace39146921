// CUDA k-center greedy (PatchCore coreset) selection.
//
// Per step, one kernel updates every point's nearest-centre distance (a warp per row,
// double accumulation as on CPU so selections match the reference) and reduces a per-block
// argmax; a one-block kernel then picks the winner and publishes it in device memory for
// the next step, so the host never synchronises inside the loop.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"

namespace slsg {
namespace {

// float64 as it is; the other types through float (half and bfloat16 convert to float).
template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Best {
  double value;
  int64_t index;
};

// Larger value wins; equal values go to the lower index (matches torch.argmax).
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best o{__shfl_down_sync(0xffffffff, b.value, offset),
           __shfl_down_sync(0xffffffff, b.index, offset)};
    b = better(b, o);
  }
  return b;
}

template <typename scalar_t>
__global__ void update_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t D,
                              const int64_t* __restrict__ last, double* __restrict__ min_dist,
                              double* __restrict__ block_value, int64_t* __restrict__ block_index) {
  __shared__ Best shared[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const scalar_t* center = x + (*last) * D;
  Best best{-1.0, -1};
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < N; row += total_warps) {
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
      // Exact for int8 (integers) and float32 inputs alike: differences of float32 values
      // are exact in double. float64 is read as it is.
      const double diff = to_double(x[row * D + d]) - to_double(center[d]);
      s += diff * diff;
    }
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffff, s, offset);
    if (lane == 0) {
      double m = min_dist[row];
      if (m >= 0.0 && s < m) min_dist[row] = m = s;
      best = better(best, Best{m, row});
    }
  }
  if (lane == 0) shared[warp] = best;
  __syncthreads();
  if (warp == 0) {
    Best b = lane < kWarps ? shared[lane] : Best{-1.0, -1};
    b = warp_best(b);
    if (lane == 0) {
      block_value[blockIdx.x] = b.value;
      block_index[blockIdx.x] = b.index;
    }
  }
}

__global__ void select_kernel(const double* __restrict__ block_value,
                              const int64_t* __restrict__ block_index, int num_blocks,
                              double* __restrict__ min_dist, int64_t* __restrict__ last,
                              int64_t* __restrict__ out) {
  __shared__ Best shared[32];
  Best best{-1.0, -1};
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x)
    best = better(best, Best{block_value[b], block_index[b]});
  best = warp_best(best);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = best;
  __syncthreads();
  if (warp == 0) {
    Best b = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : Best{-1.0, -1};
    b = warp_best(b);
    if (lane == 0) {
      *out = b.index;
      *last = b.index;
      min_dist[b.index] = -1.0;  // selected points never win again
    }
  }
}

at::Tensor greedy_coreset_cuda(const at::Tensor& x_in, int64_t n, int64_t start) {
  check_greedy_coreset_args(x_in, n, start);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16 || dtype == at::kChar,
              "greedy_coreset on CUDA supports float32, float64, float16, bfloat16 and int8, got ", dtype);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(dtype == at::kChar || at::isfinite(x).all().item<bool>(),
              "greedy_coreset: x contains NaN or Inf");
  const int64_t N = x.size(0), D = x.size(1);
  auto opts = x.options();
  at::Tensor selected = at::empty({n}, opts.dtype(at::kLong));
  at::Tensor min_dist = at::full({N}, std::numeric_limits<double>::infinity(), opts.dtype(at::kDouble));
  min_dist.index_put_({start}, -1.0);
  selected.index_put_({0}, start);
  at::Tensor last = at::full({1}, start, opts.dtype(at::kLong));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>(4 * sms, (N + kWarps - 1) / kWarps));
  at::Tensor block_value = at::empty({blocks}, opts.dtype(at::kDouble));
  at::Tensor block_index = at::empty({blocks}, opts.dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, dtype, "greedy_coreset_cuda", [&] {
    for (int64_t step = 1; step < n; ++step) {
      update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), N, D, last.data_ptr<int64_t>(), min_dist.data_ptr<double>(),
          block_value.data_ptr<double>(), block_index.data_ptr<int64_t>());
      select_kernel<<<1, 1024, 0, stream>>>(block_value.data_ptr<double>(),
                                            block_index.data_ptr<int64_t>(), blocks,
                                            min_dist.data_ptr<double>(), last.data_ptr<int64_t>(),
                                            selected.data_ptr<int64_t>() + step);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return selected;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CUDA, m) { m.impl("greedy_coreset", &greedy_coreset_cuda); }

}  // namespace slsg
