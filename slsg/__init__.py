"""slsg: industrial image anomaly detection (SLSG) with fast C++/CUDA kernels."""
from . import ops
from .memory import MemoryBank

__version__ = "0.1.0"
__all__ = ["ops", "MemoryBank", "__version__"]
