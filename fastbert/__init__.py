"""fastbert: a BERT encoder on fused Triton/CUDA kernels that loads HuggingFace weights unchanged."""
from fastbert import hf_attention, ops  # noqa: F401  (hf_attention registers attn_implementation="fastbert")
from fastbert.backend import BackendUnavailableError, available_backends, current_backend, use_backend
from fastbert.models.bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    MissingWeightsError,
)
from fastbert.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "MissingWeightsError",
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "current_backend",
    "ops",
    "patch",
    "unpatch",
    "use_backend",
]
