// CPU k-center greedy (PatchCore coreset) selection.
//
// Each step updates every point's distance to its nearest selected centre and picks the
// farthest point. Distances are summed in double from float inputs so that the order of
// summation (SIMD here, torch in the reference) cannot change which point wins; exact
// ties go to the lowest index. The work is one fused, parallel pass over x per step; for
// int8 features (the projected ones every MemoryBank coreset uses) steps skip the rows that
// the new centre cannot change (below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace slsg {
namespace {

constexpr int64_t kMaxInt8Dim = 33000;  // 33000 * 255^2 < 2^31

struct Best {
  double value = -std::numeric_limits<double>::infinity();
  int64_t index = -1;
};

// float64 stays as it is (through float it would lose digits and overflow above 3.4e38);
// the other types are exact in float first (half, bfloat16 and int8 have no direct double
// conversion on every compiler).
template <typename scalar_t>
inline double to_double(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

// Four independent accumulators break the add dependency chain and let the compiler
// vectorise (SLP) across them.
template <typename scalar_t>
inline double squared_distance(const scalar_t* a, const scalar_t* b, int64_t D) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double e0 = to_double(a[d]) - to_double(b[d]);
    const double e1 = to_double(a[d + 1]) - to_double(b[d + 1]);
    const double e2 = to_double(a[d + 2]) - to_double(b[d + 2]);
    const double e3 = to_double(a[d + 3]) - to_double(b[d + 3]);
    s0 += e0 * e0;
    s1 += e1 * e1;
    s2 += e2 * e2;
    s3 += e3 * e3;
  }
  for (; d < D; ++d) {
    const double e = to_double(a[d]) - to_double(b[d]);
    s0 += e * e;
  }
  return (s0 + s1) + (s2 + s3);
}

// Quantised features: integer arithmetic is exact, so any summation order (SIMD here,
// torch in the reference) gives the same distances. |a - b| <= 255, so int32 holds
// sums of up to 33,000 dimensions (checked by the caller).
inline int32_t squared_distance_i8(const int8_t* a, const int8_t* b, int64_t D) {
  int32_t s = 0;
  for (int64_t d = 0; d < D; ++d) {
    const int32_t e = static_cast<int32_t>(a[d]) - static_cast<int32_t>(b[d]);
    s += e * e;
  }
  return s;
}

inline double squared_distance(const int8_t* a, const int8_t* b, int64_t D) {
  return static_cast<double>(squared_distance_i8(a, b, D));
}

// One step over rows [begin, end): update nearest-centre distances, return the farthest
// row. Built for AVX2 and for the baseline ISA; the loader picks what the CPU supports.
template <typename scalar_t>
__attribute__((target_clones("avx2", "default"))) Best update_rows(
    const scalar_t* data, const scalar_t* center, int64_t D, double* min_dist, int64_t begin,
    int64_t end) {
  Best best;
  for (int64_t i = begin; i < end; ++i) {
    double m = min_dist[i];
    if (m >= 0.0) {
      const double d = squared_distance(data + i * D, center, D);
      if (d < m) min_dist[i] = m = d;
    }
    if (m > best.value) best = {m, i};  // strict: keeps the lowest index on ties
  }
  return best;
}

template <typename scalar_t>
void greedy_coreset_kernel(const at::Tensor& x, int64_t n, int64_t start, at::Tensor& selected) {
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* data = x.data_ptr<scalar_t>();
  int64_t* out = selected.data_ptr<int64_t>();
  // -1 marks selected points: they can never win again, so the selection has no repeats.
  std::vector<double> min_dist(N, std::numeric_limits<double>::infinity());
  const int64_t grain = std::max<int64_t>(1024, N / (4 * at::get_num_threads()) + 1);
  const int64_t num_chunks = (N + grain - 1) / grain;
  std::vector<Best> chunk_best(num_chunks);

  int64_t last = start;
  out[0] = start;
  min_dist[start] = -1.0;
  for (int64_t step = 1; step < n; ++step) {
    const scalar_t* center = data + last * D;
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c)
        chunk_best[c] = update_rows(data, center, D, min_dist.data(), c * grain,
                                    std::min(N, (c + 1) * grain));
    });
    Best best;
    for (const Best& b : chunk_best)
      if (b.value > best.value) best = b;
    last = best.index;
    out[step] = last;
    min_dist[last] = -1.0;
  }
}

// ---- int8: the same selection, pruned by the triangle inequality ------------------------
//
// Every unselected point belongs to the group of its nearest centre (ties: the earlier
// centre), and each group knows the largest squared distance r^2 of its members to it. A new
// centre c can bring a member p of group g (centre a) closer only if |c - a| < 2 r: else
// |c - p| >= |c - a| - |p - a| >= r >= |p - a|. Those groups are skipped without reading
// their rows; on clustered features (real ones), soon nearly all are, and a step reads the
// rows near the new centre instead of all N. Distances are exact integers, so the skipped
// updates are exactly the ones that would change nothing, and the selection equals the
// plain one (the farthest point, ties to the lowest index). Where pruning would not pay
// (features without structure, e.g. noise), steps stay plain passes over all rows.

struct Farthest {
  int32_t value = -1;  // squared distance; -1: none
  int64_t index = -1;
  void offer(int32_t v, int64_t i) {
    if (v > value || (v == value && v >= 0 && i < index)) value = v, index = i;
  }
};

struct GroupChunk {
  int64_t group, begin, end;  // a slice of one group's member list
  int64_t kept = 0;           // members that stay, compacted to the slice's front
  Farthest kept_best, moved_best;
  std::vector<int32_t> moved;  // members now nearest to the new centre
};

// Members [begin, end) of a group against the new centre: the ones it brings closer move
// (their distance updated), the others stay compacted at the front; selected points (-1)
// leave. Built for AVX2 and the baseline ISA, like update_rows.
__attribute__((target_clones("avx2", "default"))) void scan_group_chunk(
    const int8_t* data, const int8_t* center, int64_t D, int32_t* min_dist, int32_t* members,
    GroupChunk& chunk) {
  for (int64_t i = chunk.begin; i < chunk.end; ++i) {
    const int32_t p = members[i];
    const int32_t m = min_dist[p];
    if (m < 0) continue;
    const int32_t d = squared_distance_i8(data + static_cast<int64_t>(p) * D, center, D);
    if (d < m) {
      min_dist[p] = d;
      chunk.moved.push_back(p);
      chunk.moved_best.offer(d, p);
    } else {
      members[chunk.begin + chunk.kept++] = p;
      chunk.kept_best.offer(m, p);
    }
  }
}

__attribute__((target_clones("avx2", "default"))) int32_t center_distance(const int8_t* a, const int8_t* b,
                                                                           int64_t D) {
  return squared_distance_i8(a, b, D);
}

// A plain step over rows [begin, end) (every row against the new centre, as update_rows),
// also recording each moved row's group.
__attribute__((target_clones("avx2", "default"))) Farthest stream_rows(
    const int8_t* data, const int8_t* center, int64_t D, int32_t* min_dist, int32_t* group,
    int32_t center_id, int64_t begin, int64_t end) {
  Farthest best;
  for (int64_t i = begin; i < end; ++i) {
    int32_t m = min_dist[i];
    if (m >= 0) {
      const int32_t d = squared_distance_i8(data + i * D, center, D);
      if (d < m) min_dist[i] = m = d, group[i] = center_id;
      if (m > best.value) best.value = m, best.index = i;  // rows ascend: the first maximum stays
    }
  }
  return best;
}

class Int8Coreset {
 public:
  Int8Coreset(const at::Tensor& x, int64_t n)
      : N_(x.size(0)), D_(x.size(1)), data_(x.data_ptr<int8_t>()),
        min_dist_(N_, std::numeric_limits<int32_t>::max()), group_(N_, 0) {
    centers_.reserve(n);
  }

  // The selection order, start first, into out[0..n-1].
  void run(int64_t n, int64_t start, int64_t* out) {
    out[0] = start;
    int64_t center = start, center_group = 0;
    int64_t probe_gap = kFirstProbe, next_probe = kFirstProbe;
    for (int64_t step = 1; step <= n; ++step) {
      // The centre chosen last (out[step - 1]) joins; its group's id is its selection rank.
      centers_.push_back(center);
      min_dist_[center] = -1;
      const int32_t id = static_cast<int32_t>(step - 1);
      // Pruning pays once the groups are small next to the distances between centres (with
      // clustered features, a few dozen centres in); measured every step while on, and while
      // off at probes spaced further apart each time they fail (features without structure
      // never prune, and a probe costs a pass over the rows' groups).
      if (!pruned_ && step == next_probe) {
        build_groups();
        pruned_ = scanned_share(center, center_group) < kEnterShare;
        if (!pruned_) {
          drop_groups();
          probe_gap = std::min(2 * probe_gap, kMaxProbeGap);
        }
        next_probe = step + probe_gap;
      } else if (pruned_ && scanned_share(center, center_group) > kLeaveShare) {
        pruned_ = false;
        drop_groups();
        next_probe = step + probe_gap;
      }
      const Farthest best = pruned_ ? pruned_step(center, id) : stream_step(center, id);
      if (step == n) break;
      TORCH_CHECK(best.index >= 0, "greedy_coreset: internal error, no point left to select");
      center = best.index;
      center_group = group_[center];
      out[step] = center;
    }
  }

 private:
  static constexpr int64_t kChunk = 4096, kFirstProbe = 16, kMaxProbeGap = 512;
  static constexpr double kEnterShare = 0.15, kLeaveShare = 0.4;

  Farthest stream_step(int64_t center, int32_t id) {
    const int64_t grain = std::max<int64_t>(1024, N_ / (4 * at::get_num_threads()) + 1);
    const int64_t chunks = (N_ + grain - 1) / grain;
    std::vector<Farthest> part(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        part[c] = stream_rows(data_, data_ + center * D_, D_, min_dist_.data(), group_.data(), id, c * grain,
                              std::min(N_, (c + 1) * grain));
    });
    Farthest best;
    for (const Farthest& f : part) best.offer(f.value, f.index);
    return best;
  }

  // Member lists and farthest members of the groups of all centres but the newest (whose
  // group the coming step fills), from the rows' groups.
  void build_groups() {
    const int64_t groups = static_cast<int64_t>(centers_.size()) - 1;
    members_.assign(groups, {});
    farthest_.assign(groups, Farthest());
    for (int64_t i = 0; i < N_; ++i) {
      const int32_t m = min_dist_[i];
      if (m < 0) continue;
      members_[group_[i]].push_back(static_cast<int32_t>(i));
      farthest_[group_[i]].offer(m, i);
    }
  }

  void drop_groups() {
    members_.clear();
    members_.shrink_to_fit();
    farthest_.clear();
  }

  // Marks the groups the new centre can change (scan_) and returns their share of all rows.
  double scanned_share(int64_t center, int64_t center_group) {
    const int64_t groups = static_cast<int64_t>(members_.size());
    const int8_t* c = data_ + center * D_;
    scan_.assign(groups, 0);
    at::parallel_for(0, groups, 64, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g) {
        if (members_[g].empty()) continue;
        // The centre's own group always: its farthest member was the centre, now taken (the
        // test below would skip the group when r = 0).
        if (g == center_group) {
          scan_[g] = 1;
          continue;
        }
        const int64_t between = center_distance(c, data_ + centers_[g] * D_, D_);
        scan_[g] = between < 4 * static_cast<int64_t>(farthest_[g].value);
      }
    });
    int64_t rows = 0;
    for (int64_t g = 0; g < groups; ++g)
      if (scan_[g]) rows += static_cast<int64_t>(members_[g].size());
    return static_cast<double>(rows) / static_cast<double>(N_);
  }

  // The groups scanned_share marked, against the new centre; the movers form its group `id`.
  Farthest pruned_step(int64_t center, int32_t id) {
    TORCH_CHECK(static_cast<int64_t>(members_.size()) == id, "greedy_coreset: internal error, group ", id,
                " out of order");
    const int8_t* c = data_ + center * D_;
    const int64_t groups = static_cast<int64_t>(members_.size());
    chunks_.clear();
    for (int64_t g = 0; g < groups; ++g)
      if (scan_[g])
        for (int64_t b = 0; b < static_cast<int64_t>(members_[g].size()); b += kChunk)
          chunks_.push_back({g, b, std::min<int64_t>(b + kChunk, members_[g].size())});
    at::parallel_for(0, static_cast<int64_t>(chunks_.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        scan_group_chunk(data_, c, D_, min_dist_.data(), members_[chunks_[i].group].data(), chunks_[i]);
    });
    std::vector<int32_t> moved;
    Farthest moved_best;
    for (size_t i = 0; i < chunks_.size();) {
      const int64_t g = chunks_[i].group;
      int32_t* list = members_[g].data();
      int64_t size = 0;
      Farthest kept;
      for (; i < chunks_.size() && chunks_[i].group == g; ++i) {
        GroupChunk& ch = chunks_[i];
        if (ch.begin != size) std::copy(list + ch.begin, list + ch.begin + ch.kept, list + size);
        size += ch.kept;
        kept.offer(ch.kept_best.value, ch.kept_best.index);
        moved.insert(moved.end(), ch.moved.begin(), ch.moved.end());
        moved_best.offer(ch.moved_best.value, ch.moved_best.index);
      }
      members_[g].resize(size);
      farthest_[g] = kept;
    }
    for (const int32_t p : moved) group_[p] = id;
    members_.push_back(std::move(moved));
    farthest_.push_back(moved_best);
    Farthest best;
    for (const Farthest& f : farthest_) best.offer(f.value, f.index);
    return best;
  }

  const int64_t N_, D_;
  const int8_t* data_;
  std::vector<int32_t> min_dist_;  // squared distance to the nearest centre; -1: selected
  std::vector<int32_t> group_;     // rank of that centre (the first one on ties)
  std::vector<int64_t> centers_;   // rows of the centres, by rank
  bool pruned_ = false;
  std::vector<std::vector<int32_t>> members_;  // while pruning: rows per group
  std::vector<Farthest> farthest_;
  std::vector<char> scan_;
  std::vector<GroupChunk> chunks_;
};

at::Tensor greedy_coreset_cpu(const at::Tensor& x_in, int64_t n, int64_t start) {
  check_greedy_coreset_args(x_in, n, start);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kChar,
              "greedy_coreset on CPU supports float32, float64, bfloat16 and int8, got ", dtype);
  TORCH_CHECK(dtype != at::kChar || x_in.size(1) <= kMaxInt8Dim,
              "greedy_coreset: int8 features support D <= ", kMaxInt8Dim, ", got ", x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(dtype == at::kChar || at::isfinite(x).all().item<bool>(),
              "greedy_coreset: x contains NaN or Inf");
  at::Tensor selected = at::empty({n}, x.options().dtype(at::kLong));
  if (dtype == at::kChar && x.size(0) < std::numeric_limits<int32_t>::max()) {
    Int8Coreset(x, n).run(n, start, selected.data_ptr<int64_t>());
    return selected;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kChar, x.scalar_type(), "greedy_coreset_cpu",
                             [&] { greedy_coreset_kernel<scalar_t>(x, n, start, selected); });
  return selected;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) { m.impl("greedy_coreset", &greedy_coreset_cpu); }

}  // namespace slsg
