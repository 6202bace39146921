// Operator schemas of the slsg library. Implementations live in cpu/ and cuda/,
// fake (meta) kernels and autograd formulas in slsg/ops/*.py.
#include <torch/library.h>

#include <string>

#include "cpu/blas.h"
#include "cpu/gemm.h"
#include "cpu/gemm_bf16.h"

TORCH_LIBRARY(slsg, m) {
  // k smallest values over j of ||x_i - c_j||^2 - r_j^2, ascending, ties -> lowest j.
  m.def("sphere_distance(Tensor x, Tensor centers, Tensor? radii, int k) -> (Tensor, Tensor)");
  // Mean of the k largest values of each row of a [B, L] tensor.
  m.def("topk_mean(Tensor scores, int k) -> Tensor");
  // k-center greedy selection of n rows of x, starting from row `start`.
  m.def("greedy_coreset(Tensor x, int n, int start) -> Tensor");
  // Graph ops (cpu/graph*.cpp, cuda/graph*.cu); semantics in slsg/ops/graph_reference.py.
  // Indices [B, N, k] of the k*dilation most cosine-similar nodes (+ bias [N, N]), every
  // dilation-th, in descending similarity; ties -> lowest index.
  m.def("knn_graph(Tensor x, int k, int dilation, Tensor? bias, bool include_self) -> Tensor");
  // max over the neighbours j = index[b, i, :] of x_j - x_i, per channel.
  m.def("max_relative(Tensor x, Tensor index) -> Tensor");
  m.def("max_relative_backward(Tensor grad, Tensor x, Tensor index) -> Tensor");
  // Softmax attention over the K neighbours of each node: returns (out, logsumexp [B, H, N]).
  m.def("sparse_graph_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor? bias, "
        "float scale) -> (Tensor, Tensor)");
  // -> (grad_q, grad_k, grad_v, grad_bias); grad_bias is empty unless bias_grad.
  m.def("sparse_graph_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor index, Tensor? bias, Tensor lse, float scale, bool bias_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Softmax attention over all nodes with an online softmax: returns (out, logsumexp,
  // scores). scores holds the pre-softmax [Nq, Nk] of the first kept_slices (batch, head)
  // pairs in (b, h) order, [kept_slices, Nq, Nk] (CPU only; the caller bounds its size); it
  // spares the backward one matrix product for those pairs. Empty when kept_slices is 0.
  m.def("dense_graph_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, "
        "int kept_slices=0) -> (Tensor, Tensor, Tensor)");
  // With shared_qk (the caller passed one tensor as q and k; CPU only), k is not read (it
  // stands for q), grad_q is the whole gradient of that tensor, dq + dk, computed with one
  // product fewer per tile, and grad_k is empty.
  m.def("dense_graph_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor? bias, Tensor out, Tensor lse, Tensor? scores, float scale, bool bias_grad, "
        "bool shared_qk=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Which matrix product the CPU scoring, kNN and attention kernels use: "avx2" (ours) or
  // "blas"; and how the attention kernels reach the BLAS: "direct" (torch's own sgemm_) or
  // "aten" (at::addmm).
  m.def("cpu_gemm() -> str", []() -> std::string { return slsg::gemm::available() ? "avx2" : "blas"; });
  m.def("cpu_blas() -> str", []() -> std::string { return slsg::blas::direct() ? "direct" : "aten"; });
  m.def("cpu_screen() -> str", []() -> std::string { return slsg::gemm_bf16::available() ? "bf16" : "off"; });
}
