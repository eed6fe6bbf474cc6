"""Training a patched model: Trainer, gradient checkpointing, DDP and FSDP on CPU (gloo)."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
import transformers

import fastbert
import fastbert.models.encoder as encoder
from tests.dropin import _distributed_worker
from tests.dropin._common import assert_grads_close, hf_pair, loss_and_grads
from tests.helpers import max_error, random_batch, small_config


class RecordingTrainer(transformers.Trainer):
    """Trainer that keeps every step's exact loss (the logged ones are rounded and averaged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = result[0] if return_outputs else result
        self.losses.append(loss.detach().item())
        return result


def loss_curve(model, tmp_path):
    config = small_config()
    g = torch.Generator().manual_seed(4)
    data = []
    for i in range(16):
        example = random_batch(config, 1, 12, lengths=[int(torch.randint(2, 13, (1,), generator=g))], generator=g)
        data.append({k: v[0] for k, v in example.items()} | {"labels": torch.tensor(i % 2)})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer.losses, model


def test_trainer_loss_curve_matches_unpatched(tmp_path):
    model, reference = hf_pair("BertForSequenceClassification", small_config())
    fastbert.patch(model)
    losses, trained = loss_curve(model, tmp_path / "fast")
    ref_losses, ref_trained = loss_curve(reference, tmp_path / "ref")
    assert len(losses) == len(ref_losses) == 6
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    assert type(trained.bert) is fastbert.BertModel
    for (name, p), q in zip(trained.named_parameters(), ref_trained.parameters()):
        assert max_error(p, q) <= 1e-4, name


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_gradient_checkpointing_gives_identical_gradients(kwargs, monkeypatch):
    model, reference = hf_pair("BertForMaskedLM", small_config(), train=True)
    fastbert.patch(model)
    calls = []
    original = encoder.layer_forward
    monkeypatch.setattr(encoder, "layer_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = random_batch(small_config(), 3, 10, lengths=[10, 6, 2])
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert len(calls) == 2  # one call per layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    calls.clear()
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 4  # every layer ran again in backward: checkpointing is on
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert torch.equal(loss, plain_loss)
    for key, grad in plain_grads.items():
        assert torch.equal(grads[key], grad), key  # recomputation is bitwise the same
    assert max_error(loss, ref_loss) <= 1e-5
    assert_grads_close(grads, ref_grads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """One 2-process gloo run (spawn) doing DDP, FSDP on the root module and FSDP per BertLayer."""
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    modes = ["ddp", "fsdp_root", "fsdp_per_layer"]
    try:
        mp.spawn(_distributed_worker.run, args=(2, free_port(), modes, str(out)), nprocs=2, join=True)
    except mp.ProcessRaisedException:
        # The free port can be taken between free_port() and the rendezvous: one retry on a new port.
        mp.spawn(_distributed_worker.run, args=(2, free_port(), modes, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def whole_batch_grads():
    """Gradients of one process on the whole batch, patched and not."""
    model, batch = _distributed_worker.build_model_and_batch()
    reference, _ = _distributed_worker.build_model_and_batch()
    _, grads = loss_and_grads(fastbert.patch(model), batch)
    _, ref_grads = loss_and_grads(reference, batch)
    assert_grads_close(grads, ref_grads)
    return grads


def test_ddp_two_processes_match_one_process(distributed_results, whole_batch_grads):
    result = distributed_results["ddp"]
    assert not isinstance(result, str), result
    assert_grads_close(result, whole_batch_grads)


def test_fsdp_root_wrap_matches_one_process(distributed_results, whole_batch_grads):
    result = distributed_results["fsdp_root"]
    assert not isinstance(result, str), result
    assert_grads_close(result, whole_batch_grads)


def test_fsdp_per_layer_wrap_matches_one_process(distributed_results, whole_batch_grads):
    """FSDP units per BertLayer (Accelerate/Trainer auto-wrap) unshard in the layer's forward hooks:
    the fast encoder calls each layer as a module, so those hooks run."""
    result = distributed_results["fsdp_per_layer"]
    assert not isinstance(result, str), result
    assert_grads_close(result, whole_batch_grads)
