// CPU kernels for nearest-normal scoring: sphere_distance and topk_mean.
//
// sphere_distance expands ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c so the heavy part is a
// GEMM on [Mb, D] x [D, Kb] blocks (our AVX2 micro-kernel, gemm.h; BLAS where the CPU
// lacks AVX2 and for float64), followed by a streaming k-smallest selection over each block
// row. Memory is bounded by the block buffers.
//
// On CPUs with AVX-512 BF16 the float32 kernel screens first: bfloat16 products (twice the
// speed, gemm_bf16.h) give each value within a proven margin, and only the centres whose
// lower bound does not exceed the k-th smallest upper bound are computed exactly, with the
// same float32 arithmetic as the unscreened path. The results are bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../selection.h"
#include "gemm.h"
#include "gemm_bf16.h"

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
// Squared row norms of a contiguous [R, D] tensor (of its rows minus `shift`, when given),
// without an [R, D] temporary (at K = 200k, D = 1024 that temporary alone would be 800 MB).
// Fails on non-finite rows, naming `what`, unless `what` is null.
template <typename scalar_t>
at::Tensor squared_row_norms(const at::Tensor& t, const char* what, const scalar_t* shift = nullptr) {
  const int64_t R = t.size(0), D = t.size(1);
  at::Tensor out = at::empty({R}, t.options());
  const scalar_t* data = t.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = data + r * D;
      scalar_t s = 0;
      if (shift) {
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += (row[d] - shift[d]) * (row[d] - shift[d]);
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += row[d] * row[d];
      }
      o[r] = s;
      if (!std::isfinite(s)) finite = false;
    }
  });
  TORCH_CHECK(!what || finite.load(), "sphere_distance: ", what, " NaN or Inf (or values too large to square)");
  return out;
}

// The running k smallest (value, centre) of one query row, ascending, unfilled = (+inf, -1):
// what select_row, the screen's upper bounds and the candidates' exact values all keep.
template <typename scalar_t>
struct RowBest {
  scalar_t* vals;
  int64_t* idx;
  int64_t k;
  scalar_t worst;
  bool full;

  RowBest(scalar_t* vals, int64_t* idx, int64_t k)
      : vals(vals), idx(idx), k(k), worst(vals[k - 1]), full(idx[k - 1] >= 0) {}

  bool takes(scalar_t v) const { return v < worst || !full; }

  // Offers centre j's value v, clamped at -r^2 (radius_sq points at r^2, or is null):
  // rounding can make ||x - c||^2 slightly negative. Clamping only raises v, so a v that is
  // not taken unclamped is not taken at all.
  void offer(scalar_t v, const scalar_t* radius_sq, int64_t j) {
    if (takes(v)) insert(v, radius_sq, j);
  }

 private:
  // Out of line: rare once the row has its k, and the scan loops stay small without it.
  __attribute__((noinline)) void insert(scalar_t v, const scalar_t* radius_sq, int64_t j) {
    const scalar_t r2 = radius_sq ? *radius_sq : scalar_t(0);
    if (v + r2 < scalar_t(0)) v = -r2;
    if (!takes(v)) return;
    insert_sorted(vals, idx, k, v, j);
    worst = vals[k - 1];
    full = idx[k - 1] >= 0;
  }
};

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
  RowBest<scalar_t> best(vals, idx, k);
  // Clamping only raises values, so the unclamped minimum is a safe lower bound.
  if (best.full && !(x_norm + w_min < best.worst)) return;
  for (int64_t j = 0; j < kb; ++j) best.offer(x_norm + w[j], radius_sq ? radius_sq + j : nullptr, k0 + j);
}

// The query rows and centre terms every block reads, and where results go.
template <typename scalar_t>
struct Search {
  const at::Tensor& x;
  const at::Tensor& centers;
  const scalar_t* x_norm;
  const scalar_t* center_offset;  // ||c||^2 - r^2
  const scalar_t* radius_sq;      // r^2, or null
  scalar_t* dist;
  int64_t* index;
  int64_t k;
};

// Exact values of `rows` float32 query rows (contiguous [rows, D] at xb; row i is query
// ids[i], or first + i when ids is null) against every centre, with our GEMM: each row gets
// the same sums whatever the block, which the screened path relies on.
inline void exact_rows_own_gemm(const Search<float>& s, const float* xb, int64_t rows, const int64_t* ids,
                                int64_t first, int64_t kb_max, float* buffer,
                                std::vector<float>& query_panel, std::vector<float>& center_panel) {
  const int64_t K = s.centers.size(0), D = s.x.size(1);
  float* ap = gemm::aligned(query_panel, gemm::panel_size(rows, D, gemm::kMR));
  gemm::pack_panel(xb, D, rows, D, gemm::kMR, ap);  // packed once, used against every block of centres
  const float* c = s.centers.data_ptr<float>();
  for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
    const int64_t kb = std::min(kb_max, K - k0);
    float* bp = gemm::aligned(center_panel, gemm::panel_size(kb, D, gemm::kNR));
    gemm::pack_panel(c + k0 * D, D, kb, D, gemm::kNR, bp);
    gemm::nt_packed(rows, kb, D, ap, bp, buffer, kb);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = ids ? ids[i] : first + i;
      select_row<float>(buffer + i * kb, s.x_norm[row], s.center_offset + k0,
                        s.radius_sq ? s.radius_sq + k0 : nullptr, k0, kb, s.dist + row * s.k,
                        s.index + row * s.k, s.k);
    }
  }
}

// Threads pull blocks of queries from a shared counter (robust when a core is busy with
// something else) and run a single-threaded GEMM per block into a private buffer, so
// there is one parallel region per call rather than a barrier per block.
template <typename scalar_t>
void sphere_distance_kernel(const Search<scalar_t>& s) {
  const int64_t M = s.x.size(0), K = s.centers.size(0);
  const bool use_own_gemm = std::is_same_v<scalar_t, float> && gemm::available();
  const int64_t kb_max = std::min<int64_t>(K, use_own_gemm ? kPackedCenterBlock : kCenterBlock);
  // Small batches still spread over every thread. BLAS rounds a row's products differently
  // for different block shapes, so its blocks do not follow the thread count (results
  // would); our GEMM gives each row the same sums in any block.
  const int64_t per_thread = (M + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t mb_max = use_own_gemm ? std::max<int64_t>(1, std::min<int64_t>(kQueryBlock, per_thread))
                                      : std::min<int64_t>(M, kBlasQueryBlock);
  const int64_t num_blocks = (M + mb_max - 1) / mb_max;
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_blocks);

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({mb_max * kb_max}, s.x.options());
    std::vector<float> query_panel, center_panel;  // packed operands of the AVX2 GEMM
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t blk = next_block++; blk < num_blocks; blk = next_block++) {
        const int64_t m0 = blk * mb_max, mb = std::min(mb_max, M - m0);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (use_own_gemm) {
            exact_rows_own_gemm(s, s.x.template data_ptr<float>() + m0 * s.x.size(1), mb, nullptr, m0, kb_max,
                                buffer.data_ptr<float>(), query_panel, center_panel);
            continue;
          }
        }
        const at::Tensor xb = s.x.narrow(0, m0, mb);
        for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
          const int64_t kb = std::min(kb_max, K - k0);
          scalar_t* dp = buffer.data_ptr<scalar_t>();
          at::Tensor dots = buffer.narrow(0, 0, mb * kb).view({mb, kb});
          at::mm_out(dots, xb, s.centers.narrow(0, k0, kb).t());
          for (int64_t i = 0; i < mb; ++i) {
            const int64_t row = m0 + i;
            select_row<scalar_t>(dp + i * kb, s.x_norm[row], s.center_offset + k0,
                                 s.radius_sq ? s.radius_sq + k0 : nullptr, k0, kb, s.dist + row * s.k,
                                 s.index + row * s.k, s.k);
          }
        }
      }
    }
  });
}

// ---- screened float32 path (AVX-512 BF16) ------------------------------------------------

// Below this depth, or with fewer centres, the screen's extra passes (a row's first block
// of centres is all candidates) cost more than its faster products save.
constexpr int64_t kScreenMinDim = 48;
constexpr int64_t kScreenMinCenters = 1024;
// Larger k keeps more candidates per row than the screen can hold.
constexpr int64_t kScreenMaxK = 64;
// Candidates a row may hold: at most 1024, and at most K / 16 (one candidate computed alone
// costs about as much as 16 columns of the exact GEMM). A row that keeps more than half of
// them after pruning (values too close together for the bfloat16 margin, e.g. duplicates)
// is computed exactly instead.
inline int64_t candidate_cap(int64_t K, int64_t k) {
  return std::max<int64_t>(8 * k, std::min<int64_t>(1024, K / 16));
}
// Candidate pairs computed exactly at a time.
constexpr int64_t kPairGroup = 16384;

// The screen works on rows minus a shift (the mean of some centres): distances do not
// change, and the bfloat16 errors, which grow with the operands' norms, shrink for features
// far from the origin (non-negative CNN features). Per query and centre it needs the
// shifted squared norms and lengths, and the unshifted lengths for the exact side's error.
struct ScreenTerms {
  at::Tensor shift;           // [D]
  at::Tensor x_norm;          // ||x'||^2, x' = x - shift
  at::Tensor x_length;        // ||x'||
  at::Tensor x_length_u;      // ||x||
  at::Tensor center_offset;   // ||c'||^2 - r^2, c' = c - shift
  at::Tensor center_length;   // ||c'||
  at::Tensor center_reach;    // sqrt(||c'||^2 + r^2)
  at::Tensor center_reach_u;  // sqrt(||c||^2 + r^2)
};

// How far a screened value can be from the exact float32 value of the same pair:
//   bf16 ||x'|| ||c'|| + f32 (reach^2 + reach_u^2) + absolute (reach + reach_u + 2),
// reach = ||x'|| + sqrt(||c'||^2 + r^2), reach_u the same unshifted; each float32 value
// below has magnitude <= its side's reach^2.
// - bfloat16 keeps 8 significant bits: round to nearest moves an operand by at most 2^-8
//   relative, a product by at most 2^-7 + 2^-16, and 2 x'.c' by at most that times
//   2 sum|x'_d c'_d| <= 2 ||x'|| ||c'||: bf16 = 2^-6 + 2^-15, plus slack.
// - Float32 on the screen side (the products' sums, the shifted squared norms, three adds)
//   and on the exact side (the same on the unshifted rows) add at most (2D + 3) 2^-24 of
//   their reach^2 each; doubled for slack: f32 = (D + 3) 2^-22. The slack also covers the
//   shifted rows' own rounding (2^-24 per entry, ~2^-23 reach^2) and the bounds' own.
// - Flushing subnormal operands, products or partial sums (the bfloat16 instructions do;
//   torch.set_flush_denormal makes the exact side do it too) moves each of the 2D terms by
//   less than FLT_MIN times the other factor (<= its reach) or by less than FLT_MIN.
struct ScreenBound {
  float bf16;
  float f32;
  float absolute;
  explicit ScreenBound(int64_t D)
      : bf16(std::ldexp(1.0f, -6) + std::ldexp(1.0f, -14)),
        f32(static_cast<float>(D + 3) * std::ldexp(1.0f, -22)),
        absolute(4.0f * static_cast<float>(D) * std::numeric_limits<float>::min()) {}
};

// The centre terms of one block (pointers at its first centre).
struct CenterScreen {
  const float* offset;   // ||c'||^2 - r^2
  const float* length;   // ||c'||
  const float* reach;    // sqrt(||c'||^2 + r^2)
  const float* reach_u;  // sqrt(||c||^2 + r^2)
  const float* radius_sq;  // r^2, or null
};

// A query row's centres that the screen could not rule out, in increasing index order,
// with the lower bounds of their values.
struct Candidates {
  std::vector<int64_t> index;
  std::vector<float> lower;
  bool overflow = false;  // too many: the row is computed exactly instead

  void reset() { index.clear(), lower.clear(), overflow = false; }

  // Drops candidates whose lower bound exceeds the current k-th smallest upper bound.
  void prune(float worst) {
    size_t kept = 0;
    for (size_t c = 0; c < index.size(); ++c)
      if (!(lower[c] > worst)) index[kept] = index[c], lower[kept] = lower[c], ++kept;
    index.resize(kept), lower.resize(kept);
  }
};

struct ScreenRow {  // a query's terms (shifted norm and lengths)
  float norm, length, length_u;
};

// Bounds of one row's block of screened values: lower[j], and upper[j] in place of approx[j]
// (NaN, from inf - inf, becomes no bound). Writes the offsets j whose lower bound does not
// exceed `worst` to hits, ascending, and returns their count. AVX-512: only CPUs that screen
// call it (gemm_bf16::available()).
#if SLSG_GEMM_BF16
__attribute__((target("avx512f"))) inline int64_t screen_bounds(float* approx, const ScreenRow& q,
                                                                const CenterScreen& c, int64_t kb,
                                                                const ScreenBound& bound, float worst,
                                                                float* lower, int32_t* hits) {
  const __m512 norm = _mm512_set1_ps(q.norm), length = _mm512_set1_ps(q.length);
  const __m512 length_u = _mm512_set1_ps(q.length_u), two = _mm512_set1_ps(2.0f);
  const __m512 bf16 = _mm512_set1_ps(bound.bf16), f32 = _mm512_set1_ps(bound.f32);
  const __m512 absolute = _mm512_set1_ps(bound.absolute), limit = _mm512_set1_ps(worst);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t j = 0; j < kb; j += 16) {
    const __mmask16 valid = static_cast<__mmask16>(kb - j >= 16 ? 0xFFFF : (1u << (kb - j)) - 1);
    const __m512 dot = _mm512_maskz_loadu_ps(valid, approx + j);
    const __m512 v = _mm512_add_ps(norm, _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, c.offset + j),
                                                       _mm512_mul_ps(two, dot)));
    const __m512 reach = _mm512_add_ps(length, _mm512_maskz_loadu_ps(valid, c.reach + j));
    const __m512 reach_u = _mm512_add_ps(length_u, _mm512_maskz_loadu_ps(valid, c.reach_u + j));
    const __m512 product = _mm512_mul_ps(length, _mm512_maskz_loadu_ps(valid, c.length + j));
    const __m512 squares = _mm512_add_ps(_mm512_mul_ps(reach, reach), _mm512_mul_ps(reach_u, reach_u));
    const __m512 margin = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(bf16, product), _mm512_mul_ps(f32, squares)),
        _mm512_mul_ps(absolute, _mm512_add_ps(_mm512_add_ps(reach, reach_u), two)));
    __m512 lo = _mm512_sub_ps(v, margin), hi = _mm512_add_ps(v, margin);
    lo = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(lo, lo, _CMP_ORD_Q), _mm512_sub_ps(_mm512_setzero_ps(), inf), lo);
    hi = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(hi, hi, _CMP_ORD_Q), inf, hi);
    _mm512_mask_storeu_ps(lower + j, valid, lo);
    _mm512_mask_storeu_ps(approx + j, valid, hi);
    const __mmask16 hit = valid & _mm512_cmp_ps_mask(lo, limit, _CMP_LE_OQ);
    if (hit) {
      _mm512_mask_compressstoreu_epi32(hits + n, hit, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j))));
      n += __builtin_popcount(hit);
    }
  }
  return n;
}
#else
inline int64_t screen_bounds(float*, const ScreenRow&, const CenterScreen&, int64_t, const ScreenBound&,
                             float, float*, int32_t*) {
  return 0;  // never called: screening needs x86 AVX-512 BF16
}
#endif

// One query row against one block of screened values (approx[j] ~= shifted x.c_{k0+j}):
// keeps the k smallest upper bounds in upper/upper_index and adds every centre whose lower
// bound does not exceed the k-th of them to the candidates. `lower` is scratch of kb floats.
inline void screen_row(float* approx, const ScreenRow& q, const CenterScreen& c, int64_t k0, int64_t kb,
                       const ScreenBound& bound, float* lower, int32_t* hits, float* upper,
                       int64_t* upper_index, int64_t k, int64_t cap, Candidates& cand) {
  RowBest<float> best(upper, upper_index, k);
  const int64_t n = screen_bounds(approx, q, c, kb, bound, best.worst, lower, hits);
  if (n == 0) return;  // the usual case once the row has seen a few blocks
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = hits[t];
    // The exact value is clamped as offer clamps the upper bound, which can only raise it.
    if (!(best.full && lower[j] > best.worst)) best.offer(approx[j], c.radius_sq ? c.radius_sq + j : nullptr, k0 + j);
  }
  // Against the bound that includes this block: early in a row's first block it is loose.
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = hits[t];
    if (!(lower[j] > best.worst)) cand.index.push_back(k0 + j), cand.lower.push_back(lower[j]);
  }
  if (static_cast<int64_t>(cand.index.size()) >= cap) {
    cand.prune(best.worst);
    if (static_cast<int64_t>(cand.index.size()) > cap / 2) {
      cand.reset();
      cand.overflow = true;
    }
  }
}

// Whether a block of rows should stop screening and go to the exact GEMM: the margins are
// too wide for these data (clusters far apart, relative to the spread inside them). Past a
// third of such rows the screen costs more than it saves (the bfloat16 products cost about
// half the exact ones, a row in full exact one). Rows count when they overflowed or, at
// checkpoints from 1/32 of the centres on, when their live candidates (pruned against the
// row's current bound: the first blocks' bound is loose) scaled to all K centres exceed the
// cap. Before, with overflows alone and half the rows, 4 clusters 3-100 standard normals
// apart took 1.12x-1.23x the exact kernel's time: rows trickled into overflow over the first
// 8-66% of the centres, after much of the screen's work. Now 1.05x-1.07x (2026-11-30,
// benchmarks/RESULTS.md). Only speed depends on this: every path is exact.
inline bool block_defeats_screen(Candidates* cands, const float* upper, int64_t k, int64_t mb, int64_t overflowed,
                                 int64_t seen, int64_t K, int64_t cap) {
  if (3 * overflowed > mb) return true;
  // Checkpoints: whenever the count seen is a power of two (centre blocks are 256 rows), from
  // 1/32 of the centres on; pruning costs a pass over the candidates.
  if (32 * seen < K || (seen & (seen - 1)) != 0) return false;
  int64_t doomed = 0;
  for (int64_t i = 0; i < mb; ++i) {
    Candidates& cand = cands[i];
    if (!cand.overflow) cand.prune(upper[i * k + k - 1]);
    doomed += cand.overflow || static_cast<int64_t>(cand.index.size()) * K > cap * seen;
  }
  return 3 * doomed > mb;
}

void screened_kernel(const Search<float>& s, const ScreenTerms& t) {
  const int64_t M = s.x.size(0), K = s.centers.size(0), D = s.x.size(1), k = s.k;
  const ScreenBound bound(D);
  const int64_t cap = candidate_cap(K, k);
  const int64_t kb_max = std::min<int64_t>(K, kPackedCenterBlock);
  const int64_t per_thread = (M + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t mb_max = std::max<int64_t>(1, std::min<int64_t>(kQueryBlock, per_thread));
  const int64_t num_blocks = (M + mb_max - 1) / mb_max;
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_blocks);
  const float* x = s.x.data_ptr<float>();
  const float* c = s.centers.data_ptr<float>();
  const float* shift = t.shift.data_ptr<float>();
  const float *xn = t.x_norm.data_ptr<float>(), *xl = t.x_length.data_ptr<float>();
  const float* xl_u = t.x_length_u.data_ptr<float>();
  const float *c_off = t.center_offset.data_ptr<float>(), *cl = t.center_length.data_ptr<float>();
  const float *c_reach = t.center_reach.data_ptr<float>(), *c_reach_u = t.center_reach_u.data_ptr<float>();

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> approx(mb_max * kb_max), lower(kb_max), scratch, query_panel, center_panel;
    std::vector<int32_t> hits(kb_max);
    std::vector<float> upper(mb_max * k), dots, rows_buffer;
    std::vector<const float*> pair_x, pair_c;  // (query row, candidate centre) pairs to compute exactly
    std::vector<int64_t> upper_index(mb_max * k), exact_ids;
    std::vector<Candidates> cands(mb_max);
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t blk = next_block++; blk < num_blocks; blk = next_block++) {
        const int64_t m0 = blk * mb_max, mb = std::min(mb_max, M - m0);
        std::fill(upper.begin(), upper.end(), std::numeric_limits<float>::infinity());
        std::fill(upper_index.begin(), upper_index.end(), -1);
        for (auto& cand : cands) cand.reset();
        float* ap = gemm::aligned(query_panel, gemm_bf16::panel_size(mb, D, gemm_bf16::kMR));
        gemm_bf16::pack_panel(x + m0 * D, D, mb, D, gemm_bf16::kMR, shift, scratch, ap);
        int64_t overflowed = 0;
        for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
          const int64_t kb = std::min(kb_max, K - k0);
          float* bp = gemm::aligned(center_panel, gemm_bf16::panel_size(kb, D, gemm_bf16::kNR));
          gemm_bf16::pack_panel(c + k0 * D, D, kb, D, gemm_bf16::kNR, shift, scratch, bp);
          gemm_bf16::nt_packed(mb, kb, D, ap, bp, approx.data(), kb);
          for (int64_t i = 0; i < mb; ++i) {
            if (cands[i].overflow) continue;
            const int64_t row = m0 + i;
            const CenterScreen terms{c_off + k0, cl + k0, c_reach + k0, c_reach_u + k0,
                                     s.radius_sq ? s.radius_sq + k0 : nullptr};
            screen_row(approx.data() + i * kb, ScreenRow{xn[row], xl[row], xl_u[row]}, terms, k0, kb, bound,
                       lower.data(), hits.data(), upper.data() + i * k, upper_index.data() + i * k, k, cap,
                       cands[i]);
            overflowed += cands[i].overflow;
          }
          if (block_defeats_screen(cands.data(), upper.data(), k, mb, overflowed, k0 + kb, K, cap)) {
            for (int64_t i = 0; i < mb; ++i) cands[i].reset(), cands[i].overflow = true;
            break;
          }
        }
        // The candidates' exact values, with the same sums as the unscreened path's GEMM, for
        // groups of rows holding about kPairGroup candidates (bounds the pair buffers).
        exact_ids.clear();
        for (int64_t i0 = 0, i1 = 0; i0 < mb; i0 = i1) {
          pair_x.clear(), pair_c.clear();
          for (i1 = i0; i1 < mb && static_cast<int64_t>(pair_x.size()) < kPairGroup; ++i1) {
            Candidates& cand = cands[i1];
            if (cand.overflow) {
              exact_ids.push_back(m0 + i1);
              continue;
            }
            cand.prune(upper[i1 * k + k - 1]);
            for (const int64_t j : cand.index) pair_x.push_back(x + (m0 + i1) * D), pair_c.push_back(c + j * D);
          }
          if (dots.size() < pair_x.size()) dots.resize(pair_x.size());
          gemm::pair_dots(pair_x.data(), pair_c.data(), static_cast<int64_t>(pair_x.size()), D, dots.data());
          const float* dot = dots.data();
          for (int64_t i = i0; i < i1; ++i) {
            if (cands[i].overflow) continue;
            const int64_t row = m0 + i;
            RowBest<float> best(s.dist + row * k, s.index + row * k, k);
            for (const int64_t j : cands[i].index) {  // as select_row, over the candidates only
              const float w = s.center_offset[j] - 2.0f * *dot++;
              best.offer(s.x_norm[row] + w, s.radius_sq ? s.radius_sq + j : nullptr, j);
            }
          }
        }
        // Rows whose values lie too close together for the screen (rare), all centres. A whole
        // block (abandoned) is read in place; a few rows are gathered first.
        const int64_t n_exact = static_cast<int64_t>(exact_ids.size());
        if (n_exact == mb) {
          exact_rows_own_gemm(s, x + m0 * D, mb, nullptr, m0, kb_max, approx.data(), query_panel, center_panel);
        } else if (n_exact > 0) {
          if (static_cast<int64_t>(rows_buffer.size()) < n_exact * D) rows_buffer.resize(n_exact * D);
          for (int64_t r = 0; r < n_exact; ++r)
            std::copy(x + exact_ids[r] * D, x + (exact_ids[r] + 1) * D, rows_buffer.data() + r * D);
          exact_rows_own_gemm(s, rows_buffer.data(), n_exact, exact_ids.data(), 0, kb_max, approx.data(),
                              query_panel, center_panel);
        }
      }
    }
  });
}

// What the screen needs besides the exact kernel's terms (see ScreenTerms), or nothing
// where the shifted rows' squares overflow float32 (the exact kernel accepts such inputs:
// check_expansion_fits bounds the unshifted ones only).
std::optional<ScreenTerms> screen_terms(const at::Tensor& x, const at::Tensor& x_norm,
                                        const at::Tensor& centers, const at::Tensor& center_norm,
                                        const at::Tensor& radius_sq) {
  ScreenTerms t;
  const int64_t K = centers.size(0);
  const int64_t step = std::max<int64_t>(1, K / 1024);  // any shift is correct; ~1024 centres make a good one
  t.shift = centers.index_select(0, at::arange(0, K, step, centers.options().dtype(at::kLong)))
                .to(at::kDouble).mean(0).to(at::kFloat).contiguous();
  const float* shift = t.shift.data_ptr<float>();
  t.x_norm = squared_row_norms<float>(x, nullptr, shift);
  const at::Tensor c_norm = squared_row_norms<float>(centers, nullptr, shift);
  const at::Tensor c_reach_sq = radius_sq.defined() ? c_norm + radius_sq : c_norm;
  const double reach = std::sqrt(t.x_norm.max().item<double>()) + std::sqrt(c_reach_sq.max().item<double>());
  if (!std::isfinite(reach) || !(reach * reach <= std::numeric_limits<float>::max())) return std::nullopt;
  t.x_length = t.x_norm.sqrt();
  t.x_length_u = x_norm.sqrt();
  t.center_offset = radius_sq.defined() ? c_norm - radius_sq : c_norm;
  t.center_length = c_norm.sqrt();
  t.center_reach = c_reach_sq.sqrt();
  t.center_reach_u = (radius_sq.defined() ? center_norm + radius_sq : center_norm).sqrt();
  return t;
}

// The screened kernel where terms are given (float32 only), else the exact one.
template <typename scalar_t>
void run_search(const Search<scalar_t>& s, const std::optional<ScreenTerms>& terms) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (terms.has_value()) {
      screened_kernel(s, *terms);
      return;
    }
  }
  sphere_distance_kernel<scalar_t>(s);
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
    }
    std::optional<ScreenTerms> terms;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (gemm_bf16::available() && x.size(1) >= kScreenMinDim && centers.size(0) >= kScreenMinCenters &&
          k <= kScreenMaxK)
        terms = screen_terms(x, x_norm, centers, center_offset, radius_sq);
    }
    if (radius_sq.defined()) center_offset -= radius_sq;
    const Search<scalar_t> search{x, centers, x_norm.data_ptr<scalar_t>(), center_offset.data_ptr<scalar_t>(),
                                  radius_sq.defined() ? radius_sq.data_ptr<scalar_t>() : nullptr,
                                  dist.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), k};
    run_search<scalar_t>(search, terms);
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
