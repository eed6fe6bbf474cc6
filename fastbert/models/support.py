"""Which modules the fast path may take over: exactly the classes it knows, nothing derived from them.

The fast path reads a module's parameters and runs fastbert's code in place of the module's own, so a
user's subclass (an entity-type embedding added in BertEmbeddings.forward, a scaled BertOutput), a
swapped activation or a LayerNorm replaced by an RMSNorm would be silently ignored. So:
- embeddings of an unknown class run their own forward on the padded inputs (see encoder);
- any other unknown module in the encoder makes the model run HuggingFace's forward, with one
  warning naming the module (see `check_modules`).
Linear layers are always called as modules (LoRA and quantized wrappers run their own code), so any
Linear-like class is accepted.
"""
from __future__ import annotations

import operator
import weakref
from typing import NamedTuple

import torch
from torch import nn
from transformers import activations

from fastbert.models.families import Family, LayerView

# Activation classes whose math bias_gelu implements, with its `approximate` argument.
_FUSED_GELU = {activations.GELUActivation: "none", activations.NewGELUActivation: "tanh", activations.GELUTanh: "tanh"}
# transformers' own elementwise activations: run as modules on packed tokens, which is exact.
_ELEMENTWISE = frozenset(
    entry[0] if isinstance(entry, tuple) else entry for entry in activations.ACT2CLS.values()
) | {nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU}


def gelu_approximation(activation: nn.Module) -> str | None:
    """bias_gelu's `approximate` for a known GELU module; None for any other activation."""
    if type(activation) is nn.GELU:
        return activation.approximate
    return _FUSED_GELU.get(type(activation))


def is_elementwise(activation: nn.Module) -> bool:
    """One of transformers' (or torch's) elementwise activations, which run exactly as modules on packed tokens."""
    return type(activation) in _ELEMENTWISE


def _is_layer_norm(module) -> bool:
    return type(module) is nn.LayerNorm and module.weight is not None and module.bias is not None


def _is_dropout(module) -> bool:
    return module is None or type(module) is nn.Dropout


def embeddings_known(family: Family, embeddings: nn.Module) -> bool:
    """True when the fused embeddings forward computes exactly what this module's forward does."""
    return (
        type(embeddings) is family.embeddings
        and _is_layer_norm(embeddings.LayerNorm)
        and _is_dropout(embeddings.dropout)
        and all(type(getattr(embeddings, name)) is nn.Embedding for name in _embedding_tables(family))
    )


def _embedding_tables(family: Family) -> tuple[str, ...]:
    tables = ("word_embeddings", "position_embeddings")
    return (*tables, "token_type_embeddings") if family.token_types else tables


def _is_fsdp_wrapper(layer: nn.Module, expected: tuple[type, ...]) -> bool:
    """FSDP2's fully_shard gives a module the class FSDP<Name>(FSDPModule, <its class>): same forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    bases = type(layer).__bases__
    return len(bases) == 2 and bases[0] is FSDPModule and bases[1] in expected


class TreeStamp:
    """What one module check looked at, so that the next forward can tell in a few C-level passes
    whether the tree is still the same: every lookup (the parent's _modules, _parameters or __dict__
    dict, the name, what it held), every module's class, and the layer schedule. A submodule swapped
    or deleted, a class swapped (patch/unpatch), a norm's weight replaced: the stamp no longer matches.
    """

    def __init__(self):
        self.tables: list[dict] = []
        self.names: list[str] = []
        self.found: list = []
        self.modules: list[nn.Module] = []
        self.classes: list[type] = []
        self.schedule: tuple = ()
        self.complete = True  # False when a lookup went through getattr (no dict to re-read)

    def lookup(self, table: dict | None, name: str, found) -> None:
        if table is None:
            self.complete = False
            return
        self.tables.append(table)
        self.names.append(name)
        self.found.append(found)

    def attribute(self, module: nn.Module, name: str):
        """getattr(module, name, None) for a submodule, recorded: its _modules entry and its __dict__ entry."""
        found = module._modules.get(name)
        self.lookup(module._modules, name, found)
        if found is None:
            found = module.__dict__.get(name)
            self.lookup(module.__dict__, name, found)
        return found

    def typed(self, module) -> None:
        self.modules.append(module)
        self.classes.append(type(module))

    def matches(self, schedule: tuple) -> bool:
        return (
            all(map(operator.is_, map(dict.get, self.tables, self.names), self.found))
            and all(map(operator.is_, map(type, self.modules), self.classes))
            and len(schedule) == len(self.schedule)
            and all(map(operator.is_, schedule, self.schedule))
        )


def layer_problem(family: Family, layer: nn.Module, layer_classes: tuple[type, ...],
                  views: dict, stamp: TreeStamp | None = None) -> tuple[nn.Module, str] | None:
    """(module, what is unknown about it) for the first piece of `layer` the fused forward cannot run.
    Records the layer's LayerView in `views` once its class is known (the forward then runs those modules),
    and what it looked at in `stamp`."""
    stamp = stamp if stamp is not None else TreeStamp()
    stamp.typed(layer)
    if type(layer) not in layer_classes and not _is_fsdp_wrapper(layer, layer_classes):
        return layer, f"its class {type(layer).__name__} is not transformers' {family.layer.__name__}"
    steps: list = []
    view = views[layer] = family.pieces.view(layer, steps)
    for table, name, found in steps:
        stamp.lookup(table, name, found)
        if isinstance(found, nn.Module):
            stamp.typed(found)
    for name in ("attention_norm", "ffn_norm"):
        norm = view.pieces[name]
        if isinstance(norm, nn.Module):
            stamp.lookup(norm._parameters, "weight", norm._parameters.get("weight"))
            stamp.lookup(norm._parameters, "bias", norm._parameters.get("bias"))
    for module, cls in view.containers:
        if type(module) is not cls:
            return module, f"its class {type(module).__name__} is not transformers' {cls.__name__}"
    pieces = view.pieces
    for name in ("attention_norm", "ffn_norm"):
        if not _is_layer_norm(pieces[name]):
            return pieces[name], f"{type(pieces[name]).__name__} is not an nn.LayerNorm with weight and bias"
    for name in ("attention_dropout", "attention_dense_dropout", "ffn_out_dropout"):
        if not _is_dropout(pieces[name]):
            return pieces[name], f"{type(pieces[name]).__name__} is not an nn.Dropout"
    activation = pieces["activation"]
    if gelu_approximation(activation) is None and not is_elementwise(activation):
        return activation, f"the activation {type(activation).__name__} is not one fastbert knows"
    return None


def schedule_of(family: Family, model: nn.Module) -> tuple:
    """The layers in call order, then the containers holding them (ALBERT's groups)."""
    return (*family.schedule(model), *family.container_modules(model))


def shared_module_problem(family: Family, model: nn.Module, stamp: TreeStamp) -> tuple[nn.Module, str] | None:
    """The modules a relative-position hook reads outside the layers (Family.relative.shared_modules):
    exactly their classes (an nn.Embedding without max_norm, which would renormalize rows in its forward)."""
    if family.relative is None:
        return None
    for path, cls in family.relative.shared_modules:
        module = model
        for name in path.split("."):
            parent, module = module, stamp.attribute(module, name)
            stamp.typed(module)
            if module is None:
                return parent, f"it has no {name} (the relative-position terms read {path})"
        if type(module) is not cls:
            return module, f"its class {type(module).__name__} is not {cls.__name__}"
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return module, "an nn.Embedding with max_norm"
    return None


def model_problem(family: Family, model: nn.Module, layer_classes: tuple[type, ...],
                  views: dict, stamp: TreeStamp | None = None) -> tuple[nn.Module, str] | None:
    """(module, what is unknown) for the first module of the base model the fast encoder cannot run."""
    stamp = stamp if stamp is not None else TreeStamp()
    attribute, encoder_class = family.encoder
    encoder = stamp.attribute(model, attribute)
    stamp.typed(encoder)
    if type(encoder) is not encoder_class:
        return encoder, f"its class {type(encoder).__name__} is not transformers' {encoder_class.__name__}"
    stamp.schedule = schedule_of(family, model)
    problem = shared_module_problem(family, model, stamp)
    if problem is not None:
        return problem
    for group in family.container_modules(model):
        stamp.typed(group)
        if type(group) is not family.groups:
            return group, f"its class {type(group).__name__} is not transformers' {family.groups.__name__}"
    pooler = stamp.attribute(model, "pooler")
    stamp.typed(pooler)
    if family.pooler is not None and pooler is not None and type(pooler) is not family.pooler:
        return pooler, f"its class {type(pooler).__name__} is not transformers' {family.pooler.__name__}"
    for layer in dict.fromkeys(family.schedule(model)):  # shared ALBERT layers once
        problem = layer_problem(family, layer, layer_classes, views, stamp)
        if problem is not None:
            return problem
    return None


class ModuleCheck(NamedTuple):
    problem: str | None  # a sentence naming the first module the fast path would misrun; None: none
    views: dict[nn.Module, LayerView]  # each layer's modules as checked, for the forward to run
    stamp: TreeStamp | None = None  # what the check looked at (None: not recorded)


# base model -> (layer classes, the last passed check). Weak keys: a dropped model takes its entry.
_PASSED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_modules(family: Family, model: nn.Module, layer_classes: tuple[type, ...]) -> ModuleCheck:
    """Whether the fast path knows every module of `model`, and the layers' views it checked.

    Runs on every forward (a module may be replaced at any time). A passed check is remembered with
    its TreeStamp; while the stamp matches (a few C-level passes, no walk), the same ModuleCheck,
    views included, is the answer. The forward reuses the views, so the tree is walked at most once.
    Under torch.compile the memo is left alone: dynamo guards on the weak dict's size, which a model
    collected mid-trace changes ("Guard failed on the same frame it was created")."""
    compiling = torch.compiler.is_compiling()
    remembered = None if compiling else _PASSED.get(model)
    if remembered is not None and remembered[0] == layer_classes:
        check = remembered[1]
        if check.stamp.matches(schedule_of(family, model)):
            return check
    views: dict[nn.Module, LayerView] = {}
    stamp = TreeStamp()
    problem = model_problem(family, model, layer_classes, views, stamp)
    if problem is None:
        check = ModuleCheck(None, views, stamp)
        if stamp.complete and not compiling:
            _PASSED[model] = (layer_classes, check)  # one assignment: thread-safe
        return check
    if not compiling:
        _PASSED.pop(model, None)
    module, why = problem
    name = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
    return ModuleCheck(f"the module {name} ({why})", views)


def remembered_check(model: nn.Module) -> ModuleCheck | None:
    """The last passed check of `model` (check_modules verified its stamp if it returned it this forward)."""
    remembered = _PASSED.get(model)
    return None if remembered is None else remembered[1]


def forget_checks(model: nn.Module) -> None:
    """Drop the remembered check of every base model inside `model` (patch/unpatch)."""
    for module in model.modules():
        _PASSED.pop(module, None)
