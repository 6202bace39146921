// CUDA kernels for graph attention: sparse (over K listed neighbours) and dense (over all
// nodes), forward and backward. Inputs may be float32, float64, float16 or bfloat16;
// arithmetic is in float32 (float64 for float64).
//
// Written for clarity over peak speed (no tensor cores):
// - Sparse: one warp per (batch, head, node). Lanes split the feature dimension; a warp
//   reduction gives each score. The forward keeps an online softmax with the output chunk in
//   registers (rows of whole 16-byte vectors: lane groups handle several neighbours at
//   once, see sparse_forward_vec_kernel); the backward recomputes the probabilities from the
//   saved logsumexp and scatters key/value gradients with atomics into float32 buffers.
//   On an H200 the dense kernels are far slower than torch's SDPA (benchmarks/RESULTS.md),
//   so slsg.ops runs SDPA there unless backend="extension".
// - Dense (flash-attention style): a block of kWarps warps handles kWarps query rows, one
//   per warp. Key/value tiles of kTile rows pass through shared memory; lane t scores key t
//   of the tile, so a tile costs one pass over D per lane and an online-softmax update.
//   Nothing of size N x N is stored. The backward runs two kernels that each own their
//   outputs: one per query row (dq, and the bias gradient summed over the batch with
//   atomics) and one per key row (dk, dv).
// Feature dimensions of any size are handled in chunks: scores stream D through shared
// memory kDChunk at a time, and outputs are produced 32 * V features per launch slice
// (grid z), V values per lane held in registers.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <utility>

#include "../checks.h"
#include "graph_common.cuh"

namespace slsg {
namespace {

using namespace graph_cuda;

constexpr int kWarps = 8;  // rows per block in the dense kernels; 8 warps per block in all
constexpr int kBlockThreads = kWarps * 32;
constexpr int kTile = 32;    // keys (queries) per shared-memory tile: one per lane
constexpr int kDChunk = 64;  // features per shared-memory pass of a score

void check_cuda_dtype(const char* op, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op,
              " on CUDA supports float32, float64, float16 and bfloat16, got ", d);
}

// Largest values-per-lane a kernel may use for an accumulation type: keeps the static
// shared memory of the dense kernels under 48 KiB (float64 tiles are twice as large).
template <typename acc_t>
constexpr int max_values_per_lane(int float_cap) {
  return std::is_same<acc_t, double>::value ? float_cap / 4 : float_cap;
}

// ---- sparse ------------------------------------------------------------------------------

// Score of one edge: scale * q . k (+ bias), reduced over the warp; every lane gets it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* a, const scalar_t* b, int64_t n, int lane) {
  acc_t part = 0;
  for (int64_t d = lane; d < n; d += 32) part += to_acc<acc_t>(a[d]) * to_acc<acc_t>(b[d]);
  return warp_sum(part);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void sparse_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v,
                                      const int64_t* __restrict__ index,
                                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                      acc_t* __restrict__ lse, int64_t rows, int64_t H, int64_t N,
                                      int64_t D, int64_t Dv, int64_t K, acc_t scale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (row >= rows) return;  // uniform per warp
  const int64_t bh = row / N, b = bh / H, i = row % N;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * 32 * V;
  const scalar_t* qi = q + row * D;
  const scalar_t* kb = k + bh * N * D;
  const scalar_t* vb = v + bh * N * Dv;
  const int64_t* nb = index + (b * N + i) * K;
  acc_t m = neg_inf<acc_t>(), l = 0;
  acc_t acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t j = nb[t];
    acc_t s = warp_dot<scalar_t, acc_t>(qi, kb + j * D, D, lane) * scale;
    if (bias) s += to_acc<acc_t>(bias[row * K + t]);
    const acc_t m_new = max(m, s);
    const acc_t alpha = exp_shifted(m, m_new), p = exp_shifted(s, m_new);
    l = l * alpha + p;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const int64_t c = c0 + lane + 32 * u;
      acc[u] = acc[u] * alpha + (c < Dv ? p * to_acc<acc_t>(vb[j * Dv + c]) : acc_t(0));
    }
    m = m_new;
  }
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t c = c0 + lane + 32 * u;
    if (c < Dv) out[row * Dv + c] = static_cast<scalar_t>(acc[u] / l);
  }
  if (blockIdx.y == 0 && lane == 0) lse[row] = m + log(l);
}

// Forward for rows made of whole 16-byte vectors (the common case: D, Dv multiples of 4
// float32 or 8 half values). The warp splits into groups of `lpr` lanes (the fewest whose
// 16-byte loads cover a row of q / k); each group scores and accumulates its own neighbours
// with an online softmax, so up to 32 / lpr neighbour rows are in flight at once instead of
// one, and the groups' partial softmaxes merge by shuffles at the end.
constexpr int kVecBytes = 16;
constexpr int kMaxVecsPerLane = 4;  // per row of q / k and of v: D, Dv <= 4 * 32 vectors

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[VEC]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_acc<acc_t>(s[e]);
}

template <typename scalar_t, typename acc_t, int U>
__global__ void sparse_forward_vec_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                          const scalar_t* __restrict__ v,
                                          const int64_t* __restrict__ index,
                                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                          acc_t* __restrict__ lse, int64_t rows, int64_t H, int64_t N,
                                          int64_t D, int64_t Dv, int64_t K, acc_t scale, int lpr) {
  constexpr int VEC = kVecBytes / sizeof(scalar_t);  // U vectors per lane and row
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (row >= rows) return;  // uniform per warp
  const int64_t bh = row / N, b = bh / H, i = row % N;
  const int group = lane / lpr, gl = lane % lpr, groups = 32 / lpr;
  const int nd = static_cast<int>(D / VEC), nv = static_cast<int>(Dv / VEC);
  const scalar_t* kb = k + bh * N * D;
  const scalar_t* vb = v + bh * N * Dv;
  const int64_t* nb = index + (b * N + i) * K;
  acc_t qa[U][VEC];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = gl + lpr * u;
    if (c < nd) {
      load_vec<scalar_t, acc_t, VEC>(q + row * D + c * VEC, qa[u]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qa[u][e] = 0;
    }
  }
  acc_t m = neg_inf<acc_t>(), l = 0;
  acc_t acc[U][VEC];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[u][e] = 0;
  for (int64_t t0 = 0; t0 < K; t0 += groups) {  // uniform per warp
    const int64_t t = t0 + group;
    const bool valid = t < K;
    const int64_t j = valid ? nb[t] : 0;
    acc_t s = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = gl + lpr * u;
      if (valid && c < nd) {
        acc_t kv[VEC];
        load_vec<scalar_t, acc_t, VEC>(kb + j * D + c * VEC, kv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += qa[u][e] * kv[e];
      }
    }
    for (int offset = lpr / 2; offset > 0; offset >>= 1) s += __shfl_xor_sync(kFullMask, s, offset);
    s *= scale;
    if (valid && bias) s += to_acc<acc_t>(bias[row * K + t]);
    if (!valid) s = neg_inf<acc_t>();
    const acc_t m_new = max(m, s);
    const acc_t alpha = exp_shifted(m, m_new), p = exp_shifted(s, m_new);
    l = l * alpha + p;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = gl + lpr * u;
      acc_t vv[VEC];
      if (valid && c < nv) {
        load_vec<scalar_t, acc_t, VEC>(vb + j * Dv + c * VEC, vv);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) vv[e] = 0;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = acc[u][e] * alpha + p * vv[e];
    }
    m = m_new;
  }
  // Merge the groups' softmaxes: partners share gl and differ in group.
  for (int offset = lpr; offset < 32; offset <<= 1) {
    const acc_t m2 = __shfl_xor_sync(kFullMask, m, offset);
    const acc_t l2 = __shfl_xor_sync(kFullMask, l, offset);
    const acc_t m_new = max(m, m2);
    const acc_t a = exp_shifted(m, m_new), c2 = exp_shifted(m2, m_new);
    l = l * a + l2 * c2;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = acc[u][e] * a + __shfl_xor_sync(kFullMask, acc[u][e], offset) * c2;
    m = m_new;
  }
  if (group == 0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = gl + lpr * u;
      if (c < nv) {
        alignas(kVecBytes) scalar_t packed[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) packed[e] = static_cast<scalar_t>(acc[u][e] / l);
        *reinterpret_cast<uint4*>(out + row * Dv + c * VEC) = *reinterpret_cast<const uint4*>(packed);
      }
    }
  }
  if (lane == 0) lse[row] = m + log(l);
}

// Launch shape of sparse_forward_vec_kernel: lanes per neighbour row and vectors per lane
// (1, 2 or 4; the register arrays' size). lanes = 0 when it does not apply: rows not made of
// whole, aligned 16-byte vectors, or too wide for its registers.
struct VecShape {
  int lanes = 0;
  int vectors = 0;
};

template <typename scalar_t>
VecShape sparse_vec_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out) {
  constexpr int64_t VEC = kVecBytes / sizeof(scalar_t);
  const int64_t D = q.size(3), Dv = v.size(3);
  if (D % VEC != 0 || Dv % VEC != 0) return {};
  for (const at::Tensor* t : {&q, &k, &v, &out})
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % kVecBytes != 0) return {};
  const int64_t nd = D / VEC, nv = Dv / VEC;
  VecShape shape{1, 1};
  while (shape.lanes < 32 && shape.lanes < nd) shape.lanes *= 2;
  while (shape.vectors < kMaxVecsPerLane && shape.vectors * shape.lanes < std::max(nd, nv))
    shape.vectors *= 2;
  if (std::max(nd, nv) > int64_t{shape.vectors} * shape.lanes) return {};
  return shape;
}

template <typename scalar_t, typename acc_t>
__global__ void sparse_backward_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ q,
                                       const scalar_t* __restrict__ k,
                                       const scalar_t* __restrict__ v,
                                       const int64_t* __restrict__ index,
                                       const scalar_t* __restrict__ bias,
                                       const acc_t* __restrict__ lse, acc_t* __restrict__ gq,
                                       acc_t* __restrict__ gk, acc_t* __restrict__ gv,
                                       acc_t* __restrict__ gbias, int64_t rows, int64_t H,
                                       int64_t N, int64_t D, int64_t Dv, int64_t K, acc_t scale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t bh = row / N, b = bh / H, i = row % N;
  const scalar_t* qi = q + row * D;
  const scalar_t* doi = grad_out + row * Dv;
  const scalar_t* kb = k + bh * N * D;
  const scalar_t* vb = v + bh * N * Dv;
  const int64_t* nb = index + (b * N + i) * K;
  const acc_t row_lse = shift_or_zero(lse[row]);  // a fully masked row: p = 0, not NaN
  auto prob = [&](int64_t t) {
    acc_t s = warp_dot<scalar_t, acc_t>(qi, kb + nb[t] * D, D, lane) * scale;
    if (bias) s += to_acc<acc_t>(bias[row * K + t]);
    return exp(s - row_lse);
  };
  // D_i = sum_t p_t dp_t, the softmax backward's row term (first pass).
  acc_t row_dot = 0;
  for (int64_t t = 0; t < K; ++t)
    row_dot += prob(t) * warp_dot<scalar_t, acc_t>(doi, vb + nb[t] * Dv, Dv, lane);
  for (int64_t t = 0; t < K; ++t) {
    const int64_t j = nb[t];
    const acc_t p = prob(t);
    const acc_t ds = p * (warp_dot<scalar_t, acc_t>(doi, vb + j * Dv, Dv, lane) - row_dot);
    if (gbias && lane == 0) gbias[row * K + t] = ds;
    for (int64_t d = lane; d < D; d += 32) {
      gq[row * D + d] += scale * ds * to_acc<acc_t>(kb[j * D + d]);  // this warp owns row
      atomicAdd(gk + (bh * N + j) * D + d, scale * ds * to_acc<acc_t>(qi[d]));
    }
    for (int64_t d = lane; d < Dv; d += 32) atomicAdd(gv + (bh * N + j) * Dv + d, p * to_acc<acc_t>(doi[d]));
  }
}

unsigned warp_blocks(int64_t rows) { return blocks_for(rows, kWarps); }

unsigned feature_slices(int64_t width, int values_per_lane) {
  return static_cast<unsigned>((width + 32 * values_per_lane - 1) / (32 * values_per_lane));
}

std::tuple<at::Tensor, at::Tensor> sparse_graph_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& index_in, const std::optional<at::Tensor>& bias_in, double scale) {
  check_sparse_attention_args(q_in, k_in, v_in, index_in, bias_in);
  check_cuda_dtype("sparse_graph_attention", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t K = index.size(2), rows = B * H * N;
  const auto acc = accumulation_type(q.scalar_type());
  at::Tensor out = at::empty({B, H, N, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(acc));
  if (rows == 0) return {out, lse};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_graph_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    if (const VecShape shape = sparse_vec_shape<scalar_t>(q, k, v, out); shape.lanes > 0) {
      auto kernel = shape.vectors == 1   ? sparse_forward_vec_kernel<scalar_t, acc_t, 1>
                    : shape.vectors == 2 ? sparse_forward_vec_kernel<scalar_t, acc_t, 2>
                                         : sparse_forward_vec_kernel<scalar_t, acc_t, kMaxVecsPerLane>;
      kernel<<<warp_blocks(rows), kBlockThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          index.data_ptr<int64_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), rows, H, N, D, Dv, K,
          static_cast<acc_t>(scale), shape.lanes);
      return;
    }
    dispatch_values_per_lane(Dv, 8, [&](auto vpl) {
      constexpr int V = decltype(vpl)::value;
      const dim3 grid(warp_blocks(rows), std::max(1u, feature_slices(Dv, V)));
      sparse_forward_kernel<scalar_t, acc_t, V><<<grid, kBlockThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          index.data_ptr<int64_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), rows, H, N, D, Dv, K,
          static_cast<acc_t>(scale));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_graph_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& index_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& lse_in, double scale, bool bias_grad) {
  check_sparse_attention_args(q_in, k_in, v_in, index_in, bias_in);
  check_cuda_dtype("sparse_graph_attention_backward", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const int64_t Dv = v_in.size(3), K = index_in.size(2), rows = B * H * N;
  check_sparse_attention_backward_args(grad_out_in, lse_in, q_in, v_in);
  at::globalContext().alertNotDeterministic("sparse_graph_attention_backward_cuda (atomic adds)");
  const auto dtype = q_in.scalar_type();
  const auto acc = accumulation_type(dtype);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const auto acc_options = q.options().dtype(acc);
  at::Tensor gq = at::zeros(q.sizes(), acc_options), gk = at::zeros(k.sizes(), acc_options);
  at::Tensor gv = at::zeros(v.sizes(), acc_options);
  at::Tensor gbias = bias_grad ? at::zeros({B, H, N, K}, acc_options) : at::Tensor();
  if (rows > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_graph_attention_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      sparse_backward_kernel<scalar_t, acc_t><<<warp_blocks(rows), kBlockThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, lse.data_ptr<acc_t>(),
          gq.data_ptr<acc_t>(), gk.data_ptr<acc_t>(), gv.data_ptr<acc_t>(),
          bias_grad ? gbias.data_ptr<acc_t>() : nullptr, rows, H, N, D, Dv, K,
          static_cast<acc_t>(scale));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gq.to(dtype), gk.to(dtype), gv.to(dtype),
          bias_grad ? gbias.to(dtype) : at::empty({0}, q.options())};
}

// ---- dense -------------------------------------------------------------------------------

// Lane t's dot product of this warp's vector `vec` (n features; null for an idle warp) with
// row t of a tile of nr rows starting at `rows` (leading dimension ld), streamed through
// shared memory kDChunk features at a time. Every thread of the block must call it.
template <typename scalar_t, typename acc_t>
__device__ acc_t tile_dot(const scalar_t* rows, int nr, int64_t ld, const scalar_t* vec, int64_t n,
                          acc_t (*tile)[kDChunk + 1], acc_t (*vecs)[kDChunk]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t s = 0;
  for (int64_t d0 = 0; d0 < n; d0 += kDChunk) {
    const int dw = static_cast<int>(min(static_cast<int64_t>(kDChunk), n - d0));
    for (int e = threadIdx.x; e < kTile * kDChunk; e += blockDim.x) {
      const int r = e / kDChunk, c = e % kDChunk;
      tile[r][c] = (r < nr && c < dw) ? to_acc<acc_t>(rows[r * ld + d0 + c]) : acc_t(0);
    }
    for (int c = lane; c < kDChunk; c += 32)
      vecs[warp][c] = (vec != nullptr && c < dw) ? to_acc<acc_t>(vec[d0 + c]) : acc_t(0);
    __syncthreads();
    for (int c = 0; c < dw; ++c) s += vecs[warp][c] * tile[lane][c];  // row stride 65: no bank conflicts
    __syncthreads();
  }
  return s;
}

// Loads columns [c0, c0 + W) of nr rows (leading dimension ld, `width` columns) into a
// [kTile][W] shared tile, zero-padding. Caller synchronises.
template <typename scalar_t, typename acc_t, int W>
__device__ void load_chunk(acc_t (*dst)[W], const scalar_t* rows, int nr, int64_t ld, int64_t c0,
                           int64_t width) {
  for (int e = threadIdx.x; e < kTile * W; e += blockDim.x) {
    const int r = e / W, c = e % W;
    dst[r][c] = (r < nr && c0 + c < width) ? to_acc<acc_t>(rows[r * ld + c0 + c]) : acc_t(0);
  }
}

// (b * h, first of its kWarps rows) of this block, in dense_grid's order: b * h folded into
// grid x with the blocks of rows fastest.
__device__ __forceinline__ std::pair<int64_t, int64_t> dense_block(int64_t rows) {
  const int64_t row_blocks = (rows + kWarps - 1) / kWarps;
  return {blockIdx.x / row_blocks, static_cast<int64_t>(blockIdx.x % row_blocks) * kWarps};
}

template <typename scalar_t, typename acc_t, int V>
__global__ void dense_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     const scalar_t* __restrict__ v,
                                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                     acc_t* __restrict__ lse, int64_t H, int64_t Nq, int64_t Nk,
                                     int64_t D, int64_t Dv, acc_t scale) {
  constexpr int W = 32 * V;
  __shared__ acc_t tile[kTile][kDChunk + 1];
  __shared__ acc_t vecs[kWarps][kDChunk];
  __shared__ acc_t vtile[kTile][W];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [bh, row0] = dense_block(Nq);
  const int64_t h = bh % H, i = row0 + warp;
  const bool active = i < Nq;  // uniform per warp
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * W;
  const scalar_t* qi = active ? q + (bh * Nq + i) * D : nullptr;
  const scalar_t* kb = k + bh * Nk * D;
  const scalar_t* vb = v + bh * Nk * Dv;
  acc_t m = neg_inf<acc_t>(), l = 0;
  acc_t acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0;
  for (int64_t k0 = 0; k0 < Nk; k0 += kTile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kTile), Nk - k0));
    acc_t s = tile_dot<scalar_t, acc_t>(kb + k0 * D, nk, D, qi, D, tile, vecs);
    load_chunk<scalar_t, acc_t, W>(vtile, vb + k0 * Dv, nk, Dv, c0, Dv);
    __syncthreads();
    if (active) {
      if (lane < nk) {
        s *= scale;
        if (bias) s += to_acc<acc_t>(bias[(h * Nq + i) * Nk + k0 + lane]);
      } else {
        s = neg_inf<acc_t>();
      }
      const acc_t m_new = max(m, warp_max(s));
      const acc_t base = shift_or_zero(m_new);
      const acc_t p = exp_shifted(s, base), alpha = exp_shifted(m, base);
      l = l * alpha + warp_sum(p);
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] *= alpha;
      for (int t = 0; t < nk; ++t) {
        const acc_t pt = __shfl_sync(kFullMask, p, t);
#pragma unroll
        for (int u = 0; u < V; ++u) acc[u] += pt * vtile[t][lane + 32 * u];
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t c = c0 + lane + 32 * u;
    if (c < Dv) out[(bh * Nq + i) * Dv + c] = static_cast<scalar_t>(acc[u] / l);
  }
  if (blockIdx.z == 0 && lane == 0) lse[bh * Nq + i] = m + log(l);
}

// dq for one query row per warp (and the bias gradient, summed over the batch).
template <typename scalar_t, typename acc_t, int V>
__global__ void dense_backward_query_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ bias, const acc_t* __restrict__ lse,
    const acc_t* __restrict__ row_dot, scalar_t* __restrict__ gq, acc_t* __restrict__ gbias,
    int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, acc_t scale) {
  constexpr int W = 32 * V;
  __shared__ acc_t tile[kTile][kDChunk + 1];
  __shared__ acc_t vecs[kWarps][kDChunk];
  __shared__ acc_t ktile[kTile][W];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [bh, row0] = dense_block(Nq);
  const int64_t h = bh % H, i = row0 + warp;
  const bool active = i < Nq;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * W;
  const int64_t r = bh * Nq + i;
  const scalar_t* qi = active ? q + r * D : nullptr;
  const scalar_t* doi = active ? grad_out + r * Dv : nullptr;
  const scalar_t* kb = k + bh * Nk * D;
  const scalar_t* vb = v + bh * Nk * Dv;
  const acc_t row_lse = active ? shift_or_zero(lse[r]) : acc_t(0);  // a fully masked row: P = 0
  const acc_t Di = active ? row_dot[r] : acc_t(0);
  acc_t acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0;
  for (int64_t k0 = 0; k0 < Nk; k0 += kTile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kTile), Nk - k0));
    acc_t s = tile_dot<scalar_t, acc_t>(kb + k0 * D, nk, D, qi, D, tile, vecs);
    const acc_t dp = tile_dot<scalar_t, acc_t>(vb + k0 * Dv, nk, Dv, doi, Dv, tile, vecs);
    load_chunk<scalar_t, acc_t, W>(ktile, kb + k0 * D, nk, D, c0, D);
    __syncthreads();
    if (active) {
      acc_t ds = 0;
      if (lane < nk) {
        s = s * scale + (bias ? to_acc<acc_t>(bias[(h * Nq + i) * Nk + k0 + lane]) : acc_t(0));
        ds = exp_shifted(s, row_lse) * (dp - Di);
        if (gbias && blockIdx.z == 0) atomicAdd(gbias + (h * Nq + i) * Nk + k0 + lane, ds);
      }
      for (int t = 0; t < nk; ++t) {
        const acc_t dst = __shfl_sync(kFullMask, ds, t);
#pragma unroll
        for (int u = 0; u < V; ++u) acc[u] += dst * ktile[t][lane + 32 * u];
      }
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t c = c0 + lane + 32 * u;
    if (c < D) gq[r * D + c] = static_cast<scalar_t>(scale * acc[u]);
  }
}

// dk and dv for one key row per warp: the tiles are query rows now.
template <typename scalar_t, typename acc_t, int V>
__global__ void dense_backward_key_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ bias, const acc_t* __restrict__ lse,
    const acc_t* __restrict__ row_dot, scalar_t* __restrict__ gk, scalar_t* __restrict__ gv,
    int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, acc_t scale) {
  constexpr int W = 32 * V;
  __shared__ acc_t tile[kTile][kDChunk + 1];
  __shared__ acc_t vecs[kWarps][kDChunk];
  __shared__ acc_t qtile[kTile][W];
  __shared__ acc_t dotile[kTile][W];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [bh, row0] = dense_block(Nk);
  const int64_t h = bh % H, j = row0 + warp;
  const bool active = j < Nk;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * W;
  const scalar_t* kj = active ? k + (bh * Nk + j) * D : nullptr;
  const scalar_t* vj = active ? v + (bh * Nk + j) * Dv : nullptr;
  const scalar_t* qb = q + bh * Nq * D;
  const scalar_t* dob = grad_out + bh * Nq * Dv;
  acc_t dk[V], dv[V];
#pragma unroll
  for (int u = 0; u < V; ++u) dk[u] = dv[u] = 0;
  for (int64_t i0 = 0; i0 < Nq; i0 += kTile) {
    const int ni = static_cast<int>(min(static_cast<int64_t>(kTile), Nq - i0));
    acc_t s = tile_dot<scalar_t, acc_t>(qb + i0 * D, ni, D, kj, D, tile, vecs);
    const acc_t dp = tile_dot<scalar_t, acc_t>(dob + i0 * Dv, ni, Dv, vj, Dv, tile, vecs);
    load_chunk<scalar_t, acc_t, W>(qtile, qb + i0 * D, ni, D, c0, D);
    load_chunk<scalar_t, acc_t, W>(dotile, dob + i0 * Dv, ni, Dv, c0, Dv);
    __syncthreads();
    if (active) {
      acc_t p = 0, ds = 0;
      if (lane < ni) {
        const int64_t i = i0 + lane;
        s = s * scale + (bias ? to_acc<acc_t>(bias[(h * Nq + i) * Nk + j]) : acc_t(0));
        p = exp_shifted(s, shift_or_zero(lse[bh * Nq + i]));  // a fully masked row: P = 0
        ds = p * (dp - row_dot[bh * Nq + i]);
      }
      for (int t = 0; t < ni; ++t) {
        const acc_t pt = __shfl_sync(kFullMask, p, t), dst = __shfl_sync(kFullMask, ds, t);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          dk[u] += dst * qtile[t][lane + 32 * u];
          dv[u] += pt * dotile[t][lane + 32 * u];
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t c = c0 + lane + 32 * u;
    if (c < D) gk[(bh * Nk + j) * D + c] = static_cast<scalar_t>(scale * dk[u]);
    if (c < Dv) gv[(bh * Nk + j) * Dv + c] = static_cast<scalar_t>(dv[u]);
  }
}

// Grid of the dense kernels: x enumerates (b * h, block of kWarps rows) pairs, row blocks
// fastest (neighbouring blocks read the same K and V, which stay in L2), z the feature
// slices. Folding b * h into x keeps it clear of gridDim.y's limit of 65535.
dim3 dense_grid(int64_t rows, int64_t BH, unsigned slices) {
  const int64_t blocks = static_cast<int64_t>(warp_blocks(rows)) * BH;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "dense_graph_attention on CUDA: B * H * ceil(N / ", kWarps, ") must be < 2^31, got ", blocks);
  return dim3(static_cast<unsigned>(blocks), 1, std::max(1u, slices));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_graph_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias_in, double scale, int64_t kept_slices) {
  check_dense_attention_args(q_in, k_in, v_in, bias_in);
  check_cuda_dtype("dense_graph_attention", q_in);
  // The backward kernels recompute the scores; keeping them is a CPU trade.
  TORCH_CHECK(kept_slices == 0, "dense_graph_attention: kept_slices > 0 is CPU-only, got a ", q_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(2), Dv = v.size(3);
  const auto acc = accumulation_type(q.scalar_type());
  at::Tensor out = at::empty({B, H, Nq, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(acc));
  at::Tensor no_scores = at::empty({0}, q.options());
  if (B * H * Nq == 0) return {out, lse, no_scores};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dense_graph_attention_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    dispatch_values_per_lane(Dv, max_values_per_lane<acc_t>(8), [&](auto vpl) {
      constexpr int V = decltype(vpl)::value;
      if constexpr (V <= max_values_per_lane<acc_t>(8)) {
        dense_forward_kernel<scalar_t, acc_t, V>
            <<<dense_grid(Nq, B * H, feature_slices(Dv, V)), kBlockThreads, 0, stream>>>(
                q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                lse.data_ptr<acc_t>(), H, Nq, Nk, D, Dv, static_cast<acc_t>(scale));
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, no_scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_graph_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& scores, double scale, bool bias_grad,
    bool shared_qk) {
  check_dense_attention_args(q_in, k_in, v_in, bias_in);
  check_cuda_dtype("dense_graph_attention_backward", q_in);
  TORCH_CHECK(!scores.has_value() || scores->numel() == 0,
              "dense_graph_attention_backward: kept scores are CPU-only; on CUDA pass none");
  TORCH_CHECK(!shared_qk, "dense_graph_attention_backward: shared_qk is CPU-only; on CUDA pass False");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Nk = k_in.size(2), Dv = v_in.size(3);
  check_dense_attention_backward_args(grad_out_in, out_in, lse_in, q_in, v_in);
  // The bias gradient sums the batch with atomic adds.
  if (bias_grad && B > 1) at::globalContext().alertNotDeterministic("dense_graph_attention_backward_cuda (bias gradient)");
  const auto dtype = q_in.scalar_type();
  const auto acc = accumulation_type(dtype);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  // D_i = dO_i . O_i, the softmax backward's row term, in the accumulation type.
  // 0 for a fully masked row (lse = -inf, out = NaN): its P row is 0 (else 0 * NaN spills).
  const at::Tensor row_dot = (grad_out.to(acc) * out_in.to(acc)).sum(-1).masked_fill(lse.isneginf(), 0).contiguous();
  at::Tensor gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  at::Tensor gbias = bias_grad ? at::zeros({H, Nq, Nk}, q.options().dtype(acc)) : at::Tensor();
  if (B * H * Nq == 0 || Nk == 0) {
    gq.zero_(), gk.zero_(), gv.zero_();
  } else {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dense_graph_attention_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      constexpr int kQueryCap = max_values_per_lane<acc_t>(8);
      constexpr int kKeyCap = max_values_per_lane<acc_t>(4);
      dispatch_values_per_lane(D, kQueryCap, [&](auto vpl) {
        constexpr int V = decltype(vpl)::value;
        if constexpr (V <= kQueryCap) {
          dense_backward_query_kernel<scalar_t, acc_t, V>
              <<<dense_grid(Nq, B * H, feature_slices(D, V)), kBlockThreads, 0, stream>>>(
                  grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                  v.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                  lse.data_ptr<acc_t>(), row_dot.data_ptr<acc_t>(), gq.data_ptr<scalar_t>(),
                  bias_grad ? gbias.data_ptr<acc_t>() : nullptr, H, Nq, Nk, D, Dv,
                  static_cast<acc_t>(scale));
        }
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dispatch_values_per_lane(std::max(D, Dv), kKeyCap, [&](auto vpl) {
        constexpr int V = decltype(vpl)::value;
        if constexpr (V <= kKeyCap) {
          dense_backward_key_kernel<scalar_t, acc_t, V>
              <<<dense_grid(Nk, B * H, feature_slices(std::max(D, Dv), V)), kBlockThreads, 0, stream>>>(
                  grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                  v.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                  lse.data_ptr<acc_t>(), row_dot.data_ptr<acc_t>(), gk.data_ptr<scalar_t>(),
                  gv.data_ptr<scalar_t>(), H, Nq, Nk, D, Dv, static_cast<acc_t>(scale));
        }
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gq, gk, gv, bias_grad ? gbias.to(dtype) : at::empty({0}, q.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CUDA, m) {
  m.impl("sparse_graph_attention", &sparse_graph_attention_cuda);
  m.impl("sparse_graph_attention_backward", &sparse_graph_attention_backward_cuda);
  m.impl("dense_graph_attention", &dense_graph_attention_cuda);
  m.impl("dense_graph_attention_backward", &dense_graph_attention_backward_cuda);
}

}  // namespace slsg
