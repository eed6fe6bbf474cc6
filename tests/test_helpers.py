"""The tolerance rule refuses a baseline that is the result itself: such a check could never fail."""
import pytest
import torch

from tests.helpers import assert_close_to_ref


def test_assert_close_to_ref_refuses_the_result_as_its_own_baseline():
    fast = torch.randn(4, 8)
    ref64 = fast.double() + 1.0  # far off: with the result as its baseline this would still "pass"
    for baseline in (fast, fast.view(8, 4).view(4, 8), fast[:]):
        with pytest.raises(AssertionError, match="same-dtype baseline is the result itself"):
            assert_close_to_ref(fast, baseline, ref64, name="out")
    fast64 = torch.randn(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="float64 reference is the result itself"):
        assert_close_to_ref(fast64, fast64.clone(), fast64)


def test_assert_close_to_ref_still_judges_independent_baselines():
    ref64 = torch.randn(4, 8, dtype=torch.float64)
    close, baseline = ref64.float(), ref64.float()
    assert_close_to_ref(close, baseline, ref64, name="out")
    with pytest.raises(AssertionError, match="out: error"):
        assert_close_to_ref(close + 0.1, baseline, ref64, name="out")
