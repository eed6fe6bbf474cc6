"""Strict from_pretrained for every fastbert class: all weights or a clear error, never a silent init."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from fastbert.models.families import base_classes


class MissingWeightsError(ValueError):
    """A checkpoint lacks weights the model needs, or has weights it cannot place."""


class CorruptCheckpointError(OSError):
    """A checkpoint file cannot be read (truncated or corrupted); the message names the file."""


def _is_pooler_key(key: str, prefix: str) -> bool:
    return key.startswith("pooler.") or key.startswith(prefix + "pooler.")


def _partition_keys(model, info: dict, init_new_head: bool):
    """(missing, unexpected, mismatched) keys that make the checkpoint unfit for the model.

    With init_new_head, weights of the task head and of the pooler (which a masked-LM checkpoint
    lacks and a classification head uses) are freshly initialized; other heads' weights are dropped.
    """
    prefix = model.base_model_prefix + "."
    headless = isinstance(model, base_classes())

    def needed(key: str) -> bool:
        in_encoder = headless or key.startswith(prefix)
        return in_encoder and not _is_pooler_key(key, prefix)

    missing = sorted(info.get("missing_keys", ()))
    unexpected = [] if headless else sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))  # (key, checkpoint shape, model shape)
    if init_new_head:
        missing = [k for k in missing if needed(k)]
        unexpected = [k for k in unexpected if k.startswith(prefix)]
        mismatched = [m for m in mismatched if needed(m[0])]
    return missing, unexpected, mismatched


def _hint(model, missing: list[str], init_new_head: bool) -> str:
    if init_new_head:
        return ""
    prefix = model.base_model_prefix + "."
    if isinstance(model, base_classes()) and missing and all(_is_pooler_key(k, prefix) for k in missing):
        return (
            " (the checkpoint has no pooler: pass add_pooling_layer=False to build the model without one, "
            "or init_new_head=True to initialize a new pooler)"
        )
    return " (to fine-tune a new task head, pass init_new_head=True)"


def check_loading_info(model, info: dict, init_new_head: bool) -> None:
    """Raise MissingWeightsError unless every weight the model needs came from the checkpoint with
    the right shape. A headless base model drops a checkpoint's head weights quietly (as transformers
    does). Encoder weights must always be there."""
    missing, unexpected, mismatched = _partition_keys(model, info, init_new_head)
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
            f"{_hint(model, missing, init_new_head)}: " + "; ".join(problems)
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
    """from_pretrained that refuses missing, unexpected or wrongly shaped weights."""

    @classmethod
    def from_pretrained(cls, *args, init_new_head: bool = False, **kwargs):
        if kwargs.get("trust_remote_code"):
            raise ValueError("fastbert never runs code from a checkpoint: trust_remote_code must be False")
        if kwargs.get("weights_only", True) is not True:
            raise ValueError(
                "fastbert loads checkpoints with safetensors or torch.load(weights_only=True) only: "
                "weights_only=False would let a pickled checkpoint run code"
            )
        want_info = kwargs.pop("output_loading_info", False)
        # transformers raises a RuntimeError that names no weight on a shape mismatch; let it report
        # the mismatch instead, so that check_loading_info lists it in a MissingWeightsError.
        kwargs["ignore_mismatched_sizes"] = True
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise corrupt_checkpoint_error(source, error) from error
        check_loading_info(model, info, init_new_head)
        return (model, info) if want_info else model
