"""assert_close_scaled: the tolerance follows the reference's largest entry, and it can fail."""

import math

import pytest
import torch

from tests.numerics import assert_close_scaled


def test_error_near_zero_is_judged_against_the_largest_entry():
    # The AMD CI failure: an entry near zero off by 3e-5 in a gradient that reaches 261.
    expected = torch.tensor([261.0, 1e-6, -4.0])
    actual = expected + torch.tensor([0.0, 3e-5, 0.0])
    assert_close_scaled(actual, expected, rel=1e-5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_failure_names_the_worst_element_and_its_ratio():
    expected = torch.zeros(2, 3)
    expected[0, 0] = 10.0
    actual = expected.clone()
    actual[1, 2] = 1e-3  # 1e-4 of the scale, above rel=1e-5
    actual[0, 1] = 5e-4
    with pytest.raises(AssertionError, match=r"grad: 2 of 6 elements .* worst at \(1, 2\): .* = 0.0001 of the scale"):
        assert_close_scaled(actual, expected, rel=1e-5, msg="grad")


def test_scalars_are_relative_and_shapes_dtypes_and_non_finite_entries_are_checked():
    assert_close_scaled(torch.tensor(4.0 + 1e-5), torch.tensor(4.0), rel=5e-6)
    with pytest.raises(AssertionError, match="1 of 1 elements"):
        assert_close_scaled(torch.tensor(4.0 + 1e-4), torch.tensor(4.0), rel=5e-6)
    with pytest.raises(AssertionError, match=r"shape \(3,\) != \(1, 3\)"):
        assert_close_scaled(torch.zeros(3), torch.zeros(1, 3), rel=1e-5)
    assert_close_scaled(torch.ones(3, dtype=torch.bfloat16), torch.ones(3), rel=0.0)
    assert_close_scaled(torch.tensor([math.nan, -math.inf, 1.0]), torch.tensor([math.nan, -math.inf, 1.0]), rel=0.0)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_scaled(torch.tensor([1.0, 2.0]), torch.tensor([math.nan, 2.0]), rel=1.0)


def test_an_all_zero_reference_needs_exact_zeros_or_a_floor():
    with pytest.raises(AssertionError):
        assert_close_scaled(torch.tensor([0.0, 1e-12]), torch.zeros(2), rel=1e-5)
    assert_close_scaled(torch.tensor([0.0, 1e-12]), torch.zeros(2), rel=1e-5, floor=1e-9)
    assert_close_scaled(torch.zeros(2), torch.zeros(2), rel=1e-5)
