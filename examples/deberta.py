# examples/deberta.py: DeBERTa-v3 (disentangled relative attention), random-init small config (nothing downloaded)
import copy

import torch
import transformers

import fastbert

config = transformers.DebertaV2Config(  # deberta-v3-base's layout, small
    vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    relative_attention=True, position_buckets=16, pos_att_type="p2c|c2p", norm_rel_ebd="layer_norm",
    share_att_key=True, position_biased_input=False, type_vocab_size=0, num_labels=3,
)
torch.manual_seed(0)
hf = transformers.DebertaV2ForSequenceClassification(config).eval()
native = fastbert.DebertaV2ForSequenceClassification(config).eval()  # fastbert's class, same weights
native.load_state_dict(hf.state_dict())
patched = fastbert.patch(copy.deepcopy(hf))  # or patch transformers' model in place

lengths = torch.tensor([100, 9, 40])  # past 2 * position_buckets: log-bucketed distances
input_ids = torch.randint(5, config.vocab_size, (3, 100))
attention_mask = (torch.arange(100) < lengths[:, None]).long()
with torch.inference_mode():
    expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    for name, model in (("native", native), ("patched", patched)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        print(name, "max diff:", (logits - expected).abs().max().item())
