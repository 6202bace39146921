// CPU kernels for nearest-normal scoring: sphere_distance and topk_mean.
//
// sphere_distance expands ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c so the heavy part is a
// GEMM on [Mb, D] x [D, Kb] blocks (BLAS speed, like faiss), followed by a streaming
// k-smallest selection over each block row. Memory is bounded by the block buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../selection.h"

namespace slsg {
namespace {

// Block buffer of at most 8 MiB: fits the L3 cache, keeps extra memory small.
constexpr int64_t kBlockElems = 2 * 1024 * 1024;
constexpr int64_t kCenterBlock = 4096;

template <typename scalar_t>
void sphere_distance_kernel(const at::Tensor& x, const at::Tensor& centers,
                            const at::Tensor& center_offset, const at::Tensor& radius_sq,
                            int64_t k, at::Tensor& dist, at::Tensor& index) {
  const int64_t M = x.size(0), K = centers.size(0);
  const int64_t kb_max = std::min<int64_t>(K, kCenterBlock);
  const int64_t mb_max = std::max<int64_t>(1, std::min<int64_t>(M, kBlockElems / kb_max));
  at::Tensor buffer = at::empty({mb_max * kb_max}, x.options());
  at::Tensor x_norm = x.square().sum(1);
  TORCH_CHECK(at::isfinite(x_norm).all().item<bool>(),
              "sphere_distance: x contains NaN or Inf (or values too large to square)");

  const scalar_t* xn = x_norm.data_ptr<scalar_t>();
  const scalar_t* cn = center_offset.data_ptr<scalar_t>();
  const scalar_t* r2 = radius_sq.defined() ? radius_sq.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_d = dist.data_ptr<scalar_t>();
  int64_t* out_i = index.data_ptr<int64_t>();

  for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
    const int64_t mb = std::min(mb_max, M - m0);
    at::Tensor xb = x.narrow(0, m0, mb);
    for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
      const int64_t kb = std::min(kb_max, K - k0);
      at::Tensor dots = buffer.narrow(0, 0, mb * kb).view({mb, kb});
      at::mm_out(dots, xb, centers.narrow(0, k0, kb).t());
      const scalar_t* dp = dots.data_ptr<scalar_t>();
      at::parallel_for(0, mb, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = m0 + i;
          scan_block<scalar_t>(dp + i * kb, 1, xn[row], cn + k0, r2 ? r2 + k0 : nullptr, k0, kb,
                               out_d + row * k, out_i + row * k, k);
        }
      });
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sphere_distance_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& centers_in,
                                                       const std::optional<at::Tensor>& radii,
                                                       int64_t k) {
  check_sphere_distance_args(x_in, centers_in, radii, k);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "sphere_distance on CPU supports float32 and float64, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor centers = centers_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor dist = at::full({M, k}, std::numeric_limits<double>::infinity(), x.options());
  at::Tensor index = at::full({M, k}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {dist, index};

  // ||c||^2 - r^2 is all the kernel needs per centre; r^2 alone serves the clamp.
  at::Tensor center_offset = centers.square().sum(1);
  TORCH_CHECK(at::isfinite(center_offset).all().item<bool>(),
              "sphere_distance: centers contain NaN or Inf (or values too large to square)");
  at::Tensor radius_sq;
  if (radii.has_value()) {
    radius_sq = radii->to(x.scalar_type()).contiguous().square();
    TORCH_CHECK(at::isfinite(radius_sq).all().item<bool>(), "sphere_distance: radii contain NaN or Inf");
    center_offset = center_offset - radius_sq;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sphere_distance_cpu", [&] {
    sphere_distance_kernel<scalar_t>(x, centers, center_offset, radius_sq, k, dist, index);
  });
  return {dist, index};
}

template <typename scalar_t>
void topk_mean_kernel(const at::Tensor& scores, int64_t k, at::Tensor& out) {
  const int64_t B = scores.size(0), L = scores.size(1);
  const scalar_t* s = scores.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = s + b * L;
      if (std::any_of(row, row + L, [](scalar_t v) { return std::isnan(v); })) {
        o[b] = std::numeric_limits<scalar_t>::quiet_NaN();  // as torch.topk: NaN ranks highest
        continue;
      }
      if (k == 1) {
        o[b] = *std::max_element(row, row + L);
        continue;
      }
      scratch.assign(row, row + L);
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                       std::greater<scalar_t>());
      double sum = 0.0;  // double accumulation keeps large k exact enough
      for (int64_t j = 0; j < k; ++j) sum += scratch[j];
      o[b] = static_cast<scalar_t>(sum / static_cast<double>(k));
    }
  });
}

at::Tensor topk_mean_cpu(const at::Tensor& scores_in, int64_t k) {
  check_topk_mean_args(scores_in, k);
  TORCH_CHECK(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
              "topk_mean on CPU supports float32 and float64, got ", scores_in.scalar_type());
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor out = at::empty({scores.size(0)}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "topk_mean_cpu",
                             [&] { topk_mean_kernel<scalar_t>(scores, k, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) {
  m.impl("sphere_distance", &sphere_distance_cpu);
  m.impl("topk_mean", &topk_mean_cpu);
}

}  // namespace slsg
