// CUDA kernels for nearest-normal scoring: sphere_distance and topk_mean.
//
// sphere_distance works on tiles of [rows x centres] dot products from cuBLAS (row-major, so
// one warp reads one query's row coalesced) and keeps, per query, the k smallest values of
// ||x||^2 + (||c||^2 - r^2) - 2 x.c with the lowest index on ties.
// - float16 / bfloat16 inputs: tensor-core products with float32 accumulation are the exact
//   computation the op promises, so one pass selects the result.
// - float32 inputs are screened first: tensor cores in TF32 give each value to within a
//   rigorous bound e = delta (||x|| + sqrt(||c||^2 + r^2))^2 (TF32 keeps 10 of 23 mantissa
//   bits, so each product is within 2^-9 relative, plus float32 accumulation), plus a tiny
//   absolute term for subnormal values that the hardware may flush to zero. The k-th
//   smallest upper bound T is a threshold no result can exceed; every centre whose lower
//   bound is <= T becomes a candidate, and candidates are recomputed exactly in float32. A
//   query with more than kCandidates candidates (near-duplicates closer than the bound) is
//   recomputed by the exact float32 path instead, so the result never depends on TF32.
// - float64, and k > kWarpK, take the exact path: cuBLAS in the input precision (never TF32,
//   whatever torch's matmul settings); k > kWarpK scans each query's row in one thread.
// Extra memory is bounded by the tile sizes, never [M, K].
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../selection.h"

namespace slsg {
namespace {

constexpr int64_t kRowTile = 4096;     // queries per tile
constexpr int64_t kCenterTile = 4096;  // centres per tile: a float32 tile is 64 MiB
constexpr int kWarpK = 16;             // largest k of the warp-per-query selection
constexpr int kCandidates = 256;       // screened candidates kept per query
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();  // sorts after every index

#define SLSG_CUBLAS_CHECK(expr)                                                          \
  do {                                                                                   \
    const cublasStatus_t status_ = (expr);                                               \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "sphere_distance: cuBLAS error ",      \
                static_cast<int>(status_), " in " #expr);                               \
  } while (0)

// tile[i, j] = x[i] . centers[j] for a [rows, D] and a [cols, D] block (both contiguous), in
// the precision asked for: exact (the input precision, float32 accumulation) or TF32.
void tile_dots(const at::Tensor& x, const at::Tensor& centers, at::Tensor& tile, bool tf32) {
  const int64_t rows = x.size(0), cols = centers.size(0), D = x.size(1);
  if (x.scalar_type() == at::kDouble) {
    at::mm_out(tile, x, centers.t());  // float64 matmul never uses TF32
    return;
  }
  cudaDataType_t in_type = CUDA_R_32F;
  if (x.scalar_type() == at::kHalf) in_type = CUDA_R_16F;
  if (x.scalar_type() == at::kBFloat16) in_type = CUDA_R_16BF;
  const cublasComputeType_t compute =
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
           : (in_type == CUDA_R_32F ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F);
  const float one = 1.0f, zero = 0.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // Column-major view: tile^T [cols, rows] = centers [cols, D] . x^T.
  SLSG_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(cols),
                                 static_cast<int>(rows), static_cast<int>(D), &one,
                                 centers.data_ptr(), in_type, static_cast<int>(D), x.data_ptr(),
                                 in_type, static_cast<int>(D), &zero, tile.data_ptr(), CUDA_R_32F,
                                 static_cast<int>(tile.stride(0)), compute, CUBLAS_GEMM_DEFAULT));
}

template <typename acc_t>
__device__ __forceinline__ bool before(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// Per-centre terms of one tile, pointers already offset to the tile's first centre.
template <typename acc_t>
struct CenterTerms {
  const acc_t* offset;     // ||c||^2 - r^2
  const acc_t* radius_sq;  // r^2, or null
  const acc_t* length;     // sqrt(||c||^2 + r^2) (screening only)
  int64_t first;           // index of the tile's first centre
  int64_t count;
};

// How far a TF32 tile value can be from the exact float32 one, for reach = ||x|| + length_j:
// relative * reach^2 (rounding of normal numbers) + absolute * (reach + 2), which covers what
// a relative bound cannot: subnormal operands or products flushed to zero (each term then
// moves by less than FLT_MIN times its other factor).
template <typename acc_t>
struct ScreenBound {
  acc_t relative;
  acc_t absolute;
  __device__ __forceinline__ acc_t margin(acc_t reach) const {
    return reach * (relative * reach + absolute) + acc_t(2) * absolute;
  }
};

// The value a tile entry stands for. When screening, +/- bound.margin(||x|| + length_j) turns
// it into an upper / lower bound of the exact float32 value.
template <typename acc_t>
__device__ __forceinline__ acc_t tile_value(acc_t dot, acc_t x_norm, acc_t offset) {
  return x_norm + (offset - acc_t(2) * dot);
}

// Warp-per-query selection over one tile: merges the tile's k smallest (upper bounds when
// screening) into the running list best[k] (ascending, unfilled = (+inf, -1)).
template <typename acc_t, int KMAX, bool SCREEN>
__global__ void __launch_bounds__(kThreads) select_tile_kernel(
    const acc_t* __restrict__ tile, int64_t rows, int64_t ld, const acc_t* __restrict__ x_norm,
    const acc_t* __restrict__ x_length, ScreenBound<acc_t> bound, CenterTerms<acc_t> c,
    acc_t* __restrict__ best_v, int64_t* __restrict__ best_j, int k) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const acc_t* dots = tile + row * ld;
  acc_t* bv = best_v + row * k;
  int64_t* bj = best_j + row * k;
  const acc_t running_worst = bv[k - 1];
  const acc_t xn = x_norm[row];
  const acc_t xl = SCREEN ? x_length[row] : acc_t(0);

  acc_t lv[KMAX];
  int64_t lj[KMAX];
#pragma unroll
  for (int p = 0; p < KMAX; ++p) {
    lv[p] = std::numeric_limits<acc_t>::infinity();
    lj[p] = kNoIndex;
  }
  acc_t worst = running_worst;
  for (int64_t j = lane; j < c.count; j += 32) {
    acc_t v = tile_value(dots[j], xn, c.offset[j]);
    if (SCREEN) {
      v += bound.margin(xl + c.length[j]);
    }
    if (v < worst) {
      // Rounding can make the squared distance slightly negative: clamp it at zero.
      const acc_t r2 = c.radius_sq ? c.radius_sq[j] : acc_t(0);
      if (v + r2 < acc_t(0)) v = -r2;
      if (v < worst) {
        // Insert into this lane's ascending list (its j only grow: ties keep the lowest).
        bool placed = false;
#pragma unroll
        for (int p = KMAX - 1; p > 0; --p) {
          if (p < k && !placed) {
            if (lv[p - 1] > v) {
              lv[p] = lv[p - 1];
              lj[p] = lj[p - 1];
            } else {
              lv[p] = v;
              lj[p] = c.first + j;
              placed = true;
            }
          }
        }
        if (!placed) {
          lv[0] = v;
          lj[0] = c.first + j;
        }
#pragma unroll
        for (int p = 0; p < KMAX; ++p)
          if (p == k - 1) worst = lv[p] < running_worst ? lv[p] : running_worst;
      }
    }
  }
  // Merge the 32 lane lists and the running list: k rounds of a warp argmin over the heads.
  int gp = 0;  // next entry of the running list (lane 0 offers it)
  acc_t mine_v = std::numeric_limits<acc_t>::infinity();
  int64_t mine_j = kNoIndex;
  for (int r = 0; r < k; ++r) {
    acc_t v = lv[0];
    int64_t j = lj[0];
    if (lane == 0 && gp < k && bj[gp] >= 0 && before(bv[gp], bj[gp], v, j)) {
      v = bv[gp];
      j = bj[gp];
    }
    acc_t wv = v;
    int64_t wj = j;
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes >>= 1) {
      const acc_t ov = __shfl_xor_sync(kFullMask, wv, lanes);
      const int64_t oj = __shfl_xor_sync(kFullMask, wj, lanes);
      if (before(ov, oj, wv, wj)) {
        wv = ov;
        wj = oj;
      }
    }
    if (wj == kNoIndex) break;  // fewer than k values so far
    if (lane == r) {
      mine_v = wv;
      mine_j = wj;
    }
    if (lj[0] == wj) {  // this lane's head won: pop it
#pragma unroll
      for (int p = 0; p + 1 < KMAX; ++p) {
        lv[p] = lv[p + 1];
        lj[p] = lj[p + 1];
      }
      lv[KMAX - 1] = std::numeric_limits<acc_t>::infinity();
      lj[KMAX - 1] = kNoIndex;
    } else if (lane == 0 && j == wj) {
      ++gp;  // the running list's head won
    }
  }
  __syncwarp();
  if (lane < k) {
    bv[lane] = mine_v;
    bj[lane] = mine_j == kNoIndex ? -1 : mine_j;
  }
}

// Screening, after select_tile_kernel has folded the tile into the upper bounds: drops the
// candidates whose lower bound now exceeds T (the k-th smallest upper bound), then appends
// the tile's centres whose lower bound is <= T, in increasing index order. A query whose
// candidates overflow is marked with count = kCandidates + 1.
__global__ void __launch_bounds__(kThreads) collect_candidates_kernel(
    const float* __restrict__ tile, int64_t rows, int64_t ld, const float* __restrict__ x_norm,
    const float* __restrict__ x_length, ScreenBound<float> bound, CenterTerms<float> c,
    const float* __restrict__ best_v, int k, int64_t* __restrict__ cand_j,
    float* __restrict__ cand_lower, int* __restrict__ count) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  int n = count[row];
  if (n > kCandidates) return;
  const float T = best_v[row * k + k - 1];
  int64_t* cj = cand_j + row * kCandidates;
  float* cl = cand_lower + row * kCandidates;
  const unsigned below = (1u << lane) - 1u;
  int kept = 0;
  for (int base = 0; base < n; base += 32) {
    const int p = base + lane;
    const bool in = p < n;
    const float lower = in ? cl[p] : 0.0f;
    const int64_t j = in ? cj[p] : 0;
    const bool keep = in && lower <= T;
    const unsigned mask = __ballot_sync(kFullMask, keep);
    __syncwarp();
    if (keep) {
      const int q = kept + __popc(mask & below);
      cl[q] = lower;
      cj[q] = j;
    }
    kept += __popc(mask);
  }
  const float* dots = tile + row * ld;
  const float xn = x_norm[row], xl = x_length[row];
  for (int64_t base = 0; base < c.count; base += 32) {
    const int64_t j = base + lane;
    bool take = false;
    float lower = 0.0f;
    if (j < c.count) {
      lower = tile_value(dots[j], xn, c.offset[j]) - bound.margin(xl + c.length[j]);
      take = lower <= T;
    }
    const unsigned mask = __ballot_sync(kFullMask, take);
    if (take) {
      const int q = kept + __popc(mask & below);
      if (q < kCandidates) {
        cl[q] = lower;
        cj[q] = c.first + j;
      }
    }
    kept += __popc(mask);
    if (kept > kCandidates) break;  // warp-uniform
  }
  if (lane == 0) count[row] = kept > kCandidates ? kCandidates + 1 : kept;
}

// Exact float32 values of the surviving candidates (each dot product summed by the warp in a
// fixed order, so equal centres give equal values) and their k smallest, lowest index first.
__global__ void __launch_bounds__(kThreads) rerank_candidates_kernel(
    const float* __restrict__ x, const float* __restrict__ centers, int64_t rows, int64_t D,
    const float* __restrict__ x_norm, const float* __restrict__ offset,
    const float* __restrict__ radius_sq, const float* __restrict__ best_v,
    const int64_t* __restrict__ cand_j, const float* __restrict__ cand_lower,
    const int* __restrict__ count, int k, float* __restrict__ dist, int64_t* __restrict__ index) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int n = count[row];
  if (n > kCandidates) return;  // recomputed by the exact path
  const float T = best_v[row * k + k - 1];
  const float* xr = x + row * D;
  float vals[kWarpK];
  int64_t idx[kWarpK];
  for (int p = 0; p < k; ++p) {
    vals[p] = std::numeric_limits<float>::infinity();
    idx[p] = -1;
  }
  for (int p = 0; p < n; ++p) {
    if (cand_lower[row * kCandidates + p] > T) continue;  // warp-uniform
    const int64_t j = cand_j[row * kCandidates + p];
    const float* cr = centers + j * D;
    float dot = 0.0f;
    for (int64_t d = lane; d < D; d += 32) dot = fmaf(xr[d], cr[d], dot);
#pragma unroll
    for (int lanes = 16; lanes > 0; lanes >>= 1) dot += __shfl_xor_sync(kFullMask, dot, lanes);
    float v = tile_value(dot, x_norm[row], offset[j]);
    const float r2 = radius_sq ? radius_sq[j] : 0.0f;
    if (v + r2 < 0.0f) v = -r2;
    if (v < vals[k - 1]) insert_sorted(vals, idx, k, v, j);  // candidates come in index order
  }
  if (lane < k) {
    // Each lane writes one slot (the lists are identical in every lane).
    for (int p = 0; p < k; ++p)
      if (p == lane) {
        dist[row * k + p] = vals[p];
        index[row * k + p] = idx[p];
      }
  }
}

// Serial selection for k > kWarpK: one thread per query scans the tile row.
template <typename acc_t>
__global__ void scan_tile_kernel(const acc_t* __restrict__ tile, int64_t rows, int64_t ld,
                                 const acc_t* __restrict__ x_norm, CenterTerms<acc_t> c,
                                 acc_t* __restrict__ best_v, int64_t* __restrict__ best_j,
                                 int64_t k) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows) return;
  scan_block<acc_t>(tile + i * ld, 1, x_norm[i], c.offset, c.radius_sq, c.first, c.count,
                    best_v + i * k, best_j + i * k, k);
}

// ||row||^2 of a [R, D] tensor in the accumulation dtype, converting chunk by chunk.
at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor out = at::empty({t.size(0)}, t.options().dtype(acc));
  for (int64_t r0 = 0; r0 < t.size(0); r0 += kRowTile) {
    const int64_t rb = std::min(kRowTile, t.size(0) - r0);
    out.narrow(0, r0, rb).copy_(t.narrow(0, r0, rb).to(acc).square().sum(1));
  }
  return out;
}

// The memory of normal features with its per-centre terms.
struct Bank {
  at::Tensor centers;    // [K, D], contiguous, input dtype
  at::Tensor offset;     // ||c||^2 - r^2
  at::Tensor radius_sq;  // r^2, or undefined
  at::Tensor length;     // sqrt(||c||^2 + r^2), float32 inputs only (screening)

  template <typename acc_t>
  CenterTerms<acc_t> terms(int64_t first, int64_t count) const {
    return {offset.data_ptr<acc_t>() + first,
            radius_sq.defined() ? radius_sq.data_ptr<acc_t>() + first : nullptr,
            length.defined() ? length.data_ptr<acc_t>() + first : nullptr, first, count};
  }
};

int blocks_for_warps(int64_t rows) {
  return static_cast<int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Folds one tile into the running lists best_v / best_j (k <= kWarpK).
template <typename acc_t, bool SCREEN>
void select_tile(const at::Tensor& tile, int64_t rows, const at::Tensor& x_norm,
                 const at::Tensor& x_length, ScreenBound<acc_t> bound, CenterTerms<acc_t> terms,
                 at::Tensor& best_v, at::Tensor& best_j, int64_t k) {
  auto kernel = k == 1 ? select_tile_kernel<acc_t, 1, SCREEN> : select_tile_kernel<acc_t, kWarpK, SCREEN>;
  kernel<<<blocks_for_warps(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      tile.data_ptr<acc_t>(), rows, tile.stride(0), x_norm.data_ptr<acc_t>(),
      SCREEN ? x_length.data_ptr<acc_t>() : nullptr, bound, terms, best_v.data_ptr<acc_t>(),
      best_j.data_ptr<int64_t>(), static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Exact k smallest values for the rows of xq ([mq, D], input dtype, contiguous), written into
// dist / index [mq, k] (which start as (+inf, -1)). `tile`: a buffer of at least one tile to
// reuse, else one is allocated.
template <typename acc_t>
void exact_search(const at::Tensor& xq, const at::Tensor& xq_norm, const Bank& bank, int64_t k,
                  at::Tensor& dist, at::Tensor& index, at::Tensor tile = {}) {
  const int64_t M = xq.size(0), K = bank.centers.size(0);
  const int64_t rows_max = std::min(M, kRowTile), cols_max = std::min(K, kCenterTile);
  if (!tile.defined()) tile = at::empty({rows_max, cols_max}, xq_norm.options());
  for (int64_t m0 = 0; m0 < M; m0 += rows_max) {
    const int64_t rows = std::min(rows_max, M - m0);
    at::Tensor xb = xq.narrow(0, m0, rows), nb = xq_norm.narrow(0, m0, rows);
    at::Tensor dv = dist.narrow(0, m0, rows), dj = index.narrow(0, m0, rows);
    for (int64_t k0 = 0; k0 < K; k0 += cols_max) {
      const int64_t cols = std::min(cols_max, K - k0);
      at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
      tile_dots(xb, bank.centers.narrow(0, k0, cols), t, /*tf32=*/false);
      const auto terms = bank.terms<acc_t>(k0, cols);
      if (k <= kWarpK) {
        select_tile<acc_t, false>(t, rows, nb, nb, ScreenBound<acc_t>{acc_t(0), acc_t(0)}, terms, dv, dj, k);
      } else {
        scan_tile_kernel<acc_t><<<static_cast<int>((rows + kThreads - 1) / kThreads), kThreads, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(
            t.data_ptr<acc_t>(), rows, t.stride(0), nb.data_ptr<acc_t>(), terms,
            dv.data_ptr<acc_t>(), dj.data_ptr<int64_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
}

// float32, k <= kWarpK: TF32 screening, exact re-ranking, exact path for overflowing rows.
void screened_search(const at::Tensor& x, const at::Tensor& x_norm, const Bank& bank, int64_t k,
                     at::Tensor& dist, at::Tensor& index) {
  const int64_t M = x.size(0), K = bank.centers.size(0), D = x.size(1);
  // Each TF32 product is within 2^-9 of the float32 product (10 mantissa bits kept, by
  // truncation at worst); float32 accumulation adds at most ~D 2^-24 relative. Both are
  // bounded by ||x|| ||c|| <= (||x|| + ||c||)^2 / 2, and the value holds 2 x.c.
  // Flushing a subnormal operand or product moves each of the D terms of x.c by less than
  // FLT_MIN times the other factor (<= reach) or by less than FLT_MIN: the absolute part.
  const ScreenBound<float> bound{std::ldexp(1.0f, -9) + static_cast<float>(D) * std::ldexp(1.0f, -22),
                                 2.0f * static_cast<float>(D) * std::numeric_limits<float>::min()};
  const at::Tensor x_length = x_norm.sqrt();
  const int64_t rows_max = std::min(M, kRowTile), cols_max = std::min(K, kCenterTile);
  const auto f32 = x_norm.options();
  at::Tensor tile = at::empty({rows_max, cols_max}, f32);
  at::Tensor upper_v = at::empty({rows_max, k}, f32);
  at::Tensor upper_j = at::empty({rows_max, k}, f32.dtype(at::kLong));
  at::Tensor cand_j = at::empty({rows_max, kCandidates}, f32.dtype(at::kLong));
  at::Tensor cand_lower = at::empty({rows_max, kCandidates}, f32);
  at::Tensor count = at::empty({rows_max}, f32.dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t m0 = 0; m0 < M; m0 += rows_max) {
    const int64_t rows = std::min(rows_max, M - m0);
    at::Tensor xb = x.narrow(0, m0, rows), nb = x_norm.narrow(0, m0, rows);
    at::Tensor lb = x_length.narrow(0, m0, rows);
    at::Tensor uv = upper_v.narrow(0, 0, rows), uj = upper_j.narrow(0, 0, rows);
    at::Tensor cnt = count.narrow(0, 0, rows);
    uv.fill_(std::numeric_limits<float>::infinity());
    uj.fill_(-1);
    cnt.zero_();
    for (int64_t k0 = 0; k0 < K; k0 += cols_max) {
      const int64_t cols = std::min(cols_max, K - k0);
      at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
      tile_dots(xb, bank.centers.narrow(0, k0, cols), t, /*tf32=*/true);
      const auto terms = bank.terms<float>(k0, cols);
      select_tile<float, true>(t, rows, nb, lb, bound, terms, uv, uj, k);
      collect_candidates_kernel<<<blocks_for_warps(rows), kThreads, 0, stream>>>(
          t.data_ptr<float>(), rows, t.stride(0), nb.data_ptr<float>(), lb.data_ptr<float>(),
          bound, terms, uv.data_ptr<float>(), static_cast<int>(k), cand_j.data_ptr<int64_t>(),
          cand_lower.data_ptr<float>(), cnt.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor dv = dist.narrow(0, m0, rows), dj = index.narrow(0, m0, rows);
    rerank_candidates_kernel<<<blocks_for_warps(rows), kThreads, 0, stream>>>(
        xb.data_ptr<float>(), bank.centers.data_ptr<float>(), rows, D, nb.data_ptr<float>(),
        bank.offset.data_ptr<float>(),
        bank.radius_sq.defined() ? bank.radius_sq.data_ptr<float>() : nullptr,
        uv.data_ptr<float>(), cand_j.data_ptr<int64_t>(), cand_lower.data_ptr<float>(),
        cnt.data_ptr<int>(), static_cast<int>(k), dv.data_ptr<float>(), dj.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor overflow = at::nonzero(cnt > kCandidates).view(-1);
    if (overflow.numel() > 0) {
      at::Tensor ov = at::full({overflow.numel(), k}, std::numeric_limits<float>::infinity(), f32);
      at::Tensor oj = at::full({overflow.numel(), k}, -1, f32.dtype(at::kLong));
      exact_search<float>(xb.index_select(0, overflow), nb.index_select(0, overflow), bank, k,
                          ov, oj, tile);  // the screening's tile buffer: no second one
      dv.index_copy_(0, overflow, ov);
      dj.index_copy_(0, overflow, oj);
    }
  }
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
  TORCH_CHECK(x_in.size(1) <= std::numeric_limits<int>::max(),
              "sphere_distance on CUDA: feature size D beyond 2^31 is not supported");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor dist = at::full({M, k}, std::numeric_limits<double>::infinity(), x.options().dtype(acc));
  at::Tensor index = at::full({M, k}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {dist, index};

  Bank bank;
  bank.centers = centers_in.contiguous();
  const at::Tensor x_norm = row_norms(x, acc);
  const at::Tensor center_norm = row_norms(bank.centers, acc);
  TORCH_CHECK(at::isfinite(x_norm).all().item<bool>(), "sphere_distance: x contains NaN or Inf (or values too large to square)");
  TORCH_CHECK(at::isfinite(center_norm).all().item<bool>(),
              "sphere_distance: centers contain NaN or Inf (or values too large to square)");
  check_expansion_fits(x_norm.max().item<double>(), center_norm.max().item<double>(),
                       acc == at::kDouble ? std::numeric_limits<double>::max()
                                          : static_cast<double>(std::numeric_limits<float>::max()));
  bank.offset = center_norm;
  if (radii.has_value()) {
    bank.radius_sq = radii->to(acc).contiguous().square();
    TORCH_CHECK(at::isfinite(bank.radius_sq).all().item<bool>(),
                "sphere_distance: radii contain NaN or Inf (or values too large to square)");
    bank.offset = center_norm - bank.radius_sq;
  }
  if (dtype == at::kFloat && k <= kWarpK) {
    // sqrt(||c||^2 + r^2) >= ||c||: the bound then also covers the rounding of large radii.
    bank.length = bank.radius_sq.defined() ? (center_norm + bank.radius_sq).sqrt() : center_norm.sqrt();
    screened_search(x, x_norm, bank, k, dist, index);
  } else if (dtype == at::kDouble) {
    exact_search<double>(x, x_norm, bank, k, dist, index);
  } else {
    exact_search<float>(x, x_norm, bank, k, dist, index);
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
