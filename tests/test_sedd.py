"""SEDD (absorbing): score entropy against the SPEC formula, DSE >= 0 and = 0 at the true ratio, the SEDD <-> MDLM
identity (scaled scores are a distribution; per-sample losses and bounds agree), samplers, bad input, and a
trainer smoke run.

Identity used (derivation in dlm.process.sedd): with ell = log(s (e^sigma - 1)) normalised over y != m,
sigma'(t) DSE_l = sigma'(t)/(e^sigma_t - 1) (-log p_theta(x^l | z_t)) and sigma'/(e^sigma - 1) = -alpha'/(1 - alpha)
= MDLM's w(t) (alpha = e^{-sigma}). So for the same (x, t, z_t) -- the same generator stream -- the SEDD loss and
the MDLM loss are equal sample by sample."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import dlm.process.mdlm  # registers "mdlm"
import dlm.process.sedd  # noqa: F401  (registers "sedd")
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.process import ProcessConfig, get_process
from dlm.process.absorbing import subs_log_probs
from dlm.process.schedules import get_schedule
from dlm.process.sedd import SEDDProcess, dse_absorbing, dse_uniform, euler_absorbing, score_entropy, sedd_weight

K = 6
MASK = K
SPECIALS = SpecialIds(bos=0, eos=1, pad=1, mask=MASK, vocab_size=K)


def make_sedd(**kw) -> SEDDProcess:
    proc = get_process(ProcessConfig(name="sedd", **kw), SPECIALS)
    assert isinstance(proc, SEDDProcess)
    return proc


class Double(nn.Module):
    """Bidirectional test double (ignores t): logits^l = E[z^l] + mean_j P[z^j] + pos^l. Counts calls."""

    def __init__(self, vocab: int = K + 1, L: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.context = L
        self.E = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.P = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = nn.Parameter(torch.randn(L, vocab, generator=g))
        self.calls = 0
        self.seen_t: list = []

    def forward(self, ids_BL, *, attn="bidirectional", t_B=None, key_mask_BL=None):
        assert attn == "bidirectional"
        self.calls += 1
        self.seen_t.append(t_B)
        L = ids_BL.shape[1]
        return self.E[ids_BL] + self.P[ids_BL].mean(1, keepdim=True) + self.pos[:L]


def _batch(B: int = 5, L: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, K, (B, L), generator=g)
    real = torch.ones(B, L, dtype=torch.bool)
    real[0, -2:] = False
    return Batch(ids_BL=x, mask_BL=real)


# ---------------------------------------------------------------------------------------------- score entropy


def test_dse_matches_spec_formula_nonnegative_and_zero_at_true_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    N, V = 50, K + 1
    sigma = torch.rand(N, generator=g, dtype=torch.float64) * 5 + 1e-3
    x = torch.randint(0, K, (N,), generator=g)
    ell = torch.randn(N, V, generator=g, dtype=torch.float64) * 2  # unnormalised scaled log-scores
    c = torch.log(torch.expm1(sigma))
    log_s = (ell - c[:, None]).clone()
    log_s[:, MASK] = float("-inf")  # y = z^l = m excluded
    r = torch.zeros(N, V, dtype=torch.float64)
    r[torch.arange(N), x] = 1.0 / torch.expm1(sigma)
    ref = score_entropy(log_s, r)
    got = dse_absorbing(ell, x, sigma, MASK)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert bool((ref >= -1e-12).all())
    # s = r exactly: zero loss; normalised s: >= 0.
    log_true = torch.where(r > 0, torch.log(r), torch.full_like(r, float("-inf")))
    assert torch.allclose(score_entropy(log_true, r), torch.zeros(N, dtype=torch.float64), atol=1e-12)
    ell_true = torch.full((N, V), float("-inf"), dtype=torch.float64)
    ell_true[torch.arange(N), x] = 0.0
    assert torch.allclose(dse_absorbing(ell_true, x, sigma, MASK), torch.zeros(N, dtype=torch.float64), atol=1e-12)
    ell_norm = torch.log_softmax(ell.masked_fill(torch.arange(V) == MASK, float("-inf")), -1)
    assert bool((dse_absorbing(ell_norm, x, sigma, MASK) >= 0).all())


def test_weight_equals_mdlm_weight() -> None:
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    for name, kw in (("loglinear", {"eps": 1e-3}), ("geometric", {"sigma_min": 1e-4, "sigma_max": 20.0})):
        sch = get_schedule(name, **kw)
        assert torch.allclose(sedd_weight(sch, t), sch.mdlm_weight(t), rtol=1e-9)


# ---------------------------------------------------------------------------------------------- SEDD <-> MDLM


@pytest.mark.parametrize("schedule", ["loglinear", "geometric"])
def test_sedd_from_mdlm_denoiser_identity(schedule: str) -> None:
    """A SEDD model built from an MDLM denoiser (same network): s (e^sigma - 1) = p_theta sums to 1 over y, and
    per-sample loss / bound of SEDD-absorb equal MDLM's for the same (x, t, z) (same generator stream)."""
    model = Double(seed=2)
    sedd = make_sedd(schedule=schedule, time_cond=False)
    mdlm = get_process(ProcessConfig(name="mdlm", schedule=schedule, time_cond=False), SPECIALS)
    batch = _batch()
    z = batch.ids_BL.clone()
    z[:, ::2] = MASK
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    log_s = sedd.log_score(model, z, t)
    scaled = log_s.exp() * torch.expm1(sedd.schedule.sigma(t))[:, None, None]
    masked = z == MASK
    assert torch.allclose(scaled[masked].sum(-1), torch.ones(int(masked.sum()), dtype=torch.float64), atol=1e-6)
    assert bool((scaled[~masked] == 0).all())
    p_mdlm = subs_log_probs(mdlm.denoiser(model)(z, t), z, MASK).exp().to(torch.float64)
    assert torch.allclose(scaled[masked], p_mdlm[masked], atol=1e-6)
    for seed in range(3):
        ls, _ = sedd.loss(model, batch, torch.Generator().manual_seed(seed))
        lm, _ = mdlm.loss(model, batch, torch.Generator().manual_seed(seed))
        assert torch.allclose(ls.double(), lm.double(), rtol=1e-5), (ls, lm)
        ns = sedd.nll(model, batch, torch.Generator().manual_seed(seed))
        nm = mdlm.nll(model, batch, torch.Generator().manual_seed(seed))
        assert not ns.exact and torch.equal(ns.tokens_B, nm.tokens_B)
        assert torch.allclose(ns.nats_B, nm.nats_B, rtol=1e-5), (ns.nats_B, nm.nats_B)


def test_loss_gradient_and_time_conditioning() -> None:
    model = Double(seed=3)
    sedd = make_sedd(schedule="geometric")
    assert sedd.time_conditioned and sedd.attention == "bidirectional" and not sedd.exact_likelihood
    assert sedd.vocab_size == K + 1
    loss, stats = sedd.loss(model, _batch(), torch.Generator().manual_seed(0))
    loss.backward()
    value = float(loss.detach())
    assert math.isfinite(value) and value >= 0 and stats["tokens"] == 33  # 38 real less 5 context positions 0
    assert model.E.grad is not None and torch.isfinite(model.E.grad).all()
    t_seen = model.seen_t[-1]
    assert t_seen is not None and t_seen.dtype == torch.float32  # sigma_t
    assert not make_sedd(time_cond=False).time_conditioned


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("sampler", ["euler", "analytic"])
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_samplers_vocabulary_fixed_positions_nfe(sampler: str, steps: int) -> None:
    model = Double(seed=4)
    sedd = make_sedd(time_cond=False)
    fixed = torch.full((1, 8), -1, dtype=torch.int64)
    fixed[0, 5] = 3
    fixed[0, 7] = 2
    out = sedd.sample(
        model, 6, 8, sampler=sampler, prompt_ids=[0, 4], fixed_ids=fixed, steps=steps,
        generator=torch.Generator().manual_seed(7), temperature=0.9, top_p=0.95,
    )  # fmt: skip
    ids = out.ids_NL
    assert ids.shape == (6, 8) and out.prompt_len == 2
    assert bool(((ids >= 0) & (ids < K)).all())
    assert bool((ids[:, :2] == torch.tensor([0, 4])).all())
    assert bool((ids[:, 5] == 3).all()) and bool((ids[:, 7] == 2).all())
    assert 1 <= out.nfe <= steps and out.nfe == model.calls
    again = sedd.sample(
        model, 6, 8, sampler=sampler, prompt_ids=[0, 4], fixed_ids=fixed, steps=steps,
        generator=torch.Generator().manual_seed(7), temperature=0.9, top_p=0.95,
    )  # fmt: skip
    assert torch.equal(again.ids_NL, ids)


def test_euler_one_step_draws_from_p_theta_and_time_conditioned_default() -> None:
    """S = 1: the single Euler step resolves every mask with x^l ~ p_theta(. | all MASK)."""
    L, N = 2, 4000
    model = Double(L=L, seed=5)
    sedd = make_sedd()  # time-conditioned: the double receives sigma_1
    out = sedd.sample(model, N, L, sampler="euler", steps=1, generator=torch.Generator().manual_seed(1))
    assert out.nfe == 1 and model.seen_t[-1] is not None
    z = torch.full((1, L), MASK)
    p = subs_log_probs(sedd.denoiser(model)(z, torch.ones(1, dtype=torch.float64)), z, MASK)[0].exp()
    emp = torch.stack([torch.bincount(out.ids_NL[:, l], minlength=K + 1).float() / N for l in range(L)])
    assert torch.allclose(emp, p, atol=0.03)


def test_euler_direct_jump_probability() -> None:
    """With many steps, the fraction revealed after the first step matches lambda = sigma'(1) dt / (e^sigma_1 - 1)."""
    sch = get_schedule("loglinear", eps=1e-3)
    S, N, L = 4, 4000, 1

    calls = {"n": 0}

    def denoise(z, t):
        calls["n"] += 1
        if calls["n"] == 2:
            frac = float((z != MASK).float().mean())
            lam = float(sch.dsigma(1.0) * (1 / S) / torch.expm1(sch.sigma(1.0)))
            calls["frac"], calls["lam"] = frac, lam
        logp = torch.full((*z.shape, K + 1), -math.log(K))
        logp[..., MASK] = float("-inf")
        return logp

    z0 = torch.full((N, L), MASK)
    out = euler_absorbing(denoise, z0, sch, S, torch.Generator().manual_seed(0), mask_id=MASK)
    assert not bool((out.ids_BL == MASK).any())
    assert abs(calls["frac"] - min(calls["lam"], 1.0)) < 0.03


def test_bad_input() -> None:
    model = Double()
    sedd = make_sedd(time_cond=False)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 8, sampler="nope", generator=g)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 8, steps=0, generator=g)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 8, bogus=1, generator=g)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 8, prompt_ids=[MASK], generator=g)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 9, generator=g)
    with pytest.raises(DlmError):
        sedd.sample(model, 2, 8, fixed_ids=torch.full((1, 7), -1), generator=g)
    with pytest.raises(DlmError):
        make_sedd(eval_t_samples=0)
    with pytest.raises(DlmError):
        make_sedd(transition="nope")
    uni = make_sedd(transition="uniform", time_cond=False)
    with pytest.raises(DlmError):
        uni.sample(Double(vocab=K), 2, 8, sampler="analytic", top_p=0.0, generator=g)
    with pytest.raises(DlmError):
        uni.sample(Double(vocab=K), 2, 8, sampler="euler", temperature=-1.0, generator=g)


@pytest.mark.parametrize("sampler", ["euler", "analytic"])
def test_uniform_samplers_through_the_process(sampler: str) -> None:
    """SEDD-uniform: both samplers, with filters and trajectories: ids in [0, K), fixed ids kept (trajectory -1),
    one network call per step, the same stream gives the same samples."""
    L, S = 8, 4
    uni = make_sedd(transition="uniform")
    model = Double(vocab=K, L=L, seed=6)
    fixed = torch.full((L,), -1)
    fixed[5] = 3

    def run(**kw):
        return uni.sample(
            model, 5, L, sampler=sampler, steps=S, prompt_ids=[2], fixed_ids=fixed,
            generator=torch.Generator().manual_seed(8), return_trajectory=True, **kw,
        )  # fmt: skip

    out = run(temperature=0.7, top_p=0.9)
    assert out.nfe == S and bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())
    assert bool((out.ids_NL[:, 0] == 2).all()) and bool((out.ids_NL[:, 5] == 3).all())
    assert bool((out.trajectory_NL[:, [0, 5]] == -1).all()) and bool((out.trajectory_NL < S).all())
    assert torch.equal(run(temperature=0.7, top_p=0.9).ids_NL, out.ids_NL)
    assert torch.equal(run(top_k=1).ids_NL, run(temperature=0.0).ids_NL)


# ---------------------------------------------------------------------------------------------- uniform


def _uniform_ratio(x: Tensor, z: Tensor, sigma: Tensor, V: int) -> Tensor:
    """r_y = p_{t|0}(y | x) / p_{t|0}(z | x) for y != z (0 at y = z), brute force, float64 [N, V]."""
    alpha = torch.exp(-sigma.to(torch.float64))[:, None]
    p = alpha * torch.nn.functional.one_hot(x, V) + (1 - alpha) / V
    r = p / p.gather(-1, z[:, None])
    return r.masked_fill(torch.nn.functional.one_hot(z, V).bool(), 0.0)


def test_dse_uniform_matches_spec_formula_and_zero_at_true_ratio() -> None:
    g = torch.Generator().manual_seed(3)
    N, V = 60, K
    sigma = torch.rand(N, generator=g, dtype=torch.float64) * 4 + 1e-3
    x = torch.randint(0, V, (N,), generator=g)
    z = torch.where(torch.rand(N, generator=g) < 0.5, x, torch.randint(0, V, (N,), generator=g))
    log_s = torch.randn(N, V, generator=g, dtype=torch.float64)
    r = _uniform_ratio(x, z, sigma, V)
    ref = score_entropy(log_s.masked_fill(torch.nn.functional.one_hot(z, V).bool(), float("-inf")), r)
    got = dse_uniform(log_s, x, z, sigma)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert bool((got >= -1e-12).all())
    log_true = torch.log(r.clamp(min=1e-300)).masked_fill(r == 0, 0.0)
    assert torch.allclose(dse_uniform(log_true, x, z, sigma), torch.zeros(N, dtype=torch.float64), atol=1e-9)


def test_uniform_process_loss_nll_and_euler() -> None:
    model = Double(vocab=K, seed=6)
    sedd = make_sedd(transition="uniform", schedule="geometric", time_cond=False)
    assert not sedd.absorbing and sedd.vocab_size == K
    batch = _batch()
    loss, stats = sedd.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) >= 0 and stats["tokens"] == 33
    assert model.E.grad is not None and torch.isfinite(model.E.grad).all()
    res = sedd.nll(model, batch, torch.Generator().manual_seed(1))
    assert not res.exact and bool(torch.isfinite(res.nats_B).all()) and bool((res.nats_B >= 0).all())
    fixed = torch.full((1, 8), -1, dtype=torch.int64)
    fixed[0, 6] = 3
    model.calls = 0
    out = sedd.sample(
        model, 5, 8, sampler="euler", prompt_ids=[0, 2], fixed_ids=fixed, steps=6,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    ids = out.ids_NL
    assert bool(((ids >= 0) & (ids < K)).all()) and out.nfe == 6 == model.calls
    assert bool((ids[:, :2] == torch.tensor([0, 2])).all()) and bool((ids[:, 6] == 3).all())


# ---------------------------------------------------------------------------------------------- trainer


def test_trainer_smoke_bound_falls(tmp_path: Path) -> None:
    from tests.helpers import smoke_train

    steps = 30
    summary, vals = smoke_train(
        tmp_path, ["--process.name=sedd", "--process.eval_t_samples=2"], steps=steps, val_every=15
    )
    assert summary["step"] == steps
    assert len(vals) >= 2 and all(math.isfinite(v) for v in vals)
    assert vals[-1] < vals[0], vals


@pytest.mark.parametrize("sampler", ["euler", "analytic"])
def test_absorbing_trajectory_and_fixed_positions(sampler: str) -> None:
    """Trajectory: -1 at fixed positions, the step of the reveal elsewhere; the revealed token never changes."""
    L, S = 8, 5
    model = Double(L=L, seed=3)
    sedd = make_sedd()
    fixed = torch.full((L,), -1)
    fixed[6] = 2
    out = sedd.sample(
        model, 6, L, sampler=sampler, steps=S, prompt_ids=[1], fixed_ids=fixed,
        generator=torch.Generator().manual_seed(4), return_trajectory=True,
    )  # fmt: skip
    traj = out.trajectory_NL
    assert traj.shape == (6, L) and out.nfe <= S
    assert bool((traj[:, [0, 6]] == -1).all()) and bool((traj[:, [1, 2, 3, 4, 5, 7]] >= 0).all())
    assert bool((traj < S).all())
    assert bool((out.ids_NL[:, 0] == 1).all()) and bool((out.ids_NL[:, 6] == 2).all())
    assert bool((out.ids_NL != MASK).all())


# ---------------------------------------------------------------------------------------------- uniform bound


class ExactUniformScore(nn.Module):
    """The exact concrete score of a known p0(x^{1..n} | x^0) under the uniform forward process (no network):

        p_t(z) = sum_x p0(x | x^0) prod_l [alpha_t 1{z^l = x^l} + (1 - alpha_t) / K],
        log s(z)_{l,y} = log p_t(z^{l <- y}) - log p_t(z)     (positions l = 1..n; position 0 is the context x^0)

    ``t_R`` (float64, one t per row) is set by the test before each call (the process is built time-independent)."""

    def __init__(self, p0_CS: Tensor, K: int, n: int, schedule) -> None:
        super().__init__()
        self.p0_CS, self.K, self.n, self.schedule = p0_CS, K, n, schedule
        self.states_SN = torch.tensor(list(itertools.product(range(K), repeat=n)))  # [S, n]
        self.index = {tuple(s.tolist()): i for i, s in enumerate(self.states_SN)}
        S = self.states_SN.shape[0]
        nb = torch.empty(S, n, K, dtype=torch.int64)  # state index of z with position l set to y
        for i, st in enumerate(self.states_SN.tolist()):
            for pos in range(n):
                for y in range(K):
                    nb[i, pos, y] = self.index[tuple([*st[:pos], y, *st[pos + 1 :]])]
        self.nb_SNK = nb
        self.t_R: Tensor | None = None
        self.dummy = nn.Parameter(torch.zeros(1))

    def marginal(self, alpha_R: Tensor, c_R: Tensor) -> Tensor:
        """p_t(z) over the states, float64 [R, S], for per-row alpha and context token."""
        eq_SSN = (self.states_SN[:, None, :] == self.states_SN[None, :, :]).to(torch.float64)
        a = alpha_R[:, None, None, None]
        q_RSS = (a * eq_SSN + (1 - a) / self.K).prod(-1)  # q(z = row state | x = column state)
        return torch.einsum("rzx,rx->rz", q_RSS, self.p0_CS[c_R])

    def forward(self, ids_BL, *, attn="bidirectional", t_B=None, key_mask_BL=None):
        assert t_B is None and self.t_R is not None
        R = ids_BL.shape[0]
        p_RS = self.marginal(self.schedule.alpha(self.t_R).to(torch.float64), ids_BL[:, 0])
        iz_R = torch.tensor([self.index[tuple(r)] for r in ids_BL[:, 1:].tolist()])
        nb_RNK = self.nb_SNK[iz_R]
        log_p = torch.log(p_RS)
        out = log_p.gather(1, nb_RNK.reshape(R, -1)).view(R, self.n, self.K) - log_p.gather(1, iz_R[:, None])[..., None]
        return torch.cat([torch.zeros(R, 1, self.K, dtype=torch.float64), out], 1)


@pytest.mark.parametrize(("Kv", "n"), [(3, 1), (4, 2), (5, 2)])
def test_uniform_bound_with_the_exact_score_equals_minus_log_p0(Kv: int, n: int) -> None:
    """With the exact score the reverse process is the true one, so the bound is tight up to the prior term:

        -log p0(x^{1..n} | x^0) = int_0^1 E_{z_t ~ p_{t|0}(.|x)} (sigma'(t)/K) sum_l DSE_l dt + KL(p_{1|0}(.|x) || p_1)

    The t-integral is done by Gauss-Legendre quadrature in sigma (t = (1 - e^{-sigma}) / (1 - eps), loglinear) with
    the expectation over z_t exact (all K^n states); the process's own ``bound_integrand`` gives the integrand.
    The prior KL is ~1e-6 here (alpha_1 = eps = 1e-3), so the bound itself also equals -log p0 to 1e-4."""
    g = torch.Generator().manual_seed(10 * Kv + n)
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=Kv, vocab_size=Kv)
    proc = get_process(ProcessConfig(name="sedd", transition="uniform", time_cond=False, eps=1e-3), specials)
    S = Kv**n
    p0_CS = torch.rand(Kv, S, generator=g, dtype=torch.float64) + 0.05
    p0_CS = p0_CS / p0_CS.sum(1, keepdim=True)
    model = ExactUniformScore(p0_CS, Kv, n, proc.schedule)
    states = model.states_SN
    eps = 1e-3
    sig_1 = -math.log(eps)
    panels = [0.0, 1e-3, 0.05, 1.0, sig_1]
    nodes, weights = np.polynomial.legendre.leggauss(64)
    sig_Q = torch.cat([torch.tensor((nodes + 1) / 2 * (b - a) + a) for a, b in itertools.pairwise(panels)])
    w_Q = torch.cat([torch.tensor(weights / 2 * (b - a)) for a, b in itertools.pairwise(panels)])
    t_Q = -torch.expm1(-sig_Q) / (1 - eps)
    dt_Q = torch.exp(-sig_Q) / (1 - eps)  # dt / dsigma
    for c, xi in ((0, 0), (1, S - 1), (Kv - 1, S // 2)):
        x_L = torch.cat([torch.tensor([c]), states[xi]])
        # every (node, z_t state) pair in one batch; z^0 = x^0 (context, never resampled)
        z_RL = torch.cat([torch.full((S, 1), c), states], 1).repeat(len(t_Q), 1)
        t_R = t_Q.repeat_interleave(S)
        batch = Batch(x_L[None].expand(len(t_R), n + 1).clone(), torch.ones(len(t_R), n + 1, dtype=torch.bool))
        model.t_R = t_R
        with torch.no_grad():
            f_R = proc.bound_integrand(model, batch, t_R, z_RL).to(torch.float64)
        alpha_R = proc.schedule.alpha(t_R).to(torch.float64)
        q_R = (alpha_R[:, None] * (z_RL[:, 1:] == x_L[1:]) + (1 - alpha_R[:, None]) / Kv).prod(1)
        bound = float(((f_R * q_R).view(len(t_Q), S).sum(1) * dt_Q * w_Q).sum())
        a1 = torch.tensor([eps], dtype=torch.float64)
        p1 = model.marginal(a1, torch.tensor([c]))[0]
        q1 = (a1 * (states == x_L[1:]) + (1 - a1) / Kv).prod(1)
        prior_kl = float((q1 * (q1.log() - p1.log())).sum())
        target = -math.log(float(p0_CS[c, xi]))
        assert abs(bound + prior_kl - target) < 1e-4, (bound, prior_kl, target)
        assert abs(bound - target) < 1e-4, (bound, target)


def test_uniform_bound_of_an_untrained_score_is_about_log_K() -> None:
    """log s = 0 (an untrained network) at K = 4096: the bound is about ln K nats per token, not K ln K (the rate
    of a jump z -> y is sigma'(t)/K)."""
    Kv = 4096
    specials = SpecialIds(bos=0, eos=1, pad=1, mask=Kv, vocab_size=Kv)
    proc = get_process(ProcessConfig(name="sedd", transition="uniform", time_cond=False, eval_t_samples=64), specials)

    class Zero(nn.Module):
        def forward(self, ids_BL, *, attn="bidirectional", t_B=None, key_mask_BL=None):
            return torch.zeros(*ids_BL.shape, Kv)

    x = torch.randint(0, Kv, (32, 4), generator=torch.Generator().manual_seed(0))
    res = proc.nll(Zero(), Batch(x, torch.ones_like(x, dtype=torch.bool)), torch.Generator().manual_seed(1))
    per_token = float(res.nats_B.sum() / res.tokens_B.sum())
    assert res.tokens_B.tolist() == [3] * 32
    assert abs(per_token - math.log(Kv)) < 0.1 * math.log(Kv), (per_token, math.log(Kv))
