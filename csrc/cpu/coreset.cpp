// CPU k-center greedy (PatchCore coreset) selection.
//
// Each step updates every point's distance to its nearest selected centre and picks the
// farthest point. Distances are summed in double from float inputs so that the order of
// summation (SIMD here, torch in the reference) cannot change which point wins; exact
// ties go to the lowest index. The work is one fused, parallel pass over x per step.
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
inline double squared_distance(const int8_t* a, const int8_t* b, int64_t D) {
  int32_t s = 0;
  for (int64_t d = 0; d < D; ++d) {
    const int32_t e = static_cast<int32_t>(a[d]) - static_cast<int32_t>(b[d]);
    s += e * e;
  }
  return static_cast<double>(s);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kChar, x.scalar_type(), "greedy_coreset_cpu",
                             [&] { greedy_coreset_kernel<scalar_t>(x, n, start, selected); });
  return selected;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) { m.impl("greedy_coreset", &greedy_coreset_cpu); }

}  // namespace slsg
