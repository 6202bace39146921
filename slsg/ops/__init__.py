"""The Python face of slsg's custom ops.

Model code calls these functions, never ``torch.ops.slsg`` directly: each validates its
arguments, then runs the compiled kernel when the extension has one for the device, else
the pure-PyTorch reference in ``slsg.ops.reference`` (``slsg.ops.graph_reference`` for the
graph ops).
"""
from ._extension import BackendInfo, backend
from .coreset import greedy_coreset
from .graph import dense_graph_attention, knn_graph, max_relative, sparse_graph_attention
from .scoring import sphere_distance, topk_mean

__all__ = [
    "BackendInfo",
    "backend",
    "dense_graph_attention",
    "greedy_coreset",
    "knn_graph",
    "max_relative",
    "sparse_graph_attention",
    "sphere_distance",
    "topk_mean",
]
