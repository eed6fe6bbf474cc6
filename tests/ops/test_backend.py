"""The backend switch: setter, scoped blocks, reasons for what cannot run."""

import pytest
import fastbert


@pytest.fixture(autouse=True)
def restore_process_backend():
    before = fastbert.current_backend()
    yield
    fastbert.use_backend(before)


def test_setter_is_process_wide_and_a_block_is_scoped():
    fastbert.use_backend("torch")
    assert fastbert.current_backend() == "torch"
    with fastbert.use_backend("auto"):
        assert fastbert.current_backend() == "auto"
        with fastbert.use_backend("torch"):
            assert fastbert.current_backend() == "torch"
        assert fastbert.current_backend() == "auto"
    assert fastbert.current_backend() == "torch"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'cuda', 'cpp', 'auto'\), got 'tpu'"):
        fastbert.use_backend("tpu")


def test_available_backends_give_true_or_a_reason():
    for name, status in fastbert.available_backends().items():
        assert status is True or (isinstance(status, str) and status), name
    assert fastbert.available_backends()["torch"] is True
