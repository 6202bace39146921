// CPU kernels for graph attention: sparse (over K listed neighbours) and dense (over all
// nodes), forward and backward.
//
// Sparse: one pass per node, no gathered [.., K, D] copies. The forward saves only the
// logsumexp per node; the backward recomputes the K scores from it. The backward is
// parallel over (batch, head) so each thread owns the key/value gradient rows it scatters
// into (no atomics, deterministic).
//
// Dense: flash-attention on the CPU. Query tiles of kQueryTile rows meet key tiles of
// kKeyTile rows as GEMMs on raw pointers (blas.h: our strided kernel or torch's BLAS), with
// an online softmax that rescales the partial output when a later tile raises the row
// maximum; the softmax work (and the bias add) is fused row passes over the tile while it
// is in cache. Work items run head-major, so the batch items that share a bias stripe run
// back to back and read it from cache. Extra memory is a few tiles per thread, never an
// N x N matrix. The backward recomputes the probabilities tile by tile from the saved
// logsumexp, from the scores themselves where the forward kept them (kept_slices: the
// caller bounds their size), else from a fresh Q K^T product. When the caller passed one
// tensor as q and k (shared_qk), it returns that tensor's whole gradient, (dS + dS^T) Q,
// with one product fewer per tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "../checks.h"
#include "blas.h"

namespace slsg {
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
inline void axpy(T* y, T alpha, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

void check_cpu_float(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              " on CPU supports float32 and float64, got ", t.scalar_type());
}

// A shift of 0 for rows whose scores are all -inf, so that exp gives 0, not NaN.
template <typename T>
inline T finite_or_zero(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// ---- sparse ------------------------------------------------------------------------------

template <typename scalar_t>
void sparse_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& index, const at::Tensor& bias, double scale_d,
                           at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t K = index.size(2);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const scalar_t* bd = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* od = out.data_ptr<scalar_t>();
  scalar_t* ld = lse.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * (D + Dv)));
  at::parallel_for(0, B * H * N, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / N, b = bh / H, i = r % N;
      const scalar_t* qi = qd + r * D;
      const scalar_t* kb = kd + bh * N * D;
      const scalar_t* vb = vd + bh * N * Dv;
      const int64_t* nb = idx + (b * N + i) * K;
      scalar_t m = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t t = 0; t < K; ++t) {
        s[t] = scale * dot(qi, kb + nb[t] * D, D) + (bd ? bd[r * K + t] : scalar_t(0));
        m = std::max(m, s[t]);
      }
      // A fully masked row (every score -inf): shift 0, so p = 0, lse = -inf and the
      // output is 0 / 0 = NaN, as in the reference, but the backward sees p = 0, not NaN.
      const scalar_t shift = finite_or_zero(m);
      scalar_t* o = od + r * Dv;
      std::fill(o, o + Dv, scalar_t(0));
      scalar_t l = 0;
      for (int64_t t = 0; t < K; ++t) {
        const scalar_t p = std::exp(s[t] - shift);
        l += p;
        axpy(o, p, vb + nb[t] * Dv, Dv);
      }
      const scalar_t inv = scalar_t(1) / l;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
      ld[r] = shift + std::log(l);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_graph_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& index_in, const std::optional<at::Tensor>& bias_in, double scale) {
  check_sparse_attention_args(q_in, k_in, v_in, index_in, bias_in);
  check_cpu_float("sparse_graph_attention", q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (lse.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_graph_attention_cpu", [&] {
    sparse_forward_kernel<scalar_t>(q, k, v, index, bias, scale, out, lse);
  });
  return {out, lse};
}

template <typename scalar_t>
void sparse_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& index, const at::Tensor& bias,
                            const at::Tensor& lse, double scale_d, at::Tensor& gq, at::Tensor& gk,
                            at::Tensor& gv, at::Tensor& gbias) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t K = index.size(2);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t* god = grad_out.data_ptr<scalar_t>();
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const scalar_t* bd = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* ld = lse.data_ptr<scalar_t>();
  scalar_t* gqd = gq.data_ptr<scalar_t>();
  scalar_t* gkd = gk.data_ptr<scalar_t>();
  scalar_t* gvd = gv.data_ptr<scalar_t>();
  scalar_t* gbd = gbias.defined() ? gbias.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(K), dp(K);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const scalar_t* kb = kd + bh * N * D;
      const scalar_t* vb = vd + bh * N * Dv;
      scalar_t* gkb = gkd + bh * N * D;
      scalar_t* gvb = gvd + bh * N * Dv;
      std::fill(gqd + bh * N * D, gqd + (bh + 1) * N * D, scalar_t(0));
      std::fill(gkb, gkb + N * D, scalar_t(0));
      std::fill(gvb, gvb + N * Dv, scalar_t(0));
      for (int64_t i = 0; i < N; ++i) {
        const int64_t r = bh * N + i;
        const scalar_t* qi = qd + r * D;
        const scalar_t* doi = god + r * Dv;
        const int64_t* nb = idx + (b * N + i) * K;
        // p = softmax recomputed from the saved logsumexp; dp = dL/dp; D_i = sum p dp.
        scalar_t row_dot = 0;
        const scalar_t row_lse = finite_or_zero(ld[r]);  // a fully masked row: p = 0, not NaN
        for (int64_t t = 0; t < K; ++t) {
          const scalar_t s = scale * dot(qi, kb + nb[t] * D, D) + (bd ? bd[r * K + t] : scalar_t(0));
          p[t] = std::exp(s - row_lse);
          dp[t] = dot(doi, vb + nb[t] * Dv, Dv);
          row_dot += p[t] * dp[t];
        }
        scalar_t* gqi = gqd + r * D;
        for (int64_t t = 0; t < K; ++t) {
          const scalar_t ds = p[t] * (dp[t] - row_dot);  // dL/ds
          if (gbd) gbd[r * K + t] = ds;
          const int64_t j = nb[t];
          axpy(gqi, scale * ds, kb + j * D, D);
          axpy(gkb + j * D, scale * ds, qi, D);
          axpy(gvb + j * Dv, p[t], doi, Dv);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_graph_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& index_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& lse_in, double scale, bool bias_grad) {
  check_sparse_attention_args(q_in, k_in, v_in, index_in, bias_in);
  check_cpu_float("sparse_graph_attention_backward", q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  check_sparse_attention_backward_args(grad_out_in, lse_in, q_in, v_in);
  const at::Tensor grad_out = grad_out_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(q.scalar_type()).contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  // Zeroed by the kernel, slice by slice, inside its one parallel region.
  at::Tensor gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  at::Tensor gbias = bias_grad ? at::empty({q.size(0), q.size(1), q.size(2), index.size(2)}, q.options())
                               : at::Tensor();
  if (lse.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_graph_attention_backward_cpu", [&] {
      sparse_backward_kernel<scalar_t>(grad_out, q, k, v, index, bias, lse, scale, gq, gk, gv, gbias);
    });
  }
  if (!bias_grad) gbias = at::empty({0}, q.options());
  return {gq, gk, gv, gbias};
}

// ---- dense -------------------------------------------------------------------------------

// Row passes of the online softmax, fused so each tile row is read once or twice while it
// sits in L1. float rows use a vectorised exp (Cephes-style: range reduction by ln 2 and a
// degree-6 polynomial, relative error < 1e-7; 0 below -87, so exp(-inf) = 0). The
// extension is built without -march flags, so the float row kernels are compiled twice,
// for AVX2 + FMA and for baseline x86-64, and picked once at run time. double rows
// (gradcheck) use std::exp.
//
// Trapping math (GCC's default) forbids turning the clamps and selects into vector blends;
// PyTorch itself builds with -fno-trapping-math, so these kernels do too. Only builtins
// inside the region: a header function compiled with other options would not be inlined.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

static inline __attribute__((always_inline)) float exp_approx(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln 2 split in two (Cody-Waite): n * hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = __builtin_bit_cast(int32_t, t) - 0x4B400000;  // the integer n, from t's bits
  const float e = p * __builtin_bit_cast(float, (ni + 127) << 23);
  return x < -87.0f ? 0.0f : e;
}

// Sum with 8 independent partial sums, a form the compiler vectorises without reassociation.
static inline __attribute__((always_inline)) float sum_body(const float* s, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += s[j + l];
  float total = 0.0f;
  for (; j < n; ++j) total += s[j];
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total;
}

static inline __attribute__((always_inline)) float row_max_body(const float* s, int64_t n) {
  float lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = -__builtin_inff();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = s[j + l] > lanes[l] ? s[j + l] : lanes[l];
  float m = -__builtin_inff();
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// out may be in (in place); no __restrict, so GCC checks the overlap once per call.
static inline __attribute__((always_inline)) float exp_shifted_sum_body(const float* in, float* out, int64_t n,
                                                                        float shift) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_approx(in[j] - shift);
  return sum_body(out, n);
}

// s[j] += b[j], returning the new row's maximum: the bias add and the max in one pass.
static inline __attribute__((always_inline)) float add_row_max_body(float* __restrict s, const float* __restrict b,
                                                                    int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] += b[j];
  return row_max_body(s, n);
}

// out[j] = exp(in[j] + b[j] - shift), returning the sum (out may be in).
static inline __attribute__((always_inline)) float exp_bias_shifted_sum_body(const float* in, const float* b,
                                                                             float* out, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_approx(in[j] + b[j] - shift);
  return sum_body(out, n);
}

static inline __attribute__((always_inline)) void softmax_grad_body(float* __restrict dp, const float* __restrict p,
                                                                    int64_t n, float row_dot) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - row_dot);
}

#define SLSG_AVX2 __attribute__((target("avx2,fma")))
SLSG_AVX2 float row_max_avx2(const float* s, int64_t n) { return row_max_body(s, n); }
SLSG_AVX2 float exp_shifted_sum_avx2(const float* in, float* out, int64_t n, float shift) {
  return exp_shifted_sum_body(in, out, n, shift);
}
SLSG_AVX2 void softmax_grad_avx2(float* dp, const float* p, int64_t n, float d) { softmax_grad_body(dp, p, n, d); }
SLSG_AVX2 float add_row_max_avx2(float* s, const float* b, int64_t n) { return add_row_max_body(s, b, n); }
SLSG_AVX2 float exp_bias_shifted_sum_avx2(const float* in, const float* b, float* out, int64_t n, float shift) {
  return exp_bias_shifted_sum_body(in, b, out, n, shift);
}
float row_max_base(const float* s, int64_t n) { return row_max_body(s, n); }
float exp_shifted_sum_base(const float* in, float* out, int64_t n, float shift) {
  return exp_shifted_sum_body(in, out, n, shift);
}
void softmax_grad_base(float* dp, const float* p, int64_t n, float d) { softmax_grad_body(dp, p, n, d); }
float add_row_max_base(float* s, const float* b, int64_t n) { return add_row_max_body(s, b, n); }
float exp_bias_shifted_sum_base(const float* in, const float* b, float* out, int64_t n, float shift) {
  return exp_bias_shifted_sum_body(in, b, out, n, shift);
}
#undef SLSG_AVX2

#pragma GCC pop_options

// __builtin_cpu_init: this runs as a static initializer, possibly before libgcc's own.
const bool kHasAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();

float row_max_f(const float* s, int64_t n) { return kHasAvx2 ? row_max_avx2(s, n) : row_max_base(s, n); }
float exp_shifted_sum_f(const float* in, float* out, int64_t n, float shift) {
  return kHasAvx2 ? exp_shifted_sum_avx2(in, out, n, shift) : exp_shifted_sum_base(in, out, n, shift);
}
void softmax_grad_f(float* dp, const float* p, int64_t n, float d) {
  kHasAvx2 ? softmax_grad_avx2(dp, p, n, d) : softmax_grad_base(dp, p, n, d);
}
float add_row_max_f(float* s, const float* b, int64_t n) {
  return kHasAvx2 ? add_row_max_avx2(s, b, n) : add_row_max_base(s, b, n);
}
float exp_bias_shifted_sum_f(const float* in, const float* b, float* out, int64_t n, float shift) {
  return kHasAvx2 ? exp_bias_shifted_sum_avx2(in, b, out, n, shift) : exp_bias_shifted_sum_base(in, b, out, n, shift);
}

// max_j s[j]
template <typename T>
T row_max(const T* s, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row_max_f(s, n);
  } else {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    return m;
  }
}

// out[j] = exp(in[j] - shift) (out may be in); returns the sum.
template <typename T>
T exp_shifted_sum(const T* in, T* out, int64_t n, T shift) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_shifted_sum_f(in, out, n, shift);
  } else {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(in[j] - shift));
    return sum;
  }
}

// dp[j] = p[j] * (dp[j] - row_dot): dL/ds of a softmax row.
template <typename T>
void softmax_grad(T* dp, const T* p, int64_t n, T row_dot) {
  if constexpr (std::is_same_v<T, float>) {
    softmax_grad_f(dp, p, n, row_dot);
  } else {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - row_dot);
  }
}

// s[j] += b[j] (b may be null: no bias); returns max_j s[j].
template <typename T>
T add_row_max(T* s, const T* b, int64_t n) {
  if (b == nullptr) return row_max(s, n);
  if constexpr (std::is_same_v<T, float>) {
    return add_row_max_f(s, b, n);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += b[j];
    return row_max(s, n);
  }
}

// out[j] = exp(in[j] (+ b[j]) - shift) (out may be in; b may be null); returns the sum.
template <typename T>
T exp_shifted_sum(const T* in, const T* b, T* out, int64_t n, T shift) {
  if (b == nullptr) return exp_shifted_sum(in, out, n, shift);
  if constexpr (std::is_same_v<T, float>) {
    return exp_bias_shifted_sum_f(in, b, out, n, shift);
  } else {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(in[j] + b[j] - shift));
    return sum;
  }
}

// Tile sizes (rows of Q x rows of K): products large enough for full speed, a float score
// tile of 512 KiB per thread (the backward holds two). Larger or smaller tiles measured no
// faster (2026-11-30: 128-512 rows x 256-1024 columns).
constexpr int64_t kQueryTile = 256;
constexpr int64_t kKeyTile = 512;
constexpr int64_t kQueryTileB = 256;
// Short sequences take quarter-height tiles: two per-thread [rows, 512] buffers are much of
// the backward's own memory there. N = 256, 1 head: with 256 rows its peak was 8.7-9.0 MiB
// against SDPA's fused kernel's 8.0-8.2; with 128 rows 8.3-9.0 against 8.1-8.5; with 64 rows
// 8.1-8.3 against 8.3, at the same speed in paired rounds (2026-11-30).
constexpr int64_t kShortQueryTileB = 64, kShortSequence = 768;
constexpr int64_t kKeyTileB = 512;

// at::parallel_for(begin, end, 1, f) whose pool threads run in the caller's inference mode
// (pool threads do not inherit it, and the products' ATen fallback in blas.h makes tensors
// there).
template <typename F>
void parallel_tiles(int64_t begin, int64_t end, const F& f) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(begin, end, 1, [&](int64_t b, int64_t e) {
    std::optional<c10::InferenceMode> mode;
    if (inference) mode.emplace();
    f(b, e);
  });
}

// q, k, v as [B*H, N, D] contiguous, detached. k is often q itself (shared projections):
// one copy then.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flat_qkv(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in) {
  const int64_t BH = q_in.size(0) * q_in.size(1);
  const at::Tensor q = q_in.detach().contiguous().view({BH, q_in.size(2), q_in.size(3)});
  const at::Tensor k = k_in.is_same(q_in) ? q : k_in.detach().contiguous().view({BH, k_in.size(2), k_in.size(3)});
  const at::Tensor v = v_in.is_same(q_in) ? q : v_in.detach().contiguous().view({BH, v_in.size(2), v_in.size(3)});
  return {q, k, v};
}

// The bias [H, Nq, Nk] by rows (row(h, i) = &bias[h, i, 0]; null without a bias). Its
// last dimension must be contiguous: see bias_with_unit_stride.
template <typename T>
struct BiasRows {
  const T* data = nullptr;
  int64_t head_stride = 0, row_stride = 0;
  explicit BiasRows(const at::Tensor& bias) {
    if (bias.defined() && bias.numel() > 0) {
      data = bias.data_ptr<T>();
      head_stride = bias.stride(0), row_stride = bias.stride(1);
    }
  }
  const T* row(int64_t h, int64_t i, int64_t j0) const {
    return data ? data + h * head_stride + i * row_stride + j0 : nullptr;
  }
};

at::Tensor bias_with_unit_stride(const std::optional<at::Tensor>& bias_in) {
  if (!bias_in.has_value()) return at::Tensor();
  const at::Tensor bias = bias_in->detach();
  return bias.size(2) > 1 && bias.stride(2) != 1 ? bias.contiguous() : bias;
}

// With `scores` defined ([S, Nq, Nk], S <= BH), the scores of the first S slices are written
// there and exponentiated into the per-thread tile, so the backward can skip recomputing them.
template <typename scalar_t>
void dense_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const BiasRows<scalar_t>& bias, scalar_t scale, int64_t H, at::Tensor& out,
                          at::Tensor& lse, const at::Tensor& scores) {
  using blas::Op;
  const int64_t BH = q.size(0), Nq = q.size(1), Nk = k.size(1), D = q.size(2), Dv = v.size(2);
  const int64_t nqb = (Nq + kQueryTile - 1) / kQueryTile;
  const int64_t kept = scores.defined() ? scores.size(0) : 0;
  const scalar_t *qd = q.data_ptr<scalar_t>(), *kd = k.data_ptr<scalar_t>(), *vd = v.data_ptr<scalar_t>();
  scalar_t* kept_d = kept > 0 ? scores.data_ptr<scalar_t>() : nullptr;
  scalar_t *od = out.data_ptr<scalar_t>(), *lsed = lse.data_ptr<scalar_t>();
  const int64_t B = H > 0 ? BH / H : 0;
  parallel_tiles(0, BH * nqb, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buffer(kQueryTile * std::min(kKeyTile, Nk));
    std::vector<scalar_t> m(kQueryTile), l(kQueryTile), alpha(kQueryTile);
    scalar_t* S = buffer.data();
    for (int64_t w = begin; w < end; ++w) {
      // Items in (head, query tile, batch) order: the batch items that share a stripe of
      // the bias run one after another, so it is read from memory once, not once per item
      // (H = 8, N = 1024: 32 MiB per item).
      const int64_t b = w % B, h = w / B / nqb, q0 = (w / B % nqb) * kQueryTile, bh = b * H + h;
      const int64_t rows = std::min(kQueryTile, Nq - q0);
      const scalar_t* Q = qd + (bh * Nq + q0) * D;
      scalar_t* O = od + (bh * Nq + q0) * Dv;
      for (int64_t k0 = 0; k0 < Nk; k0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, Nk - k0);
        const scalar_t *K = kd + (bh * Nk + k0) * D, *V = vd + (bh * Nk + k0) * Dv;
        // Raw scores go to the kept copy when there is one, else straight into the tile.
        scalar_t* raw = bh < kept ? kept_d + (bh * Nq + q0) * Nk + k0 : S;
        const int64_t ld_raw = bh < kept ? Nk : cols;
        blas::gemm<scalar_t>(Op::N, Op::T, rows, cols, D, scale, Q, D, K, D, 0, raw, ld_raw);
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* row = raw + r * ld_raw;
          const scalar_t tile_max = add_row_max(row, bias.row(h, q0 + r, k0), cols);
          const scalar_t m_new = k0 == 0 ? tile_max : std::max(m[r], tile_max);
          const scalar_t shift = finite_or_zero(m_new);
          const scalar_t sum = exp_shifted_sum(row, S + r * cols, cols, shift);
          // alpha rescales what earlier tiles summed under the old maximum.
          alpha[r] = k0 == 0 ? scalar_t(0) : std::exp(m[r] - shift);
          l[r] = (k0 == 0 ? scalar_t(0) : l[r] * alpha[r]) + sum;
          m[r] = m_new;
        }
        if (k0 > 0) {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < Dv; ++d) O[r * Dv + d] *= alpha[r];
        }
        blas::gemm<scalar_t>(Op::N, Op::N, rows, Dv, cols, 1, S, cols, V, Dv, k0 == 0 ? 0 : 1, O, Dv);
      }
      scalar_t* L = lsed + bh * Nq + q0;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t inv = scalar_t(1) / l[r];
        for (int64_t d = 0; d < Dv; ++d) O[r * Dv + d] *= inv;
        L[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_graph_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias_in, double scale, int64_t kept_slices) {
  check_dense_attention_args(q_in, k_in, v_in, bias_in);
  check_cpu_float("dense_graph_attention", q_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(kept_slices >= 0 && kept_slices <= B * H, "dense_graph_attention: kept_slices must be in [0, B * H] = [0, ",
              B * H, "], got ", kept_slices);
  const auto [q, k, v] = flat_qkv(q_in, k_in, v_in);
  const at::Tensor bias = bias_with_unit_stride(bias_in);
  at::Tensor out = at::empty({B * H, Nq, Dv}, q.options());
  at::Tensor lse = at::empty({B * H, Nq}, q.options());
  const int64_t Nk = k_in.size(2);
  at::Tensor scores = kept_slices > 0 ? at::empty({kept_slices, Nq, Nk}, q.options()) : at::Tensor();
  if (B * H * Nq > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dense_graph_attention_cpu", [&] {
      dense_forward_kernel<scalar_t>(q, k, v, BiasRows<scalar_t>(bias), static_cast<scalar_t>(scale), H, out, lse,
                                     scores);
    });
  }
  return {out.view({B, H, Nq, Dv}), lse.view({B, H, Nq}),
          kept_slices > 0 ? scores : at::empty({0}, q.options())};
}

// row_dot[i] = dO_i . O_i = sum_j P_ij dP_ij, the softmax backward's row term, for the
// rows of slice bh ([BH, N, Dv] views). Done here rather than by whole-tensor ATen ops: one
// parallel region per call. A fully masked row (lse = -inf) has out = NaN; its P row is 0,
// so is its term (else 0 * NaN would spill NaN into dk and the bias gradient).
template <typename scalar_t>
void softmax_row_terms(scalar_t* row_dot, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                       int64_t bh) {
  const int64_t N = out.size(1), Dv = out.size(2);
  const scalar_t* dod = dout.data_ptr<scalar_t>() + bh * N * Dv;
  const scalar_t* od = out.data_ptr<scalar_t>() + bh * N * Dv;
  const scalar_t* lsed = lse.data_ptr<scalar_t>() + bh * N;
  for (int64_t i = 0; i < N; ++i)
    row_dot[i] = lsed[i] == -std::numeric_limits<scalar_t>::infinity() ? scalar_t(0) : dot(dod + i * Dv, od + i * Dv, Dv);
}

// dst[r, c] (+)= src[c, r] for a [rows, cols] dst (row stride cols) and a [cols, rows] src
// (row stride rows), in square blocks so both sides stay in L1.
template <bool Add, typename T>
void transposed_into(T* dst, const T* src, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
      for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c) {
          if constexpr (Add) {
            dst[r * cols + c] += src[c * rows + r];
          } else {
            dst[r * cols + c] = src[c * rows + r];
          }
        }
}

// gbias[h, r0:r0+rows, c0:c0+cols] += dS ([rows, cols]), gbias contiguous [H, Nq, Nk].
template <typename T>
void add_bias_grad(T* gbias, int64_t Nq, int64_t Nk, int64_t h, int64_t r0, int64_t c0, const T* dS, int64_t rows,
                   int64_t cols) {
  T* g = gbias + (h * Nq + r0) * Nk + c0;
  for (int64_t r = 0; r < rows; ++r) axpy(g + r * Nk, T(1), dS + r * cols, cols);
}

template <typename scalar_t>
void dense_backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const BiasRows<scalar_t>& bias, const at::Tensor& out,
                           const at::Tensor& lse, const at::Tensor& scores, scalar_t scale, int64_t H,
                           at::Tensor& gq, at::Tensor& gk, at::Tensor& gv, at::Tensor& gbias) {
  using blas::Op;
  const int64_t BH = q.size(0), Nq = q.size(1), Nk = k.size(1), D = q.size(2), Dv = v.size(2);
  const int64_t tq = Nq < kShortSequence ? kShortQueryTileB : kQueryTileB;
  const int64_t nqb = (Nq + tq - 1) / tq, B = H > 0 ? BH / H : 0;
  const int64_t kept = scores.defined() ? scores.size(0) : 0;
  const bool bias_grad = gbias.numel() > 0;
  const scalar_t *qd = q.data_ptr<scalar_t>(), *kd = k.data_ptr<scalar_t>(), *vd = v.data_ptr<scalar_t>();
  const scalar_t *dod = dout.data_ptr<scalar_t>(), *lsed = lse.data_ptr<scalar_t>();
  const scalar_t* kept_d = kept > 0 ? scores.data_ptr<scalar_t>() : nullptr;
  scalar_t *gqd = gq.data_ptr<scalar_t>(), *gkd = gk.data_ptr<scalar_t>(), *gvd = gv.data_ptr<scalar_t>();
  scalar_t* gbd = bias_grad ? gbias.data_ptr<scalar_t>() : nullptr;
  // Items (b, h) own their dq, dk, dv; the bias gradient sums over the batch, so the items
  // of one head share it: one lock per (head, query tile) stripe.
  std::unique_ptr<std::mutex[]> stripe_locks(new std::mutex[std::max<int64_t>(1, H * nqb)]);
  parallel_tiles(0, BH, [&](int64_t begin, int64_t end) {
    const int64_t tile = std::min(tq, Nq) * std::min(kKeyTileB, Nk);
    std::vector<scalar_t> p_buffer(tile), dp_buffer(tile), row_dot(Nq);
    scalar_t *P = p_buffer.data(), *dS = dp_buffer.data();
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / B, bh = w % B * H + h;  // (head, batch) order, as the forward's
      // The gradient slices are not zeroed: the first product into each overwrites it
      // (beta = 0), which saves a pass over them and a read of C in each first product.
      softmax_row_terms(row_dot.data(), dout, out, lse, bh);
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t q0 = qb * tq, rows = std::min(tq, Nq - q0);
        const scalar_t *Q = qd + (bh * Nq + q0) * D, *dO = dod + (bh * Nq + q0) * Dv;
        const scalar_t *L = lsed + bh * Nq + q0, *Drow = row_dot.data() + q0;
        scalar_t* dQ = gqd + (bh * Nq + q0) * D;
        for (int64_t k0 = 0; k0 < Nk; k0 += kKeyTileB) {
          const int64_t cols = std::min(kKeyTileB, Nk - k0);
          const scalar_t *K = kd + (bh * Nk + k0) * D, *V = vd + (bh * Nk + k0) * Dv;
          if (bh < kept) {  // kept by the forward: P = exp(S - lse) straight from them
            const scalar_t* sd = kept_d + (bh * Nq + q0) * Nk + k0;
            for (int64_t r = 0; r < rows; ++r) exp_shifted_sum(sd + r * Nk, P + r * cols, cols, finite_or_zero(L[r]));
          } else {
            blas::gemm<scalar_t>(Op::N, Op::T, rows, cols, D, scale, Q, D, K, D, 0, P, cols);
            for (int64_t r = 0; r < rows; ++r)
              exp_shifted_sum(P + r * cols, bias.row(h, q0 + r, k0), P + r * cols, cols, finite_or_zero(L[r]));
          }
          // The first query tile writes each key tile's dk, dv rows; the first key tile
          // writes each query tile's dq rows.
          const scalar_t first_q = qb == 0 ? 0 : 1, first_k = k0 == 0 ? 0 : 1;
          scalar_t *dK = gkd + (bh * Nk + k0) * D, *dV = gvd + (bh * Nk + k0) * Dv;
          blas::gemm<scalar_t>(Op::T, Op::N, cols, Dv, rows, 1, P, cols, dO, Dv, first_q, dV, Dv);
          blas::gemm<scalar_t>(Op::N, Op::T, rows, cols, Dv, 1, dO, Dv, V, Dv, 0, dS, cols);  // dP
          for (int64_t r = 0; r < rows; ++r) softmax_grad(dS + r * cols, P + r * cols, cols, Drow[r]);
          blas::gemm<scalar_t>(Op::N, Op::N, rows, D, cols, scale, dS, cols, K, D, first_k, dQ, D);
          blas::gemm<scalar_t>(Op::T, Op::N, cols, D, rows, scale, dS, cols, Q, D, first_q, dK, D);
          if (bias_grad) {
            std::lock_guard<std::mutex> guard(stripe_locks[h * nqb + qb]);
            add_bias_grad(gbd, Nq, Nk, h, q0, k0, dS, rows, cols);
          }
        }
      }
    }
  });
}

// Square tiles of the shared-projection backward (below): four per thread.
constexpr int64_t kSharedTile = 256;
// Below this depth the product it saves costs less than its transposed passes over the
// tiles (B = 8, N = 1024, 2 threads: 0.82x-0.94x at D = 16, 1.03x-1.16x at D = 32,
// 1.07x-1.16x at D = 128), so the general backward runs and adds dk to dq.
constexpr int64_t kSharedMinDepth = 32;

// The backward when k is q (the graph layer's shared query/key projection). The gradient of
// q is then scale * (dS + dS^T) Q, one product where the general backward does two (dq and
// dk), so tiles go in pairs (I, J), (J, I): both dS tiles are formed, summed transposed, and
// multiplied once per side. Without kept scores the pair also shares one Q_I Q_J^T product
// (S_JI is S_IJ^T before the bias). Per tile pair: 6 products (7 without kept scores)
// against the general backward's 8 (10). Parallel over (batch, head) like the general one.
template <typename scalar_t>
void dense_backward_shared_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& v,
                                  const BiasRows<scalar_t>& bias, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& scores, scalar_t scale, int64_t H, at::Tensor& gq,
                                  at::Tensor& gv, at::Tensor& gbias) {
  using blas::Op;
  const int64_t BH = q.size(0), N = q.size(1), D = q.size(2), Dv = v.size(2);
  const int64_t nt = (N + kSharedTile - 1) / kSharedTile, B = H > 0 ? BH / H : 0;
  const int64_t kept = scores.defined() ? scores.size(0) : 0;
  const bool bias_grad = gbias.numel() > 0;
  const scalar_t *qd = q.data_ptr<scalar_t>(), *vd = v.data_ptr<scalar_t>(), *dod = dout.data_ptr<scalar_t>();
  const scalar_t* kept_d = kept > 0 ? scores.data_ptr<scalar_t>() : nullptr;
  scalar_t *gqd = gq.data_ptr<scalar_t>(), *gvd = gv.data_ptr<scalar_t>();
  scalar_t* gbd = bias_grad ? gbias.data_ptr<scalar_t>() : nullptr;
  // The bias gradient sums over the batch: one lock per (head, tile row) stripe, and a
  // thread holds at most one at a time.
  std::unique_ptr<std::mutex[]> stripe_locks(new std::mutex[std::max<int64_t>(1, H * nt)]);
  parallel_tiles(0, BH, [&](int64_t begin, int64_t end) {
    const int64_t side = std::min(kSharedTile, N);
    std::vector<scalar_t> buffer(4 * side * side), row_dot(N);
    const auto slot = [&](int64_t which) { return buffer.data() + which * side * side; };
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / B, bh = w % B * H + h;  // (head, batch) order, as the forward's
      const scalar_t* L = lse.data_ptr<scalar_t>() + bh * N;
      const scalar_t *Qb = qd + bh * N * D, *Vb = vd + bh * N * Dv, *dOb = dod + bh * N * Dv;
      scalar_t *gQb = gqd + bh * N * D, *gVb = gvd + bh * N * Dv;
      softmax_row_terms(row_dot.data(), dout, out, lse, bh);
      std::fill(gQb, gQb + N * D, scalar_t(0));
      std::fill(gVb, gVb + N * Dv, scalar_t(0));
      // P = exp(scores - lse) over rows [r0, r0 + rows) and columns [c0, c0 + cols), into P
      // (which may already hold the raw scores, before the bias), or straight from the kept
      // scores (which include it).
      const auto probabilities = [&](scalar_t* P, int64_t rows, int64_t cols, int64_t r0, int64_t c0, bool from_kept) {
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t shift = finite_or_zero(L[r0 + r]);
          if (from_kept) {
            exp_shifted_sum(kept_d + (bh * N + r0 + r) * N + c0, P + r * cols, cols, shift);
          } else {
            exp_shifted_sum(P + r * cols, bias.row(h, r0 + r, c0), P + r * cols, cols, shift);
          }
        }
      };
      // dS = P o (dO_rows V_cols^T - D_rows) into dS.
      const auto score_grad = [&](scalar_t* dS, const scalar_t* P, int64_t rows, int64_t cols, int64_t r0, int64_t c0) {
        blas::gemm<scalar_t>(Op::N, Op::T, rows, cols, Dv, 1, dOb + r0 * Dv, Dv, Vb + c0 * Dv, Dv, 0, dS, cols);
        for (int64_t r = 0; r < rows; ++r) softmax_grad(dS + r * cols, P + r * cols, cols, row_dot[r0 + r]);
        if (bias_grad) {
          std::lock_guard<std::mutex> guard(stripe_locks[h * nt + r0 / kSharedTile]);
          add_bias_grad(gbd, N, N, h, r0, c0, dS, rows, cols);
        }
      };
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t i0 = ti * kSharedTile, ri = std::min(kSharedTile, N - i0);
        const scalar_t *Qi = Qb + i0 * D, *dOi = dOb + i0 * Dv;
        scalar_t *dQi = gQb + i0 * D, *dVi = gVb + i0 * Dv;
        for (int64_t tj = ti; tj < nt; ++tj) {
          const int64_t j0 = tj * kSharedTile, rj = std::min(kSharedTile, N - j0);
          const bool diagonal = ti == tj;
          const scalar_t *Qj = Qb + j0 * D, *dOj = dOb + j0 * Dv;
          scalar_t *dQj = gQb + j0 * D, *dVj = gVb + j0 * Dv;
          scalar_t *Pij = slot(0), *Pji = slot(1);  // [ri, rj] and [rj, ri]
          if (bh < kept) {
            probabilities(Pij, ri, rj, i0, j0, true);
            if (!diagonal) probabilities(Pji, rj, ri, j0, i0, true);
          } else {
            blas::gemm<scalar_t>(Op::N, Op::T, ri, rj, D, scale, Qi, D, Qj, D, 0, Pij, rj);
            if (!diagonal) {
              transposed_into<false>(Pji, Pij, rj, ri);
              probabilities(Pji, rj, ri, j0, i0, false);
            }
            probabilities(Pij, ri, rj, i0, j0, false);
          }
          blas::gemm<scalar_t>(Op::T, Op::N, rj, Dv, ri, 1, Pij, rj, dOi, Dv, 1, dVj, Dv);  // dVj += Pij^T dOi
          scalar_t *dSij = slot(2), *dSji = slot(3);  // [ri, rj] and [rj, ri]
          score_grad(dSij, Pij, ri, rj, i0, j0);
          if (diagonal) {
            scalar_t* sum = slot(1);  // Pji's slot is free on the diagonal: dS + dS^T
            std::copy(dSij, dSij + ri * ri, sum);
            transposed_into<true>(sum, dSij, ri, ri);
            blas::gemm<scalar_t>(Op::N, Op::N, ri, D, ri, scale, sum, ri, Qi, D, 1, dQi, D);
            continue;
          }
          blas::gemm<scalar_t>(Op::T, Op::N, ri, Dv, rj, 1, Pji, ri, dOj, Dv, 1, dVi, Dv);  // dVi += Pji^T dOj
          score_grad(dSji, Pji, rj, ri, j0, i0);
          transposed_into<true>(dSij, dSji, ri, rj);
          blas::gemm<scalar_t>(Op::N, Op::N, ri, D, rj, scale, dSij, rj, Qj, D, 1, dQi, D);
          blas::gemm<scalar_t>(Op::T, Op::N, rj, D, ri, scale, dSij, rj, Qi, D, 1, dQj, D);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_graph_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& scores_in, double scale, bool bias_grad,
    bool shared_qk) {
  check_dense_attention_args(q_in, k_in, v_in, bias_in);
  check_cpu_float("dense_graph_attention_backward", q_in);
  TORCH_CHECK(!shared_qk || q_in.sizes() == k_in.sizes(),
              "dense_graph_attention_backward: shared_qk needs k of q's shape ", q_in.sizes(), ", got ", k_in.sizes());
  // shared_qk: k stands for q and is not read, on every path (its gradient is folded into q's).
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Nk = k_in.size(2), Dv = v_in.size(3);
  check_dense_attention_backward_args(grad_out_in, out_in, lse_in, q_in, v_in);
  const bool kept = scores_in.has_value() && scores_in->numel() > 0;
  if (kept) {
    TORCH_CHECK(scores_in->dim() == 3 && scores_in->size(0) <= B * H && scores_in->size(1) == Nq &&
                    scores_in->size(2) == Nk && scores_in->scalar_type() == q_in.scalar_type(),
                "dense_graph_attention_backward: scores must be ", q_in.scalar_type(), " [S, Nq, Nk] with S <= B * H = ",
                B * H, ", Nq = ", Nq, ", Nk = ", Nk, ", got ", scores_in->scalar_type(), " ", scores_in->sizes());
    check_same_device("dense_graph_attention_backward", "scores", *scores_in, q_in);
  }
  // Batch items add into the bias gradient in whatever order the threads reach it.
  if (bias_grad && B > 1 && at::get_num_threads() > 1)
    at::globalContext().alertNotDeterministic("dense_graph_attention_backward_cpu (bias gradient)");
  const auto dtype = q_in.scalar_type();
  const auto [q, k, v] = flat_qkv(q_in, shared_qk ? q_in : k_in, v_in);
  const at::Tensor scores = kept ? scores_in->detach().contiguous() : at::Tensor();
  const at::Tensor dout = grad_out_in.detach().to(dtype).contiguous().view({B * H, Nq, Dv});
  const at::Tensor lse = lse_in.detach().to(dtype).contiguous().view({B * H, Nq});
  const at::Tensor out = out_in.detach().to(dtype).contiguous().view({B * H, Nq, Dv});
  const at::Tensor bias = bias_with_unit_stride(bias_in);
  const bool shared_kernel = shared_qk && D >= kSharedMinDepth;
  at::Tensor gq = at::empty({B * H, Nq, D}, q.options());
  at::Tensor gk = shared_kernel ? at::Tensor() : at::empty({B * H, Nk, D}, q.options());
  at::Tensor gv = at::empty({B * H, Nk, Dv}, q.options());
  at::Tensor gbias = bias_grad ? at::zeros({H, Nq, Nk}, q.options()) : at::empty({0}, q.options());
  if (shared_kernel) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "dense_graph_attention_backward_cpu", [&] {
      dense_backward_shared_kernel<scalar_t>(dout, q, v, BiasRows<scalar_t>(bias), out, lse, scores,
                                             static_cast<scalar_t>(scale), H, gq, gv, gbias);
    });
  } else if (B * H * Nq * Nk > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "dense_graph_attention_backward_cpu", [&] {
      dense_backward_kernel<scalar_t>(dout, q, k, v, BiasRows<scalar_t>(bias), out, lse, scores,
                                      static_cast<scalar_t>(scale), H, gq, gk, gv, gbias);
    });
    if (shared_qk) gq.add_(gk);
  } else {
    gq.zero_(), gk.zero_(), gv.zero_();
  }
  // With shared_qk, gq holds dq + dk and gk is empty.
  if (shared_qk) gk = at::empty({0}, q.options());
  return {gq.view({B, H, Nq, D}), shared_qk ? gk : gk.view({B, H, Nk, D}), gv.view({B, H, Nk, Dv}), gbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) {
  m.impl("sparse_graph_attention", &sparse_graph_attention_cpu);
  m.impl("sparse_graph_attention_backward", &sparse_graph_attention_backward_cpu);
  m.impl("dense_graph_attention", &dense_graph_attention_cpu);
  m.impl("dense_graph_attention_backward", &dense_graph_attention_backward_cpu);
}

}  // namespace slsg
