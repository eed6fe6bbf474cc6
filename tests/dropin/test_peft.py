"""PEFT LoRA on query/value with fastbert.patch applied before or after: same outputs, losses, gradients."""
import copy

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

import fastbert  # noqa: E402
from tests.dropin._common import assert_grads_close, loss_and_grads  # noqa: E402
from tests.helpers import max_error, random_batch, small_config  # noqa: E402


def lora(model):
    # init_lora_weights=False: random A and B, so the adapters change the outputs from the start.
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False,
        task_type="SEQ_CLS",
    )
    torch.manual_seed(7)
    return peft.get_peft_model(model, config)


def make_models(order):
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(small_config())
    untouched = copy.deepcopy(base).eval()
    reference = lora(copy.deepcopy(base))
    if order == "patch_then_lora":
        model = lora(fastbert.patch(base))
    else:
        model = fastbert.patch(lora(base))
    return model, reference, untouched


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
def test_lora_outputs_losses_gradients_and_merge(order):
    model, reference, _ = make_models(order)
    assert type(model.base_model.model.bert) is fastbert.BertModel
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(query).__module__.startswith("peft"), "LoRA wrapped the separate query Linear"
    g = torch.Generator().manual_seed(1)
    batch = random_batch(small_config(), 4, 10, lengths=[10, 6, 3, 8], generator=g)
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    model.train(), reference.train()
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= 1e-5
    assert any("lora_A" in k for k in grads) and any("lora_B" in k for k in grads)
    assert all(g.abs().sum() > 0 for k, g in grads.items() if "lora_" in k), "every adapter gets a gradient"
    assert not any("query.base_layer" in k for k in grads), "frozen base weights stay frozen"
    assert_grads_close(grads, ref_grads)

    model.eval(), reference.eval()
    with torch.no_grad():
        before_merge = model(**batch).logits
        assert max_error(before_merge, reference(**batch).logits) <= 1e-5
        merged = model.merge_and_unload()
        assert type(merged.bert) is fastbert.BertModel
        assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
        assert max_error(merged(**batch).logits, before_merge) <= 1e-5  # now on the fused-QKV path


def test_lora_adapters_actually_change_the_outputs():
    model, _, untouched = make_models("lora_then_patch")
    batch = random_batch(small_config(), 2, 8, lengths=[8, 5])
    model.eval()
    with torch.no_grad():
        with_adapters = model(**batch).logits
        with model.disable_adapter():
            without = model(**batch).logits
        base = untouched(**batch).logits
    assert max_error(with_adapters, without) > 1e-4
    assert max_error(without, base) <= 1e-5


def test_unpatch_a_peft_model():
    model, reference, _ = make_models("lora_then_patch")
    fastbert.unpatch(model)
    assert type(model.base_model.model.bert) is transformers.BertModel
    batch = random_batch(small_config(), 2, 8, lengths=[8, 5])
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
