"""Layer programs (fastbert/models/program.py): one order of steps per layer kind, run by a bound executor (the
inference plan) and a live one (the general forward). What the programs compute against transformers is tested by
the parity tests; these check that both forwards really run the program the table names, and that both bind
one fused query/key/value copy."""
from __future__ import annotations

import dataclasses

import torch

import fastbert
from fastbert.models import encoder, fused_qkv, modernbert, plan, plan_steps, program
from tests.helpers import random_batch, small_config
from tests.models.test_modernbert import modernbert_config


def _recording(calls: list, run):
    def recorded(steps, hidden, call):
        calls.append(type(steps).__name__)
        return run(steps, hidden, call)
    return recorded


def test_the_live_forward_runs_the_program_its_family_names(monkeypatch):
    config = small_config()
    model = fastbert.BertModel(config).eval()
    batch = random_batch(config, 2, 7, lengths=[7, 4])
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    calls = []
    family = dataclasses.replace(model._fastbert_family, program=_recording(calls, program.post_norm))
    for layer in model.encoder.layer:
        monkeypatch.setattr(layer, "_fastbert_family", family)
    plan.forget_plans(model)  # plans are per model (a model's family never changes): this one is new
    with torch.no_grad():
        inputs = {name: batch.get(name) for name in ("input_ids", "token_type_ids")}
        got = encoder.encode(model, family, inputs, batch["attention_mask"].bool(), {}).last_hidden_state
    assert calls == ["LiveLayer"] * config.num_hidden_layers
    assert torch.equal(got, want)


def test_a_program_without_bound_steps_gets_no_plan():
    config = small_config()
    model = fastbert.BertModel(config).eval()
    family = dataclasses.replace(model._fastbert_family, program=lambda steps, hidden, call: hidden)
    built = plan.Plan(model, family, fastbert.models.support.check_modules(family, model, (family.layer,)),
                      (family.layer, encoder.fast_layer_class(family)))
    assert built.layers is None and "has no bound steps" in built.reason


def test_the_plan_runs_post_norm_on_its_bound_steps(monkeypatch):
    config = small_config()
    model = fastbert.BertModel(config).eval()
    calls = []
    for name in ("attention", "attention_out", "ffn_out"):
        original = getattr(plan_steps.LayerSteps, name)
        monkeypatch.setattr(plan_steps.LayerSteps, name,
                            lambda self, *a, _name=name, _run=original: calls.append(_name) or _run(self, *a))
    with torch.no_grad():
        model(**random_batch(config, 2, 5))
    assert calls == ["attention", "attention_out", "ffn_out"] * config.num_hidden_layers


def test_modernbert_runs_pre_norm_on_live_steps(monkeypatch):
    config = modernbert_config()
    model = fastbert.ModernBertModel(config).eval()
    calls = []
    monkeypatch.setattr(modernbert, "pre_norm", _recording(calls, program.pre_norm))
    ids = torch.randint(5, config.vocab_size, (2, 9))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert calls == ["LiveModernLayer"] * config.num_hidden_layers


def test_plan_and_live_forward_bind_one_fused_qkv_copy():
    config = small_config()
    model = fastbert.BertModel(config).eval()
    with torch.no_grad():
        model(**random_batch(config, 2, 5))  # builds the plan, which fuses through the one cache
        attention = model.encoder.layer[0].attention.self
        first = fused_qkv.fused_parameters(attention, attention.query, attention.key, attention.value)
        second = fused_qkv.fused_parameters(attention, attention.query, attention.key, attention.value)
    assert first[0] is second[0] and fused_qkv.cached(model)
    with torch.no_grad():
        attention.query.weight.add_(1.0)  # a changed parameter: a fresh copy
        third = fused_qkv.fused_parameters(attention, attention.query, attention.key, attention.value)
    assert third[0] is not first[0] and torch.equal(third[0][: config.hidden_size], attention.query.weight)
