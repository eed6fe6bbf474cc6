"""Run transformers' own common model tests with fastbert.patch() applied to every model they build.

    python scripts/run_hf_model_tests_patched.py [--sdist transformers-X.tar.gz] [--families bert,albert]
                                                 [-k EXPR] [--timeout 900]

transformers' ModelTesterMixin (tests/test_modeling_common.py of the installed version's sdist, from
PyPI with pip unless --sdist is given) runs over every class of each family (base model and every
head), once plainly and once with every model patched right after construction: PreTrainedModel.
post_init is wrapped, and the outermost model under construction is patched (so a head's base model
is patched with the head's knowledge of which heads read column 0). The sdist has no per-model test
files and no generation/export tests: each family's tester here is fastbert's own (tiny configs,
random masks with holes, token types), generate/export mixins are empty stand-ins.

Prints the tests that fail or are skipped only when patched, with the first line of their message.
Needs the `parameterized` package (a test dependency of transformers). CPU-heavy: a few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import transformers

FAMILIES = {
    "bert": dict(config="BertConfig", classes=["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertLMHeadModel",
                 "BertForNextSentencePrediction", "BertForSequenceClassification", "BertForTokenClassification",
                 "BertForQuestionAnswering", "BertForMultipleChoice"], token_types=16, settings={}),
    "roberta": dict(config="RobertaConfig", classes=["RobertaModel", "RobertaForMaskedLM", "RobertaForCausalLM",
                    "RobertaForSequenceClassification", "RobertaForTokenClassification",
                    "RobertaForQuestionAnswering", "RobertaForMultipleChoice"], token_types=16, settings={}),
    "electra": dict(config="ElectraConfig", classes=["ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM",
                    "ElectraForCausalLM", "ElectraForSequenceClassification", "ElectraForTokenClassification",
                    "ElectraForQuestionAnswering", "ElectraForMultipleChoice"], token_types=16,
                    settings={"embedding_size": 16}),
    "distilbert": dict(config="DistilBertConfig", classes=["DistilBertModel", "DistilBertForMaskedLM",
                       "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
                       "DistilBertForQuestionAnswering", "DistilBertForMultipleChoice"], token_types=0,
                       settings={"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37}),
    "albert": dict(config="AlbertConfig", classes=["AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
                   "AlbertForSequenceClassification", "AlbertForTokenClassification", "AlbertForQuestionAnswering",
                   "AlbertForMultipleChoice"], token_types=16, settings={"embedding_size": 16}),
}
_COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
               type_vocab_size=16, initializer_range=0.02)

_TEST_MODULE = '''import unittest

import transformers
from transformers.testing_utils import require_torch

from ...generation.test_utils import GenerationTesterMixin
from ...test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

FAMILY = {family}


class Tester:
    batch_size, seq_length, is_training, num_labels, num_choices = 13, 7, True, 2, 4
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads = 99, 32, 2, 4

    def __init__(self, parent):
        self.parent = parent

    def get_config(self):
        return getattr(transformers, FAMILY["config"])(**FAMILY["settings"])

    def prepare_config_and_inputs_for_common(self):
        inputs = {{"input_ids": ids_tensor([13, 7], 99), "attention_mask": random_attention_mask([13, 7])}}
        if FAMILY["token_types"]:
            inputs["token_type_ids"] = ids_tensor([13, 7], FAMILY["token_types"])
        return self.get_config(), inputs


CLASSES = tuple(getattr(transformers, name) for name in FAMILY["classes"])
# transformers' own check: a tester inherits the generation mixin exactly when a class can generate
MIXINS = (ModelTesterMixin, GenerationTesterMixin) if any(c.can_generate() for c in CLASSES) else (ModelTesterMixin,)


@require_torch
class PatchedModelTest(*MIXINS, unittest.TestCase):
    all_model_classes = CLASSES

    def setUp(self):
        self.model_tester = Tester(self)
'''

_CONFTEST = '''import os
import sys

from transformers.modeling_utils import PreTrainedModel

if os.environ.get("FASTBERT_PATCH_EVERY_MODEL") == "1":
    import fastbert

    _post_init = PreTrainedModel.post_init

    def _outermost(model):
        """False while `model` is built inside another model's __init__ (a head's base model)."""
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            if owner is not model and isinstance(owner, PreTrainedModel):
                return False
            frame = frame.f_back
        return True

    def post_init(self):
        _post_init(self)
        if _outermost(self):
            try:
                fastbert.patch(self)
            except fastbert.UnsupportedModelError:
                pass

    PreTrainedModel.post_init = post_init
'''


def _sdist(path: str | None, work: Path) -> Path:
    if path:
        return Path(path)
    version = transformers.__version__
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"transformers=={version}", "-d", str(work)], check=True, stdout=subprocess.DEVNULL)
    return next(work.glob("transformers-*.tar.gz"))


def _write_tree(sdist: Path, root: Path, families: list[str]) -> Path:
    tests = root / "tests"
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/tests/test_modeling_common.py"))
        (tests / "generation").mkdir(parents=True)
        (tests / "test_modeling_common.py").write_bytes(archive.extractfile(member).read())
    (tests / "exporters").mkdir()
    (tests / "generation" / "test_utils.py").write_text("class GenerationTesterMixin:\n    pass\n")
    (tests / "exporters" / "test_export.py").write_text("class ExportTesterMixin:\n    pass\n")
    for package in (tests, tests / "generation", tests / "exporters", tests / "models"):
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text("")
    for family in families:
        spec = dict(FAMILIES[family])
        spec["settings"] = {**_COMMON, **spec["settings"]}
        folder = tests / "models" / family
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / f"test_modeling_{family}.py").write_text(_TEST_MODULE.format(family=repr(spec)))
    (root / "conftest.py").write_text(_CONFTEST)
    return tests / "models"


def _run(root: Path, target: Path, patched: bool, keyword: str | None, timeout: int) -> dict:
    report = root / f"report-{int(patched)}.xml"
    command = ["timeout", str(timeout), sys.executable, "-m", "pytest", str(target), "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", "--rootdir", str(root), "-W", "ignore"]
    if keyword:
        command += ["-k", keyword]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # a checkout to test may follow
    env = dict(os.environ, FASTBERT_PATCH_EVERY_MODEL=str(int(patched)), PYTHONPATH=path)
    finished = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    print(f"{'patched' if patched else 'plain'}: {finished.stdout.strip().splitlines()[-1:]}", flush=True)
    return _outcomes(report)


_SEVERITY = {"passed": 0, "skipped": 1, "error": 2, "failure": 3}


def _outcomes(report: Path) -> dict:
    """test id -> (outcome, first line of the message); the worst outcome of a test's entries (subtests)."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 2)[-2]}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome, message = kind, (element.get("message") or "").strip().splitlines()[:1]
                message = message[0][:200] if message else ""
        if _SEVERITY[outcome] >= _SEVERITY[outcomes.get(name, ("passed",))[0]]:
            outcomes[name] = (outcome, message)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", help="transformers sdist (default: pip download of the installed version)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("-k", dest="keyword")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run (plain, patched)")
    parser.add_argument("--json", help="write both runs' outcomes here")
    parser.add_argument("--plain-from", help="reuse the plain run of an earlier --json (fastbert plays no part in it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        target = _write_tree(_sdist(args.sdist, root), root / "hf", args.families.split(","))
        if args.plain_from:
            earlier = json.loads(Path(args.plain_from).read_text())["plain"]
            plain = {name: tuple(value) for name, value in earlier.items()}
        else:
            plain = _run(root / "hf", target, False, args.keyword, args.timeout)
        patched = _run(root / "hf", target, True, args.keyword, args.timeout)
    only = {name: patched[name] for name in patched
            if patched[name][0] != "passed" and plain.get(name, ("passed",))[0] == "passed"}
    counts = {kind: sum(o == kind for o, _ in patched.values()) for kind in ("passed", "failure", "error", "skipped")}
    print(f"{len(patched)} cases patched: {counts}")
    for kind in ("failure", "error", "skipped"):
        names = sorted(name for name, (outcome, _) in only.items() if outcome == kind)
        print(f"\n{kind} only when patched: {len(names)}")
        for name in names:
            print(f"  {name}: {only[name][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "patched": patched}, indent=1))


if __name__ == "__main__":
    main()
