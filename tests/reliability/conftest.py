"""Shared fixtures of the reliability tests: tiny models, the CPU backends to run on."""
from __future__ import annotations

import pytest
import torch

import fastbert
from tests.helpers import small_config
from tests.reliability._common import CPU_BACKENDS


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    with fastbert.use_backend(request.param):
        yield request.param


@pytest.fixture(params=CPU_BACKENDS)
def cpu_training_backend(request):
    """cpu_backend for training: the "cpp" attention kernel is inference-only (its registry entry refuses
    autograd, so an explicit "cpp" raises), so "cpp" trains under "auto": fastbert._C's row ops (with their
    backward) and torch's attention."""
    with fastbert.use_backend("auto" if request.param == "cpp" else request.param):
        yield request.param


@pytest.fixture(scope="module")
def tiny_model():
    """An eval-mode fastbert.BertModel of tests.helpers.small_config (vocab 128, 64 positions, 2 types)."""
    torch.manual_seed(0)
    return fastbert.BertModel(small_config()).eval()
