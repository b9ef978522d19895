"""Means and paired differences with normal 95% intervals (quality.paired), against hand values."""

from __future__ import annotations

import pytest

from preflab.quality.paired import mean_ci, paired_diff


def test_mean_ci_hand_values():
    m, ci = mean_ci([1.0, 2.0, 3.0, 4.0])  # s = 1.2910, 1.96 s / 2 = 1.2652
    assert m == 2.5
    assert ci == pytest.approx([2.5 - 1.26520, 2.5 + 1.26520], abs=1e-4)
    assert mean_ci([3.0]) == (3.0, [3.0, 3.0])
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])


def test_paired_diff_hand_values():
    # items 3 and 4 are unscored on one side; d = [1, 0, 0]: mean 1/3, s = sqrt(1/3), half-width 1.96 s / sqrt(3)
    p = paired_diff([1, 1, 0, None, 1], [0, 1, 0, 1, None])
    assert p["n"] == 3 and p["diff"] == pytest.approx(1 / 3)
    assert p["ci"] == pytest.approx([1 / 3 - 0.65333, 1 / 3 + 0.65333], abs=1e-4)
    assert paired_diff([1, 0], [1, 0])["ci"] == [0.0, 0.0]
    assert paired_diff([None], [1])["n"] == 0
    with pytest.raises(ValueError, match="same items"):
        paired_diff([1, 0], [1])
