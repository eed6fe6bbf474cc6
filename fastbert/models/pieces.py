"""Where a layer's pieces live: `LayerPieces` (attribute paths of what the fused layer forward reads, for one
family) and `LayerView` (one layer's modules, found in one walk). The family table (families.py) declares a
LayerPieces per family; support.py checks the modules a view finds; encoder.py runs them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn


@dataclass(frozen=True)
class LayerPieces:
    """Attribute paths, relative to one layer, of what the fused layer forward reads.

    A path that is None is a step the family does not have (DistilBERT and ALBERT apply no dropout
    after one of their dense layers).
    """

    attention: str  # the module holding the head count, head size and scaling
    heads_attribute: str
    query: str
    key: str
    value: str
    attention_dropout: str
    attention_dense: str
    attention_dense_dropout: str | None
    attention_norm: str
    ffn_in: str
    activation: str
    ffn_out: str
    ffn_out_dropout: str | None
    ffn_norm: str
    containers: tuple[tuple[str, type], ...]  # (path, exact class) of the modules holding the pieces

    def __post_init__(self):
        # A walk plan: each module on the way to a piece or container once, parents first, as
        # (index of the parent in the walk, attribute name); then the walk index each path ends at.
        walk: list[tuple[int, str]] = []
        node_of: dict[tuple[str, ...], int] = {(): 0}

        def end_of(path: str) -> int:
            steps = tuple(path.split("."))
            for depth in range(1, len(steps) + 1):
                if steps[:depth] not in node_of:
                    walk.append((node_of[steps[:depth - 1]], steps[depth - 1]))
                    node_of[steps[:depth]] = len(walk)
            return node_of[steps]

        pieces = {name: None if getattr(self, name) is None else end_of(getattr(self, name)) for name in PIECE_NAMES}
        containers = tuple((end_of(path), cls) for path, cls in self.containers)
        object.__setattr__(self, "_walk", tuple(walk))  # frozen dataclass: set once, here
        object.__setattr__(self, "_piece_ends", pieces)
        object.__setattr__(self, "_container_ends", containers)

    def view(self, layer: nn.Module, steps: list | None = None) -> LayerView:
        """The pieces and containers of `layer`, in one walk that looks each module up once.

        steps: if given, receives (parent's _modules dict, name, module found) for every lookup made
        there, or (None, name, found) for one made by getattr (see support.TreeStamp)."""
        nodes = [layer]
        for parent, name in self._walk:
            # Submodules straight from nn.Module._modules: Module.__getattr__ is a Python call per
            # attribute, and this runs per layer per call. Anything else (an int, a function) by getattr.
            node = nodes[parent]
            table = node._modules if isinstance(node, nn.Module) else None
            found = table.get(name) if table is not None else None
            if found is None:
                table, found = None, getattr(node, name)
            nodes.append(found)
            if steps is not None:
                steps.append((table, name, found))
        pieces = {name: None if end is None else nodes[end] for name, end in self._piece_ends.items()}
        return LayerView(pieces, tuple((nodes[end], cls) for end, cls in self._container_ends))


class LayerView(NamedTuple):
    """One layer's modules as one forward sees them."""

    pieces: dict[str, nn.Module | None]  # piece name (a LayerPieces field) -> module; None: not in the family
    containers: tuple[tuple[nn.Module, type], ...]  # (module, the exact class it must have)


PIECE_NAMES = tuple(f.name for f in dataclasses.fields(LayerPieces) if f.name not in ("heads_attribute", "containers"))
