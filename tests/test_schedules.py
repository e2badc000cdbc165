"""Noise schedules (SPEC §2) and antithetic time sampling (SPEC §3.4)."""

from __future__ import annotations

import math

import pytest
import torch

from dlm.errors import DlmError
from dlm.process.schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogLinearSchedule,
    Schedule,
    available_schedules,
    get_schedule,
    sample_times,
)

SCHEDULES: list[Schedule] = [
    LinearSchedule(),
    LogLinearSchedule(),
    LogLinearSchedule(eps=0.2),
    CosineSchedule(),
    GeometricSchedule(),
    GeometricSchedule(sigma_min=1e-3, sigma_max=5.0),
]
IDS = [repr(s) for s in SCHEDULES]
GRID = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
H = 1e-6


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_derivatives_match_finite_differences(sched: Schedule) -> None:
    fd_alpha = (sched.alpha(GRID + H) - sched.alpha(GRID - H)) / (2 * H)
    fd_sigma = (sched.sigma(GRID + H) - sched.sigma(GRID - H)) / (2 * H)
    torch.testing.assert_close(sched.dalpha(GRID), fd_alpha, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.dsigma(GRID), fd_sigma, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_alpha_boundary_monotone_and_sigma(sched: Schedule) -> None:
    assert abs(sched.alpha(0.0).item() - 1.0) < 1e-3
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    alpha = sched.alpha(t)
    assert bool((alpha[1:] < alpha[:-1]).all())
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    assert bool((sched.dalpha(GRID) < 0).all())
    torch.testing.assert_close(sched.sigma(GRID), -torch.log(sched.alpha(GRID)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sched.dsigma(GRID), -sched.dalpha(GRID) / sched.alpha(GRID), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        sched.mdlm_weight(GRID), -sched.dalpha(GRID) / (1 - sched.alpha(GRID)), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_float64_output_same_shape(sched: Schedule) -> None:
    t = torch.rand(3, 4, dtype=torch.float32) * 0.9 + 0.05
    for fn in (sched.alpha, sched.dalpha, sched.sigma, sched.dsigma, sched.mdlm_weight):
        out = fn(t)
        assert out.dtype == torch.float64
        assert out.shape == (3, 4)
    assert sched.alpha(0.5).dtype == torch.float64


def test_end_values() -> None:
    assert LinearSchedule().alpha(1.0).item() == 0.0
    assert LogLinearSchedule().alpha(1.0).item() == pytest.approx(1e-3, rel=1e-12)
    assert LogLinearSchedule().sigma(1.0).item() == pytest.approx(-math.log(1e-3), rel=1e-12)
    assert CosineSchedule().alpha(1.0).item() == pytest.approx(0.0, abs=1e-15)
    geo = GeometricSchedule()
    assert geo.sigma(0.0).item() == pytest.approx(1e-4, rel=1e-12)
    assert geo.sigma(1.0).item() == pytest.approx(20.0, rel=1e-12)
    assert geo.sigma(0.5).item() == pytest.approx(math.sqrt(1e-4 * 20.0), rel=1e-12)


def test_mdlm_weight_linear_and_loglinear_is_one_over_t() -> None:
    assert torch.equal(LinearSchedule().mdlm_weight(GRID), 1.0 / GRID)
    for eps in (1e-3, 0.2, 0.9):
        sched = LogLinearSchedule(eps=eps)
        torch.testing.assert_close(sched.mdlm_weight(GRID), 1.0 / GRID, rtol=0, atol=0)
        # the generic definition -alpha'/(1-alpha) = (1-eps)/((1-eps) t) agrees up to rounding
        generic = -sched.dalpha(GRID) / (1 - sched.alpha(GRID))
        torch.testing.assert_close(generic, 1.0 / GRID, rtol=1e-12, atol=0)


def test_mdlm_weight_cosine_closed_form() -> None:
    x = math.pi * GRID / 2
    closed = (math.pi / 2) * torch.sin(x) / (1 - torch.cos(x))
    torch.testing.assert_close(CosineSchedule().mdlm_weight(GRID), closed, rtol=1e-12, atol=0)


def test_mdlm_weight_geometric_closed_form() -> None:
    geo = GeometricSchedule()
    sigma = 1e-4 ** (1 - GRID) * 20.0**GRID
    closed = sigma * math.log(20.0 / 1e-4) / (torch.exp(sigma) - 1)
    torch.testing.assert_close(geo.mdlm_weight(GRID), closed, rtol=1e-9, atol=0)


def test_get_schedule_and_params_roundtrip() -> None:
    assert set(available_schedules()) >= {"linear", "loglinear", "cosine", "geometric"}
    for sched in SCHEDULES:
        rebuilt = get_schedule(sched.name, **sched.params())
        assert type(rebuilt) is type(sched)
        assert rebuilt.params() == sched.params()
    assert get_schedule("loglinear").params() == {"eps": 1e-3}
    assert get_schedule("geometric").params() == {"sigma_min": 1e-4, "sigma_max": 20.0}


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("nope", {}, "nope"),
        ("loglinear", {"eps": 0.0}, "eps"),
        ("loglinear", {"eps": 1.0}, "eps"),
        ("loglinear", {"eps": -0.5}, "eps"),
        ("loglinear", {"eps": "x"}, "eps"),
        ("geometric", {"sigma_min": 5.0, "sigma_max": 5.0}, "sigma_min"),
        ("geometric", {"sigma_min": 30.0}, "sigma_min"),
        ("geometric", {"sigma_min": 0.0}, "sigma_min"),
        ("geometric", {"sigma_max": -1.0}, "sigma_max"),
        ("linear", {"eps": 0.1}, "linear"),
        ("cosine", {"bogus": 1}, "cosine"),
    ],
)
def test_get_schedule_errors(name: str, params: dict, needle: str) -> None:
    with pytest.raises(DlmError, match=needle):
        get_schedule(name, **params)


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
def test_antithetic_spacing(batch_size: int) -> None:
    gen = torch.Generator().manual_seed(batch_size)
    t = sample_times(batch_size, generator=gen)
    assert t.dtype == torch.float64
    assert t.shape == (batch_size,)
    assert bool(((t >= 0) & (t < 1)).all())
    s = torch.sort(t).values
    gaps = torch.cat([s[1:] - s[:-1], (s[:1] + 1.0) - s[-1:]])  # cyclic gaps sum to 1
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1.0 / batch_size), rtol=0, atol=1e-12)


def test_same_seed_same_samples() -> None:
    for antithetic in (True, False):
        a = sample_times(16, generator=torch.Generator().manual_seed(3), antithetic=antithetic)
        b = sample_times(16, generator=torch.Generator().manual_seed(3), antithetic=antithetic)
        c = sample_times(16, generator=torch.Generator().manual_seed(4), antithetic=antithetic)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_antithetic_mean_and_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, n = 8, 2000
    anti = torch.stack([sample_times(batch, generator=gen) for _ in range(n)])
    iid = torch.stack([sample_times(batch, generator=gen, antithetic=False) for _ in range(n)])
    assert anti.mean().item() == pytest.approx(0.5, abs=0.01)
    assert iid.mean().item() == pytest.approx(0.5, abs=0.01)
    # batch-mean variance: i.i.d. 1/(12 B); antithetic 1/(12 B^2), i.e. B times smaller
    var_anti = anti.mean(dim=1).var().item()
    var_iid = iid.mean(dim=1).var().item()
    assert var_iid == pytest.approx(1 / (12 * batch), rel=0.15)
    assert var_anti == pytest.approx(1 / (12 * batch**2), rel=0.15)
    assert var_anti < var_iid / 4


def test_iid_not_evenly_spaced_and_range_mapping() -> None:
    gen = torch.Generator().manual_seed(1)
    t = sample_times(32, generator=gen, antithetic=False)
    s = torch.sort(t).values
    assert (s[1:] - s[:-1]).std().item() > 1e-3
    for antithetic in (True, False):
        t = sample_times(256, generator=gen, antithetic=antithetic, t_min=0.2, t_max=0.6)
        assert bool(((t >= 0.2) & (t < 0.6)).all())
        assert t.max().item() - t.min().item() > 0.3
    t = sample_times(10, generator=torch.Generator().manual_seed(2), t_min=0.5, t_max=1.0)
    s = torch.sort(t).values
    torch.testing.assert_close(s[1:] - s[:-1], torch.full((9,), 0.05, dtype=torch.float64), rtol=0, atol=1e-12)


def test_sample_times_errors() -> None:
    with pytest.raises(DlmError, match="batch_size"):
        sample_times(0)
    with pytest.raises(DlmError, match="t_min"):
        sample_times(4, t_min=0.5, t_max=0.5)
    with pytest.raises(DlmError, match="t_max"):
        sample_times(4, t_max=1.5)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_t_of_alpha_inverts_alpha(sched: Schedule) -> None:
    """t_of_alpha(alpha_t) = t on the grid (closed forms and the generic bisection), and values outside
    [alpha_1, alpha_0] clamp to the ends."""
    torch.testing.assert_close(sched.t_of_alpha(sched.alpha(GRID)), GRID, rtol=0, atol=1e-9)
    assert float(sched.t_of_alpha(torch.tensor(1.0))) < 1e-3 and float(sched.t_of_alpha(torch.tensor(0.0))) > 0.999
