"""D3PM (absorbing and uniform): the per-token uniform posterior against the K x K matrix formula, the T-step
bound against exact enumeration over z_t (unbiasedness of ``nll`` and ``nelbo_exact``), convergence of the
absorbing bound to the continuous MDLM bound as T grows, samplers, bad input, and a run through the trainer."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dlm.process.d3pm  # noqa: F401  (registers "d3pm")
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.process import ProcessConfig, get_process
from dlm.process.d3pm import D3PMProcess, _uniform_kl_terms, uniform_posterior
from dlm.process.uniform import reverse_probs


def _specials(K: int) -> SpecialIds:
    return SpecialIds(bos=0, eos=1, pad=2, mask=K, vocab_size=K)


def _process(K: int, **kw) -> D3PMProcess:
    proc = get_process(ProcessConfig(name="d3pm", **kw), _specials(K))
    assert isinstance(proc, D3PMProcess)
    return proc


def _model(vocab: int, time_cond: bool, context: int = 16, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    from dlm.model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=vocab, context=context, n_layer=2, n_head=2, d_model=16, time_cond=time_cond)
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.add_(noise * 0.1) if p.ndim == 1 else p.copy_(noise * scale)
    return model.eval()


# ------------------------------------------------------------------------------------ uniform posterior


def _matrices(K: int, a_s: float, a_t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q_{t|s} (one step s -> t), Qbar_s (0 -> s), Qbar_t (0 -> t): rows = from, columns = to."""
    one = np.ones((K, K)) / K
    beta = a_t / a_s
    return beta * np.eye(K) + (1 - beta) * one, a_s * np.eye(K) + (1 - a_s) * one, a_t * np.eye(K) + (1 - a_t) * one


@pytest.mark.parametrize(("a_s", "a_t"), [(0.9, 0.7), (1.0, 0.3), (0.4, 0.0), (0.5, 0.5)])
def test_uniform_posterior_equals_matrix_formula(a_s: float, a_t: float) -> None:
    K = 5
    Qts, Qs, Qt = _matrices(K, a_s, a_t)
    xs, ys = (
        torch.tensor([x for x in range(K) for _ in range(K)]),
        torch.tensor([y for _ in range(K) for y in range(K)]),
    )
    post = uniform_posterior(xs, ys, a_s, a_t, K).numpy()
    g = torch.Generator().manual_seed(1)
    p_K = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 2, -1)
    for n, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
        ref = Qts[:, y] * Qs[x, :] / Qt[x, y]  # q(z_s | z_t = y, x) = Q_{t|s}[., y] Qbar_s[x, .] / Qbar_t[x, y]
        assert ref.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(post[n], ref, atol=1e-12)
        assert post[n].sum() == pytest.approx(1.0, abs=1e-12)
    # reverse p_theta(z_s | z_t = y) = sum_x p(x) q(z_s | z_t = y, x) and the closed-form KL
    for y in range(K):
        ref_p = sum(
            float(p_K[x]) * Qts[:, y] * Qs[x, :] / Qt[x, y] for x in range(K)
        )  # every Qt[x, y] > 0 unless a_t = 1
        one = torch.ones(1, dtype=torch.float64)
        rev = reverse_probs(p_K[None], torch.tensor([y]), one * a_t, one * a_s)[0].numpy()  # dlm.process.uniform
        np.testing.assert_allclose(rev, ref_p, atol=1e-12)
        assert rev.sum() == pytest.approx(1.0, abs=1e-12)
        for x in range(K):
            q = Qts[:, y] * Qs[x, :] / Qt[x, y]
            nz = q > 0
            kl_ref = float((q[nz] * (np.log(q[nz]) - np.log(ref_p[nz]))).sum())
            kl = _uniform_kl_terms(p_K.log()[None], torch.tensor([x]), torch.tensor([y]), one * a_s, one * a_t, K)
            assert float(kl) == pytest.approx(kl_ref, abs=1e-12)
            assert kl_ref >= -1e-12


# ------------------------------------------------------------------------------ exact bounds by enumeration


def _absorbing_exact(proc: D3PMProcess, model, x_L: torch.Tensor) -> float:
    """L_T + sum_i sum_{mask patterns} q(pattern) sum_{masked l} a_i (-log p_theta(x^l | z_t)), float64.

    Position 0 is context (never masked, never scored): the patterns range over positions 1..L-1."""
    L = x_L.shape[0]
    pats = torch.tensor(list(itertools.product([0, 1], repeat=L - 1)), dtype=torch.bool)  # [2^(L-1), L-1]
    pats = torch.cat([torch.zeros(pats.shape[0], 1, dtype=torch.bool), pats], 1)  # position 0 clean
    P = pats.shape[0]
    total = float(proc.prior_kl(torch.ones(1, L - 1, dtype=torch.bool))[0])
    steps = torch.arange(1, proc.T + 1)
    chunk = max(1, 4096 // P)
    with torch.no_grad():
        for c in range(0, proc.T, chunk):
            i = steps[c : c + chunk].repeat_interleave(P)  # [n * P]
            pt = pats.repeat(i.shape[0] // P, 1)
            z = torch.where(pt, proc.specials.mask, x_L[None])
            logp = torch.log_softmax(proc._logits(model, z, i).double(), -1)
            ce = -(logp.gather(-1, x_L[None, :, None].expand(z.shape[0], L, 1)).squeeze(-1) * pt).sum(1)
            a_s, a_t = proc.alpha[i - 1], proc.alpha[i]
            m = pt.sum(1).to(torch.float64)
            q = a_t ** (L - 1 - m) * (1 - a_t) ** m
            total += float((q * (a_s - a_t) / (1 - a_t) * ce).sum())
    return total


class CopyLM(torch.nn.Module):
    """Time-independent double: p(x^l = j | z) ∝ exp(c * #{clean positions of z holding j}) over the K tokens, so
    more clean context means a sharper (here better) prediction; the MASK logit is very negative."""

    def __init__(self, K: int, c: float = 1.5):
        super().__init__()
        self.K, self.c = K, c
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids_BL, *, attn="bidirectional", t_B=None):
        assert attn == "bidirectional" and t_B is None
        counts = torch.nn.functional.one_hot(ids_BL, self.K + 1)[..., : self.K].sum(1, keepdim=True).float()
        logits = (self.c * counts).expand(-1, ids_BL.shape[1], -1)
        return torch.cat([logits, torch.full_like(logits[..., :1], -30.0)], -1)


def _uniform_exact(proc: D3PMProcess, model, x_L: torch.Tensor) -> float:
    """L_T + sum_i sum_{z_t} q(z_t | x) sum_{l >= 1} KL, with the KL from the explicit matrix formula; position 0
    is context (z^0 = x^0, never scored)."""
    K, L = proc.K, x_L.shape[0]
    z = torch.tensor([[int(x_L[0]), *c] for c in itertools.product(range(K), repeat=L - 1)])
    a1 = float(proc.alpha[-1])
    qT = a1 * np.eye(K) + (1 - a1) / K
    total = L * 0.0
    for x in x_L.tolist()[1:]:
        total += float((qT[x] * np.log(qT[x] * K)).sum())
    with torch.no_grad():
        for i in range(1, proc.T + 1):
            a_s, a_t = float(proc.alpha[i - 1]), float(proc.alpha[i])
            Qts, Qs, Qt = _matrices(K, a_s, a_t)
            p = torch.softmax(proc._logits(model, z, torch.full((z.shape[0],), i)).double(), -1).numpy()
            for r in range(z.shape[0]):
                prob = np.prod([Qt[x, y] for x, y in zip(x_L.tolist()[1:], z[r].tolist()[1:], strict=True)])
                for pos in range(1, L):
                    x, y = int(x_L[pos]), int(z[r, pos])
                    post = Qts[:, y] * Qs[:, :] / Qt[:, y : y + 1]  # row x': q(z_s | z_t = y, x')
                    rev = p[r, pos] @ post
                    q = post[x]
                    nz = q > 0
                    total += prob * float((q[nz] * (np.log(q[nz]) - np.log(rev[nz]))).sum())
    return total


def test_absorbing_estimators_are_unbiased() -> None:
    K, L, T = 6, 5, 8
    proc = _process(K, T=T, schedule="linear")
    model = _model(K + 1, time_cond=True)
    x_L = torch.tensor([3, 4, 5, 3, 0])
    exact = _absorbing_exact(proc, model, x_L)
    n = 4000
    batch = Batch(x_L[None].repeat(n, 1), torch.ones(n, L, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    res = proc.nll(model, batch, generator=g)
    assert res.exact is False and res.tokens_B.tolist() == [L - 1] * n  # position 0 is context only
    est = res.nats_B
    se = float(est.std() / math.sqrt(n))
    assert abs(float(est.mean()) - exact) < 3 * se, (float(est.mean()), exact, se)
    m = 300
    ex = proc.nelbo_exact(model, Batch(x_L[None].repeat(m, 1), torch.ones(m, L, dtype=torch.bool)), generator=g)
    se2 = float(ex.std() / math.sqrt(m))
    assert float(ex.std()) < float(est.std())  # the full sum over steps varies less than one sampled step
    assert abs(float(ex.mean()) - exact) < 3 * se2 + 1e-9, (float(ex.mean()), exact, se2)


def test_uniform_estimators_are_unbiased() -> None:
    K, L, T = 4, 3, 5
    proc = _process(K, T=T, transition="uniform", schedule="loglinear", eps=0.05, eval_t_samples=2)
    assert proc.vocab_size == K and not proc.absorbing
    model = _model(K, time_cond=True)
    x_L = torch.tensor([1, 3, 3])
    exact = _uniform_exact(proc, model, x_L)
    assert float(proc.prior_kl(torch.ones(1, L, dtype=torch.bool))) > 0  # alpha_1 = eps > 0
    n = 4000
    batch = Batch(x_L[None].repeat(n, 1), torch.ones(n, L, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    est = proc.nll(model, batch, generator=g).nats_B
    se = float(est.std() / math.sqrt(n))
    assert abs(float(est.mean()) - exact) < 3 * se, (float(est.mean()), exact, se)
    m = 400
    ex = proc.nelbo_exact(model, Batch(x_L[None].repeat(m, 1), torch.ones(m, L, dtype=torch.bool)), generator=g)
    se2 = float(ex.std() / math.sqrt(m))
    assert abs(float(ex.mean()) - exact) < 3 * se2, (float(ex.mean()), exact, se2)


@pytest.mark.parametrize("kind", ["real", "copy"])
def test_absorbing_bound_converges_to_continuous_mdlm_bound(kind: str) -> None:
    K, L = 6, 6
    time_cond = kind == "real"
    model = _model(K + 1, time_cond=True, seed=3) if time_cond else CopyLM(K)
    # position 0 is context only; the scored positions 1..5 hold the tokens the test always used
    x_L = torch.tensor([1, 3, 4, 5, 3, 0]) if time_cond else torch.tensor([5, 3, 3, 3, 3, 4])
    pats = torch.tensor(list(itertools.product([0, 1], repeat=L - 1)), dtype=torch.bool)
    pats = torch.cat([torch.zeros(pats.shape[0], 1, dtype=torch.bool), pats], 1)  # position 0 is context
    P = pats.shape[0]
    # continuous bound: int_0^1 (1/t) sum_p t^m (1-t)^(L-1-m) CE_p(t) dt, Gauss-Legendre on [0, 1]
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t_R = torch.tensor((nodes + 1) / 2).repeat_interleave(P)
    w_R = torch.tensor(weights / 2).repeat_interleave(P)
    pp = pats.repeat(len(nodes), 1)
    zz = torch.where(pp, K, x_L[None])
    with torch.no_grad():
        out = model(zz, attn="bidirectional", t_B=t_R.float() if time_cond else None)
    logp = torch.log_softmax(out[..., :K].double(), -1)
    ce = -(logp.gather(-1, x_L[None, :, None].expand(zz.shape[0], L, 1)).squeeze(-1) * pp).sum(1)
    m = pp.sum(1).to(torch.float64)
    cont = float((w_R * t_R ** (m - 1) * (1 - t_R) ** (L - 1 - m) * ce).sum())
    b1000 = _absorbing_exact(_process(K, T=1000, schedule="linear", time_cond=time_cond), model, x_L)
    b10 = _absorbing_exact(_process(K, T=10, schedule="linear", time_cond=time_cond), model, x_L)
    assert abs(b1000 - cont) < 0.01 * cont, (b1000, cont)
    assert abs(b10 - cont) > 5 * abs(b1000 - cont), (b10, b1000, cont)
    if kind == "copy":  # prediction improves with context: the discrete bounds are looser and tighten with T
        assert b10 > b1000 > cont, (b10, b1000, cont)


# ----------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("transition", ["absorbing", "uniform"])
def test_samples_are_clean_and_fixed_positions_hold(transition: str) -> None:
    K, L, T = 7, 10, 20
    proc = _process(K, T=T, transition=transition)
    model = _model(K + (transition == "absorbing"), time_cond=True)
    g = torch.Generator().manual_seed(0)
    out = proc.sample(model, 6, L, generator=g, steps=5)
    assert out.nfe == 5 and out.prompt_len == 0 and out.ids_NL.shape == (6, L)
    assert bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())
    fixed = torch.full((L,), -1)
    fixed[7] = 4
    fixed[9] = 0
    out = proc.sample(model, 6, L, generator=g, prompt_ids=[5, 6], fixed_ids=fixed, temperature=0.8, top_k=4, top_p=0.9)
    assert out.nfe == T and out.prompt_len == 2
    assert bool(((out.ids_NL >= 0) & (out.ids_NL < K)).all())
    assert out.ids_NL[:, :2].tolist() == [[5, 6]] * 6
    assert out.ids_NL[:, 7].tolist() == [4] * 6 and out.ids_NL[:, 9].tolist() == [0] * 6
    a = proc.sample(model, 3, L, generator=torch.Generator().manual_seed(5), steps=1)
    b = proc.sample(model, 3, L, generator=torch.Generator().manual_seed(5), steps=1)
    assert torch.equal(a.ids_NL, b.ids_NL) and a.nfe == 1


def test_bad_input_raises() -> None:
    K = 5
    with pytest.raises(DlmError):
        _process(K, T=0)
    with pytest.raises(DlmError):
        _process(K, transition="gaussian")
    proc = _process(K, T=4)
    assert proc.vocab_size == K + 1 and proc.time_conditioned and proc.attention == "bidirectional"
    assert not _process(K, T=4, time_cond=False).time_conditioned
    model = _model(K + 1, time_cond=True)
    for kw in ({"steps": 0}, {"steps": 5}, {"sampler": "euler"}, {"bogus": 1}, {"top_p": 0.0}):
        with pytest.raises(DlmError):
            proc.sample(model, 2, 4, **kw)


def test_loss_is_differentiable_and_hybrid_adds_ce() -> None:
    K, L = 6, 8
    model = _model(K + 1, time_cond=True).train()
    x = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, L, dtype=torch.bool)
    mask[0, 5:] = False
    batch = Batch(x, mask)
    proc = _process(K, T=50)
    loss, stats = proc.loss(model, batch, generator=torch.Generator().manual_seed(1))
    # 29 real tokens less the 4 context positions 0
    assert stats["tokens"] == 25 and loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    hyb = _process(K, T=50, hybrid_lambda=0.01)
    loss2, stats2 = hyb.loss(model, batch, generator=torch.Generator().manual_seed(1))
    assert stats2["nll"] == pytest.approx(stats["nll"]) and float(loss2.detach()) > float(loss.detach())


# ---------------------------------------------------------------------------------------------- trainer


def test_trainer_smoke_validation_bound_falls(tmp_path: Path) -> None:
    from tests.helpers import smoke_train

    steps = 40
    summary, vals = smoke_train(
        tmp_path,
        ["--process.name=d3pm", "--process.T=50", "--process.eval_t_samples=4"],
        steps=steps,
        val_every=20,
        seq_len=32,
        width=64,
        layers=2,
    )
    assert summary["step"] == steps
    assert len(vals) >= 2 and all(math.isfinite(v) for v in vals)
    assert vals[-1] < vals[0], vals


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_absorbing_ddpm_cache_equals_ddpm_and_trajectory(steps: int) -> None:
    """Time-independent absorbing D3PM: ``ddpm_cache`` gives ddpm's samples and reveal steps for the same stream,
    with nfe = the number of steps at which some token was revealed; refused for a time-conditioned network."""
    K, L, T = 7, 10, 20
    proc = _process(K, T=T, time_cond=False)
    assert proc.samplers[:2] == ("ddpm", "ddpm_cache")
    model = _model(K + 1, time_cond=False)
    fixed = torch.full((L,), -1)
    fixed[3] = 2
    opts = {"steps": steps, "fixed_ids": fixed, "return_trajectory": True}
    outs = {
        name: proc.sample(model, 4, L, sampler=name, generator=torch.Generator().manual_seed(3), **opts)
        for name in ("ddpm", "ddpm_cache")
    }
    a, b = outs["ddpm"], outs["ddpm_cache"]
    assert torch.equal(a.ids_NL, b.ids_NL) and torch.equal(a.trajectory_NL, b.trajectory_NL)
    traj = a.trajectory_NL
    assert bool((traj[:, 3] == -1).all()) and bool((traj[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]] >= 0).all())
    assert bool((traj < steps).all())
    assert b.nfe == len(set(traj[traj >= 0].tolist())) <= a.nfe <= steps
    assert bool((a.ids_NL[:, 3] == 2).all()) and bool((a.ids_NL < K).all())
    with pytest.raises(DlmError, match="time-independent"):
        _process(K, T=T).sample(_model(K + 1, time_cond=True), 2, L, sampler="ddpm_cache")
    assert _process(K, T=T, transition="uniform").samplers == ("ddpm",)


def test_absorbing_one_step_draws_from_p_theta_given_all_mask() -> None:
    """S = 1 from all-MASK: every position gets x ~ p_theta(x | z = all MASK, t = 1) (MASK logit dropped)."""
    K, L, T, N = 5, 4, 10, 4000
    proc = _process(K, T=T)
    model = _model(K + 1, time_cond=True, scale=0.5)
    out = proc.sample(model, N, L, steps=1, generator=torch.Generator().manual_seed(0))
    z = torch.full((1, L), K)
    logits = proc.denoiser(model)(z, torch.ones(1, dtype=torch.float64))[0, :, :K].double()
    p = torch.softmax(logits, -1)
    emp = torch.stack([torch.bincount(out.ids_NL[:, l], minlength=K).double() / N for l in range(L)])
    assert torch.allclose(emp, p, atol=4 * math.sqrt(0.25 / N))
