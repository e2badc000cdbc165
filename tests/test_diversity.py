"""Sample-diversity metrics (dlm.eval.diversity) against hand-computed values and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlm.errors import DlmError
from dlm.eval.diversity import (
    DEFINITIONS,
    distinct_n,
    diversity_summary,
    mean_se,
    repetition_rate,
    unigram_entropy,
)


def test_entropy_hand_computed() -> None:
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert unigram_entropy([7, 7, 3, 5]) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy([4, 4, 4]) == 0.0


def test_all_distinct_identity() -> None:
    for n in (1, 2, 5, 17):
        ids = list(range(100, 100 + n))
        assert unigram_entropy(ids) == pytest.approx(math.log(n))
        assert distinct_n(ids, 1) == 1.0
        assert distinct_n(ids, 2) == 1.0
        assert repetition_rate(ids) == 0.0


def test_edge_cases_defined() -> None:
    for s in ([], [9]):
        assert unigram_entropy(s) == 0.0
        assert repetition_rate(s) == 0.0
        assert distinct_n(s, 2) == 1.0
    assert distinct_n([], 1) == 1.0


def test_distinct_hand_computed() -> None:
    s = [1, 2, 1, 2, 3]
    assert distinct_n(s, 1) == pytest.approx(3 / 5)
    # bigrams (1,2) (2,1) (1,2) (2,3): 3 distinct of 4
    assert distinct_n(s, 2) == pytest.approx(3 / 4)


def test_repetition_window() -> None:
    assert repetition_rate([1, 2, 3, 1], window=2) == 0.0
    assert repetition_rate([1, 2, 3, 1], window=3) == pytest.approx(1 / 4)
    assert repetition_rate([1, 2, 3, 1], window=100) == pytest.approx(1 / 4)
    assert repetition_rate([5, 5, 5, 5], window=1) == pytest.approx(3 / 4)
    # the last occurrence counts: 1 at 0 and 3, seen again at 5 within window 2 of position 3
    assert repetition_rate([1, 2, 3, 1, 4, 1], window=2) == pytest.approx(1 / 6)


def test_array_inputs_agree() -> None:
    s = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    for arr in (np.array(s), torch.tensor(s)):
        assert unigram_entropy(arr) == unigram_entropy(s)
        assert distinct_n(arr, 2) == distinct_n(s, 2)
        assert repetition_rate(arr, 4) == repetition_rate(s, 4)


def test_mean_se_formula() -> None:
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    # deviations -2 -1 0 3: sum of squares 14, variance 14/3, se sqrt(14/3/4)
    assert se == pytest.approx(math.sqrt(14 / 12))
    assert mean_se([2.5]) == (2.5, None)
    with pytest.raises(DlmError):
        mean_se([])


def test_summary_hand_computed() -> None:
    samples = [[1, 1, 2, 2], [1, 2, 3, 1], [7]]
    s = diversity_summary(samples, window=2)
    assert s["samples"] == 3 and s["tokens"] == 9
    h = [math.log(2), 1.5 * math.log(2), 0.0]
    assert s["entropy_mean"] == pytest.approx(sum(h) / 3)
    assert s["entropy_se"] == pytest.approx(mean_se(h)[1])
    # pooled unigrams: {1, 2, 3, 7} of 9 tokens; per sample 2/4, 3/4, 1/1
    assert s["distinct_1"] == pytest.approx(4 / 9)
    assert s["distinct_1_mean"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    # bigrams: (1,1)(1,2)(2,2) and (1,2)(2,3)(3,1): 5 distinct of 6; [7] has none and is left out of the mean
    assert s["distinct_2"] == pytest.approx(5 / 6)
    assert s["distinct_2_mean"] == pytest.approx((1.0 + 1.0) / 2)
    # window 2 repeats: sample 1 positions 1 and 3 -> 2; sample 2 none; sample 3 none
    assert s["repetition_rate"] == pytest.approx(2 / 9)
    assert s["repetition_rate_mean"] == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert s["repetition_window"] == 2
    assert set(s["definitions"]) == set(DEFINITIONS) == set(s) - {"definitions"}
    assert all(not isinstance(v, float) or math.isfinite(v) for v in s.values())


def test_summary_of_empty_samples_is_defined() -> None:
    s = diversity_summary([[], []])
    assert s["entropy_mean"] == 0.0 and s["repetition_rate"] == 0.0 and s["distinct_1"] == 1.0
    assert s["distinct_1_mean"] is None and s["repetition_rate_mean"] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: diversity_summary([]),
        lambda: diversity_summary([[1, 2]], window=0),
        lambda: unigram_entropy("abc"),
        lambda: unigram_entropy([1, 2.5]),
        lambda: unigram_entropy([[1, 2], [3]]),
        lambda: distinct_n([1, 2], 0),
    ],
)
def test_bad_input(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DlmError):
        call()
