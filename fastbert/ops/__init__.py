"""Fused ops. Each module holds the PyTorch reference, the dispatch and the entry point of one op."""
from fastbert.ops.add_layer_norm import add_layer_norm, add_layer_norm_ref
from fastbert.ops.attention import attention, attention_ref, varlen_attention, varlen_attention_ref
from fastbert.ops.bias_gelu import bias_gelu, bias_gelu_ref
from fastbert.ops.int8_linear import int8_linear
from fastbert.ops.linear import linear, linear_ref
from fastbert.ops.padding import pad_input, unpad_input

__all__ = [
    "add_layer_norm",
    "add_layer_norm_ref",
    "attention",
    "attention_ref",
    "bias_gelu",
    "bias_gelu_ref",
    "int8_linear",
    "linear",
    "linear_ref",
    "pad_input",
    "unpad_input",
    "varlen_attention",
    "varlen_attention_ref",
]
