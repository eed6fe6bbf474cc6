"""Shared test helpers: the tolerance rule, small model configs, random batches."""
from __future__ import annotations

import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers

# Smallest float differences each dtype is allowed beyond twice PyTorch's own error.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are one tensor, or views of one storage (an empty tensor shares nothing)."""
    if a is b:
        return True
    if not a.numel() or not b.numel():
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def assert_close_to_ref(fast: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, atol=None, name=""):
    """err(fast, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref) + atol (flash-attention's rule).

    The baseline and the reference must be computed apart from `fast`: with `fast` itself as the
    baseline, err <= 2 * err + atol always holds and the check could never fail."""
    for other, role in ((torch_same_dtype, "same-dtype baseline"), (ref64, "float64 reference")):
        assert not shares_memory(fast, other), (
            f"{name}: the {role} is the result itself (same tensor or storage); compute it independently"
        )
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert fast.dtype == torch_same_dtype.dtype, f"{name}: dtype {fast.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    atol = ATOL[fast.dtype] if atol is None else atol
    fast_err, torch_err = max_error(fast, ref64), max_error(torch_same_dtype, ref64)
    assert fast_err <= 2 * torch_err + atol, f"{name}: error {fast_err:.3g} > 2 * {torch_err:.3g} + {atol:g}"


def int8_gate() -> tuple[float, float]:
    """The project's int8 accuracy gate (min mean cosine, min per-example cosine to the unquantized model):
    the defaults of fastbert.quantize.quantize, read from there so that the tests follow it."""
    from fastbert.quantize import quantize

    parameters = inspect.signature(quantize).parameters
    return parameters["min_cosine_mean"].default, parameters["min_cosine"].default


# ---- formulas written out independently of torch.nn.functional, for any float dtype ----------------

def gelu_formula(x, approximate="none"):
    """GELU: the erf form ("none") or the tanh approximation ("tanh")."""
    if approximate == "none":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm_formula(x, residual, weight, bias, eps, x_bias):
    """LayerNorm(x + x_bias + residual) * weight + bias over the last dim; 0 stands for an absent term."""
    h = x + x_bias + residual
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * weight + bias


def packed_attention_probs(q, k, cu_seqlens, scale):
    """Per sequence of packed (tokens, heads, dim) q, k: softmax(q k^T * scale), (heads, length, length)."""
    bounds = cu_seqlens.tolist()
    return [torch.softmax(q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0) * scale, -1)
            for a, b in zip(bounds[:-1], bounds[1:])]


def packed_attention_formula(q, k, v, cu_seqlens, scale):
    """Self-attention on packed (tokens, heads, dim) tensors, each sequence over its own tokens only."""
    bounds = cu_seqlens.tolist()
    probs = packed_attention_probs(q, k, cu_seqlens, scale)
    return torch.cat([(p @ v[a:b].transpose(0, 1)).transpose(0, 1)
                      for p, a, b in zip(probs, bounds[:-1], bounds[1:])])


def _leaves(inputs, dtype=None):
    """Fresh leaf copies (optionally cast) of the tensor inputs that require grad; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in inputs]


def _run(fn, inputs, grad_out):
    output = fn(*inputs)
    output.backward(grad_out.to(output.dtype))
    return output, [None if t is None else t.grad for t in inputs]


def check_against_reference(fast_fn, ref_fn, inputs, atol, names=None):
    """Run fast_fn and ref_fn (same dtype, then on fp64 copies) forward and backward with one random
    upstream gradient, and apply assert_close_to_ref to the output and every input gradient."""
    names = names or [f"input {i}" for i in range(len(inputs))]
    probe = ref_fn(*_leaves(inputs))
    grad_out = torch.randn(probe.shape, device=probe.device, dtype=torch.float64)
    fast, fast_grads = _run(fast_fn, _leaves(inputs), grad_out)
    same, same_grads = _run(ref_fn, _leaves(inputs), grad_out)
    ref, ref_grads = _run(ref_fn, _leaves(inputs, torch.float64), grad_out)
    assert_close_to_ref(fast, same, ref, atol, "output")
    for name, t, g_fast, g_same, g_ref in zip(names, inputs, fast_grads, same_grads, ref_grads):
        if t is not None and t.is_floating_point():
            assert g_fast is not None, f"grad of {name} is missing"
            assert_close_to_ref(g_fast, g_same, g_ref, atol, f"grad of {name}")


def assert_forward_matches(reference, fast, inputs: dict, backend: str, atol: float):
    """Both models' forward without gradients (fast under fastbert.use_backend(backend)): last_hidden_state within
    atol on the real tokens. Returns (fast's output, the reference's) for further checks."""
    import fastbert

    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = reference(**inputs)
        with fastbert.use_backend(backend):
            out = fast(**inputs)
    assert max_error(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= atol
    return out, ref


def assert_training_step_matches(reference, fast, inputs: dict, backend: str, atol: float) -> None:
    """One training-mode step of each model on `inputs` (fast under fastbert.use_backend(backend)): the losses
    within atol, and every parameter's gradient within atol * max(1, the reference gradient's largest magnitude)."""
    import fastbert

    reference.train()
    fast.train()
    ref_loss = reference(**inputs).loss
    ref_loss.backward()
    with fastbert.use_backend(backend):
        loss = fast(**inputs).loss
        loss.backward()
    assert max_error(loss, ref_loss) <= atol
    ref_grads = dict(reference.named_parameters())
    for name, param in fast.named_parameters():
        ref_grad = ref_grads[name].grad
        assert max_error(param.grad, ref_grad) <= atol * max(1.0, ref_grad.abs().max().item()), name


def small_config(**overrides) -> transformers.BertConfig:
    """A tiny BERT (2 layers, hidden 64, 4 heads of 16) for fast CPU tests."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    values.update(overrides)
    return transformers.BertConfig(**values)


def padding_mask(lengths, seqlen: int, side: str = "right") -> torch.Tensor:
    """(batch, seqlen) int mask with the given real lengths, padded on `side`."""
    positions = torch.arange(seqlen)[None, :]
    lengths = torch.as_tensor(lengths)[:, None]
    keep = positions < lengths if side == "right" else positions >= seqlen - lengths
    return keep.long()


def random_batch(config, batch: int, seqlen: int, lengths=None, side="right", generator=None):
    """input_ids, token_type_ids and attention_mask for a random batch."""
    input_ids = torch.randint(0, config.vocab_size, (batch, seqlen), generator=generator)
    token_type_ids = torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=generator)
    if lengths is None:
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=generator)
    mask = padding_mask(lengths, seqlen, side)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask)


def multiple_choice_batch(config):
    """2 questions x 3 choices x 10 tokens with mixed padding, and the labels: (batch, labels)."""
    batch = random_batch(config, 6, 10, lengths=[10, 4, 7, 10, 2, 9])
    return {k: v.view(2, 3, 10) for k, v in batch.items()}, torch.tensor([0, 2])


def run_every_batch_in_threads(infer, batches: list, threads: int) -> list[dict]:
    """Each of `threads` threads runs infer on every batch, all released at once and each starting at a
    different batch, so the threads overlap; one {batch index: result} per thread."""
    start = threading.Barrier(threads)

    def work(offset):
        start.wait()
        order = [(offset + i) % len(batches) for i in range(len(batches))]
        return {i: infer(batches[i]) for i in order}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, range(threads)))
