// Argument checks shared by the CPU and CUDA kernels. The Python layer gives friendlier
// messages first; these guard direct C++ / torch.ops callers.
#pragma once
#include <ATen/ATen.h>

namespace slsg {

inline void check_sphere_distance_args(const at::Tensor& x, const at::Tensor& centers,
                                       const std::optional<at::Tensor>& radii, int64_t k) {
  TORCH_CHECK(x.dim() == 2, "sphere_distance: x must be 2-D [M, D], got shape ", x.sizes());
  TORCH_CHECK(centers.dim() == 2, "sphere_distance: centers must be 2-D [K, D], got shape ",
              centers.sizes());
  TORCH_CHECK(x.size(1) == centers.size(1), "sphere_distance: feature sizes differ: x has D=",
              x.size(1), ", centers has D=", centers.size(1));
  TORCH_CHECK(x.scalar_type() == centers.scalar_type(), "sphere_distance: dtype mismatch: x is ",
              x.scalar_type(), ", centers is ", centers.scalar_type());
  TORCH_CHECK(x.device() == centers.device(), "sphere_distance: device mismatch: x on ",
              x.device(), ", centers on ", centers.device());
  TORCH_CHECK(centers.size(0) > 0, "sphere_distance: centers is empty");
  TORCH_CHECK(x.size(1) > 0, "sphere_distance: feature size D must be > 0");
  TORCH_CHECK(k >= 1 && k <= centers.size(0), "sphere_distance: k must be in [1, K=",
              centers.size(0), "], got ", k);
  if (radii.has_value()) {
    const auto& r = *radii;
    TORCH_CHECK(r.dim() == 1 && r.size(0) == centers.size(0),
                "sphere_distance: radii must be [K]=[", centers.size(0), "], got ", r.sizes());
    TORCH_CHECK(r.device() == centers.device(), "sphere_distance: radii on ", r.device(),
                ", centers on ", centers.device());
  }
}

inline void check_topk_mean_args(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2, "topk_mean: scores must be 2-D [B, L], got ", scores.sizes());
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "topk_mean: k must be in [1, L=", scores.size(1),
              "], got ", k);
}

inline void check_greedy_coreset_args(const at::Tensor& x, int64_t n, int64_t start) {
  TORCH_CHECK(x.dim() == 2, "greedy_coreset: x must be 2-D [N, D], got ", x.sizes());
  TORCH_CHECK(n >= 1 && n <= x.size(0), "greedy_coreset: n must be in [1, N=", x.size(0),
              "], got ", n);
  TORCH_CHECK(start >= 0 && start < x.size(0), "greedy_coreset: start must be in [0, N), got ",
              start);
}

}  // namespace slsg
