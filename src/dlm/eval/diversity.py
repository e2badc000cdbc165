"""Diversity of generated samples, reported next to every generative perplexity (issue 12): a low gen PPL from
repetitive text must be visible.

Pure functions over token-id sequences (a list of ints, a 1-D numpy or torch integer array): each sample is the
generated part of one row (no prompt, no padding). With x = (x_1, ..., x_m) one sample of m tokens:

    entropy(x)       H = -sum_v p_v ln p_v, p_v = #{i : x_i = v} / m       unigram entropy in nats
    distinct_n(x)    |{(x_i, ..., x_{i+n-1})}| / (m - n + 1)                 distinct n-grams / total n-grams
    repetition(x, w) #{i : x_i in {x_{i-w}, ..., x_{i-1}}} / m               share of tokens already seen in
                                                                             the previous w tokens (w = 100)

Edge cases (defined, never NaN): an empty sample has H = 0 and repetition 0; a sample of one token has H = 0
and repetition 0; a sample with fewer than n tokens has no n-gram and distinct_n = 1 (vacuously no repeat),
but it is left out of the per-sample mean of distinct-n and adds nothing to the pooled figure
(:func:`diversity_summary`). n-grams never cross sample boundaries.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dlm.errors import DlmError

DEFAULT_WINDOW = 100


def as_ids(sample: Any) -> list[int]:
    """A sample as a list of Python ints; DlmError for anything that is not a flat sequence of integers."""
    ids = sample.tolist() if hasattr(sample, "tolist") else sample
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise DlmError(f"a sample must be a sequence of token ids, got {type(sample).__name__}")
    out: list[int] = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise DlmError(f"a sample must hold integer token ids, got {t!r}")
        out.append(t)
    return out


def unigram_entropy(sample: Any) -> float:
    """H = -sum_v p_v ln p_v over the sample's empirical unigram distribution, in nats (0 for an empty sample)."""
    ids = as_ids(sample)
    m = len(ids)
    if m == 0:
        return 0.0
    return -sum((c / m) * math.log(c / m) for c in Counter(ids).values())


def ngrams(sample: Any, n: int) -> list[tuple[int, ...]]:
    """The m - n + 1 n-grams of a sample of m tokens, in order (none when m < n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DlmError(f"n-gram order must be an integer >= 1, got {n!r}")
    ids = as_ids(sample)
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(sample: Any, n: int) -> float:
    """distinct n-grams / total n-grams of one sample; 1.0 when the sample has no n-gram (fewer than n tokens)."""
    grams = ngrams(sample, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise DlmError(f"repetition window must be an integer >= 1, got {window!r}")


def repeated_tokens(sample: Any, window: int = DEFAULT_WINDOW) -> int:
    """#{i : x_i equals one of the previous ``window`` tokens x_{i-window}, ..., x_{i-1} of the same sample}."""
    _check_window(window)
    ids = as_ids(sample)
    last_seen: dict[int, int] = {}
    repeats = 0
    for i, t in enumerate(ids):
        j = last_seen.get(t)
        if j is not None and i - j <= window:
            repeats += 1
        last_seen[t] = i
    return repeats


def repetition_rate(sample: Any, window: int = DEFAULT_WINDOW) -> float:
    """Share of a sample's tokens already seen in its previous ``window`` tokens (0.0 for an empty sample)."""
    ids = as_ids(sample)
    return repeated_tokens(ids, window) / len(ids) if ids else 0.0


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean over independent samples:

        mean = (1/n) sum_s v_s,   se = sqrt( sum_s (v_s - mean)^2 / (n - 1) ) / sqrt(n)

    se is None when n < 2; DlmError when there is no value.
    """
    n = len(values)
    if n == 0:
        raise DlmError("mean_se needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


DEFINITIONS: dict[str, str] = {
    "samples": "number of samples",
    "tokens": "total tokens over all samples",
    "entropy_mean": "mean over samples of H = -sum_v p_v ln p_v (nats), p the sample's unigram distribution; "
    "an empty or one-token sample has H = 0",
    "entropy_se": "standard error of entropy_mean: sqrt(sum_s (H_s - mean)^2 / (n - 1)) / sqrt(n); null if n < 2",
    "distinct_1": "pooled: distinct unigrams over all samples / total unigrams",
    "distinct_1_mean": "mean over samples with >= 1 token of (distinct unigrams / tokens of the sample)",
    "distinct_2": "pooled: distinct bigrams over all samples / total bigrams (bigrams within a sample only); "
    "1 when no sample has a bigram",
    "distinct_2_mean": "mean over samples with >= 2 tokens of (distinct bigrams / bigrams of the sample); "
    "null when none has",
    "repetition_rate": "pooled: tokens equal to one of the previous `repetition_window` tokens of their sample / "
    "total tokens",
    "repetition_rate_mean": "mean over samples with >= 1 token of the sample's repetition rate; null when none has",
    "repetition_rate_se": "standard error of repetition_rate_mean (as entropy_se)",
    "repetition_window": "the window w of the repetition rate",
}


def _pooled_distinct(id_lists: list[list[int]], n: int) -> tuple[float, float | None]:
    """(distinct n-grams over all samples / total n-grams, mean per-sample distinct-n over samples with one)."""
    grams = [ngrams(ids, n) for ids in id_lists]
    total = sum(len(g) for g in grams)
    pooled = len({t for g in grams for t in g}) / total if total else 1.0
    per = [len(set(g)) / len(g) for g in grams if g]
    return pooled, (mean_se(per)[0] if per else None)


def diversity_summary(samples: Sequence[Any], window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """Every diversity figure of a set of samples (fields and their definitions in ``DEFINITIONS``; the dict holds
    them under ``definitions``). DlmError for an empty set of samples."""
    _check_window(window)
    id_lists = [as_ids(s) for s in samples]
    if not id_lists:
        raise DlmError("diversity_summary needs at least one sample")
    tokens = sum(len(ids) for ids in id_lists)
    ent_mean, ent_se = mean_se([unigram_entropy(ids) for ids in id_lists])
    d1, d1_mean = _pooled_distinct(id_lists, 1)
    d2, d2_mean = _pooled_distinct(id_lists, 2)
    nonempty = [ids for ids in id_lists if ids]
    rep_mean, rep_se = mean_se([repetition_rate(ids, window) for ids in nonempty]) if nonempty else (None, None)
    repeats = sum(repeated_tokens(ids, window) for ids in id_lists)
    return {
        "samples": len(id_lists),
        "tokens": tokens,
        "entropy_mean": ent_mean,
        "entropy_se": ent_se,
        "distinct_1": d1,
        "distinct_1_mean": d1_mean,
        "distinct_2": d2,
        "distinct_2_mean": d2_mean,
        "repetition_rate": repeats / tokens if tokens else 0.0,
        "repetition_rate_mean": rep_mean,
        "repetition_rate_se": rep_se,
        "repetition_window": window,
        "definitions": dict(DEFINITIONS),
    }
