"""The capability registry: the one place that states what each implementation of each op can run.

Every implementation of an op registers an `Implementation`: the op, the backend it belongs to,
where its code lives ("module:attribute", imported only when first run), the device types and dtypes
it takes, a machine-level probe (can this backend run on this device type here at all?) and an
optional `supports` check that looks at one call's `Signature` (device type, dtype, width, head_dim,
autograd, interpreter) and returns None or the reason it cannot take that call.

Everything else is derived from the registrations:
  - `Registry.resolve(requested, signature)`: which implementation runs a call (memoized), and
    `fastbert.ops._dispatch.bind`: the same choice, prepared once for calls on fixed parameters;
  - `Registry.availability(backend, devices, interpreting)`: whether a backend can run anything on
    this machine, else why not, for `available_backends()` and `fastbert info`.
Only the "auto" preference order (`AUTO_PREFERENCE` in fastbert/backend.py) is kept by hand.

The resolver is pure logic over signatures and probes, so tests can hand it fake CUDA signatures
(and probes that report a GPU) and cover the GPU-only branches on a CPU machine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


class Signature(NamedTuple):
    """What resolution looks at in one call. Small and hashable: it is the memoization key."""

    op: str
    device: str  # device type: "cpu", "cuda", ...
    dtype: torch.dtype
    width: int = 0  # last dim of a row-wise op's input (hidden or intermediate size); 0 = not relevant
    head_dim: int = 0  # attention head size; 0 = not relevant
    grad: bool = False  # autograd records this call (inference-only implementations refuse it)
    interpreting: bool = False  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors


Probe = Callable[[str], "str | None"]  # device type -> None if the backend can run there, else why not
Check = Callable[[Signature], "str | None"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Implementation:
    """One implementation of one op on one backend, and what it can take."""

    op: str
    backend: str
    target: str  # "module:attribute" of the callable; imported lazily, so `import fastbert` stays light
    devices: frozenset[str] | None  # device types it takes; None: any (the torch references)
    dtypes: frozenset[torch.dtype] | None  # input dtypes it takes; None: any
    probe: Probe  # machine-level: is the code there, is the device there
    supports: Check | None = None  # per-call limits (width, head_dim, autograd, ...)
    # "module:attribute" of bind(run, **params) -> callable, for calls that repeat on fixed parameters (an
    # inference plan's weights): what can be prepared once is prepared there (packed weights, converted
    # biases, addresses), `run` being the loaded target. None: the op is not bound, only called.
    binder: str | None = None
    note: str | None = None  # "module:attribute" of note() -> str: what its binding runs here (`fastbert info`)

    def problem(self, signature: Signature) -> str | None:
        """None if this implementation can run the call described by `signature`, else why not."""
        if self.devices is not None and signature.device not in self.devices:
            return f"it runs on {', '.join(sorted(self.devices))} tensors, got a {signature.device} tensor"
        if self.dtypes is not None and signature.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            return f"it takes {names} inputs, got {_dtype_name(signature.dtype)}"
        return self.probe(signature.device) or (self.supports(signature) if self.supports else None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class Registry:
    """Implementations by (op, backend), and resolution over them."""

    def __init__(self, auto_preference: dict[str, dict[str, tuple[str, ...]]]):
        self._implementations: dict[tuple[str, str], Implementation] = {}
        self.auto_preference = auto_preference  # device type -> op -> backends, best first
        self._resolved: dict[tuple[str, Signature], Implementation] = {}
        self.generation = 0  # bumped whenever resolutions may change; memos elsewhere key on it

    def register(self, implementation: Implementation) -> Implementation:
        key = (implementation.op, implementation.backend)
        if key in self._implementations:
            raise ValueError(f"{implementation.op} on backend {implementation.backend!r} is registered twice")
        self._implementations[key] = implementation
        self.clear_cache()
        return implementation

    def get(self, op: str, backend: str) -> Implementation | None:
        return self._implementations.get((op, backend))

    def ops(self) -> list[str]:
        return sorted({op for op, _ in self._implementations})

    def backends_of(self, op: str) -> list[str]:
        return [backend for o, backend in self._implementations if o == op]

    def implementations(self) -> list[Implementation]:
        return list(self._implementations.values())

    def devices_of(self, backend: str) -> set[str] | None:
        """The device types some implementation of `backend` takes (None: any)."""
        devices: set[str] = set()
        for implementation in self._implementations.values():
            if implementation.backend == backend:
                if implementation.devices is None:
                    return None
                devices |= implementation.devices
        return devices

    def with_probe(self, probe: Probe) -> Registry:
        """A copy whose every implementation uses `probe`: what would resolve on another machine (tests)."""
        copy = Registry(self.auto_preference)
        for implementation in self._implementations.values():
            copy.register(dataclasses.replace(implementation, probe=probe))
        return copy

    def availability(self, backend: str, interpreting: bool, device: str | None = None) -> str | None:
        """None if some op of `backend` can run here (on `device`, or on any device type it takes),
        else every reason it cannot, each once. The probes say which devices this machine lacks."""
        reasons = []
        for implementation in self._implementations.values():
            if implementation.backend != backend:
                continue
            devices = sorted(implementation.devices) if implementation.devices is not None else ["cpu"]
            for device_type in devices if device is None else [device]:
                dtype = min(implementation.dtypes or {torch.float32}, key=str)
                call = Signature(implementation.op, device_type, dtype, interpreting=interpreting)
                reason = implementation.problem(call)
                if reason is None:
                    return None
                reasons.append(reason)
        if not reasons:
            return f"no op is registered for backend {backend!r}"
        return "; ".join(dict.fromkeys(reasons))

    def auto_order(self, op: str, device: str) -> tuple[str, ...]:
        order = self.auto_preference.get(device, {}).get(op, ("torch",))
        return order() if callable(order) else order  # a machine.MachineChoice, read on first use

    def resolve(self, requested: str, signature: Signature) -> Implementation:
        """The implementation that runs `signature` when the user selected backend `requested`.

        "torch" always runs the reference. An explicit backend that has the op must be able to take
        the call, else BackendUnavailableError says why. "auto", or an explicit backend without this
        op at all, takes the first implementation in the auto order that can take the call.
        Memoized: the per-call cost is one dict lookup, which torch.compile traces as a constant.
        """
        key = (requested, signature)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = self._resolve_uncached(requested, signature)
        return found

    def _resolve_uncached(self, requested: str, signature: Signature) -> Implementation:
        reference = self.get(signature.op, "torch")
        if reference is None:
            raise KeyError(f"no torch implementation is registered for op {signature.op!r} (ops: {self.ops()})")
        if requested == "torch":
            return reference
        explicit = self.get(signature.op, requested) if requested != "auto" else None
        if explicit is not None:
            problem = explicit.problem(signature)
            if problem is not None:
                raise BackendUnavailableError(
                    f"backend {requested!r} cannot run {signature.op} on {signature.device}: {problem}"
                )
            return explicit
        for backend in self.auto_order(signature.op, signature.device):
            candidate = self.get(signature.op, backend)
            if candidate is not None and candidate.problem(signature) is None:
                return candidate
        return reference

    def clear_cache(self) -> None:
        self._resolved.clear()
        self.generation += 1
