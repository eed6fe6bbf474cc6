# examples/mpnet.py: MPNet (all-mpnet-base-v2's architecture, relative-position bias), random-init small config
import copy

import torch
import transformers

import fastbert

config = transformers.MPNetConfig(  # all-mpnet-base-v2's layout, small: 32 relative buckets, pad id 1
    vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=514, layer_norm_eps=1e-5,
)
torch.manual_seed(0)
hf = transformers.MPNetModel(config).eval()
native = fastbert.MPNetModel(config).eval()  # fastbert's class, same weights
native.load_state_dict(hf.state_dict())
patched = fastbert.patch(copy.deepcopy(hf))  # or patch transformers' model (or a SentenceTransformer) in place

lengths = torch.tensor([300, 12, 150])  # distances past MPNet's max_distance of 128
input_ids = torch.randint(5, config.vocab_size, (3, 300))
attention_mask = (torch.arange(300) < lengths[:, None]).long()
input_ids[attention_mask == 0] = config.pad_token_id


def mean_pooled(model):  # sentence-transformers' mean pooling over the real tokens
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return (hidden * attention_mask[..., None]).sum(1) / lengths[:, None]


with torch.inference_mode():
    expected = mean_pooled(hf)
    for name, model in (("native", native), ("patched", patched)):
        print(name, "max diff:", (mean_pooled(model) - expected).abs().max().item())
