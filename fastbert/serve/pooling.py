"""sentence-transformers' pooling modes over a right-padded encoder output (zeros or garbage at padding:
every mode reads the mask). Each returns (batch, hidden) in the dtype of `hidden`."""
from __future__ import annotations

import torch

# sentence-transformers' config keys, in the order it concatenates the modes it finds.
CONFIG_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
POOLING_MODES = tuple(CONFIG_KEYS)
TEI_NAMES = {"last-token": "lasttoken", "last_token": "lasttoken"}  # TEI's --pooling spelling of the same mode


def mode_from_name(name: str) -> str:
    """The pooling mode `name` (sentence-transformers' or TEI's spelling), or a ValueError saying why not."""
    mode = TEI_NAMES.get(name, name)
    if mode == "splade":
        raise ValueError("SPLADE pools a masked-LM head's vocabulary logits into a sparse vector (TEI's "
                         "/embed_sparse), which fastbert serve does not serve; its dense modes: "
                         + ", ".join(POOLING_MODES))
    if mode not in POOLING_MODES:
        raise ValueError(f"expected one of {', '.join(POOLING_MODES)} (or TEI's last-token)")
    return mode


def pooling_modes_from_config(config: dict) -> tuple[str, ...]:
    """The modes of a 1_Pooling/config.json (newer files may say "pooling_mode": "mean")."""
    if isinstance(config.get("pooling_mode"), str):
        modes = (config["pooling_mode"],)
    else:
        modes = tuple(mode for mode, key in CONFIG_KEYS.items() if config.get(key))
    unknown = [mode for mode in modes if mode not in CONFIG_KEYS]
    if unknown or not modes:
        raise ValueError(f"pooling modes {unknown or 'none'}: expected some of {', '.join(POOLING_MODES)}")
    return modes


def _masked_sum(hidden: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None):
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if weights is not None:
        keep = keep * weights.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1), keep.sum(1).clamp(min=1e-9)


def _cls(hidden, mask):
    return hidden[:, 0]


def _max(hidden, mask):
    return hidden.masked_fill(~mask.unsqueeze(-1), -1e9).max(1).values


def _mean(hidden, mask):
    total, count = _masked_sum(hidden, mask)
    return total / count


def _mean_sqrt_len(hidden, mask):
    total, count = _masked_sum(hidden, mask)
    return total / count.sqrt()


def _weightedmean(hidden, mask):
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device).expand(mask.shape)
    total, weight = _masked_sum(hidden, mask, positions)
    return total / weight


def _lasttoken(hidden, mask):
    last = (mask.sum(1) - 1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


_POOL = {"cls": _cls, "max": _max, "mean": _mean, "mean_sqrt_len": _mean_sqrt_len,
         "weightedmean": _weightedmean, "lasttoken": _lasttoken}


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """hidden (batch, seq, dim), mask (batch, seq) bool, right padding -> (batch, dim * len(modes))."""
    pooled = [_POOL[mode](hidden, mask) for mode in modes]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
