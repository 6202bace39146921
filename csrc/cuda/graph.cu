// CUDA kernels for graph construction and aggregation: knn_graph and max_relative.
//
// knn_graph: cuBLAS computes the cosine similarities of a block of R rows against all N
// nodes, stored transposed ([N, R]) so that thread r, scanning node j, reads next to its
// neighbours (coalesced). Each thread streams its row through the shared sorted-insertion
// selection (selection.h) on negated similarities: scanning j in increasing order and
// shifting only strictly worse entries keeps ties at the lowest index. Memory is bounded by
// the block buffer, never [B, N, N].
//
// max_relative: one thread per (node, channel); the backward recomputes the argmax and
// scatters with atomics into a float32 (float64) buffer, then casts.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../selection.h"
#include "graph_common.cuh"

namespace slsg {
namespace {

using namespace graph_cuda;

constexpr int64_t kMaxSimilarities = 32 * 1024 * 1024;  // block buffer: 128 MiB in float32
constexpr int kThreads = 256;
constexpr double kCosineEps = 1e-12;

template <typename acc_t>
__global__ void knn_select_kernel(const acc_t* __restrict__ sims, int64_t groups, int64_t N,
                                  int64_t R, int64_t r0, bool include_self, int64_t span,
                                  int64_t k, int64_t dilation, acc_t* __restrict__ vals,
                                  int64_t* __restrict__ idx, int64_t* __restrict__ out) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= groups * R) return;
  const int64_t g = t / R, r = t % R, i = r0 + r;
  acc_t* v = vals + t * span;
  int64_t* ix = idx + t * span;
  for (int64_t s = 0; s < span; ++s) {
    v[s] = std::numeric_limits<acc_t>::infinity();
    ix[s] = -1;
  }
  const acc_t* column = sims + g * N * R + r;
  for (int64_t j = 0; j < N; ++j) {
    if (!include_self && j == i) continue;
    const acc_t value = -column[j * R];  // ascending negated similarity = descending similarity
    if (ix[span - 1] < 0 || value < v[span - 1]) insert_sorted<acc_t>(v, ix, span, value, j);
  }
  int64_t* o = out + (g * N + i) * k;
  for (int64_t s = 0; s < k; ++s) o[s] = ix[s * dilation];
}

void check_cuda_dtype(const char* op, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op,
              " on CUDA supports float32, float64, float16 and bfloat16, got ", d);
}

at::Tensor knn_graph_cuda(const at::Tensor& x_in, int64_t k, int64_t dilation,
                          const std::optional<at::Tensor>& bias_in, bool include_self) {
  check_knn_graph_args(x_in, k, dilation, bias_in, include_self);
  check_cuda_dtype("knn_graph", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), span = k * dilation;
  at::Tensor out = at::empty({B, N, k}, x_in.options().dtype(at::kLong));
  if (B == 0 || N == 0) return out;
  const auto acc = accumulation_type(x_in.scalar_type());
  const at::Tensor x = x_in.detach().to(acc);
  TORCH_CHECK(at::isfinite(x).all().item<bool>(), "knn_graph: x contains NaN or Inf");
  // Rows whose squared norm could overflow are scaled by a power of two (exact; cosine
  // similarity ignores the scale), as the reference does.
  const at::Tensor peak = x.abs().amax(-1, true);
  const double limit = std::ldexp(1.0, 62) / std::sqrt(static_cast<double>(x.size(2)));
  at::Tensor xs = x;
  if (peak.gt(limit).any().item<bool>())
    xs = at::where(peak.gt(limit), x * at::exp2(-at::ceil(at::log2(peak))), x);
  const at::Tensor xn = (xs / at::linalg_vector_norm(xs, 2, {-1}, true).clamp_min(kCosineEps)).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->detach().to(acc).contiguous();
    TORCH_CHECK(at::isfinite(bias).all().item<bool>(), "knn_graph: bias contains NaN or Inf");
  }
  const int64_t R = std::min(N, std::max<int64_t>(1, kMaxSimilarities / N));
  const int64_t G = std::max<int64_t>(1, std::min(B, kMaxSimilarities / (N * R)));
  at::Tensor sims = at::empty({G * N * R}, xn.options());
  at::Tensor vals = at::empty({G * R * span}, xn.options());
  at::Tensor idx = at::empty({G * R * span}, out.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += G) {
    const int64_t g = std::min(G, B - b0);
    const at::Tensor xg = xn.narrow(0, b0, g);
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t r = std::min(R, N - r0);
      at::Tensor S = sims.narrow(0, 0, g * N * r).view({g, N, r});
      {
        const at::NoTF32Guard exact;  // neighbours must not depend on torch's TF32 setting
        at::bmm_out(S, xg, xg.narrow(1, r0, r).transpose(1, 2));  // S[g, j, rr] = x_j . x_{r0+rr}
      }
      if (bias.defined()) S.add_(bias.narrow(0, r0, r).t().unsqueeze(0));
      AT_DISPATCH_FLOATING_TYPES(acc, "knn_graph_cuda", [&] {
        knn_select_kernel<scalar_t><<<blocks_for(g * r, kThreads), kThreads, 0, stream>>>(
            S.data_ptr<scalar_t>(), g, N, r, r0, include_self, span, k, dilation,
            vals.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
            out.data_ptr<int64_t>() + b0 * N * k);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return out;
}

// ---- max_relative ------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void max_relative_forward_kernel(const scalar_t* __restrict__ x,
                                            const int64_t* __restrict__ index,
                                            scalar_t* __restrict__ out, int64_t N, int64_t C,
                                            int64_t K, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % C, r = e / C, base = (r / N) * N;
    const int64_t* nb = index + r * K;
    acc_t m = to_acc<acc_t>(x[(base + nb[0]) * C + c]);
    for (int64_t t = 1; t < K; ++t) {
      const acc_t v = to_acc<acc_t>(x[(base + nb[t]) * C + c]);
      if (v > m || v != v) m = v;  // NaN propagates, as torch.max
    }
    out[e] = static_cast<scalar_t>(m - to_acc<acc_t>(x[e]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void max_relative_backward_kernel(const scalar_t* __restrict__ grad,
                                             const scalar_t* __restrict__ x,
                                             const int64_t* __restrict__ index,
                                             acc_t* __restrict__ grad_x, int64_t N, int64_t C,
                                             int64_t K, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % C, r = e / C, base = (r / N) * N;
    const int64_t* nb = index + r * K;
    // The first neighbour (in index order) holding the maximum; the first NaN wins.
    acc_t best = to_acc<acc_t>(x[(base + nb[0]) * C + c]);
    int64_t arg = nb[0];
    for (int64_t t = 1; t < K; ++t) {
      const acc_t v = to_acc<acc_t>(x[(base + nb[t]) * C + c]);
      if (v > best || (v != v && best == best)) {
        best = v;
        arg = nb[t];
      }
    }
    const acc_t g = to_acc<acc_t>(grad[e]);
    atomicAdd(grad_x + (base + arg) * C + c, g);
    atomicAdd(grad_x + e, -g);
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20));
}

at::Tensor max_relative_cuda(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_max_relative_args(x_in, index_in);
  check_cuda_dtype("max_relative", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t total = x.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_relative_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    max_relative_forward_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), x.size(1),
        x.size(2), index.size(2), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor max_relative_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                      const at::Tensor& index_in) {
  check_max_relative_args(x_in, index_in);
  check_cuda_dtype("max_relative_backward", x_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "max_relative_backward: grad must have x's shape ",
              x_in.sizes(), ", got ", grad_in.sizes());
  check_same_device("max_relative_backward", "grad", grad_in, x_in);  // a host grad: illegal address
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::globalContext().alertNotDeterministic("max_relative_backward_cuda (atomic adds)");
  at::Tensor grad_acc = at::zeros(x.sizes(), x.options().dtype(accumulation_type(x.scalar_type())));
  const int64_t total = x.numel();
  if (total == 0) return grad_acc.to(x.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_relative_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    max_relative_backward_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        grad_acc.data_ptr<acc_t>(), x.size(1), x.size(2), index.size(2), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CUDA, m) {
  m.impl("knn_graph", &knn_graph_cuda);
  m.impl("max_relative", &max_relative_cuda);
  m.impl("max_relative_backward", &max_relative_backward_cuda);
}

}  // namespace slsg
