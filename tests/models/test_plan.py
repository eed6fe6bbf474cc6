"""Inference plans (fastbert/models/plan.py): built once, run when they still describe the model, never stale.

Each test compares the plan's output with the general forward's (plans off: every op resolved per
call) on the same model and inputs; in fp32 on CPU both run the same kernels, so they must agree
bitwise (the pooler: to 1e-6, the plan runs it as a packed GEMM with the tanh in its epilogue), at every
length: both attend through the one bound qkv_attention (the fixture below fixes its length limit at
SHORT_SEQLEN, as on a CPU with AMX, so these tests do not depend on the CPU: elsewhere the kernel on the fused
QKV output runs at every length, test_fused_qkv_attention_length_follows_the_cpu).
"Ran the plan" is observed by counting Plan.run calls.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastbert
from fastbert.cpu import attention as cpu_attention
from fastbert.models import plan
from fastbert.models.families import FAMILIES, family_of_model_type
from tests.helpers import max_error, random_batch, small_config
from tests.models.family_configs import MODEL_TYPES, family_batch, family_config


@pytest.fixture(autouse=True)
def fused_qkv_attention_up_to_short_seqlen(monkeypatch):
    monkeypatch.setattr(cpu_attention, "fused_qkv_max_seqlen", lambda: cpu_attention.SHORT_SEQLEN)
    fresh_qkv_bindings(monkeypatch)


def fresh_qkv_bindings(monkeypatch) -> None:
    """Forget the bound qkv_attention (memoized per selection: its length limit and kernel are bound)."""
    from fastbert.ops import qkv_attention

    monkeypatch.setattr(qkv_attention, "_bound", {})


def count_kernel_calls(monkeypatch, calls: list) -> None:
    """Appends max_seqlen to `calls` each time a plan runs fastbert._C's kernel on the fused QKV output (the
    implementation the registry loaded for qkv_attention on "cpp", which plans bind)."""
    from fastbert.cpu.attention import fused_qkv_attention
    from fastbert.ops import _dispatch

    monkeypatch.setattr(_dispatch._loaded, "qkv_attention__cpp",
                        lambda *a: calls.append(a[-1]) or fused_qkv_attention(*a), raising=False)
    fresh_qkv_bindings(monkeypatch)


@pytest.fixture
def plan_runs(monkeypatch):
    """The list of plans run, one entry per forward that ran one."""
    runs = []
    original = plan.Plan.run
    monkeypatch.setattr(plan.Plan, "run", lambda self, *a: runs.append(self) or original(self, *a))
    return runs


def general(model, batch):
    """The general forward's output (plans off), then plans back on."""
    plan.set_plans(False)
    try:
        with torch.no_grad():
            return model(**batch)
    finally:
        plan.set_plans(True)


def infer(model, batch):
    with torch.no_grad():
        return model(**batch)


def skip_without_the_extension():
    """fused_qkv_attention is fastbert._C's kernel: without it there is no call to check."""
    problem = fastbert.extension.load_problem()
    if problem is not None:
        pytest.skip(f"fused_qkv_attention needs fastbert._C: {problem}")


def model_and_batch(lengths=(40, 12, 1), seqlen=40):
    torch.manual_seed(0)
    config = small_config()
    return fastbert.BertModel(config).eval(), random_batch(config, len(lengths), seqlen, lengths=list(lengths))


def assert_same_as_general(model, batch):
    fast = infer(model, batch)
    reference = general(model, batch)
    assert torch.equal(fast.last_hidden_state, reference.last_hidden_state)
    # the plan's pooler is the packed GEMM with tanh in its epilogue; the general forward calls the module
    tolerance = 1e-6 if fast.pooler_output.dtype == torch.float32 else 8e-3  # bf16: one step at |y| < 1
    assert max_error(fast.pooler_output, reference.pooler_output) < tolerance
    return fast


@pytest.mark.parametrize("lengths", [(40, 40), (40, 6, 1)], ids=["dense", "padded"])
def test_plan_matches_the_general_forward_bitwise(plan_runs, lengths):
    model, batch = model_and_batch(lengths)
    batch["output_hidden_states"] = True
    fast = infer(model, batch)
    reference = general(model, batch)
    assert len(plan_runs) == 1 and plan_runs[0].layers is not None
    assert len(fast.hidden_states) == len(reference.hidden_states) == 3
    for got, want in zip(fast.hidden_states, reference.hidden_states):
        assert torch.equal(got, want)
    assert torch.equal(fast.last_hidden_state, reference.last_hidden_state)


def test_plan_is_built_once(plan_runs):
    model, batch = model_and_batch()
    for _ in range(3):
        infer(model, batch)
    assert len(plan_runs) == 3 and len({id(p) for p in plan_runs}) == 1


# Plans do not bind relative-position terms (fastbert.models.relative): those families run the general forward.
PLANNED_TYPES = tuple(t for t in MODEL_TYPES if family_of_model_type(t).relative is None)


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t not in PLANNED_TYPES])
def test_families_with_relative_positions_run_no_plan(plan_runs, model_type):
    config = family_config(model_type)
    model = fastbert.patch(family_of_model_type(model_type).base(config).eval())
    batch = family_batch(config, [24, 3, 20], 24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(infer(model, batch).last_hidden_state, general(model, batch).last_hidden_state)
    assert not plan_runs


@pytest.mark.parametrize("model_type", PLANNED_TYPES)
def test_every_family_runs_a_plan_equal_to_the_general_forward(plan_runs, model_type, monkeypatch):
    torch.manual_seed(0)
    config = family_config(model_type)  # at most 32 positions: the short attention kernel is turned off here
    monkeypatch.setattr(cpu_attention, "fused_qkv_max_seqlen", lambda: 16)
    fresh_qkv_bindings(monkeypatch)
    family = next(f for f in FAMILIES if f.model_type == model_type)
    model = fastbert.patch(family.base(config).eval())
    batch = family_batch(config, [24, 3, 20], 24, generator=torch.Generator().manual_seed(1))
    fast = infer(model, batch)
    assert plan_runs and plan_runs[-1].layers is not None, plan.plan_for.__doc__
    reference = general(model, batch)
    keep = batch["attention_mask"].bool()
    assert max_error(fast.last_hidden_state[keep], reference.last_hidden_state[keep]) <= 1e-6


def test_token_type_ids_given_or_not(plan_runs):
    model, batch = model_and_batch()
    assert_same_as_general(model, {k: v for k, v in batch.items() if k != "token_type_ids"})
    assert_same_as_general(model, batch)
    assert len(plan_runs) == 2


# ---- invalidation: each change rebuilds the plan (or sends the call to the general forward) ----------------

def test_in_place_parameter_update_rebuilds(plan_runs):
    model, batch = model_and_batch()
    before = infer(model, batch).last_hidden_state
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(2.0)
    after = assert_same_as_general(model, batch).last_hidden_state
    assert max_error(after, before) > 1e-3
    assert plan_runs[0] is not plan_runs[1]


def test_replaced_parameter_rebuilds(plan_runs):
    model, batch = model_and_batch()
    infer(model, batch)
    query = model.encoder.layer[0].attention.self.query
    query.weight = nn.Parameter(torch.randn_like(query.weight))
    assert_same_as_general(model, batch)
    assert plan_runs[0] is not plan_runs[1]


def test_dtype_change_rebuilds(plan_runs):
    model, batch = model_and_batch()
    infer(model, batch)
    model.to(torch.bfloat16)
    out = assert_same_as_general(model, batch)
    assert out.last_hidden_state.dtype == torch.bfloat16 and plan_runs[-1].dtype == torch.bfloat16


def test_backend_selection_and_packing_rebuild(plan_runs):
    from fastbert.cpu import onednn_linear

    model, batch = model_and_batch()
    infer(model, batch)
    with fastbert.use_backend("torch"):
        assert_same_as_general(model, batch)
        assert plan_runs[-1].selection == "torch"
    packing = onednn_linear.packing_enabled()
    try:
        onednn_linear.set_packing(False)
        assert_same_as_general(model, batch)
    finally:
        onednn_linear.set_packing(packing)
    assert len({id(p) for p in plan_runs}) == 3


def test_unpatch_and_patch_again(plan_runs):
    torch.manual_seed(0)
    from transformers import BertModel

    config = small_config()
    model = BertModel(config).eval()
    batch = random_batch(config, 2, 40)
    plain = infer(model, batch).last_hidden_state
    fastbert.patch(model)
    first = infer(model, batch)
    fastbert.unpatch(model)
    assert torch.equal(infer(model, batch).last_hidden_state, plain)  # transformers' forward: no plan
    assert len(plan_runs) == 1
    fastbert.patch(model)
    second = infer(model, batch)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)
    assert len(plan_runs) == 2 and plan_runs[0] is not plan_runs[1]


def test_swapped_submodule_rebuilds(plan_runs):
    model, batch = model_and_batch()
    infer(model, batch)
    layer = model.encoder.layer[0]
    layer.output.dense = nn.Linear(layer.output.dense.in_features, layer.output.dense.out_features)
    assert_same_as_general(model, batch)
    assert plan_runs[0] is not plan_runs[1]


def test_unknown_activation_takes_the_general_forward(plan_runs):
    model, batch = model_and_batch()
    infer(model, batch)
    model.encoder.layer[1].intermediate.intermediate_act_fn = nn.ReLU()
    infer(model, batch)
    assert "ReLU" in plan._PLANS[model].reason
    assert_same_as_general(model, batch)
    assert len(plan_runs) == 1  # a ReLU is not a GELU: the plan's verdict is the general forward


def test_swapped_norm_class_falls_back_to_transformers(plan_runs):
    class ScaledNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model, batch = model_and_batch()
    infer(model, batch)
    old = model.encoder.layer[0].output.LayerNorm
    new = ScaledNorm(old.normalized_shape, eps=old.eps)
    new.load_state_dict(old.state_dict())
    model.encoder.layer[0].output.LayerNorm = new
    with pytest.warns(UserWarning, match="not on the fast path"):
        infer(model, batch)
    assert len(plan_runs) == 1


def test_hooks_and_forward_overrides_take_the_general_forward(plan_runs):
    model, batch = model_and_batch()
    infer(model, batch)
    seen = []
    handle = model.encoder.layer[1].register_forward_hook(lambda *args: seen.append(1))
    assert_same_as_general(model, batch)
    assert len(plan_runs) == 1 and seen == [1, 1]
    handle.remove()
    table = model.embeddings.word_embeddings
    table.forward = lambda ids: seen.append(2) or nn.Embedding.forward(table, ids)
    infer(model, batch)
    assert len(plan_runs) == 1 and seen[-1] == 2
    del table.forward
    global_handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        infer(model, batch)
    finally:
        global_handle.remove()
    assert len(plan_runs) == 1
    infer(model, batch)
    assert len(plan_runs) == 2  # hooks gone: the plan runs again


def test_global_hook_registries_exist():
    """The plan reads torch's private global hook tables; if they move, this fails (and the plan then
    never runs, since global_hooks() reports an unknown table as a hook)."""
    module = torch.nn.modules.module
    for name in plan._GLOBAL_HOOK_TABLES:
        assert isinstance(getattr(module, name, None), dict), name
    assert not plan.global_hooks()


def test_training_mode_and_grad_mode_take_the_general_forward(plan_runs):
    model, batch = model_and_batch()
    model.train()
    infer(model, batch)
    model.eval()
    model.encoder.layer[0].attention.self.dropout.train()  # one module in training mode is enough
    infer(model, batch)
    model.eval()
    model(**batch)  # grad enabled
    assert plan_runs == []
    infer(model, batch)
    assert len(plan_runs) == 1


def test_inputs_embeds_and_empty_batches_take_the_general_forward(plan_runs):
    model, batch = model_and_batch()
    embeds = model.embeddings.word_embeddings(batch["input_ids"]).detach()
    infer(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]})
    infer(model, {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["attention_mask"])})
    assert plan_runs == []


def test_plans_are_not_module_state():
    import copy
    import pickle

    model, batch = model_and_batch()
    infer(model, batch)
    clone = copy.deepcopy(model)
    assert model in plan._PLANS and clone not in plan._PLANS
    assert b"fastbert.models.plan" not in pickle.dumps(model)
    assert torch.equal(infer(clone, batch).last_hidden_state, infer(model, batch).last_hidden_state)


def test_the_plan_runs_the_pooler_and_hands_a_hooked_one_back(plan_runs):
    model, batch = model_and_batch()
    fast = infer(model, batch)
    first = fast.last_hidden_state[:, 0].double()
    dense = model.pooler.dense
    exact = torch.tanh(first @ dense.weight.double().T + dense.bias.double())
    assert max_error(fast.pooler_output, exact) < 1e-6
    calls = []
    model.pooler.register_forward_hook(lambda *args: calls.append(1))
    hooked = infer(model, batch)
    assert calls == [1] and len(plan_runs) == 1  # a hooked pooler: the general forward, the module called
    assert max_error(hooked.pooler_output, exact) < 1e-6

    model.pooler._forward_hooks.clear()
    with torch.no_grad():
        dense.weight.mul_(-0.5)  # changed in place: the plan is rebuilt with the new weight
    changed = infer(model, batch)
    exact = torch.tanh(first @ dense.weight.double().T + dense.bias.double())
    assert len(plan_runs) == 2 and max_error(changed.pooler_output, exact) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_model_runs_its_plan_bitwise_and_hands_back_what_it_cannot_bind(plan_runs, dtype):
    """fastbert.quantize'd models: the plan fuses the int8 query/key/value into one int8 GEMM (the same per-token
    scales, so the same columns) and skips quantize's own scope hooks; a user's hook, or query/key/value that mix
    int8 and float, send the call to the general forward; an in-place change to an int8 weight rebuilds."""
    from fastbert.quantize import quantize

    model, batch = model_and_batch()
    model = model.to(dtype)
    quantize(model, calibration=[batch], min_cosine_mean=0.0, min_cosine=0.0)
    plan_runs.clear()  # quantize's own calibration forwards ran plans too
    assert_same_as_general(model, batch)
    assert len(plan_runs) == 1
    value = model.encoder.layer[0].attention.self.value
    handle = value.register_forward_hook(lambda *args: None)
    assert_same_as_general(model, batch)
    assert len(plan_runs) == 1  # a user's hook on an int8 Linear: the general forward
    handle.remove()
    with torch.no_grad():
        value.weight_int8.neg_()
    changed = assert_same_as_general(model, batch)
    assert len(plan_runs) == 2
    value.weight_int8.neg_()
    model.encoder.layer[0].attention.self.key = nn.Linear(*reversed(value.weight_int8.shape)).to(dtype)
    mixed = assert_same_as_general(model, batch)
    assert len(plan_runs) == 2 and not torch.equal(mixed.last_hidden_state, changed.last_hidden_state)


def test_fused_qkv_attention_length_follows_the_cpu(pretend_machine):
    """Up to SHORT_SEQLEN tokens on a CPU with AMX (SDPA is faster above), every length elsewhere (measured)."""
    import math

    from fastbert.cpu import machine
    from fastbert.cpu.attention import SHORT_SEQLEN

    for features, expected in ((["avx512f", "amx_bf16"], SHORT_SEQLEN), (["avx512f", "avx512_bf16"], math.inf)):
        pretend_machine(features)
        assert machine.choice("fused_qkv_max_seqlen") == expected  # (the module's function is pinned above)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences_attend_on_the_fused_kernel_where_the_cpu_says_so(plan_runs, monkeypatch, dtype):
    """With no length limit (a CPU without AMX), dense and padded batches longer than SHORT_SEQLEN attend on
    fused_qkv_attention, and agree with the general forward (SDPA / the registry's varlen kernel)."""
    import math

    from fastbert.cpu.attention import SHORT_SEQLEN

    skip_without_the_extension()
    monkeypatch.setattr(cpu_attention, "fused_qkv_max_seqlen", lambda: math.inf)
    fresh_qkv_bindings(monkeypatch)
    calls = []
    count_kernel_calls(monkeypatch, calls)
    for lengths in ((SHORT_SEQLEN + 9, SHORT_SEQLEN + 9), (SHORT_SEQLEN + 9, 7, 1)):
        model, batch = model_and_batch(lengths, seqlen=SHORT_SEQLEN + 9)
        model = model.to(dtype)
        calls.clear()
        fast = infer(model, batch)
        assert calls == [SHORT_SEQLEN + 9] * len(model.encoder.layer)
        calls.clear()
        reference = general(model, batch)  # the general forward's inference runs the same bound kernel
        assert calls == [SHORT_SEQLEN + 9] * len(model.encoder.layer)
        assert torch.equal(fast.last_hidden_state, reference.last_hidden_state)


@pytest.mark.parametrize("others", [(), (6, 1)], ids=["dense", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_sequences_attend_on_the_plans_kernel(plan_runs, monkeypatch, others, dtype):
    from fastbert.cpu.attention import SHORT_SEQLEN

    skip_without_the_extension()
    lengths = (SHORT_SEQLEN, *others) if others else (SHORT_SEQLEN, SHORT_SEQLEN)

    calls = []
    count_kernel_calls(monkeypatch, calls)
    model, batch = model_and_batch(lengths, seqlen=SHORT_SEQLEN)
    model = model.to(dtype)
    fast = infer(model, batch)
    assert calls == [SHORT_SEQLEN] * len(model.encoder.layer)
    calls.clear()
    reference = general(model, batch)  # the same bound kernel: bitwise at every length
    assert calls == [SHORT_SEQLEN] * len(model.encoder.layer)
    assert torch.equal(fast.last_hidden_state, reference.last_hidden_state)
    calls.clear()
    batch = random_batch(small_config(), 1, SHORT_SEQLEN + 1, lengths=[SHORT_SEQLEN + 1])
    calls.clear()
    infer(model, batch)
    assert calls == []
