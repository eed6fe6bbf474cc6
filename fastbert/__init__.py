"""fastbert: a BERT encoder on fused Triton/CUDA kernels that loads HuggingFace weights unchanged."""
from fastbert import ops
from fastbert.backend import BackendUnavailableError, available_backends, current_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "current_backend",
    "ops",
    "use_backend",
]
