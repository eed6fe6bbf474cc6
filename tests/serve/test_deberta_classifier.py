"""/predict on a DeBERTa-v3-shaped sequence classifier (relative attention, no token types: the tokenizer's
token_type_ids of a pair are ignored, as transformers ignores them), against transformers' logits."""
import torch
import transformers

from tests.models.family_configs import family_config
from tests.serve.conftest import TEXTS, save_checkpoint, serve

TOLERANCE = 1e-5
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def test_predict_on_a_deberta_v3_classifier_matches_transformers(tmp_path):
    config = family_config("deberta-v2", vocab_size=30522, num_labels=3, id2label=LABELS,
                           label2id={label: i for i, label in LABELS.items()})
    torch.manual_seed(4)
    folder = save_checkpoint(transformers.DebertaV2ForSequenceClassification(config), tmp_path / "deberta")
    reference = transformers.DebertaV2ForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = [TEXTS[1], [TEXTS[0], TEXTS[2]], TEXTS[4]]
    with torch.no_grad():
        singles = reference(**tokenizer([TEXTS[1], TEXTS[4]], padding=True, return_tensors="pt")).logits
        pair = reference(**tokenizer([TEXTS[0]], [TEXTS[2]], return_tensors="pt")).logits[0]
    with serve(folder) as client:
        answers = client.post("/predict", json={"inputs": inputs, "raw_scores": True}).json()
    got = [{entry["label"]: entry["score"] for entry in answer} for answer in answers]
    for scores, expected in zip(got, (singles[0], pair, singles[1])):
        assert max(abs(scores[label] - expected[i].item()) for i, label in LABELS.items()) <= TOLERANCE
