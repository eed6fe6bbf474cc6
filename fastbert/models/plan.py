"""Inference plans: a model's fast forward resolved once, then run as a flat loop of kernel calls.

The general forward (fastbert/models/encoder.py) decides everything per call: which backend runs each
op, whether a GEMM fuses its epilogue, whether autograd records, where a layer's modules are. That is
~3,000 Python calls per MiniLM forward, more time than the kernels take for one short request.

A plan is built the first time a model runs an inference forward (grad disabled, every module in eval
mode). Per layer it binds the kernels the registry resolved for the model's device and dtype, the
parameters (packed for oneDNN, the query/key/value weights fused) and the heads' geometry. A forward
then runs the embeddings on the real tokens, and per layer a handful of direct kernel calls: no
registry lookup, no capability check, no module walk.

Never stale: before each run, a few C-level passes compare what the plan bound with the model now
(`Plan.current`): every parameter it read (identity in its module, version counter, storage address:
in-place updates, replaced parameters, .to(dtype/device)), the module tree (the module check's stamp:
swapped, deleted or re-classed submodules, patch/unpatch), module modes, hooks and instance-level
forward overrides on the modules the general path calls as modules, the backend selection and the
registry generation (use_backend, set_packing, clear_cache). Anything else is rebuilt from scratch.
What a plan does not cover (inputs_embeds, empty batches, unknown activations or Linear wrappers,
inference-tensor parameters, FSDP-wrapped layers, hooks) runs the general forward, which decides per
call as before. fastbert.quantize's Int8Linear is bound (its buffers checked like parameters; the three
int8 query/key/value projections fused into one int8 GEMM), and quantize's own per-layer scope hooks are
the only hooks a plan skips (any change to a hook table rebuilds the plan).

A plan holds no per-call state, so threads share it; two threads that build one at once each build
their own and the last assignment stays. On CUDA, a plan is what a CUDA graph captures: one forward
per (batch, length) bucket with its inputs in static buffers (docs/engineering/internals.md).
"""
from __future__ import annotations

import functools
import itertools
import operator
import weakref
from typing import Callable

import torch
from torch import nn

from fastbert import backend
from fastbert.env import flag
from fastbert.models.embed import EmbeddingSteps, embed
from fastbert.models.families import Family, module_pooler
from fastbert.models.plan_steps import (
    LayerSteps,
    Resolver,
    Unplannable,
    is_int8,
    qkv_gemm,
)
from fastbert.models.program import BoundCall, post_norm
from fastbert.models.support import TreeStamp, check_modules, embeddings_known, gelu_approximation, remembered_check
from fastbert.ops import qkv_attention
from fastbert.quantize import SCOPE_HOOKS

_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_TRAINING = operator.attrgetter("training")
_LINEARS = ("query", "key", "value", "attention_dense", "ffn_in", "ffn_out")
_DROPOUTS = ("attention_dropout", "attention_dense_dropout", "ffn_out_dropout")
_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


# ---- building ------------------------------------------------------------------------------------------

class Binder:
    """Collects what a plan reads, so that Plan.current can compare it with the model at each forward."""

    def __init__(self):
        self.tables: list[dict] = []  # _parameters / _buffers dicts the parameters sit in
        self.names: list[str] = []
        self.parameters: list[torch.Tensor] = []
        self.floats: list[torch.Tensor] = []  # the float parameters: one device and dtype for the whole plan
        self.modules: list[nn.Module] = []  # modules whose mode the general forward reads (dropouts)
        self.called: list[nn.Module] = []  # modules the general forward calls as modules (hooks, forward)

    def parameter(self, module: nn.Module, name: str, table: str = "_parameters") -> torch.Tensor:
        found = getattr(module, table).get(name)
        if found is None:
            raise Unplannable(f"{type(module).__name__}.{name} is not in its {table}")
        if found.is_inference():  # no version counter: in-place changes could not be seen
            raise Unplannable(f"{type(module).__name__}.{name} is an inference tensor")
        self.tables.append(getattr(module, table))
        self.names.append(name)
        self.parameters.append(found)
        if table == "_parameters":
            self.floats.append(found)
        return found

    def linear(self, module: nn.Module, what: str) -> nn.Module:
        """An nn.Linear with a bias, or a fastbert.Int8Linear with one (its int8 weight, scales and bias buffers)."""
        if is_int8(module) and module.bias is not None:
            for name in ("weight_int8", "weight_scale", "bias"):
                self.parameter(module, name, "_buffers")
            self.called.append(module)  # the general forward calls it as a module: its hooks send calls there
            return module
        if type(module) is not nn.Linear or module.bias is None:
            raise Unplannable(f"the {what} is a {type(module).__name__}, not an nn.Linear with a bias")
        self.parameter(module, "weight")
        self.parameter(module, "bias")
        return module

    def norm(self, module: nn.LayerNorm) -> nn.LayerNorm:
        if len(module.normalized_shape) != 1:
            raise Unplannable(f"a LayerNorm over {module.normalized_shape}")
        self.parameter(module, "weight")
        self.parameter(module, "bias")
        return module


def _layer_steps(binder: Binder, resolver: Resolver, pieces: dict, heads_attribute: str) -> LayerSteps:
    for name in _LINEARS:
        binder.linear(pieces[name], name)
    for name in ("attention_norm", "ffn_norm"):
        binder.norm(pieces[name])
    binder.modules.extend(pieces[name] for name in _DROPOUTS if pieces[name] is not None)
    approximate = gelu_approximation(pieces["activation"])
    if approximate is None:
        raise Unplannable(f"the activation {type(pieces['activation']).__name__} is not a GELU")
    owner = pieces["attention"]
    heads, head_dim = getattr(owner, heads_attribute), owner.attention_head_size
    qkv, features = qkv_gemm(resolver, owner, pieces["query"], pieces["key"], pieces["value"])
    if features != 3 * heads * head_dim:
        raise Unplannable(f"query/key/value produce {features // 3} features, not heads * head_dim")
    attention_dense, attention_norm = resolver.gemm_then_norm(pieces["attention_dense"], pieces["attention_norm"])
    ffn_out, ffn_norm = resolver.gemm_then_norm(pieces["ffn_out"], pieces["ffn_norm"])
    return LayerSteps(
        qkv, heads, head_dim, float(getattr(owner, "scaling", head_dim**-0.5)),
        attention_dense, attention_norm, resolver.gemm_gelu(pieces["ffn_in"], approximate), ffn_out, ffn_norm,
    )


def _embedding_steps(binder: Binder, resolver: Resolver, stamp: TreeStamp, family: Family,
                     model: nn.Module) -> EmbeddingSteps:
    embeddings = stamp.attribute(model, "embeddings")
    if embeddings is None or not embeddings_known(family, embeddings):
        raise Unplannable("the embeddings are not transformers' own")
    stamp.typed(embeddings)
    tables = ["word_embeddings", "position_embeddings"] + (["token_type_embeddings"] if family.token_types else [])
    found = {}
    for name in (*tables, "LayerNorm", "dropout"):
        found[name] = stamp.attribute(embeddings, name)
        stamp.typed(found[name])
    for name in tables:
        if found[name].max_norm is not None:
            raise Unplannable(f"embeddings.{name} renormalizes rows (max_norm)")
    weights = {name: binder.parameter(found[name], "weight") for name in tables}
    norm = binder.norm(found["LayerNorm"])
    binder.modules.extend([embeddings, found["dropout"]])
    binder.called.extend(found[name] for name in tables)
    token_type = weights.get("token_type_embeddings")
    return EmbeddingSteps(
        functools.partial(torch.embedding, weights["word_embeddings"]),
        functools.partial(torch.embedding, weights["position_embeddings"]),
        None if token_type is None else functools.partial(torch.embedding, token_type),
        resolver.norm(norm),
        # fp32: the kernel adds token type 0's row in fp32, as the live forward's fp32 add does
        None if token_type is None or token_type.dtype != torch.float32 else resolver.norm(norm, token_type[0]),
    )


def _projection(binder: Binder, stamp: TreeStamp, family: Family, model: nn.Module) -> Callable | None:
    linear = family.projection_module(model, stamp.attribute)
    if linear is None:
        return None
    binder.linear(linear, "projection")
    binder.called.append(linear)
    return functools.partial(torch._C._nn.linear, weight=linear.weight, bias=linear.bias)


def _pooler_step(binder: Binder, resolver: Resolver, stamp: TreeStamp, family: Family,
                 model: nn.Module) -> Callable | None:
    """first tokens (batch, hidden) -> pooler_output for transformers' own Linear-then-Tanh pooler; None for
    any other (or no) pooler, which native.py then calls as a module, as without a plan."""
    if family.pool is not module_pooler:
        return None
    pooler = stamp.attribute(model, "pooler")
    if pooler is None or type(pooler) is not family.pooler:
        return None
    stamp.typed(pooler)
    dense, activation = stamp.attribute(pooler, "dense"), stamp.attribute(pooler, "activation")
    for module in (dense, activation):
        stamp.typed(module)
    if type(dense) is not nn.Linear or dense.bias is None or type(activation) is not nn.Tanh:
        return None
    binder.linear(dense, "pooler")
    binder.called.extend([pooler, dense, activation])
    return resolver.gemm_tanh(dense)


def _parameters_device_dtype(binder: Binder) -> tuple[torch.device, torch.dtype]:
    devices = {p.device for p in binder.parameters}
    dtypes = {p.dtype for p in binder.floats}
    if len(devices) != 1 or len(dtypes) != 1:
        raise Unplannable(f"parameters on {len(devices)} devices in {len(dtypes)} dtypes")
    device, dtype = devices.pop(), dtypes.pop()
    if device.type not in ("cpu", "cuda") or dtype not in _DTYPES:
        raise Unplannable(f"parameters on {device.type} in {dtype}")
    return device, dtype


def _layers(family: Family, model: nn.Module, views: dict, layer_classes: tuple[type, ...]) -> list[nn.Module]:
    layers = list(family.schedule(model))
    for layer in layers:
        if type(layer) not in layer_classes:  # FSDP wrappers and the like keep their own call path
            raise Unplannable(f"a layer of class {type(layer).__name__}")
        if layer not in views:
            raise Unplannable("a layer the module check did not see")
    return layers


# ---- the plan ------------------------------------------------------------------------------------------

class Plan:
    """A model's inference forward, resolved. `layers` is None when the model runs the general forward
    (then `reason` says why): that verdict is remembered and checked exactly like a plan."""

    def __init__(self, model: nn.Module, family: Family, check, layer_classes: tuple[type, ...]):
        self.family, self.views = family, check.views
        self.selection, self.generation = backend.current_backend(), backend.REGISTRY.generation
        self.stamp, self.binder = TreeStamp(), Binder()
        self.reason: str | None = None
        self.layers: tuple[LayerSteps, ...] | None = None
        try:
            self._build(model, layer_classes)
        except Unplannable as why:
            self.reason, self.layers = str(why), None
        self._freeze()

    def _build(self, model: nn.Module, layer_classes: tuple[type, ...]) -> None:
        family, binder = self.family, self.binder
        if family.program is not post_norm:  # LayerSteps is post_norm's bound executor
            raise Unplannable(f"the layer program {family.program.__name__} has no bound steps")
        layers = _layers(family, model, self.views, layer_classes)
        # resolved on the device and dtype of the first layer's LayerNorm (a query Linear may be int8);
        # _parameters_device_dtype checks all float parameters
        first = family.pieces.view(layers[0]).pieces["attention_norm"] if layers else None
        weight = getattr(first, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise Unplannable("no layer with a LayerNorm weight")
        resolver = Resolver(weight.device, weight.dtype)
        self.embeddings = _embedding_steps(binder, resolver, self.stamp, family, model)
        self.projection = _projection(binder, self.stamp, family, model)
        self.embeddings_module = self.stamp.modules[0]
        self.pooler = _pooler_step(binder, resolver, self.stamp, family, model)
        steps: dict[nn.Module, LayerSteps] = {}
        for layer in layers:  # ALBERT's shared layers are bound once
            if layer not in steps:
                steps[layer] = _layer_steps(binder, resolver, self.views[layer].pieces, family.pieces.heads_attribute)
        binder.called.extend(layers)
        self.device, self.dtype = _parameters_device_dtype(binder)
        self.layers = tuple(steps[layer] for layer in layers)
        head_dim = self.layers[0].head_dim
        attention = qkv_attention.bound_for(resolver.probe, head_dim)
        self.dense_attention, self.varlen_attention = attention.dense, attention.packed

    def _freeze(self) -> None:
        """Tuples of what `current` compares at each forward."""
        binder = self.binder
        self.tables, self.names, self.parameters = tuple(binder.tables), tuple(binder.names), tuple(binder.parameters)
        self.versions = tuple(map(_VERSION, self.parameters))
        self.addresses = tuple(map(_DATA_PTR, self.parameters))
        self.modules = tuple(dict.fromkeys(binder.modules))
        self.hook_tables = tuple(itertools.chain.from_iterable(
            (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks) for m in binder.called))
        # Hooks: any change rebuilds the plan (`current`); a plan runs only when every hook is one it may skip,
        # fastbert.quantize's shared-quantization scope (the plan quantizes the QKV input once itself).
        self.hook_keys = tuple(map(tuple, self.hook_tables))
        self.only_skippable_hooks = all(hook in SCOPE_HOOKS for table in self.hook_tables for hook in table.values())
        self.instance_dicts = tuple(m.__dict__ for m in binder.called)
        del self.binder

    def current(self, views: dict) -> bool:
        """Whether the model is still what this plan (or verdict) was built from: else rebuild.
        `views`: this forward's passed module check (the same dict while its stamp matches)."""
        return (
            self.generation == backend.REGISTRY.generation
            and self.selection == backend.current_backend()
            and views is self.views
            and self.stamp.matches(())
            and all(map(operator.is_, map(dict.get, self.tables, self.names), self.parameters))
            and tuple(map(_VERSION, self.parameters)) == self.versions
            and tuple(map(_DATA_PTR, self.parameters)) == self.addresses
            and tuple(map(tuple, self.hook_tables)) == self.hook_keys
        )

    def takes(self, inputs: dict, layout) -> bool:
        """Whether the plan runs this call (else the general forward does): input_ids, some real tokens,
        no autocast, dropouts in eval mode, no hooks or forward overrides on what the general forward calls
        as modules. (The model's own mode and grad mode: decided by encode.)"""
        ids = inputs.get("input_ids")
        return (
            self.layers is not None and ids is not None and ids.device == self.device
            and layout.seqlen > 0 and (layout.indices is None or layout.indices.shape[0] > 0)
            and not torch.is_autocast_enabled(self.device.type)
            and not any(map(_TRAINING, self.modules))
            and self.only_skippable_hooks
            and not any(map(operator.contains, self.instance_dicts, itertools.repeat("forward")))
            and not global_hooks()
        )

    def embed(self, inputs: dict, layout) -> torch.Tensor:
        hidden = embed(self.embeddings, self.family, self.embeddings_module, inputs, layout)
        return hidden if self.projection is None else self.projection(hidden)

    def pool(self, first_tokens: torch.Tensor) -> torch.Tensor | None:
        """The pooler's output for each sequence's first real token, or None: native.py calls the pooler."""
        return None if self.pooler is None else self.pooler(first_tokens.contiguous())

    def run(self, inputs: dict, layout, all_hidden: list | None) -> torch.Tensor:
        """Embeddings and every layer on the real tokens: (tokens, hidden)."""
        hidden = self.embed(inputs, layout)
        if all_hidden is not None:
            all_hidden.append(layout.unpack(hidden))
        if layout.dense:
            call = BoundCall(self.dense_attention, (layout.batch, layout.seqlen))
        else:
            call = BoundCall(self.varlen_attention, (layout.cu_seqlens, layout.max_seqlen))
        for steps in self.layers:
            hidden = post_norm(steps, hidden, call)
            if all_hidden is not None:
                all_hidden.append(layout.unpack(hidden))
        return hidden

def global_hooks() -> bool:
    """Whether any global module hook is registered (torch.nn.modules.module's registries; private names,
    fenced by tests/models/test_plan.py: if they move, every forward takes the general path)."""
    module = torch.nn.modules.module
    tables = [getattr(module, name, None) for name in _GLOBAL_HOOK_TABLES]
    return any(table is None or len(table) for table in tables)


_GLOBAL_HOOK_TABLES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                       "_global_backward_pre_hooks")

_enabled = flag("FASTBERT_PLANS", default=True)


def set_plans(enabled: bool) -> None:
    """Turn inference plans on or off for the process (off: every forward decides per call, as the
    general forward does; for A/B measurements and as a way out). FASTBERT_PLANS=0 sets it off."""
    global _enabled
    _enabled = bool(enabled)


def plans_enabled() -> bool:
    return _enabled


# base model -> its Plan. Weak keys: a dropped model takes its plan; never module state (deepcopy, pickle).
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


def plan_for(model: nn.Module, family: Family, views: dict | None, layer_classes: tuple[type, ...]) -> Plan | None:
    """The model's current plan (or general-path verdict), rebuilt when anything it bound changed.

    views: this forward's module check (support.check_modules), None if the caller made none. None
    when the check was not one the plan can follow (a lookup by getattr: no stamp to compare)."""
    if not _enabled:
        return None
    check = remembered_check(model) if views is not None else check_modules(family, model, layer_classes)
    if check is None or check.problem is not None or (views is not None and check.views is not views):
        return None
    plan = _PLANS.get(model)
    if plan is None or not plan.current(check.views):
        plan = _PLANS[model] = Plan(model, family, check, layer_classes)  # one assignment: thread-safe
    return plan


def forget_plans(model: nn.Module) -> None:
    """Drop the plan of every module inside `model`."""
    for module in model.modules():
        _PLANS.pop(module, None)
