// CPU kernels for graph construction and aggregation: knn_graph and max_relative.
//
// knn_graph: cosine similarity is a GEMM of the L2-normalised features with themselves.
// The [N, N] matrix is never built: it is cut into T x T tiles, and since it is symmetric
// only tiles with I <= J are computed, each feeding both its rows (node i sees j) and its
// columns (node j sees i). The tiles' dot products come from our AVX2 GEMM (gemm.h) on
// blocks packed once per batch item. Every node keeps its best k*dilation candidates in a
// small sorted list; a threshold guessed from a sample of the nodes lets one vector
// comparison reject most candidates from the first tile on, and the few nodes whose guess
// was too high are recomputed exactly at the end. The few dozen survivors of a tile row are
// ranked by counting, without branches (count_ranks_avx2). With enough batch items a thread takes
// whole items; otherwise tiles run in round-robin rounds (no block twice in a round), so
// the tiles of a round run in parallel without two threads touching one list.
//
// max_relative: forward is row-parallel; backward is parallel over (batch, channel block),
// so each thread owns the gradient rows it scatters into (no atomics, deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "gemm.h"

namespace slsg {
namespace {

constexpr int64_t kKnnTile = 256;                    // 256 x 256 floats = 256 KiB: fits L2
constexpr double kCosineEps = 1e-12;                  // as F.normalize

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t index;
};

// a ranks before b: higher similarity first, then the lower index.
template <typename acc_t>
inline bool ranks_before(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Gathers (values[c] + bias[c], first + c) with value >= worst, in order, skipping node
// `skip`; returns how many. Chunks with no value that high cost one vector pass.
template <typename acc_t>
int64_t gather_at_least_portable(const acc_t* values, const acc_t* bias, int64_t count, acc_t worst,
                                 int64_t first, int64_t skip, Candidate<acc_t>* out) {
  constexpr int64_t kChunk = 16;
  acc_t vals[kChunk];
  int64_t m = 0;
  for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
    const int64_t cw = std::min(kChunk, count - c0);
    acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : chunk_max)
    for (int64_t c = 0; c < cw; ++c) {
      vals[c] = values[c0 + c] + (bias ? bias[c0 + c] : acc_t(0));
      chunk_max = std::max(chunk_max, vals[c]);
    }
    if (chunk_max < worst) continue;
    for (int64_t c = 0; c < cw; ++c) {
      const int64_t node = first + c0 + c;
      if (vals[c] >= worst && node != skip) out[m++] = {vals[c], node};
    }
  }
  return m;
}

#if SLSG_GEMM_AVX2
// For each 8-bit mask, the lanes whose bit is set, first (the rest 0): the permutation
// that packs a vector's chosen lanes to its front.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane)
        if ((mask >> lane) & 1) lanes[mask][k++] = lane;
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};

// The same for float with AVX2, into separate value and node arrays (the ranking's layout):
// 8 values per compare, and the survivors of 8 are packed with one permutation each
// (profiled: extracting them one by one cost as much as the compares). vals and ids need
// room for the survivors plus 8.
__attribute__((target("avx2"))) inline int64_t gather_at_least_avx2(
    const float* values, const float* bias, int64_t count, float worst, int64_t first,
    int64_t skip, float* vals, int32_t* ids) {
  static const CompressTable table;
  const __m256 w = _mm256_set1_ps(worst);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t m = 0, c = 0;
  for (; c + 8 <= count; c += 8) {
    __m256 v = _mm256_loadu_ps(values + c);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, w, _CMP_GE_OQ)));
    // No branch on the mask: at a few dozen survivors per 256 it mispredicted often (profiled).
    const uint64_t self = static_cast<uint64_t>(skip - (first + c));
    mask &= ~(self < 8 ? 1u << self : 0u);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]));
    const __m256i node = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first + c)), lane);
    _mm256_storeu_ps(vals + m, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + m), _mm256_permutevar8x32_epi32(node, perm));
    m += __builtin_popcount(mask);
  }
  for (; c < count; ++c) {
    const float v = values[c] + (bias ? bias[c] : 0.0f);
    if (v >= worst && first + c != skip) vals[m] = v, ids[m] = static_cast<int32_t>(first + c), ++m;
  }
  return m;
}
#endif

// Ranking by counting, for small candidate sets: a candidate's rank is the number of
// candidates that rank before it, so it goes straight to its slot in the sorted list.
// O(count^2) compares, 8 per AVX2 instruction, but no data-dependent branches: nth_element +
// sort on the ~80 survivors of a row mispredicted most of their compares (profiled at
// N = 256: half the kernel's time). Used up to kCountMax candidates.
constexpr int64_t kCountMax = 128;

#if SLSG_GEMM_AVX2
// Pads vals with -inf (never before a finite value) and ids, unless null, with INT32_MAX to
// a multiple of 8.
__attribute__((target("avx2"))) inline int64_t pad8(float* vals, int32_t* ids, int64_t count) {
  int64_t padded = (count + 7) & ~int64_t(7);
  for (int64_t u = count; u < padded; ++u) {
    vals[u] = -std::numeric_limits<float>::infinity();
    if (ids) ids[u] = std::numeric_limits<int32_t>::max();
  }
  return padded;
}

// level[t] = #{u < count : vals[u] >= vals[t]} for t up to count rounded up to 8 (vals and
// level have room for that; vals is padded). Two blocks of t per pass over u, and u two at
// a time: four independent sums, as one sum's add chain bounded the loop (profiled).
__attribute__((target("avx2"))) inline void count_at_least_avx2(const float* vals, int64_t count,
                                                                int64_t padded, int32_t* level) {
  for (int64_t t = 0; t < padded; t += 16) {
    const __m256 va = _mm256_loadu_ps(vals + t);
    const __m256 vb = t + 8 < padded ? _mm256_loadu_ps(vals + t + 8) : va;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
    int64_t u = 0;
    for (; u + 2 <= count; u += 2) {  // a true lane is -1
      const __m256 x = _mm256_broadcast_ss(vals + u), y = _mm256_broadcast_ss(vals + u + 1);
      a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(x, va, _CMP_GE_OQ)));
      b0 = _mm256_sub_epi32(b0, _mm256_castps_si256(_mm256_cmp_ps(x, vb, _CMP_GE_OQ)));
      a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(_mm256_cmp_ps(y, va, _CMP_GE_OQ)));
      b1 = _mm256_sub_epi32(b1, _mm256_castps_si256(_mm256_cmp_ps(y, vb, _CMP_GE_OQ)));
    }
    if (u < count) {
      const __m256 x = _mm256_broadcast_ss(vals + u);
      a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps(x, va, _CMP_GE_OQ)));
      b0 = _mm256_sub_epi32(b0, _mm256_castps_si256(_mm256_cmp_ps(x, vb, _CMP_GE_OQ)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(level + t), _mm256_add_epi32(a0, a1));
    if (t + 8 < padded) _mm256_storeu_si256(reinterpret_cast<__m256i*>(level + t + 8), _mm256_add_epi32(b0, b1));
  }
}

// The r-th largest (1-based) of count <= kCountMax finite values, by counting: the largest
// value that at least r values reach. No branch on the data (a row's floor, see row_floor).
// vals has room for count rounded up to 8 (padding).
__attribute__((target("avx2"))) inline float kth_largest_by_counting(float* vals, int64_t count, int64_t r) {
  alignas(32) int32_t level[kCountMax];
  const int64_t padded = pad8(vals, nullptr, count);
  count_at_least_avx2(vals, count, padded, level);
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(r - 1));
  for (int64_t t = 0; t < padded; t += 8) {
    const __m256 reach = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(level + t)), below));
    best = _mm256_max_ps(best, _mm256_blendv_ps(best, _mm256_loadu_ps(vals + t), reach));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  return *std::max_element(lanes, lanes + 8);
}

// rank[t] = #{u : vals[u] > vals[t], or equal with ids[u] < ids[t]} over `count` finite
// values with distinct ids; vals, ids and rank have room for count rounded up to 8 (padding).
// Eight candidates t at a time meet each u, broadcast, so a rank needs no horizontal sum.
// Without ties the rank is #{u : vals[u] >= vals[t]} - 1, one compare per value; only when
// there is a tie are ids compared.
__attribute__((target("avx2"))) inline void count_ranks_avx2(float* vals, int32_t* ids,
                                                             int64_t count, int32_t* rank) {
  const int64_t padded = pad8(vals, ids, count);
  count_at_least_avx2(vals, count, padded, rank);
  for (int64_t t = 0; t < count; ++t) --rank[t];
  // A tied group of g values all get the rank of its last slot, so the ranks sum to more
  // than 0 + 1 + ... + (count - 1) exactly when there is a tie.
  int64_t sum = 0;
  for (int64_t t = 0; t < count; ++t) sum += rank[t];
  if (sum == count * (count - 1) / 2) return;
  for (int64_t t = 0; t < padded; t += 8) {
    const __m256 vt = _mm256_loadu_ps(vals + t);
    const __m256i it = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ids + t));
    __m256i acc = _mm256_setzero_si256();
    for (int64_t u = 0; u < count; ++u) {
      const __m256 v = _mm256_broadcast_ss(vals + u);
      const __m256i lower = _mm256_cmpgt_epi32(it, _mm256_set1_epi32(ids[u]));
      const __m256 before = _mm256_or_ps(
          _mm256_cmp_ps(v, vt, _CMP_GT_OQ),
          _mm256_and_ps(_mm256_cmp_ps(v, vt, _CMP_EQ_OQ), _mm256_castsi256_ps(lower)));
      acc = _mm256_sub_epi32(acc, _mm256_castps_si256(before));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rank + t), acc);
  }
}

#endif

// The r-th largest (1-based) of count values (scrambles vals): quickselect whose partitions
// have no data-dependent branch (each value is written to both ends of the other buffer, and
// an end advances by the compare), as nth_element's mispredicted compares cost most of a
// floor (profiled). Values equal to the pivot drop out, so every round shrinks the range.
template <typename acc_t>
acc_t kth_largest(acc_t* vals, int64_t count, int64_t r) {
  constexpr int64_t kMax = 256;
  if (count > kMax) {
    std::nth_element(vals, vals + (r - 1), vals + count, std::greater<acc_t>());
    return vals[r - 1];
  }
  acc_t spare[kMax];
  acc_t *from = vals, *to = spare;
  int64_t n = count;
  while (n > 16) {
    const acc_t x = from[0], y = from[n / 2], z = from[n - 1];
    const acc_t pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of 3
    int64_t above = 0, below = 0;
    for (int64_t t = 0; t < n; ++t) {
      const acc_t v = from[t];
      to[above] = v;
      to[n - 1 - below] = v;
      above += v > pivot;
      below += v < pivot;
    }
    if (r <= above) {
      n = above;
    } else if (r <= n - below) {
      return pivot;
    } else {
      r -= n - below;
      std::copy(to + n - below, to + n, to);  // keep each range at its buffer's start
      n = below;
    }
    std::swap(from, to);
  }
  for (int64_t t = 0; t < n; ++t) {
    int64_t above = 0, level = 0;
    for (int64_t u = 0; u < n; ++u) above += from[u] > from[t], level += from[u] >= from[t];
    if (above < r && level >= r) return from[t];
  }
  return from[0];  // unreachable for 1 <= r <= count
}

// Per-thread buffers of knn_tile, allocated once per task rather than once per tile.
template <typename acc_t>
struct TileBuffers {
  at::Tensor tile, tile_t;                 // flat, kKnnTile^2 each
  std::vector<Candidate<acc_t>> scratch;  // kKnnTile + 2 * span
  std::vector<acc_t> cut;                 // kKnnTile
  std::vector<float> vals;                // span + kKnnTile + 8: the float path's survivors
  std::vector<int32_t> ids;               // (see offer_candidates), after the list
  TileBuffers(const at::TensorOptions& options, int64_t span)
      : tile(at::empty({kKnnTile * kKnnTile}, options)),
        tile_t(at::empty({kKnnTile * kKnnTile}, options)),
        scratch(kKnnTile + 2 * span),
        cut(kKnnTile),
        vals(std::is_same_v<acc_t, float> ? span + kKnnTile + 8 : 0),
        ids(std::is_same_v<acc_t, float> ? span + kKnnTile + 8 : 0) {}
};

// Offers `count` candidates (values[c] + bias[c], node first + c) to one node's list, kept
// sorted best first with at most `capacity` entries; returns the new length. Chunks whose
// maximum is below the worst entry of a full list are rejected with one vector pass; the
// survivors are gathered in node order. A few survivors are inserted in place; up to
// kCountMax candidates (list and survivors together) are ranked by counting
// (count_ranks_avx2) and placed in their slots. Otherwise, when more than `capacity`
// survive, the capacity-th best value is found on a plain float copy (`cut`: one compare per
// step, several times faster than ordering the pairs, profiled), and only values above it,
// plus ties at it in node order, are kept. These are sorted and merged with the list in one
// pass. Candidates below `floor`, the node's guessed threshold (see knn_floors), are
// rejected outright.
template <typename acc_t>
int64_t offer_candidates(Candidate<acc_t>* list, int64_t n, int64_t capacity,
                         const acc_t* values, const acc_t* bias, int64_t first, int64_t count,
                         int64_t skip, acc_t floor, TileBuffers<acc_t>& buffers) {
  const acc_t worst = n == capacity ? std::max(floor, list[n - 1].value) : floor;
  Candidate<acc_t>* scratch = buffers.scratch.data();
  int64_t m = -1;
#if SLSG_GEMM_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (gemm::available()) {
      // Survivors go after the list's slots in ranking layout (values, int32 nodes).
      float* vals = buffers.vals.data();
      int32_t* ids = buffers.ids.data();
      m = gather_at_least_avx2(values, bias, count, worst, first, skip, vals + n, ids + n);
      if (m > 8 && n + m <= kCountMax) {
        // Rank the list and the survivors together; each lands in its slot of the new list.
        alignas(32) int32_t rank[kCountMax];
        const int64_t total = n + m;
        for (int64_t t = 0; t < n; ++t) vals[t] = list[t].value, ids[t] = static_cast<int32_t>(list[t].index);
        count_ranks_avx2(vals, ids, total, rank);
        // Ranks past the list go to one spare slot: a branch here mispredicted half the time.
        for (int64_t t = 0; t < total; ++t)
          scratch[std::min<int64_t>(rank[t], capacity)] = {vals[t], ids[t]};
        const int64_t kept = std::min(capacity, total);
        std::copy(scratch, scratch + kept, list);
        return kept;
      }
      for (int64_t t = 0; t < m; ++t) scratch[t] = {vals[n + t], ids[n + t]};
    }
  }
#endif
  if (m < 0) m = gather_at_least_portable<acc_t>(values, bias, count, worst, first, skip, scratch);
  if (m == 0) return n;
  if (m <= 8) {  // the common case once the list is full: insert in place, no merge pass
    for (int64_t t = 0; t < m; ++t) {
      const Candidate<acc_t> c = scratch[t];
      if (n == capacity && !ranks_before(c, list[n - 1])) continue;
      int64_t p = n == capacity ? n - 1 : n++;
      for (; p > 0 && ranks_before(c, list[p - 1]); --p) list[p] = list[p - 1];
      list[p] = c;
    }
    return n;
  }
  if (m > capacity) {
    acc_t* cut = buffers.cut.data();
    for (int64_t t = 0; t < m; ++t) cut[t] = scratch[t].value;
    const acc_t threshold = kth_largest<acc_t>(cut, m, capacity);
    int64_t above = 0;
    for (int64_t t = 0; t < m; ++t) above += scratch[t].value > threshold;
    int64_t ties = capacity - above, kept = 0;
    for (int64_t t = 0; t < m; ++t) {
      const acc_t v = scratch[t].value;
      if (v > threshold || (v == threshold && ties-- > 0)) scratch[kept++] = scratch[t];
    }
    m = kept;
  }
  std::sort(scratch, scratch + m, ranks_before<acc_t>);
  // Merge the two sorted runs into the space after the survivors, then copy back.
  Candidate<acc_t>* merged = scratch + m;
  const int64_t total = std::min(capacity, n + m);
  int64_t a = 0, b = 0;
  for (int64_t t = 0; t < total; ++t) {
    const bool take_list = b == m || (a < n && ranks_before(list[a], scratch[b]));
    merged[t] = take_list ? list[a++] : scratch[b++];
  }
  std::copy(merged, merged + total, list);
  return total;
}

// Asks for n floats at p ahead of use: bias rows are short runs 4N bytes apart, which the
// hardware prefetcher picks up too late (profiled: half of the candidate pass waited there).
template <typename acc_t>
inline void prefetch_span(const acc_t* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(acc_t);
  for (int64_t o = 0; o < n; o += kLine) __builtin_prefetch(p + o);
}

// Round-robin tournament over nb blocks: every pair I < J exactly once, no block twice in
// one round; the first round holds the diagonal tiles (I, I).
std::vector<std::vector<std::pair<int64_t, int64_t>>> tile_rounds(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds(1);
  for (int64_t i = 0; i < nb; ++i) rounds[0].emplace_back(i, i);
  const int64_t n = nb + (nb % 2);  // odd: add a dummy block nb (a bye)
  for (int64_t r = 0; r + 1 < n; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    auto add = [&](int64_t a, int64_t b) {
      if (a < nb && b < nb && a != b) round.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(n - 1, r);
    for (int64_t i = 1; i < n / 2; ++i) add((r + i) % (n - 1), (r - i + (n - 1)) % (n - 1));
    if (!round.empty()) rounds.push_back(std::move(round));
  }
  return rounds;
}


// Rank of the floor among `samples` sampled candidates out of N: about margin * span of all
// N score above it (see knn_floors). Each survivor costs selection work, and a floor above the
// span-th best value costs a recomputation (knn_refill), so the margin shrinks as the sample
// grows: a one-tile row samples a quarter of itself (margin 2, about 14 sampled values above
// the floor at k * dilation = 27), the multi-tile floors 64-256 of all N nodes (margin 3,
// from 6 sampled values above it at N = 1024; margin 2 there was 20% slower, benchmark).
inline int64_t floor_rank(int64_t span, int64_t samples, int64_t N, int64_t margin) {
  return std::clamp<int64_t>((margin * span * samples + N - 1) / N, 1, span);
}

// Floor of one node of a one-tile graph, from every 4th of its N values (+ bias); -inf when
// too few to sample. `work` holds N / 4 + 8 values.
template <typename acc_t>
acc_t row_floor(const acc_t* values, const acc_t* bias, int64_t N, int64_t span, int64_t skip,
                acc_t* work) {
  int64_t m = 0;
  for (int64_t j = 0; j < N; j += 4)
    if (j != skip) work[m++] = values[j] + (bias ? bias[j] : acc_t(0));
  const int64_t rank = floor_rank(span, m, N, /*margin=*/2);
  if (m < 2 * rank || m < 16) return -std::numeric_limits<acc_t>::infinity();
#if SLSG_GEMM_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (m <= kCountMax && gemm::available()) return kth_largest_by_counting(work, m, rank);
  }
#endif
  return kth_largest<acc_t>(work, m, rank);
}

// One batch item's normalised features, each block of kKnnTile rows packed once as both
// GEMM operands (A panels for the rows of a tile, B panels for its columns): every block
// meets every other, so packing per tile would repeat it nb times (a fifth of the GEMM time
// at C = 256, profiled). Empty (no panels) where the AVX2 GEMM is unavailable or for float64.
struct PackedBlocks {
  std::vector<float> a_storage, b_storage;
  float* a = nullptr;
  float* b = nullptr;
  int64_t a_stride = 0, b_stride = 0;

  template <typename acc_t>
  void pack(const at::Tensor& xb) {
    if (!std::is_same_v<acc_t, float> || !gemm::available()) return;
    const int64_t N = xb.size(0), C = xb.size(1), nb = (N + kKnnTile - 1) / kKnnTile;
    a_stride = gemm::panel_size(kKnnTile, C, gemm::kMR);
    b_stride = gemm::panel_size(kKnnTile, C, gemm::kNR);
    a = gemm::aligned(a_storage, nb * a_stride);
    b = gemm::aligned(b_storage, nb * b_stride);
    const float* x = reinterpret_cast<const float*>(xb.data_ptr());
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t rows = std::min(kKnnTile, N - blk * kKnnTile);
      gemm::pack_panel(x + blk * kKnnTile * C, C, rows, C, gemm::kMR, a + blk * a_stride);
      gemm::pack_panel(x + blk * kKnnTile * C, C, rows, C, gemm::kNR, b + blk * b_stride);
    }
  }
};

// Offers the dot products of tile (I, J) of one batch item to the nodes' lists: rows of
// block I see the nodes of block J and, when I != J, rows of block J see those of block I
// (the same products, transposed).
template <typename acc_t>
void knn_tile(const at::Tensor& xb, const acc_t* bias, int64_t N, int64_t I, int64_t J,
              bool include_self, const acc_t* floors, Candidate<acc_t>* items, int64_t* sizes,
              int64_t span, const PackedBlocks& packed, TileBuffers<acc_t>& buffers) {
  const int64_t i0 = I * kKnnTile, j0 = J * kKnnTile;
  const int64_t ti = std::min(kKnnTile, N - i0), tj = std::min(kKnnTile, N - j0);
  at::Tensor tile = buffers.tile.narrow(0, 0, ti * tj).view({ti, tj});
  if (packed.a) {
    gemm::nt_packed(ti, tj, xb.size(1), packed.a + I * packed.a_stride, packed.b + J * packed.b_stride,
                    reinterpret_cast<float*>(tile.data_ptr()), tj, /*symmetric=*/I == J);
  } else {
    at::mm_out(tile, xb.narrow(0, i0, ti), xb.narrow(0, j0, tj).t());
  }
  const acc_t* S = tile.data_ptr<acc_t>();
  for (int64_t r = 0; r < ti; ++r) {
    const int64_t i = i0 + r;
    if (bias && r + 1 < ti) prefetch_span(bias + (i + 1) * N + j0, tj);
    const acc_t* brow = bias ? bias + i * N + j0 : nullptr;
    // A one-tile graph has no sampled floors: the tile is the whole row, so a floor comes
    // from a strided quarter of the row itself, by the same rule (knn_refill keeps it exact).
    const acc_t floor = tj == N ? row_floor(S + r * tj, brow, N, span, include_self ? -1 : i,
                                            buffers.cut.data())
                                : floors[i];
    sizes[i] = offer_candidates<acc_t>(items + i * span, sizes[i], span, S + r * tj, brow, j0, tj,
                                       include_self ? -1 : i, floor, buffers);
  }
  if (I == J) return;
  // The transposed copy (a blocked ATen transpose) keeps the column pass contiguous.
  at::Tensor tile_t = buffers.tile_t.narrow(0, 0, ti * tj).view({tj, ti});
  tile_t.copy_(tile.t());
  const acc_t* St = tile_t.data_ptr<acc_t>();
  for (int64_t c = 0; c < tj; ++c) {
    const int64_t j = j0 + c;
    if (bias && c + 1 < tj) prefetch_span(bias + (j + 1) * N + i0, ti);
    sizes[j] = offer_candidates<acc_t>(items + j * span, sizes[j], span, St + c * ti,
                                       bias ? bias + j * N + i0 : nullptr, i0, ti, -1, floors[j],
                                       buffers);
  }
}

// The nodes whose similarities estimate each node's rejection threshold (see knn_floors),
// and the bias at those columns [N, samples], gathered once per call rather than once per
// batch item (a strided read of the whole [N, N] bias: profiled at an eighth of the kernel).
// Empty for small graphs, which skip the floors. Golden-ratio steps through the node order
// spread the sample over both axes of an image grid (a plain stride can hit a few columns
// only, and the bias is often spatial).
struct FloorSample {
  std::vector<int64_t> nodes;
  at::Tensor nodes_t, bias;  // bias undefined without a bias

  FloorSample(int64_t N, int64_t span, const at::Tensor& full_bias) {
    const int64_t samples = std::min<int64_t>(N, std::clamp<int64_t>(N / 16, 64, 256));
    if (N <= kKnnTile || samples < 2 * span) return;  // one tile: see row_floor
    int64_t step = static_cast<int64_t>(0.6180339887 * static_cast<double>(N)) | 1;
    while (std::gcd(step, N) != 1) step += 2;
    nodes.resize(samples);
    for (int64_t t = 0; t < samples; ++t) nodes[t] = (t * step) % N;
    std::sort(nodes.begin(), nodes.end());
    nodes_t = at::tensor(nodes, at::kLong);
    if (full_bias.defined()) bias = full_bias.index_select(1, nodes_t).contiguous();
  }
};

// Per node, a rejection threshold ("floor") estimated from the sampled nodes: the r-th best
// sampled value, r chosen so that about 3 * span of all N candidates score above it (the
// span-th best of the sample, a guaranteed lower bound, lets several times more through:
// profiled, most of the kernel's time went to those). Candidates below the floor are
// rejected from the first tile on, even when the tiles that hold the best candidates come
// last (e.g. a relative-position bias that favours distant nodes). The floor is a guess: a
// node whose list is not full at the end had it too high and is recomputed without one
// (knn_refill), so the result stays exact. The margin covers the rounding difference
// between this GEMM and the tiles'.
template <typename acc_t>
void knn_floors(const at::Tensor& xb, const FloorSample& sample, int64_t span,
                bool include_self, acc_t* floors) {
  const int64_t N = xb.size(0), samples = static_cast<int64_t>(sample.nodes.size());
  if (samples == 0) {
    std::fill(floors, floors + N, -std::numeric_limits<acc_t>::infinity());
    return;
  }
  const at::Tensor sims = at::mm(xb, xb.index_select(0, sample.nodes_t).t()).contiguous();  // [N, samples]
  const acc_t* sd = sims.data_ptr<acc_t>();
  const acc_t* bd = sample.bias.defined() ? sample.bias.template data_ptr<acc_t>() : nullptr;
  const int64_t rank = floor_rank(span, samples, N, /*margin=*/3);
  std::vector<acc_t> row(samples);
  for (int64_t i = 0; i < N; ++i) {
    int64_t m = 0;
    for (int64_t t = 0; t < samples; ++t) {
      if (!include_self && sample.nodes[t] == i) continue;
      row[m++] = sd[i * samples + t] + (bd ? bd[i * samples + t] : acc_t(0));
    }
    const acc_t v = kth_largest<acc_t>(row.data(), m, rank);
    floors[i] = v - acc_t(1e-3) * std::max<acc_t>(1, std::abs(v));
  }
}

// Recomputes, without a floor, the list of each node (of rows [first, last)) that ended
// with fewer than span entries (its floor was above its span-th best value): their rows of
// similarities in one product, then an exact selection. Rare by construction of the floors.
template <typename acc_t>
void knn_refill(const at::Tensor& xb, const acc_t* bias, int64_t span, bool include_self,
                Candidate<acc_t>* items, int64_t* sizes, int64_t first, int64_t last) {
  const int64_t N = xb.size(0);
  std::vector<int64_t> rows;
  for (int64_t i = first; i < last; ++i)
    if (sizes[i] < span) rows.push_back(i);
  if (rows.empty()) return;
  const int64_t R = static_cast<int64_t>(rows.size());
  const at::Tensor rows_t = at::from_blob(rows.data(), {R}, at::kLong);
  const at::Tensor sims = at::mm(xb.index_select(0, rows_t), xb.t()).contiguous();  // [R, N]
  const acc_t* sd = sims.data_ptr<acc_t>();
  std::vector<Candidate<acc_t>> row(N);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = rows[r];
    int64_t m = 0;
    for (int64_t j = 0; j < N; ++j)
      if (include_self || j != i) row[m++] = {sd[r * N + j] + (bias ? bias[i * N + j] : acc_t(0)), j};
    std::partial_sort(row.begin(), row.begin() + span, row.begin() + m, ranks_before<acc_t>);
    std::copy(row.begin(), row.begin() + span, items + i * span);
    sizes[i] = span;
  }
}

// Writes every dilation-th index of each node's sorted list.
template <typename acc_t>
void knn_emit(const Candidate<acc_t>* items, int64_t rows, int64_t span, int64_t k,
              int64_t dilation, int64_t* out) {
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t t = 0; t < k; ++t) out[row * k + t] = items[row * span + t * dilation].index;
}

template <typename acc_t>
void knn_graph_kernel(const at::Tensor& xn, const at::Tensor& bias, int64_t k, int64_t dilation,
                      bool include_self, at::Tensor& out) {
  const int64_t B = xn.size(0), N = xn.size(1);
  const int64_t span = k * dilation;
  const int64_t nb = (N + kKnnTile - 1) / kKnnTile;
  const auto rounds = tile_rounds(nb);
  const acc_t* bias_data = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  int64_t* out_data = out.data_ptr<int64_t>();
  const FloorSample sample(N, span, bias);

  if (B >= at::get_num_threads()) {
    // Enough batch items to keep every thread busy: a thread takes whole items (one
    // parallel region, no barriers between tiles). Running a tile for several items in
    // turn (to read each bias block once per group) was tried: the larger working set
    // cost more than it saved (benchmark, 14:25 UTC).
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      // Not zero-filled (sizes say what is valid): a memset of it showed in profiles.
      std::unique_ptr<Candidate<acc_t>[]> items(new Candidate<acc_t>[N * span]);
      std::vector<int64_t> sizes(N);
      std::vector<acc_t> floors(N);
      PackedBlocks packed;
      TileBuffers<acc_t> buffers(xn.options(), span);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(sizes.begin(), sizes.end(), 0);
        const at::Tensor xb = xn[b];
        packed.pack<acc_t>(xb);
        knn_floors<acc_t>(xb, sample, span, include_self, floors.data());
        for (const auto& round : rounds)
          for (const auto& [I, J] : round)
            knn_tile<acc_t>(xb, bias_data, N, I, J, include_self, floors.data(), items.get(),
                            sizes.data(), span, packed, buffers);
        knn_refill<acc_t>(xb, bias_data, span, include_self, items.get(), sizes.data(), 0, N);
        knn_emit<acc_t>(items.get(), N, span, k, dilation, out_data + b * N * k);
      }
    });
    return;
  }
  // Few batch items: the tiles of one round run in parallel (no block twice in a round, so
  // no list is touched by two threads).
  std::unique_ptr<Candidate<acc_t>[]> items(new Candidate<acc_t>[N * span]);
  std::vector<int64_t> sizes(N);
  std::vector<acc_t> floors(N);
  PackedBlocks packed;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(sizes.begin(), sizes.end(), 0);
    const at::Tensor xb = xn[b];
    packed.pack<acc_t>(xb);
    knn_floors<acc_t>(xb, sample, span, include_self, floors.data());
    for (const auto& round : rounds) {
      at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
        TileBuffers<acc_t> buffers(xn.options(), span);
        for (int64_t t = begin; t < end; ++t)
          knn_tile<acc_t>(xb, bias_data, N, round[t].first, round[t].second, include_self,
                          floors.data(), items.get(), sizes.data(), span, packed, buffers);
      });
    }
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      knn_refill<acc_t>(xb, bias_data, span, include_self, items.get(), sizes.data(), begin, end);
      knn_emit<acc_t>(items.get() + begin * span, end - begin, span, k, dilation,
                      out_data + (b * N + begin) * k);
    });
  }
}

// Whether n values are all finite, without allocating (isfinite would build an N x N mask).
template <typename scalar_t>
bool all_finite(const scalar_t* data, int64_t n) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t e = begin; e < end; ++e) ok &= std::isfinite(data[e]);
    if (!ok) finite = false;
  });
  return finite;
}

#if SLSG_GEMM_AVX2
// Row passes of normalize_rows for float with AVX2 (the portable loops compile to SSE with
// one add chain: profiled at a tenth of a one-tile kNN call).
__attribute__((target("avx2,fma"))) inline double sum_of_squares_avx2(const float* row, int64_t C) {
  __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(row + c)), hi = _mm256_cvtps_pd(_mm_loadu_ps(row + c + 4));
    a = _mm256_fmadd_pd(lo, lo, a), b = _mm256_fmadd_pd(hi, hi, b);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(a, b));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; c < C; ++c) sum += static_cast<double>(row[c]) * static_cast<double>(row[c]);
  return sum;
}

__attribute__((target("avx2"))) inline void divide_row_avx2(const float* row, int64_t C, float norm, float* out) {
  const __m256 n = _mm256_set1_ps(norm);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) _mm256_storeu_ps(out + c, _mm256_div_ps(_mm256_loadu_ps(row + c), n));
  for (; c < C; ++c) out[c] = row[c] / norm;
}
#endif

// The sum of squares of a row, in double (no overflow for any float).
template <typename scalar_t>
double sum_of_squares(const scalar_t* row, int64_t C) {
#if SLSG_GEMM_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (gemm::available()) return sum_of_squares_avx2(row, C);
  }
#endif
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(row[c]) * static_cast<double>(row[c]);
  return sum;
}

template <typename scalar_t>
void divide_row(const scalar_t* row, int64_t C, scalar_t norm, scalar_t* out) {
#if SLSG_GEMM_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (gemm::available()) return divide_row_avx2(row, C, norm, out);
  }
#endif
  for (int64_t c = 0; c < C; ++c) out[c] = row[c] / norm;
}

// Rows scaled to unit L2 norm (zero rows stay zero, as F.normalize); false if x holds a
// NaN or Inf. One pass, one parallel region.
template <typename scalar_t>
bool normalize_rows(const at::Tensor& x, at::Tensor& xn) {
  const int64_t R = x.size(0) * x.size(1), C = x.size(2);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  scalar_t* od = xn.data_ptr<scalar_t>();
  std::atomic<bool> finite{true};
  // Beyond this the norm does not fit scalar_t (or the double sum overflows).
  const double max_sum = std::is_same_v<scalar_t, float>
                             ? static_cast<double>(std::numeric_limits<float>::max()) * std::numeric_limits<float>::max()
                             : std::numeric_limits<double>::max();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scaled;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = xd + r * C;
      double sum = sum_of_squares(row, C);
      if (!(sum <= max_sum)) {
        // A NaN or Inf anywhere in the row shows in its sum; a finite row this large is
        // scaled by a power of two (exact; cosine similarity ignores the scale), as the
        // reference does.
        double peak = 0.0;
        bool row_finite = true;
        for (int64_t c = 0; c < C; ++c) {
          const double a = std::abs(static_cast<double>(row[c]));
          row_finite = row_finite && std::isfinite(a);
          peak = std::max(peak, a);
        }
        if (!row_finite) {
          finite = false;
          continue;
        }
        scaled.resize(C);
        const int shift = std::ilogb(peak) + 1;  // peak * 2^-shift < 1
        for (int64_t c = 0; c < C; ++c) scaled[c] = std::ldexp(row[c], -shift);
        row = scaled.data();
        sum = sum_of_squares(row, C);
      }
      const scalar_t norm = static_cast<scalar_t>(std::max(std::sqrt(sum), kCosineEps));
      divide_row(row, C, norm, od + r * C);
    }
  });
  return finite;
}

at::Tensor knn_graph_cpu(const at::Tensor& x_in, int64_t k, int64_t dilation,
                         const std::optional<at::Tensor>& bias_in, bool include_self) {
  check_knn_graph_args(x_in, k, dilation, bias_in, include_self);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "knn_graph on CPU supports float32 and float64, got ", x_in.scalar_type());
  const int64_t B = x_in.size(0), N = x_in.size(1);
  // Node ids are ranked as int32 (offer_candidates).
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "knn_graph on CPU supports at most 2^31 - 1 nodes, got ", N);
  at::Tensor out = at::empty({B, N, k}, x_in.options().dtype(at::kLong));
  if (B == 0 || N == 0) return out;
  // Detached: the tiles go through ATen ops, which autograd must not record.
  const at::Tensor x = x_in.detach().contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->detach().contiguous();
  }
  at::Tensor xn = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "knn_graph_cpu", [&] {
    TORCH_CHECK(normalize_rows<scalar_t>(x, xn), "knn_graph: x contains NaN or Inf");
    TORCH_CHECK(!bias.defined() || all_finite(bias.data_ptr<scalar_t>(), bias.numel()),
                "knn_graph: bias contains NaN or Inf");
    knn_graph_kernel<scalar_t>(xn, bias, k, dilation, include_self, out);
  });
  return out;
}

// ---- max_relative ------------------------------------------------------------------------

// m = max(m, v) that lets a NaN through, like torch.max: the result is NaN if any value is.
template <typename scalar_t>
inline scalar_t nan_max(scalar_t m, scalar_t v) {
  return (v > m || v != v) ? v : m;
}

// Whether v replaces the running argmax m: strictly larger, or the first NaN (torch.max).
template <typename scalar_t>
inline bool takes_max(scalar_t m, scalar_t v) {
  return v > m || (v != v && m == m);
}

template <typename scalar_t>
void max_relative_forward_kernel(const at::Tensor& x, const at::Tensor& index, at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = index.size(2);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * C));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* base = xd + (r / N) * N * C;
      const int64_t* nb = idx + r * K;
      scalar_t* o = od + r * C;
      std::copy(base + nb[0] * C, base + nb[0] * C + C, o);
      for (int64_t t = 1; t < K; ++t) {
        const scalar_t* row = base + nb[t] * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = nan_max(o[c], row[c]);
      }
      const scalar_t* own = xd + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] -= own[c];
    }
  });
}

template <typename scalar_t>
void max_relative_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& index, at::Tensor& grad_x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = index.size(2);
  // Work items are (batch, channel block): each owns the gradient columns it scatters into.
  // Whole rows are fastest (contiguous neighbour rows); split channels only to give every
  // thread work when the batch is small.
  const int64_t threads = at::get_num_threads();
  const int64_t wanted_blocks = (2 * threads + B - 1) / B;
  const int64_t cb = std::max<int64_t>(16, (C + wanted_blocks - 1) / wanted_blocks);
  const int64_t blocks = (C + cb - 1) / cb;
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* gd = grad.data_ptr<scalar_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> best_buf(cb);
    // Position in the neighbour list, not node id: as wide as a float, so the loop vectorises.
    std::vector<int32_t> pos_buf(cb);
    scalar_t* best = best_buf.data();
    int32_t* pos = pos_buf.data();
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / blocks, c0 = (w % blocks) * cb;
      const int64_t cw = std::min(cb, C - c0);
      const scalar_t* xb = xd + b * N * C + c0;
      scalar_t* gxb = gx + b * N * C + c0;
      for (int64_t i = 0; i < N; ++i) std::fill(gxb + i * C, gxb + i * C + cw, scalar_t(0));
      for (int64_t i = 0; i < N; ++i) {
        const int64_t* nb = idx + (b * N + i) * K;
        // Recompute the argmax: the first neighbour (in index order) holding the maximum.
        const scalar_t* first = xb + nb[0] * C;
        for (int64_t c = 0; c < cw; ++c) {
          best[c] = first[c];
          pos[c] = 0;
        }
        for (int64_t t = 1; t < K; ++t) {
          const scalar_t* row = xb + nb[t] * C;
          const int32_t tt = static_cast<int32_t>(t);
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) {
            const bool take = takes_max(best[c], row[c]);
            best[c] = take ? row[c] : best[c];
            pos[c] = take ? tt : pos[c];
          }
        }
        const scalar_t* g = gd + (b * N + i) * C + c0;
        scalar_t* own = gxb + i * C;
        for (int64_t c = 0; c < cw; ++c) {
          gxb[nb[pos[c]] * C + c] += g[c];
          own[c] -= g[c];
        }
      }
    }
  });
}

void check_cpu_float(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              " on CPU supports float32 and float64, got ", t.scalar_type());
}

at::Tensor max_relative_cpu(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_max_relative_args(x_in, index_in);
  check_cpu_float("max_relative", x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_relative_cpu",
                             [&] { max_relative_forward_kernel<scalar_t>(x, index, out); });
  return out;
}

at::Tensor max_relative_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                     const at::Tensor& index_in) {
  check_max_relative_args(x_in, index_in);
  check_cpu_float("max_relative_backward", x_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "max_relative_backward: grad must have x's shape ",
              x_in.sizes(), ", got ", grad_in.sizes());
  check_same_device("max_relative_backward", "grad", grad_in, x_in);
  TORCH_CHECK(index_in.size(2) < std::numeric_limits<int32_t>::max(),
              "max_relative_backward: too many neighbours per node: ", index_in.size(2));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);  // zeroed by the kernel, block by block
  if (x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_relative_backward_cpu", [&] {
    max_relative_backward_kernel<scalar_t>(grad, x, index, grad_x);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) {
  m.impl("knn_graph", &knn_graph_cpu);
  m.impl("max_relative", &max_relative_cpu);
  m.impl("max_relative_backward", &max_relative_backward_cpu);
}

}  // namespace slsg
