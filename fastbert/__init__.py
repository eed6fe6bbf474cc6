"""fastbert: a BERT-family encoder on fused Triton/CUDA kernels that loads HuggingFace weights unchanged."""
from fastbert import hf_attention, ops  # noqa: F401  (hf_attention registers attn_implementation="fastbert")
from fastbert.backend import BackendUnavailableError, available_backends, current_backend, use_backend
from fastbert.cpu.allocator import apply_environment as _apply_allocator_environment
from fastbert.cpu.allocator import keep_freed_memory
from fastbert.models.auto import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from fastbert.models.catalog import CLASSES as _NATIVE_CLASSES
from fastbert.models.loading import CorruptCheckpointError, MissingWeightsError
from fastbert.models.packed import PackedOutput, encode_packed
from fastbert.patch import UnsupportedModelError, patch, unpatch
from fastbert.quantize import load_quantized, quantize, save_quantized  # fastbert.quantize is the function

__version__ = "0.1.0"

_apply_allocator_environment()  # FASTBERT_KEEP_FREED_MEMORY=1 (fastbert/cpu/allocator.py)

# The native classes under transformers' names: BertModel, BertForMaskedLM, ..., RobertaModel,
# XLMRobertaForSequenceClassification, CamembertForMaskedLM, ElectraForPreTraining,
# DistilBertForQuestionAnswering, AlbertForPreTraining, ... (fastbert.models.catalog builds them).
globals().update(_NATIVE_CLASSES)

__all__ = [
    *_NATIVE_CLASSES,
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "BackendUnavailableError",
    "CorruptCheckpointError",
    "MissingWeightsError",
    "PackedOutput",
    "UnsupportedModelError",
    "__version__",
    "available_backends",
    "current_backend",
    "encode_packed",
    "keep_freed_memory",
    "load_quantized",
    "ops",
    "patch",
    "quantize",
    "save_quantized",
    "unpatch",
    "use_backend",
]
