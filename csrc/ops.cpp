// Operator schemas of the slsg library. Implementations live in cpu/ and cuda/,
// fake (meta) kernels and autograd formulas in slsg/ops/*.py.
#include <torch/library.h>

TORCH_LIBRARY(slsg, m) {
  // k smallest values over j of ||x_i - c_j||^2 - r_j^2, ascending, ties -> lowest j.
  m.def("sphere_distance(Tensor x, Tensor centers, Tensor? radii, int k) -> (Tensor, Tensor)");
  // Mean of the k largest values of each row of a [B, L] tensor.
  m.def("topk_mean(Tensor scores, int k) -> Tensor");
  // k-center greedy selection of n rows of x, starting from row `start`.
  m.def("greedy_coreset(Tensor x, int n, int start) -> Tensor");
}
