// CPU kernels for nearest-normal scoring: sphere_distance and topk_mean.
//
// sphere_distance expands ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c so the heavy part is a
// GEMM on [Mb, D] x [D, Kb] blocks (our AVX2 micro-kernel, gemm.h; BLAS where the CPU
// lacks AVX2 and for float64), followed by a streaming k-smallest selection over each block
// row. Memory is bounded by the block buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../selection.h"
#include "gemm.h"

namespace slsg {
namespace {

// Per-thread block of up to 1024 queries x 1024 centres on the BLAS path: 4 MiB in float32,
// fits the L3 cache, keeps extra memory small. Square blocks amortise BLAS packing of both
// operands (measured here: ~30% more GFLOP/s than 256 x 4096).
constexpr int64_t kQueryBlock = 1024;
constexpr int64_t kCenterBlock = 1024;
// Queries per block on the BLAS path, whatever the thread count (see sphere_distance_kernel).
constexpr int64_t kBlasQueryBlock = 256;
// With our AVX2 GEMM (gemm.h) the queries are packed once per block and centres go 256 at a
// time: each 96-row slice of the [1024, 256] dot block then stays in L2 while it
// accumulates over D (1024-wide blocks sent it to L3 once per 256 of D).
constexpr int64_t kPackedCenterBlock = 256;

// One query row against one block of centres. A vectorised first pass turns dot products
// into w_j = (||c_j||^2 - r_j^2) - 2 x.c_j in place and finds their minimum; most blocks
// (all but the first few per row) hold no candidate better than the current k-th best and
// are skipped without the branchy insertion pass.
// Squared row norms of a contiguous [R, D] tensor, without an [R, D] temporary (at K = 200k,
// D = 1024 that temporary alone would be 800 MB). Fails on non-finite rows.
template <typename scalar_t>
at::Tensor squared_row_norms(const at::Tensor& t, const char* what) {
  const int64_t R = t.size(0), D = t.size(1);
  at::Tensor out = at::empty({R}, t.options());
  const scalar_t* data = t.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = data + r * D;
      scalar_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += row[d] * row[d];
      o[r] = s;
      if (!std::isfinite(s)) finite = false;
    }
  });
  TORCH_CHECK(finite.load(), "sphere_distance: ", what, " NaN or Inf (or values too large to square)");
  return out;
}

template <typename scalar_t>
inline void select_row(scalar_t* w, scalar_t x_norm, const scalar_t* center_offset,
                       const scalar_t* radius_sq, int64_t k0, int64_t kb, scalar_t* vals,
                       int64_t* idx, int64_t k) {
  scalar_t w_min = std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(min : w_min)
  for (int64_t j = 0; j < kb; ++j) {
    w[j] = center_offset[j] - scalar_t(2) * w[j];
    w_min = w[j] < w_min ? w[j] : w_min;
  }
  bool full = idx[k - 1] >= 0;
  scalar_t worst = vals[k - 1];
  // Clamping only raises values, so the unclamped minimum is a safe lower bound.
  if (full && !(x_norm + w_min < worst)) return;
  for (int64_t j = 0; j < kb; ++j) {
    scalar_t v = x_norm + w[j];
    if (v < worst || !full) {
      const scalar_t r2 = radius_sq ? radius_sq[j] : scalar_t(0);
      if (v + r2 < scalar_t(0)) v = -r2;  // rounding can make ||x - c||^2 slightly negative
      if (v < worst || !full) {
        insert_sorted(vals, idx, k, v, k0 + j);
        worst = vals[k - 1];
        full = idx[k - 1] >= 0;
      }
    }
  }
}

// Threads pull blocks of queries from a shared counter (robust when a core is busy with
// something else) and run a single-threaded GEMM per block into a private buffer, so
// there is one parallel region per call rather than a barrier per block.
template <typename scalar_t>
void sphere_distance_kernel(const at::Tensor& x, const at::Tensor& x_norm, const at::Tensor& centers,
                            const at::Tensor& center_offset, const at::Tensor& radius_sq,
                            int64_t k, at::Tensor& dist, at::Tensor& index) {
  const int64_t M = x.size(0), K = centers.size(0), D = x.size(1);
  const bool use_own_gemm = std::is_same_v<scalar_t, float> && gemm::available();
  const int64_t kb_max = std::min<int64_t>(K, use_own_gemm ? kPackedCenterBlock : kCenterBlock);
  // Small batches still spread over every thread. BLAS rounds a row's products differently
  // for different block shapes, so its blocks do not follow the thread count (results
  // would); our GEMM gives each row the same sums in any block.
  const int64_t per_thread = (M + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t mb_max = use_own_gemm ? std::max<int64_t>(1, std::min<int64_t>(kQueryBlock, per_thread))
                                      : std::min<int64_t>(M, kBlasQueryBlock);
  const int64_t num_blocks = (M + mb_max - 1) / mb_max;

  const scalar_t* xn = x_norm.data_ptr<scalar_t>();
  const scalar_t* cn = center_offset.data_ptr<scalar_t>();
  const scalar_t* r2 = radius_sq.defined() ? radius_sq.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_d = dist.data_ptr<scalar_t>();
  int64_t* out_i = index.data_ptr<int64_t>();
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_blocks);

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({mb_max * kb_max}, x.options());
    std::vector<float> query_panel, center_panel;  // packed operands of the AVX2 GEMM
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t blk = next_block++; blk < num_blocks; blk = next_block++) {
        const int64_t m0 = blk * mb_max, mb = std::min(mb_max, M - m0);
        const at::Tensor xb = x.narrow(0, m0, mb);
        const float* ap = nullptr;
        if (use_own_gemm) {  // packed once, used against every block of centres
          float* panel = gemm::aligned(query_panel, gemm::panel_size(mb, D, gemm::kMR));
          gemm::pack_panel(reinterpret_cast<const float*>(xb.data_ptr()), D, mb, D, gemm::kMR, panel);
          ap = panel;
        }
        for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
          const int64_t kb = std::min(kb_max, K - k0);
          scalar_t* dp = buffer.data_ptr<scalar_t>();
          if (use_own_gemm) {
            float* bp = gemm::aligned(center_panel, gemm::panel_size(kb, D, gemm::kNR));
            gemm::pack_panel(reinterpret_cast<const float*>(centers.data_ptr()) + k0 * D, D, kb, D,
                             gemm::kNR, bp);
            gemm::nt_packed(mb, kb, D, ap, bp, reinterpret_cast<float*>(dp), kb);
          } else {
            at::Tensor dots = buffer.narrow(0, 0, mb * kb).view({mb, kb});
            at::mm_out(dots, xb, centers.narrow(0, k0, kb).t());
          }
          for (int64_t i = 0; i < mb; ++i) {
            const int64_t row = m0 + i;
            select_row<scalar_t>(dp + i * kb, xn[row], cn + k0, r2 ? r2 + k0 : nullptr, k0, kb,
                                 out_d + row * k, out_i + row * k, k);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sphere_distance_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& centers_in,
                                                       const std::optional<at::Tensor>& radii,
                                                       int64_t k) {
  check_sphere_distance_args(x_in, centers_in, radii, k);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "sphere_distance on CPU supports float32 and float64, got ", x_in.scalar_type());
  // Detached: the worker threads below call at::mm_out, and autograd's thread-local
  // "below autograd" state of this kernel does not follow them there.
  const at::Tensor x = x_in.contiguous().detach();
  const at::Tensor centers = centers_in.contiguous().detach();
  const int64_t M = x.size(0);
  at::Tensor dist = at::full({M, k}, std::numeric_limits<double>::infinity(), x.options());
  at::Tensor index = at::full({M, k}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {dist, index};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sphere_distance_cpu", [&] {
    // ||c||^2 - r^2 is all the kernel needs per centre; r^2 alone serves the clamp.
    const at::Tensor x_norm = squared_row_norms<scalar_t>(x, "x contains");
    at::Tensor center_offset = squared_row_norms<scalar_t>(centers, "centers contain");
    check_expansion_fits(static_cast<double>(x_norm.max().item<scalar_t>()),
                         static_cast<double>(center_offset.max().item<scalar_t>()),
                         static_cast<double>(std::numeric_limits<scalar_t>::max()));
    at::Tensor radius_sq;
    if (radii.has_value()) {
      radius_sq = radii->detach().to(x.scalar_type()).contiguous().square();
      TORCH_CHECK(at::isfinite(radius_sq).all().item<bool>(), "sphere_distance: radii contain NaN or Inf (or values too large to square)");
      center_offset -= radius_sq;
    }
    sphere_distance_kernel<scalar_t>(x, x_norm, centers, center_offset, radius_sq, k, dist, index);
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
