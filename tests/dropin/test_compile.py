"""torch.compile of a patched model: the only graph break is the unpad host sync; no recompiles per shape.

Graphs are compiled with a counting backend that runs them as traced (like backend="eager"): Inductor's
C++ compile would take minutes on CPU and is not what these tests are about (tracing and guards).
"""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import max_error, random_batch, small_config


def patched_and_reference():
    config = small_config()
    torch.manual_seed(0)
    model = fastbert.patch(transformers.BertModel(config).eval())
    reference = transformers.BertModel(config).eval()
    reference.load_state_dict(model.state_dict())
    return config, model, reference


def only_the_unpad_sync(reason) -> bool:
    """The one break we accept: reading max_seqlen/token count on the host to unpad (padding.py)."""
    where = " ".join(str(frame) for frame in reason.user_stack)
    return "packing_from_mask" in where or "from_mask" in where


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_explain_breaks_only_at_the_unpad_sync(backend):
    config, model, reference = patched_and_reference()
    batch = random_batch(config, 3, 12, lengths=[12, 5, 3])
    torch._dynamo.reset()
    with fastbert.use_backend(backend), torch.no_grad():
        model(**batch)  # an eager call first loads the backend's kernels (imports are not traced)
        explanation = torch._dynamo.explain(model)(**batch)
    others = [r for r in explanation.break_reasons if not only_the_unpad_sync(r)]
    assert not others, [r.reason.splitlines()[0] for r in others]
    assert explanation.graph_break_count >= 1  # the data-dependent unpad (docs/fine-tuning.md, "torch.compile")


def test_compiled_outputs_match_and_shapes_do_not_recompile():
    config, model, reference = patched_and_reference()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    g = torch.Generator().manual_seed(0)
    warmup = [(2, 8, None), (3, 12, None), (2, 6, [6, 6]), (3, 9, [9, 9, 9])]  # padded and dense batches
    shapes = warmup + [(4, 10, None), (5, 16, None), (4, 11, [11] * 4), (6, 20, None), (2, 7, None)]
    with fastbert.use_backend("torch"), torch.no_grad():
        for i, (batch_size, seqlen, lengths) in enumerate(shapes):
            batch = random_batch(config, batch_size, seqlen, lengths=lengths, generator=g)
            out = compiled(**batch).last_hidden_state
            ref = reference(**batch).last_hidden_state
            keep = batch["attention_mask"].bool()
            assert max_error(out[keep], ref[keep]) <= 1e-5, (batch_size, seqlen)
            if i == len(warmup) - 1:
                warm = len(compiles)
    assert len(compiles) == warm, f"recompiled for new shapes: {warm} -> {len(compiles)} graphs"
