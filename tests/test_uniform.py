"""Uniform-state samplers (dlm.process.uniform): the closed forms against K x K matrix exponentials, the analytic step
against the exact reverse posterior by brute-force Bayes, the Tweedie <-> score maps as inverses, exact recovery of
the data marginals, temperature as a filter on p(x0 | z_t), sample-for-sample equality with a plain Euler loop
and ``D3PMProcess.sample`` (uniform), trajectories, conditioning, ids in range, nfe, and bad input."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

import dlm.process.d3pm  # noqa: F401  (registers "d3pm")
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.process import ProcessConfig, get_process
from dlm.process.base import fixed_positions
from dlm.process.d3pm import D3PMProcess
from dlm.process.sampling import sample_from_probs
from dlm.process.schedules import Schedule, get_schedule
from dlm.process.uniform import (
    analytic,
    analytic_probs,
    ancestral,
    euler,
    reverse_probs,
    score_from_x0,
    tweedie_x0,
    uniform_prior,
)

F64 = torch.float64


def _Q(K: int) -> Tensor:
    return torch.ones(K, K, dtype=F64) / K - torch.eye(K, dtype=F64)


def _product_p0(L: int, K: int, seed: int) -> Tensor:
    """Per-position marginals p0[l] (a distribution that factorises over positions), float64 [L, K]."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(L, K, generator=g, dtype=F64) * 1.5, -1)


def _exact_log_score(p0_LK: Tensor, schedule: Schedule, extra_col: float | None = None):
    """log s_t(z)_{l,y} = log p_t^l(y) - log p_t^l(z^l), p_t^l = alpha_t p0^l + (1 - alpha_t)/K (true score)."""
    L, K = p0_LK.shape

    def log_score(z_BL: Tensor, t_B: Tensor) -> Tensor:
        a = schedule.alpha(t_B)[:, None, None]
        lp = torch.log(a * p0_LK + (1 - a) / K).expand(z_BL.shape[0], L, K)
        out = lp - lp.gather(-1, z_BL[..., None])
        if extra_col is not None:  # a column past the vocabulary that must be ignored
            out = torch.cat([out, torch.full_like(out[..., :1], extra_col)], -1)
        return out

    return log_score


def _random_log_score(K: int, seed: int = 3):
    """A deterministic, sequence-dependent (imperfect) score: W[z^l] + 0.3 mean_j W[z^j] + t."""
    W = torch.randn(K, K, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def log_score(z_BL: Tensor, t_B: Tensor) -> Tensor:
        return W[z_BL] + 0.3 * W[z_BL].mean(1, keepdim=True) + t_B[:, None, None]

    return log_score


# ------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("a_t", "a_s"), [(0.3, 0.8), (0.05, 1.0), (0.6, 0.6), (1e-3, 0.5)])
def test_closed_forms_equal_matrix_exponentials(a_t: float, a_s: float) -> None:
    K, N = 5, 40
    g = torch.Generator().manual_seed(0)
    log_s = torch.randn(N, K, generator=g, dtype=F64) * 1.5  # imperfect: some entries of exp(-cQ) s are < 0
    z = torch.randint(0, K, (N,), generator=g)
    Q = _Q(K)
    c = np.log(a_s) - np.log(a_t)  # sigma_t - sigma_s
    E_minus, E_plus = torch.linalg.matrix_exp(-c * Q), torch.linalg.matrix_exp(c * Q)
    s = log_s.exp().scatter(-1, z[:, None], 1.0)  # s_z = 1
    ref = (s @ E_minus.T).clamp(min=0) * E_plus[z]  # [exp(-cQ) s]_y exp(cQ)(z, y)
    ref = ref / ref.sum(-1, keepdim=True)
    got = analytic_probs(log_s, z, a_t, a_s)
    assert torch.allclose(got, ref, atol=1e-12) and torch.allclose(got.sum(-1), torch.ones(N, dtype=F64))
    if a_s == 1.0:
        assert torch.equal(tweedie_x0(log_s, z, a_t), got)
    # score_from_x0 against sum_x p(x) p_{t|0}(y | x) / p_{t|0}(z | x) with p_{t|0} = exp(sigma_t Q)
    P = torch.linalg.matrix_exp(-np.log(a_t) * Q)  # P[y, x] = p_{t|0}(y | x)
    p = torch.softmax(torch.randn(N, K, generator=g, dtype=F64), -1)
    ref_s = torch.stack([(p[n] * P[:, :] / P[z[n], :]).sum(-1) for n in range(N)])
    got_s = score_from_x0(p, z, a_t)
    assert torch.allclose(got_s, ref_s, rtol=1e-10)
    assert torch.allclose(got_s.gather(-1, z[:, None]), torch.ones(N, 1, dtype=F64))  # s_z = 1
    # reverse_probs against the matrix formula: tests/test_d3pm.py::test_uniform_posterior_equals_matrix_formula


def test_flat_score_at_alpha_zero_falls_back_to_the_forward_kernel() -> None:
    K = 4
    z = torch.tensor([0, 2])
    flat = torch.zeros(2, K, dtype=F64)  # the true score at alpha_t = 0 (p_t uniform)
    assert torch.allclose(tweedie_x0(flat, z, 0.0), torch.full((2, K), 1 / K, dtype=F64))
    assert torch.allclose(analytic_probs(flat, z, 0.0, 0.5), torch.full((2, K), 1 / K, dtype=F64))


# --------------------------------------------------------------------------- the analytic step is exact Bayes


@pytest.mark.parametrize(("a_t", "a_s"), [(0.2, 0.7), (0.5, 1.0), (1e-3, 0.3), (0.9, 0.95)])
def test_analytic_step_is_the_exact_reverse_posterior(a_t: float, a_s: float) -> None:
    """Joint over K^L sequences, brute force: p(z_s | z_t) = p_s(z_s) p_{t|s}(z_t | z_s) / p_t(z_t), with the scores
    read off the joint p_t; the analytic step (a product over positions) must equal it for a product p0."""
    K, L = 3, 2
    p0 = _product_p0(L, K, seed=1)
    states = list(itertools.product(range(K), repeat=L))
    joint0 = torch.tensor([float(np.prod([p0[l, x[l]] for l in range(L)])) for x in states], dtype=F64)

    def kernel(alpha: float) -> Tensor:  # one position, rows = to, columns = from (symmetric anyway)
        return alpha * torch.eye(K, dtype=F64) + (1 - alpha) / K

    def joint_kernel(alpha: float) -> Tensor:
        out = torch.ones(1, 1, dtype=F64)
        for _ in range(L):
            out = torch.kron(out, kernel(alpha))
        return out

    p_s = joint_kernel(a_s) @ joint0
    p_t = joint_kernel(a_t) @ joint0
    k_ts = joint_kernel(a_t / a_s)  # [to z_t, from z_s]
    post = p_s[:, None] * k_ts.T / p_t[None, :]  # [z_s, z_t]
    index = {x: n for n, x in enumerate(states)}
    for zt in states:
        log_s = torch.empty(L, K, dtype=F64)
        for l, y in itertools.product(range(L), range(K)):
            moved = list(zt)
            moved[l] = y
            log_s[l, y] = torch.log(p_t[index[tuple(moved)]] / p_t[index[zt]])
        step = analytic_probs(log_s, torch.tensor(zt), a_t, a_s)  # [L, K]
        got = torch.tensor([float(np.prod([step[l, zs[l]] for l in range(L)])) for zs in states], dtype=F64)
        assert torch.allclose(got, post[:, index[zt]], atol=1e-12), zt
        # the same step through the x0 route (Tweedie estimate, then the D3PM posterior) and the score round trip
        p_x0 = tweedie_x0(log_s, torch.tensor(zt), a_t)
        assert torch.allclose(reverse_probs(p_x0, torch.tensor(zt), a_t, a_s), step, atol=1e-12)
        assert torch.allclose(score_from_x0(p_x0, torch.tensor(zt), a_t), log_s.exp(), rtol=1e-10)


# ------------------------------------------------------------------------------------------- distributions


def _freq(ids_NL: Tensor, K: int) -> Tensor:
    return torch.nn.functional.one_hot(ids_NL, K).to(F64).mean(0)


def test_analytic_with_the_true_score_recovers_p0_and_noop_filters_change_nothing() -> None:
    K, L, N, S = 4, 3, 3000, 4
    p0 = _product_p0(L, K, seed=2)
    sch = get_schedule("geometric")  # alpha_1 = e^-20: the uniform prior is the true p_1
    log_score = _exact_log_score(p0, sch)
    z0 = torch.zeros(N, L, dtype=torch.int64)
    out = analytic(log_score, z0, sch, S, K, torch.Generator().manual_seed(0))
    se = (p0 * (1 - p0) / N).sqrt()
    assert float(((_freq(out.ids_BL, K) - p0).abs() / se).max()) < 4.0
    # the x0 route with a filter that keeps everything draws the same samples (the score is consistent)
    noop = analytic(log_score, z0, sch, S, K, torch.Generator().manual_seed(0), top_k=K)
    assert torch.equal(noop.ids_BL, out.ids_BL)
    e_plain = euler(log_score, z0[:200], sch, 6, K, torch.Generator().manual_seed(1))
    e_noop = euler(log_score, z0[:200], sch, 6, K, torch.Generator().manual_seed(1), top_p=1.0)
    assert torch.equal(e_plain.ids_BL, e_noop.ids_BL)


def test_temperature_tempers_the_tweedie_x0_posterior() -> None:
    """S = 1: x0 ~ softmax(log p(x0 | z_1) / tau) with z_1 uniform; the expectation by brute-force Bayes."""
    K, L, N, tau = 4, 3, 4000, 0.5
    p0 = _product_p0(L, K, seed=4)
    sch = get_schedule("loglinear", eps=0.05)
    a1 = float(sch.alpha(1.0))
    expected = torch.zeros(L, K, dtype=F64)
    for z in range(K):
        like = a1 * (torch.arange(K) == z).to(F64) + (1 - a1) / K  # p_{1|0}(z | x)
        post = p0 * like  # ∝ p(x0 | z_1 = z), [L, K]
        expected += torch.softmax(torch.log(post) / tau, -1) / K
    z0 = torch.zeros(N, L, dtype=torch.int64)
    out = analytic(_exact_log_score(p0, sch), z0, sch, 1, K, torch.Generator().manual_seed(0), temperature=tau)
    se = (expected * (1 - expected) / N).sqrt()
    f = _freq(out.ids_BL, K)
    assert float(((f - expected).abs() / se).max()) < 4.0
    assert float(((f - p0).abs() / se).max()) > 8.0  # tempering is visible: not the untempered marginals
    # Euler whose single step is the Tweedie denoising step is the same draw
    e = euler(_exact_log_score(p0, sch), z0, sch, 1, K, torch.Generator().manual_seed(0), temperature=tau, denoise=True)
    assert torch.equal(e.ids_BL, out.ids_BL)


@pytest.mark.parametrize("sampler", ["euler", "analytic", "ancestral"])
def test_top_k_one_is_greedy(sampler: str) -> None:
    K, L, B, S = 5, 6, 8, 4
    ls = _random_log_score(K, seed=7)
    z0 = torch.zeros(B, L, dtype=torch.int64)

    def run(**kw):
        g = torch.Generator().manual_seed(3)
        if sampler == "ancestral":
            alphas = get_schedule("linear").alpha(torch.arange(S + 1, dtype=F64) / S)
            return ancestral(ls, z0, alphas, K, g, **kw).ids_BL
        fn = euler if sampler == "euler" else analytic
        return fn(ls, z0, get_schedule("loglinear"), S, K, g, **kw).ids_BL

    greedy = run(temperature=0.0)
    assert torch.equal(run(top_k=1), greedy)
    assert not torch.equal(run(), greedy)


# ------------------------------------------------------------------------------------------- references


def _reference_euler_uniform(
    log_score: Callable[[Tensor, Tensor], Tensor],
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    vocab: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
) -> torch.Tensor:
    """Reference (the first implementation, kept as a plain loop): jump z^l -> y != z^l with probability
    sigma'(t) dt / K * s_theta(z_t)_{l,y}, stay otherwise (rows whose total exceeds 1 renormalised onto the jumps);
    free positions start from floor(u K), one float64 uniform each; fixed ones keep z_init."""
    B, L = z_init.shape
    device = z_init.device
    fixed = torch.zeros_like(z_init, dtype=torch.bool) if fixed_BL is None else fixed_BL.bool().expand_as(z_init)
    u = torch.rand((B, L), dtype=torch.float64, generator=generator)
    prior = torch.minimum((u * vocab).floor().to(torch.int64), torch.full_like(z_init, vocab - 1))
    z = torch.where(fixed, z_init, prior)
    for i in range(steps):
        t = 1.0 - i / steps
        logs = log_score(z, torch.full((B,), t, dtype=torch.float64, device=device))[..., :vocab]
        scale = float(schedule.dsigma(t) * (1.0 / steps)) / vocab
        onehot = torch.nn.functional.one_hot(z, vocab).bool()
        rates = (logs.to(torch.float64).exp() * scale).masked_fill(onehot, 0.0)
        total = rates.sum(-1, keepdim=True)
        rates = torch.where(total > 1.0, rates / total, rates)
        stay = (1.0 - rates.sum(-1)).clamp(min=0.0)
        probs = rates + onehot.to(torch.float64) * stay.unsqueeze(-1)
        new = sample_from_probs(probs.view(B * L, vocab), generator).view(B, L)
        z = torch.where(fixed, z, new)
    return z


@pytest.mark.parametrize("schedule", ["loglinear", "geometric"])
def test_euler_matches_the_plain_euler_uniform_loop(schedule: str) -> None:
    K, B, L, S = 6, 5, 8, 7
    sch = get_schedule(schedule)
    z_init = torch.full((B, L), K)  # free positions hold anything (SEDD passes MASK)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    z_init[:, 2], fixed[:, 2] = 1, True
    z_init[1, 5], fixed[1, 5] = 4, True
    ls = _random_log_score(K)
    ref = _reference_euler_uniform(ls, z_init, sch, S, K, torch.Generator().manual_seed(5), fixed)
    out = euler(ls, z_init, sch, S, K, torch.Generator().manual_seed(5), fixed)
    assert torch.equal(out.ids_BL, ref) and out.nfe == S


def _d3pm(K: int, T: int) -> D3PMProcess:
    proc = get_process(
        ProcessConfig(name="d3pm", transition="uniform", T=T), SpecialIds(bos=0, eos=1, pad=2, mask=K, vocab_size=K)
    )
    assert isinstance(proc, D3PMProcess) and not proc.absorbing
    return proc


def _d3pm_model(K: int) -> torch.nn.Module:
    from dlm.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=K, context=16, n_layer=1, n_head=2, d_model=16, time_cond=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.3))
    return model.eval()


@pytest.mark.parametrize(
    "opts",
    [{}, {"temperature": 0.8, "top_k": 4, "top_p": 0.9}, {"temperature": 0.0}],
)
def test_ancestral_matches_d3pm_uniform_sample(opts: dict) -> None:
    K, T, S, n, L = 7, 20, 5, 6, 10
    proc, model = _d3pm(K, T), _d3pm_model(K)
    fixed_ids = torch.full((L,), -1)
    fixed_ids[7] = 4
    ref = proc.sample(
        model, n, L, generator=torch.Generator().manual_seed(9), steps=S, prompt_ids=[5, 6], fixed_ids=fixed_ids, **opts
    )
    # the process's wiring: the shared uniform prior, then the ancestral chain on its grid i_k = round(k T / S)
    g = torch.Generator().manual_seed(9)
    fixed_NL, _ = fixed_positions(n, L, [5, 6], fixed_ids, K, K, torch.device("cpu"))
    fixed = fixed_NL >= 0
    z = torch.where(fixed, fixed_NL, torch.zeros_like(fixed_NL))
    grid = torch.tensor([round(k * T / S) for k in range(S + 1)])
    out = ancestral(
        lambda z_BL, i_B: proc._logits(model, z_BL, i_B), z, proc.alpha[grid], K, g, fixed, times=grid, **opts
    )
    assert torch.equal(out.ids_BL, ref.ids_NL) and out.nfe == ref.nfe == S


# ------------------------------------------------------------------------- prior, conditioning, trajectories


def test_uniform_prior_one_float64_uniform_per_position() -> None:
    K, B, L = 7, 4, 9
    z_init = torch.full((B, L), -5)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    z_init[:, 0], fixed[:, 0] = 6, True
    g = torch.Generator().manual_seed(1)
    z = uniform_prior(z_init, K, g, fixed)
    h = torch.Generator().manual_seed(1)
    u = torch.rand(B, L, dtype=F64, generator=h)
    assert torch.equal(z[:, 1:], (u * K).floor().to(torch.int64)[:, 1:]) and z[:, 0].tolist() == [6] * B
    assert torch.equal(torch.rand(3, dtype=F64, generator=g), torch.rand(3, dtype=F64, generator=h))  # B*L used
    big = uniform_prior(torch.zeros(20000, 1, dtype=torch.int64), K, torch.Generator().manual_seed(2))
    counts = torch.bincount(big.view(-1), minlength=K).to(F64)
    se = (20000 * (1 / K) * (1 - 1 / K)) ** 0.5
    assert counts.shape == (K,) and float(((counts - 20000 / K).abs() / se).max()) < 4
    with pytest.raises(DlmError):
        uniform_prior(torch.full((1, 3), K), K, g, torch.ones(1, 3, dtype=torch.bool))


def _recorded(fn):
    """Wrap a network to record every input state (the state before each step)."""
    seen: list[Tensor] = []

    def wrapped(z_BL: Tensor, t_B: Tensor) -> Tensor:
        seen.append(z_BL.clone())
        return fn(z_BL, t_B)

    return wrapped, seen


@pytest.mark.parametrize("sampler", ["euler", "analytic", "ancestral"])
def test_conditioning_range_nfe_and_trajectory(sampler: str) -> None:
    K, B, L, S = 5, 6, 8, 6
    p0 = _product_p0(L, K, seed=5)
    sch = get_schedule("loglinear")
    net = _exact_log_score(p0, sch, extra_col=50.0)  # column K would win every draw if it were not ignored
    net, seen = _recorded(net)
    z_init = torch.full((B, L), K)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    z_init[:, :2], fixed[:, :2] = torch.tensor([3, 0]), True
    z_init[2, 6], fixed[2, 6] = 4, True
    g = torch.Generator().manual_seed(0)
    if sampler == "ancestral":
        alphas = sch.alpha(torch.arange(S + 1, dtype=F64) / S)
        out = ancestral(net, z_init, alphas, K, g, fixed, return_trajectory=True, temperature=0.9)
    else:
        fn = euler if sampler == "euler" else analytic
        out = fn(net, z_init, sch, S, K, g, fixed, return_trajectory=True, temperature=0.9, top_p=0.95)
    ids, traj = out.ids_BL, out.trajectory_BL
    assert out.nfe == S == len(seen)
    assert bool(((ids >= 0) & (ids < K)).all())
    for z in [*seen, ids]:
        assert torch.equal(z[fixed], z_init[fixed])  # conditioning never changes, also as the network sees it
    states = [*seen, ids]
    expected = torch.full((B, L), -1)
    for i in range(S):
        expected[states[i + 1] != states[i]] = i
    assert traj is not None and torch.equal(traj, expected)
    assert bool((traj[fixed] == -1).all()) and bool((traj[~fixed] >= 0).any())
    assert analytic(net, z_init, sch, S, K, torch.Generator(), fixed).trajectory_BL is None


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises() -> None:
    K = 4
    z = torch.zeros(2, 3, dtype=torch.int64)
    ls = _random_log_score(K)
    sch = get_schedule("loglinear")
    alphas = sch.alpha(torch.linspace(0, 1, 4, dtype=F64))
    for fn in (euler, analytic):
        for steps in (0, -1, True, 2.0):
            with pytest.raises(DlmError):
                fn(ls, z, sch, steps, K)
        for kw in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}):
            with pytest.raises(DlmError):
                fn(ls, z, sch, 2, K, **kw)
        with pytest.raises(DlmError):
            fn(ls, z, sch, 2, 0)
        with pytest.raises(DlmError):
            fn(ls, z + K, sch, 2, K, draw_prior=False)  # a start outside the vocabulary
        with pytest.raises(DlmError):
            fn(ls, z + K, sch, 2, K, fixed_BL=torch.ones(2, 3, dtype=torch.bool))  # fixed id outside it
    with pytest.raises(DlmError):
        euler(ls, z, get_schedule("linear"), 3, K)  # sigma'(1) = inf
    assert analytic(ls, z, get_schedule("linear"), 3, K).ids_BL.shape == (2, 3)  # alpha_1 = 0 is fine here
    for bad in (alphas[:1], alphas.flip(0), torch.stack([alphas, alphas]), torch.tensor([1.0, 0.0, 0.0, 0.0])):
        with pytest.raises(DlmError):
            ancestral(ls, z, bad, K)
    with pytest.raises(DlmError):
        ancestral(ls, z, alphas, K, times=torch.arange(3))
    with pytest.raises(DlmError):
        ancestral(ls, z, alphas, K, temperature=-0.5)
