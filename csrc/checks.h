// Argument checks shared by the CPU and CUDA kernels. The Python layer gives friendlier
// messages first; these guard direct C++ / torch.ops callers.
#pragma once
#include <cmath>
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
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "topk_mean: scores must be floating point, got ",
              scores.scalar_type());
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "topk_mean: k must be in [1, L=", scores.size(1),
              "], got ", k);
}

// ||x||^2 + ||c||^2 - 2 x.c lies within (||x|| + ||c||)^2: when that fits the accumulation
// type, no value overflows (an overflowing value would rank as +inf with an arbitrary index).
inline void check_expansion_fits(double max_x_norm_sq, double max_center_norm_sq, double limit) {
  const double reach = std::sqrt(max_x_norm_sq) + std::sqrt(max_center_norm_sq);
  TORCH_CHECK(reach * reach <= limit, "sphere_distance: x and centers are too large for this dtype "
              "(||x||^2 + ||c||^2 - 2 x.c overflows: max ||x||^2 = ", max_x_norm_sq, ", max ||c||^2 = ",
              max_center_norm_sq, "); rescale them");
}

inline void check_greedy_coreset_args(const at::Tensor& x, int64_t n, int64_t start) {
  TORCH_CHECK(x.dim() == 2, "greedy_coreset: x must be 2-D [N, D], got ", x.sizes());
  TORCH_CHECK(n >= 1 && n <= x.size(0), "greedy_coreset: n must be in [1, N=", x.size(0),
              "], got ", n);
  TORCH_CHECK(start >= 0 && start < x.size(0), "greedy_coreset: start must be in [0, N), got ",
              start);
}

// ---- graph ops -------------------------------------------------------------------------

// index must be int64 [B, N, K] on x's device with values in [0, n_source). The value range
// is checked on the data (one reduction): an out-of-range neighbour would read out of bounds.
inline void check_graph_index(const char* op, const at::Tensor& index, int64_t B, int64_t N,
                              int64_t n_source, const at::Tensor& like) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 3 && index.size(0) == B && index.size(1) == N,
              op, ": index must be [B, N, K] = [", B, ", ", N, ", K], got ", index.sizes());
  TORCH_CHECK(index.size(2) >= 1, op, ": index needs K >= 1 neighbours per node");
  TORCH_CHECK(index.device() == like.device(), op, ": index on ", index.device(), ", features on ",
              like.device());
  if (index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(index);
    const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
    TORCH_CHECK(low >= 0 && high < n_source, op, ": index values must be in [0, N=", n_source,
                "), got values in [", low, ", ", high, "]");
  }
}

// For tensors whose dtype may differ from ref's (gradients, saved statistics).
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " on ", t.device(), ", expected ",
              ref.device());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " on ", t.device(), ", expected ",
              ref.device());
}

inline void check_knn_graph_args(const at::Tensor& x, int64_t k, int64_t dilation,
                                 const std::optional<at::Tensor>& bias, bool include_self) {
  TORCH_CHECK(x.dim() == 3, "knn_graph: x must be 3-D [B, N, C], got ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, "knn_graph: feature size C must be > 0");
  const int64_t N = x.size(1), candidates = include_self ? N : N - 1;
  TORCH_CHECK(k >= 1 && dilation >= 1, "knn_graph: k and dilation must be >= 1, got k=", k,
              ", dilation=", dilation);
  // Divided, not multiplied: k * dilation can overflow int64 for a direct op call.
  TORCH_CHECK(N == 0 || (k <= candidates && dilation <= candidates / k), "knn_graph: k * dilation = ",
              k, " * ", dilation, " exceeds the ", candidates, " candidate neighbours (N=", N,
              include_self ? ")" : ", self excluded)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == N && bias->size(1) == N,
                "knn_graph: bias must be [N, N] = [", N, ", ", N, "], got ", bias->sizes());
    check_same("knn_graph", "bias", *bias, x);
  }
}

inline void check_max_relative_args(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 3, "max_relative: x must be 3-D [B, N, C], got ", x.sizes());
  check_graph_index("max_relative", index, x.size(0), x.size(1), x.size(1), x);
}

// q, k [B, H, Nq|Nk, D], v [B, H, Nk, Dv] with one dtype and device.
inline void check_attention_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D [B, H, N, D], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must be [B, H, N, D] like q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op,
              ": v must be [B, H, N, Dv] with k's first three sizes ", k.sizes(), ", got ",
              v.sizes());
  check_same(op, "k", k, q);
  check_same(op, "v", v, q);
}

inline void check_sparse_attention_args(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& index,
                                        const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_graph_attention";
  check_attention_qkv(op, q, k, v);
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q and k must have the same N, got ", q.size(2),
              " and ", k.size(2));
  check_graph_index(op, index, q.size(0), q.size(2), k.size(2), q);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 4 && bias->size(0) == q.size(0) && bias->size(1) == q.size(1) &&
                    bias->size(2) == q.size(2) && bias->size(3) == index.size(2),
                op, ": bias must be [B, H, N, K] = [", q.size(0), ", ", q.size(1), ", ", q.size(2),
                ", ", index.size(2), "], got ", bias->sizes());
    check_same(op, "bias", *bias, q);
  }
}

inline void check_dense_attention_args(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const std::optional<at::Tensor>& bias) {
  const char* op = "dense_graph_attention";
  check_attention_qkv(op, q, k, v);
  TORCH_CHECK(k.size(2) >= 1 || q.size(2) == 0, op, ": k and v need at least one node");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == q.size(1) && bias->size(1) == q.size(2) &&
                    bias->size(2) == k.size(2),
                op, ": bias must be [H, Nq, Nk] = [", q.size(1), ", ", q.size(2), ", ", k.size(2),
                "], got ", bias->sizes());
    check_same(op, "bias", *bias, q);
  }
}

// The backward's extra inputs: grad_out [B, H, N, Dv] and lse [B, H, N] on q's device (their
// dtype may differ; the kernels convert them).
inline void check_sparse_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& lse,
                                                 const at::Tensor& q, const at::Tensor& v) {
  const char* op = "sparse_graph_attention_backward";
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, N, Dv}), op, ": grad_out must be [B, H, N, Dv] = [", B,
              ", ", H, ", ", N, ", ", Dv, "], got ", grad_out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, N}), op, ": lse must be [B, H, N] = [", B, ", ", H, ", ", N,
              "], got ", lse.sizes());
  check_same_device(op, "grad_out", grad_out, q);
  check_same_device(op, "lse", lse, q);
}

// grad_out and out [B, H, Nq, Dv], lse [B, H, Nq] on q's device.
inline void check_dense_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& out,
                                                const at::Tensor& lse, const at::Tensor& q,
                                                const at::Tensor& v) {
  const char* op = "dense_graph_attention_backward";
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, Nq, Dv}) && out.sizes() == grad_out.sizes(), op,
              ": grad_out and out must be [B, H, Nq, Dv] = [", B, ", ", H, ", ", Nq, ", ", Dv, "], got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, Nq}), op, ": lse must be [B, H, Nq] = [", B, ", ", H, ", ",
              Nq, "], got ", lse.sizes());
  check_same_device(op, "grad_out", grad_out, q);
  check_same_device(op, "out", out, q);
  check_same_device(op, "lse", lse, q);
}

}  // namespace slsg
