"""The Python face of slsg's custom ops.

Model code calls these functions, never ``torch.ops.slsg`` directly: each validates its
arguments, then runs the compiled kernel when the extension has one for the device, else
the pure-PyTorch reference in ``slsg.ops.reference``.
"""
from ._extension import BackendInfo, backend
from .coreset import greedy_coreset
from .scoring import sphere_distance, topk_mean

__all__ = ["BackendInfo", "backend", "greedy_coreset", "sphere_distance", "topk_mean"]
