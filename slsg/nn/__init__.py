"""Layers built on slsg.ops: the self-attentive graph convolution, large-kernel spatial
attention, and 2-D sin-cos position embeddings."""
from .attention import LargeKernelAttention
from .graph_conv import SelfAttentiveGraphConv
from .position import relative_position_similarity, sincos_1d, sincos_2d

__all__ = [
    "LargeKernelAttention",
    "SelfAttentiveGraphConv",
    "relative_position_similarity",
    "sincos_1d",
    "sincos_2d",
]
