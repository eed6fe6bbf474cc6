"""Test-wide settings: every test draws fresh random inputs from a seed of its own, so a failure
reproduces when the test runs alone."""
import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def seed_from_test_name(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def pretend_machine(monkeypatch):
    """pretend_machine(features, kernels=None): the machine record (fastbert/cpu/machine.py) says this CPU lists
    `features` and fastbert._C's checks answer `kernels` (None: no extension); choices are re-read."""
    from fastbert.cpu import machine

    def pretend(features, kernels=None):
        record = machine.Machine("pretended CPU", frozenset(features), kernels, "test")
        monkeypatch.setattr(machine, "machine", lambda: record)
        machine._choice_value.cache_clear()
        return record

    yield pretend
    machine._choice_value.cache_clear()
