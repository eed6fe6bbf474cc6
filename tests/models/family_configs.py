"""Small random-init configs shaped like each family's public checkpoints, and batches for them."""
from __future__ import annotations

import torch
import transformers

from tests.helpers import padding_mask

_SIZE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
# roberta-base / xlm-roberta-base / camembert-base: eps 1e-5, one token type, positions offset by pad_token_id + 1.
_FAIRSEQ = dict(max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                bos_token_id=0, eos_token_id=2)


def family_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    if model_type == "bert":
        config = transformers.BertConfig(**_SIZE, max_position_embeddings=32)
    elif model_type == "roberta":
        config = transformers.RobertaConfig(**_SIZE, **_FAIRSEQ)
    elif model_type == "xlm-roberta":
        config = transformers.XLMRobertaConfig(**_SIZE, **_FAIRSEQ)
    elif model_type == "camembert":
        config = transformers.CamembertConfig(**_SIZE, **_FAIRSEQ)
    elif model_type == "electra":  # electra-small-discriminator: embedding_size 128 < hidden 256
        config = transformers.ElectraConfig(**{**_SIZE, "hidden_size": 48}, embedding_size=16,
                                            max_position_embeddings=32)
    elif model_type == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                               seq_classif_dropout=0.0, qa_dropout=0.0, num_labels=2)
    elif model_type == "albert":  # albert-base-v2: factorized embeddings, one shared layer, gelu_new
        config = transformers.AlbertConfig(**_SIZE, embedding_size=16, max_position_embeddings=32,
                                           hidden_act="gelu_new", classifier_dropout_prob=0.0)
    elif model_type == "mpnet":  # all-mpnet-base-v2: fairseq positions from pad id 1, 32 relative buckets
        config = transformers.MPNetConfig(**_SIZE, max_position_embeddings=34, layer_norm_eps=1e-5, pad_token_id=1,
                                          bos_token_id=0, eos_token_id=2)
    elif model_type == "deberta-v2":  # deberta-v3-base: log buckets (8 here, 256 there), shared key/query, c2p+p2c,
        # LayerNorm'ed relative embeddings, no absolute positions, no token types
        config = transformers.DebertaV2Config(
            **_SIZE, max_position_embeddings=64, relative_attention=True, position_buckets=8, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
            type_vocab_size=0, layer_norm_eps=1e-7, pooler_dropout=0.0, pad_token_id=0)
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "mpnet")
FAIRSEQ_TYPES = ("roberta", "xlm-roberta", "camembert", "mpnet")


def family_batch(config, lengths, seqlen: int, side: str = "right", generator=None) -> dict:
    """input_ids (never the pad id), attention_mask and, where the family has them, token_type_ids.

    Padding slots hold the pad id, as a tokenizer writes them.
    """
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, config.vocab_size, (len(lengths), seqlen), generator=generator)
    mask = padding_mask(lengths, seqlen, side)
    batch = dict(input_ids=ids.masked_fill(mask == 0, pad), attention_mask=mask)
    if getattr(config, "type_vocab_size", 0) > 1:
        batch["token_type_ids"] = torch.randint(0, config.type_vocab_size, (len(lengths), seqlen), generator=generator)
    return batch


def hf_and_fast(hf_class_name: str, config, patched: bool = False):
    """(transformers model, fastbert model) with the same random weights, in eval mode."""
    import fastbert

    torch.manual_seed(0)
    reference = getattr(transformers, hf_class_name)(config).eval()
    if patched:
        fast = getattr(transformers, hf_class_name)(config).eval()
        fast.load_state_dict(reference.state_dict())
        return reference, fastbert.patch(fast)
    fast = getattr(fastbert, hf_class_name)(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast
