# examples/families.py: every supported family, random-init small configs (nothing downloaded)
import torch
import transformers

import fastbert

small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
configs = [
    transformers.BertConfig(**small),
    transformers.RobertaConfig(**small),
    transformers.XLMRobertaConfig(**small),
    transformers.CamembertConfig(**small),
    transformers.ElectraConfig(embedding_size=32, **small),
    transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
    transformers.AlbertConfig(embedding_size=32, **small),
    transformers.ModernBertConfig(**small, global_attn_every_n_layers=2, local_attention=16),
]
input_ids = torch.randint(5, 1000, (2, 12))
attention_mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])  # the second row is padded
real = attention_mask.bool()
for config in configs:
    torch.manual_seed(0)
    reference = transformers.AutoModel.from_config(config).eval()  # transformers' model
    native = fastbert.AutoModel.from_config(config).eval()  # fastbert's class for config.model_type
    native.load_state_dict(reference.state_dict())  # same parameter names
    with torch.inference_mode():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        got = native(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    print(f"{config.model_type:12} {type(native).__name__:18} max diff {(got[real] - expected[real]).abs().max():.1e}")
