// CUDA kernels for nearest-normal scoring: sphere_distance and topk_mean.
//
// sphere_distance: cuBLAS computes a [Kb, Mb] block of dot products (transposed so that
// thread i reading row i walks memory coalesced with its neighbours), then one thread per
// query streams the block through the shared k-smallest selection. Inputs in half
// precision are converted block by block to float32, so accumulation is float32 and extra
// memory stays bounded by the block sizes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../selection.h"

namespace slsg {
namespace {

constexpr int64_t kQueryBlock = 16384;
constexpr int64_t kCenterBlock = 2048;
constexpr int kThreads = 256;

template <typename acc_t>
__global__ void scan_blocks_kernel(const acc_t* __restrict__ dots, int64_t mb, int64_t kb,
                                   const acc_t* __restrict__ x_norm,
                                   const acc_t* __restrict__ center_offset,
                                   const acc_t* __restrict__ radius_sq, int64_t k0,
                                   acc_t* __restrict__ dist, int64_t* __restrict__ index,
                                   int64_t k) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= mb) return;
  scan_block<acc_t>(dots + i, mb, x_norm[i], center_offset + k0,
                    radius_sq ? radius_sq + k0 : nullptr, k0, kb, dist + i * k, index + i * k, k);
}

// ||row||^2 of a [R, D] tensor in the accumulation dtype, converting chunk by chunk.
at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor out = at::empty({t.size(0)}, t.options().dtype(acc));
  for (int64_t r0 = 0; r0 < t.size(0); r0 += kQueryBlock) {
    const int64_t rb = std::min(kQueryBlock, t.size(0) - r0);
    out.narrow(0, r0, rb).copy_(t.narrow(0, r0, rb).to(acc).square().sum(1));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sphere_distance_cuda(const at::Tensor& x_in,
                                                        const at::Tensor& centers_in,
                                                        const std::optional<at::Tensor>& radii,
                                                        int64_t k) {
  check_sphere_distance_args(x_in, centers_in, radii, k);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "sphere_distance on CUDA supports float32, float64, float16 and bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor centers = centers_in.contiguous();
  const int64_t M = x.size(0), K = centers.size(0);
  at::Tensor dist = at::full({M, k}, std::numeric_limits<double>::infinity(), x.options().dtype(acc));
  at::Tensor index = at::full({M, k}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {dist, index};

  at::Tensor x_norm = row_norms(x, acc);
  at::Tensor center_offset = row_norms(centers, acc);
  TORCH_CHECK(at::isfinite(x_norm).all().item<bool>(), "sphere_distance: x contains NaN or Inf");
  TORCH_CHECK(at::isfinite(center_offset).all().item<bool>(),
              "sphere_distance: centers contain NaN or Inf");
  at::Tensor radius_sq;
  if (radii.has_value()) {
    radius_sq = radii->to(acc).contiguous().square();
    TORCH_CHECK(at::isfinite(radius_sq).all().item<bool>(), "sphere_distance: radii contain NaN or Inf");
    center_offset = center_offset - radius_sq;
  }

  const int64_t mb_max = std::min(M, kQueryBlock), kb_max = std::min(K, kCenterBlock);
  at::Tensor buffer = at::empty({mb_max * kb_max}, x.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
    const int64_t mb = std::min(mb_max, M - m0);
    const at::Tensor xb = x.narrow(0, m0, mb).to(acc);
    for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
      const int64_t kb = std::min(kb_max, K - k0);
      at::Tensor dots = buffer.narrow(0, 0, mb * kb).view({kb, mb});
      at::mm_out(dots, centers.narrow(0, k0, kb).to(acc), xb.t());
      const int blocks = static_cast<int>((mb + kThreads - 1) / kThreads);
      AT_DISPATCH_FLOATING_TYPES(acc, "sphere_distance_cuda", [&] {
        scan_blocks_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            dots.data_ptr<scalar_t>(), mb, kb, x_norm.data_ptr<scalar_t>() + m0,
            center_offset.data_ptr<scalar_t>(),
            radius_sq.defined() ? radius_sq.data_ptr<scalar_t>() : nullptr, k0,
            dist.data_ptr<scalar_t>() + m0 * k, index.data_ptr<int64_t>() + m0 * k, k);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {dist, index};
}

// topk_mean on CUDA uses ATen's topk (a tuned radix select) with float32 accumulation.
at::Tensor topk_mean_cuda(const at::Tensor& scores, int64_t k) {
  check_topk_mean_args(scores, k);
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = scores.to(acc);
  at::Tensor out = k == 1 ? std::get<0>(s.max(1)) : std::get<0>(s.topk(k, 1)).sum(1) / k;
  return out.to(scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CUDA, m) {
  m.impl("sphere_distance", &sphere_distance_cuda);
  m.impl("topk_mean", &topk_mean_cuda);
}

}  // namespace slsg
