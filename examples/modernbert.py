# examples/modernbert.py: ModernBERT (RoPE, GeGLU, local + global attention), random-init small config
import copy

import torch
import transformers

import fastbert

config = transformers.ModernBertConfig(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
    global_attn_every_n_layers=3, local_attention=32,  # layer 0 global; layers 1-2 local, +-16 tokens
)
torch.manual_seed(0)
hf = transformers.ModernBertForMaskedLM(config).eval()
native = fastbert.ModernBertForMaskedLM(config).eval()  # fastbert's class, same weights
native.load_state_dict(hf.state_dict())
patched = fastbert.patch(copy.deepcopy(hf))  # or patch transformers' model in place

lengths = torch.tensor([200, 37, 120])  # longer than the local window
input_ids = torch.randint(5, config.vocab_size, (3, 200))
attention_mask = (torch.arange(200) < lengths[:, None]).long()
real = attention_mask.bool()
with torch.inference_mode():
    expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    for name, model in (("native", native), ("patched", patched)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        print(name, "max diff on real tokens:", (logits[real] - expected[real]).abs().max().item())
