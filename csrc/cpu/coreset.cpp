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
#include <vector>

#include "../checks.h"

namespace slsg {
namespace {

struct Best {
  double value = -std::numeric_limits<double>::infinity();
  int64_t index = -1;
};

template <typename scalar_t>
inline double squared_distance(const scalar_t* a, const scalar_t* b, int64_t D) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += diff * diff;
  }
  return s;
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
      for (int64_t c = cb; c < ce; ++c) {
        Best best;
        const int64_t end = std::min(N, (c + 1) * grain);
        for (int64_t i = c * grain; i < end; ++i) {
          double m = min_dist[i];
          if (m >= 0.0) {
            const double d = squared_distance(data + i * D, center, D);
            if (d < m) min_dist[i] = m = d;
          }
          if (m > best.value) best = {m, i};  // strict: keeps the lowest index on ties
        }
        chunk_best[c] = best;
      }
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
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "greedy_coreset on CPU supports float32 and float64, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(at::isfinite(x).all().item<bool>(), "greedy_coreset: x contains NaN or Inf");
  at::Tensor selected = at::empty({n}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "greedy_coreset_cpu",
                             [&] { greedy_coreset_kernel<scalar_t>(x, n, start, selected); });
  return selected;
}

}  // namespace

TORCH_LIBRARY_IMPL(slsg, CPU, m) { m.impl("greedy_coreset", &greedy_coreset_cpu); }

}  // namespace slsg
