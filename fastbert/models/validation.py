"""Input validation at the model boundary.

`validate_inputs` runs before any embedding gather, on calls that stay on the fast path (a call that
falls back to transformers' forward gets transformers' own checks: see fastbert.models.native). On
CUDA an out-of-range index in an embedding lookup is a device-side assert that poisons the whole
process (every later CUDA call fails), so token ids, token types and positions are range-checked
here, with an error that names the argument, the offending value and the limit.

Cost: shape, dtype and device checks are free (metadata only). All integer range checks share ONE
host sync per forward: each tensor gets one fused `torch.aminmax`, the minima and maxima are
stacked into one small tensor and read with a single `.tolist()` (on CPU, where a read syncs
nothing, each is read directly: 3.5 instead of 11 us per forward). Nothing runs per layer.

Servers that validate upstream can skip it all: `model(..., validate=False)` or
`config.fastbert_validate = False` (see `should_validate`).
"""
from __future__ import annotations

import torch

_INTEGER_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)}
)


def should_validate(config, validate: bool | None = None) -> bool:
    """The forward's `validate` argument if given, else `config.fastbert_validate` (default True)."""
    if validate is not None:
        return bool(validate)
    return bool(getattr(config, "fastbert_validate", True))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_integer(name: str, value: torch.Tensor) -> None:
    if value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (torch.long or torch.int), got dtype {value.dtype}")


def _require_ids_shape(name: str, value: torch.Tensor, batch: int, seqlen: int) -> None:
    """token_type_ids / position_ids: (batch, seq), or (1, seq) / (seq,) broadcast over the batch."""
    shape = _shape(value)
    if shape not in ((batch, seqlen), (1, seqlen), (seqlen,)):
        raise ValueError(
            f"{name} must have shape (batch, seq) = {(batch, seqlen)} (or (1, seq) to broadcast), got {shape}"
        )


def _check_mask(attention_mask: torch.Tensor, batch: int, seqlen: int) -> bool:
    """Shape and dtype of the attention mask; True when its values must be 0/1 (checked later)."""
    shape = _shape(attention_mask)
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool, integer or float tensor, got dtype {attention_mask.dtype}")
    if attention_mask.dim() == 2:
        if shape != (batch, seqlen):
            raise ValueError(
                f"attention_mask must have the shape of input_ids (batch, seq) = {(batch, seqlen)}, got {shape}"
            )
        return attention_mask.dtype != torch.bool
    if attention_mask.dim() == 4:
        if shape not in ((batch, 1, 1, seqlen), (batch, 1, seqlen, seqlen)):
            raise ValueError(
                f"a 4-D attention_mask must have shape (batch, 1, 1, seq) = {(batch, 1, 1, seqlen)} or "
                f"(batch, 1, seq, seq) = {(batch, 1, seqlen, seqlen)}, got {shape}"
            )
        return False  # 4-D masks are bool (True = attend) or additive floats (0 = attend, -inf = not)
    raise ValueError(
        f"attention_mask must be 2-D (batch, seq) or 4-D (batch, 1, 1, seq) / (batch, 1, seq, seq), got shape {shape}"
    )


def _check_devices(embedding_device, tensors: dict[str, torch.Tensor]) -> None:
    expected = torch.device(embedding_device) if embedding_device is not None else None
    for name, value in tensors.items():
        if expected is not None and not _same_device(value.device, expected):
            raise ValueError(
                f"{name} is on {value.device} but the model's embedding weights are on {expected}: "
                f"move the inputs with .to({str(expected)!r})"
            )
    devices = {name: value.device for name, value in tensors.items()}
    if len({(d.type, d.index) for d in devices.values()}) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:  # "cuda" means the current device
        return (a.index or _current_index(a.type)) == (b.index or _current_index(b.type))
    return a.index == b.index


def _current_index(device_type: str) -> int:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.current_device()
    return 0


def validate_inputs(
    model_config,
    embedding_device,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    *,
    position_offset: int = 0,
    embedding_width: int | None = None,
    length_limit: bool = True,
) -> None:
    """Raise ValueError / TypeError naming the argument, the value and the limit if the inputs do not
    fit the model. Call it before the embeddings.

    model_config: the model's config (vocab_size, type_vocab_size if it has token types,
    max_position_embeddings, hidden_size). embedding_device: the device of the word embedding weights.
    position_offset: the position id of the first token (RoBERTa: padding_idx + 1), so a sequence
    holds at most max_position_embeddings - position_offset tokens. embedding_width: the width of
    inputs_embeds (ALBERT, ELECTRA: embedding_size), hidden_size by default. length_limit: False for a
    model without absolute positions (DeBERTa-v3: relative buckets take any length, as in transformers).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    tensors: dict[str, torch.Tensor] = {}
    if input_ids is not None:
        _require_tensor("input_ids", input_ids)
        _require_integer("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {_shape(input_ids)}")
        batch, seqlen = input_ids.shape
        tensors["input_ids"] = input_ids
    else:
        _require_tensor("inputs_embeds", inputs_embeds)
        if not inputs_embeds.dtype.is_floating_point:
            raise TypeError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
        width, width_name = (embedding_width, "embedding_size") if embedding_width else (
            model_config.hidden_size, "hidden_size")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seq, {width_name}={width}), got {_shape(inputs_embeds)}"
            )
        batch, seqlen = inputs_embeds.shape[:2]
        tensors["inputs_embeds"] = inputs_embeds
    # (name, tensor, lowest allowed, highest allowed + 1, name of the limit) for the range checks.
    ranges = []
    if input_ids is not None:
        ranges.append(("input_ids", input_ids, 0, model_config.vocab_size, "vocab_size"))
    max_positions = model_config.max_position_embeddings
    if position_ids is None:
        if length_limit and seqlen > max_positions - position_offset:
            offset_note = f" - {position_offset} (positions start at {position_offset})" if position_offset else ""
            raise ValueError(
                f"the sequence length is {seqlen} but this model takes at most "
                f"max_position_embeddings={max_positions}{offset_note} tokens: truncate the input"
            )
    else:
        _require_tensor("position_ids", position_ids)
        _require_integer("position_ids", position_ids)
        _require_ids_shape("position_ids", position_ids, batch, seqlen)
        tensors["position_ids"] = position_ids
        ranges.append(("position_ids", position_ids, 0, max_positions, "max_position_embeddings"))
    if token_type_ids is not None:
        _require_tensor("token_type_ids", token_type_ids)
        _require_integer("token_type_ids", token_type_ids)
        _require_ids_shape("token_type_ids", token_type_ids, batch, seqlen)
        tensors["token_type_ids"] = token_type_ids
        type_vocab_size = getattr(model_config, "type_vocab_size", 0)  # DistilBERT has no token types
        ranges.append(("token_type_ids", token_type_ids, 0, type_vocab_size, "type_vocab_size"))
    if attention_mask is not None:
        _require_tensor("attention_mask", attention_mask)
        if _check_mask(attention_mask, batch, seqlen):
            ranges.append(("attention_mask", attention_mask, 0, 2, "0/1 mask values"))
        tensors["attention_mask"] = attention_mask
    _check_devices(embedding_device, tensors)
    _check_ranges(ranges)


def _reads_are_free(tensors: list[torch.Tensor]) -> bool:
    """Whether reading a value of each tensor costs no device sync (all on CPU)."""
    return all(t.device.type == "cpu" for t in tensors)


def _extremes(tensors: list[torch.Tensor]) -> list:
    """[min, max, min, max, ...] of the tensors: one fused min/max each, read with ONE host sync for all of them
    on an accelerator; on CPU, where a read syncs nothing, each read directly (3x less time than stacking)."""
    extremes = [value for t in tensors for value in torch.aminmax(t)]
    if _reads_are_free(tensors):
        return [value.item() for value in extremes]
    return torch.stack([value.double() for value in extremes]).tolist()  # the one host sync


def _check_ranges(ranges) -> None:
    """Every range check with one fused min/max per tensor and at most one host sync for all of them."""
    ranges = [r for r in ranges if r[1].numel() > 0 and r[1].device.type != "meta"]
    if not ranges or torch.compiler.is_compiling():
        # Under torch.compile a host read would break the graph: validate outside the compiled region.
        return
    values = _extremes([value.detach() for _, value, _, _, _ in ranges])
    for i, (name, _, lowest, limit, limit_name) in enumerate(ranges):
        low, high = values[2 * i], values[2 * i + 1]
        if name == "attention_mask":
            if low < 0 or high > 1:
                bad = low if low < 0 else high
                raise ValueError(
                    f"a 2-D attention_mask holds 1 (token) or 0 (padding), got the value {bad:g}: "
                    f"pass additive masks as 4-D (batch, 1, 1, seq)"
                )
            continue
        if low < lowest:
            raise ValueError(f"{name} contains {int(low)}, below the minimum {lowest}")
        if high >= limit:
            raise ValueError(
                f"{name} contains {int(high)}, but {limit_name}={limit} (valid values are 0..{limit - 1})"
            )
