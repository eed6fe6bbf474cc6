"""from_pretrained for every fastbert class: transformers' own, plus a clear error for any encoder weight the
checkpoint lacks or has in another shape (never a silently random encoder)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open


class MissingWeightsError(ValueError):
    """A checkpoint lacks weights the model needs, or has weights it cannot place."""


class CorruptCheckpointError(OSError):
    """A checkpoint file cannot be read (truncated or corrupted); the message names the file."""


def _is_encoder_key(model, key: str) -> bool:
    """True for a weight of the encoder: all of a headless model's, the base model's of a head model.

    The pooler is not counted: a masked-LM checkpoint has none, and transformers creates it as it
    creates a task head."""
    prefix = model.base_model_prefix + "."
    in_base = model.base_model is model or key.startswith(prefix)
    return in_base and not (key.startswith("pooler.") or key.startswith(prefix + "pooler."))


def _partly_loaded(model, missing: set[str]) -> set[str]:
    """Missing weights of a module whose other weights came from the checkpoint: a damaged
    checkpoint, not a head it lacks. A tied weight (a decoder tied to the input embeddings) proves
    nothing: it is never missing, wherever it came from."""
    named = list(model.named_parameters(remove_duplicate=False))
    names_of = Counter(id(parameter) for _, parameter in named)
    loaded_modules = {name.rpartition(".")[0] for name, parameter in named
                      if names_of[id(parameter)] == 1 and name not in missing}
    return {key for key in missing if key.rpartition(".")[0] in loaded_modules}


def _unfit_keys(model, info: dict, reinit_head: bool):
    """(missing, unexpected, mismatched) keys that make the checkpoint unfit for the model.

    A head or pooler the checkpoint lacks was initialized by transformers, with its warning listing
    the weights, and a checkpoint's other head is dropped: both are what transformers does. A head of
    another shape is re-initialized only with ignore_mismatched_sizes=True, as in transformers.
    Encoder weights must always come from the checkpoint, with their shape, and so must the rest of
    a head module the checkpoint has part of."""
    headless = model.base_model is model
    missing = set(info.get("missing_keys", ()))
    partial = _partly_loaded(model, missing)
    missing = sorted(k for k in missing if k in partial or _is_encoder_key(model, k))
    unexpected = [] if headless else sorted(k for k in info.get("unexpected_keys", ()) if _is_encoder_key(model, k))
    mismatched = sorted(m for m in info.get("mismatched_keys", ()) if not reinit_head or _is_encoder_key(model, m[0]))
    return missing, unexpected, mismatched


def _hint(model, mismatched) -> str:
    if any(not _is_encoder_key(model, key) for key, *_ in mismatched):
        return " (pass ignore_mismatched_sizes=True to re-initialize a task head of another shape)"
    return ""


def check_loading_info(model, info: dict, reinit_head: bool = False) -> None:
    """Raise MissingWeightsError unless every encoder weight came from the checkpoint with the right
    shape (and, unless reinit_head, every head weight the checkpoint has fits its shape)."""
    missing, unexpected, mismatched = _unfit_keys(model, info, reinit_head)
    wrong_shape = [f"{key} {tuple(theirs)} in the checkpoint, {tuple(ours)} in the model" for key, theirs, ours
                   in mismatched]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        raise MissingWeightsError(
            f"{type(model).__name__}.from_pretrained: the checkpoint does not fit the model"
            f"{_hint(model, mismatched)}: " + "; ".join(problems)
        )


def _unreadable_file(source) -> tuple[str, str] | None:
    """(file, safetensors' complaint) for the first unreadable .safetensors file of a local checkpoint."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return str(path), str(error)
    return None


def corrupt_checkpoint_error(source, error: Exception) -> CorruptCheckpointError:
    found = _unreadable_file(source)
    file, why = found if found is not None else (f"a safetensors file of {source}", str(error))
    return CorruptCheckpointError(
        f"cannot read the checkpoint file {file}: {why}. The file is truncated or corrupted "
        "(an interrupted download or save?): download or save it again"
    )


class StrictLoading:
    """transformers' from_pretrained, which refuses missing, unexpected or wrongly shaped encoder weights."""

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, as for transformers' own classes, which fastbert's subclass without adding weights.

        transformers treats a class defined outside it as custom code: it would skip the weight
        conversions of its model type, and initialize a new head differently (ModernBERT's classifier)."""
        return False

    @classmethod
    def from_pretrained(cls, *args, init_new_head: bool = False, **kwargs):
        """transformers' from_pretrained (same kwargs; a task head the checkpoint lacks is initialized
        and listed in its warning), but every encoder weight must be in the checkpoint. init_new_head
        (from before heads were created as transformers creates them) now only means
        ignore_mismatched_sizes=True for the head."""
        if kwargs.get("trust_remote_code"):
            raise ValueError("fastbert never runs code from a checkpoint: trust_remote_code must be False")
        if kwargs.get("weights_only", True) is not True:
            raise ValueError(
                "fastbert loads checkpoints with safetensors or torch.load(weights_only=True) only: "
                "weights_only=False would let a pickled checkpoint run code"
            )
        want_info = kwargs.pop("output_loading_info", False)
        reinit_head = init_new_head or kwargs.get("ignore_mismatched_sizes", False)
        # transformers raises a RuntimeError that names no weight on a shape mismatch; let it report
        # the mismatch instead, so that check_loading_info lists it in a MissingWeightsError.
        kwargs["ignore_mismatched_sizes"] = True
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise corrupt_checkpoint_error(source, error) from error
        check_loading_info(model, info, reinit_head)
        return (model, info) if want_info else model
