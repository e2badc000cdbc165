"""Float64 categorical sampling: frequencies, greedy, top-k, top-p, determinism, validation."""

import math

import pytest
import torch

from dlm.errors import DlmError
from dlm.process.sampling import filter_logits, sample_categorical, sample_from_probs


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_draw_frequencies_match_the_distribution():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    N = 20000
    logits = probs.log().expand(N, -1).to(torch.float32)
    ids = sample_categorical(logits, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (N,)
    counts = torch.bincount(ids, minlength=5).to(torch.float64)
    expected = N * probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001
    assert chi2 < 18.47, (counts, chi2)


def test_inverse_cdf_is_a_deterministic_function_of_the_uniform():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    u = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = torch.searchsorted(torch.cumsum(probs, 0), u, right=True)
    got = sample_from_probs(probs.expand(1000, -1), torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)


def test_temperature_zero_and_top_k_one_are_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g)
    best = logits.argmax(-1)
    assert torch.equal(sample_categorical(logits, temperature=0.0, generator=g), best)
    assert torch.equal(sample_categorical(logits, top_k=1, generator=g), best)


def test_low_temperature_sharpens():
    logits = _logits([0.6, 0.4]).expand(5000, -1)
    ids = sample_categorical(logits, temperature=0.25, generator=torch.Generator().manual_seed(2))
    # p0 = 0.6^4 / (0.6^4 + 0.4^4) = 0.835...
    p0 = 0.6**4 / (0.6**4 + 0.4**4)
    assert abs(float((ids == 0).double().mean()) - p0) < 4 * math.sqrt(p0 * (1 - p0) / 5000)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits([0.5, 0.3, 0.15, 0.05])[None]
    kept = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.8) == {0, 1}
    assert kept(0.75) == {0, 1}
    assert kept(0.81) == {0, 1, 2}
    assert kept(0.3) == {0}
    assert kept(1.0) == {0, 1, 2, 3}
    # order in the vocabulary does not matter
    shuffled = _logits([0.05, 0.3, 0.15, 0.5])[None]
    assert set(torch.isfinite(filter_logits(shuffled, top_p=0.8))[0].nonzero().flatten().tolist()) == {1, 3}


def test_top_k_keeps_the_k_largest():
    logits = _logits([0.1, 0.4, 0.2, 0.3])[None]
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [False, True, False, True]


def test_filtered_tokens_are_never_drawn_and_mass_is_renormalised():
    N = 20000
    logits = _logits([0.5, 0.3, 0.15, 0.05]).expand(N, -1)
    ids = sample_categorical(logits, top_p=0.8, generator=torch.Generator().manual_seed(4))
    assert set(ids.unique().tolist()) == {0, 1}
    assert abs(float((ids == 0).double().mean()) - 0.625) < 0.015  # 0.5 / 0.8
    ids = sample_categorical(logits, top_k=3, generator=torch.Generator().manual_seed(5))
    assert set(ids.unique().tolist()) == {0, 1, 2}


def test_zero_probability_tokens_are_never_drawn():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], dtype=torch.float64).expand(20000, -1)
    ids = sample_from_probs(probs, torch.Generator().manual_seed(6))
    assert set(ids.unique().tolist()) == {1, 3}


def test_same_seed_same_draws_and_one_uniform_per_row():
    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(7))
    a = sample_categorical(logits, top_p=0.9, temperature=0.7, generator=torch.Generator().manual_seed(8))
    b = sample_categorical(logits, top_p=0.9, temperature=0.7, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    for kwargs in ({}, {"temperature": 0.0}, {"top_k": 3, "top_p": 0.5}):
        g = torch.Generator().manual_seed(9)
        sample_categorical(logits, generator=g, **kwargs)
        ref = torch.Generator().manual_seed(9)
        torch.rand(32, dtype=torch.float64, generator=ref)
        assert torch.equal(g.get_state(), ref.get_state()), kwargs


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"top_k": 0}, {"top_k": 1.5}, {"top_p": 0.0}, {"top_p": 1.2}]
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(DlmError):
        sample_categorical(torch.zeros(2, 3), **kwargs)


def test_pre_drawn_uniforms_give_the_generators_draws_and_leave_it_untouched():
    """``u_N`` (issue 14's samplers draw all uniforms in one call): the same tokens as drawing from the generator,
    and the generator does not move. On a CPU generator one call of n + m float64 uniforms equals two calls of
    n and m, which is what keeps first-hitting's stream identical when it draws all steps at once."""
    logits = torch.randn(12, 7, generator=torch.Generator().manual_seed(10))
    for kwargs in ({}, {"temperature": 0.0}, {"top_k": 3, "temperature": 0.8}, {"top_p": 0.6}):
        ref = sample_categorical(logits, generator=torch.Generator().manual_seed(11), **kwargs)
        u = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(0)
        before = g.get_state()
        assert torch.equal(sample_categorical(logits, generator=g, u_N=u, **kwargs), ref), kwargs
        assert torch.equal(g.get_state(), before)
    probs = torch.softmax(logits.double(), -1)
    u = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    assert torch.equal(sample_from_probs(probs, u_N=u), sample_from_probs(probs, torch.Generator().manual_seed(12)))
    one = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    g = torch.Generator().manual_seed(13)
    two = torch.cat([torch.rand(n, dtype=torch.float64, generator=g) for n in (3, 5)])
    assert torch.equal(one, two)
