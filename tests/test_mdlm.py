"""MDLM and the shared absorbing machinery: the forward process, SUBS, the posterior step against brute force,
the loss at t -> 0 and t = 1, the NELBO estimate against exact enumeration, the samplers (ddpm, ddpm_cache,
first_hitting: fixed positions, no MASK left, cache == no cache, nfe), bad input, and a trainer smoke run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlm.process.mdlm  # noqa: F401  (registers "mdlm")
from dlm.data.batch import Batch
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process
from dlm.process.absorbing import (
    ddpm,
    ddpm_cache,
    first_hitting,
    mask_tokens,
    posterior_probs,
    posterior_step,
    subs_log_probs,
)
from dlm.process.mdlm import MDLMProcess
from dlm.process.schedules import get_schedule

K = 6  # tokenizer vocabulary; MASK is the appended id K
MASK = K
SPECIALS = SpecialIds(bos=0, eos=1, pad=1, mask=MASK, vocab_size=K)


def make_process(**kw) -> MDLMProcess:
    proc = get_process(ProcessConfig(name="mdlm", **kw), SPECIALS)
    assert isinstance(proc, MDLMProcess)
    return proc


def tiny_model(L: int = 8, time_cond: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=K + 1, context=L, n_layer=1, d_model=32, n_head=2, time_cond=time_cond))
    # Sharpen the random weights a little so samples are not all uniform noise.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


class CountingDouble(nn.Module):
    """Time-independent, bidirectional test double: logits^l = E[z^l] + mean_j P[z^j] + pos^l. Counts calls."""

    def __init__(self, vocab: int = K + 1, L: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.context = L
        self.E = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.P = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos = nn.Parameter(torch.randn(L, vocab, generator=g))
        self.calls = 0

    def forward(self, ids_BL, *, attn="bidirectional", t_B=None, key_mask_BL=None):
        assert attn == "bidirectional" and t_B is None
        self.calls += 1
        L = ids_BL.shape[1]
        return self.E[ids_BL] + self.P[ids_BL].mean(1, keepdim=True) + self.pos[:L]


# ---------------------------------------------------------------------------------------------- absorbing


def test_mask_tokens_rate_and_keep() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, K, (64, 200), generator=g)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, :10] = True
    alpha = torch.linspace(0.0, 1.0, 64, dtype=torch.float64)
    z = mask_tokens(x, alpha, MASK, g, keep_BL=keep)
    assert torch.equal(z[:, :10], x[:, :10])
    unmasked = z != MASK
    assert torch.equal(z[unmasked], x[unmasked])
    rate = (z[:, 10:] == MASK).double().mean(1)
    assert torch.allclose(rate, 1 - alpha, atol=0.12)
    assert bool((z[0, 10:] == MASK).all()) and bool((z[-1] != MASK).all())


def test_subs_log_probs() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, K + 1, generator=g)
    z = torch.tensor([[MASK, 2, MASK, 0, 5], [1, MASK, MASK, MASK, 3]])
    lp = subs_log_probs(logits, z, MASK)
    assert bool(torch.isneginf(lp[..., MASK]).all())
    probs = lp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 5))
    un = z != MASK
    assert torch.equal(probs[un].argmax(-1), z[un]) and bool((probs[un].max(-1).values == 1).all())
    ref = torch.log_softmax(logits[..., :K], -1)
    assert torch.allclose(lp[~un][:, :K], ref[~un], atol=1e-6)


def test_posterior_probs_against_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    p_x = torch.softmax(torch.randn(4, K + 1, generator=g).double().index_fill(1, torch.tensor([MASK]), -1e9), -1)
    a_t, a_s = 0.3, 0.7
    post = posterior_probs(p_x, a_t, a_s, MASK)
    assert torch.allclose(post.sum(-1), torch.ones(4, dtype=torch.float64))
    # Brute force: sum over x of q(z_s | z_t = m, x) p_theta(x).
    brute = torch.zeros_like(post)
    for n in range(4):
        for x in range(K):
            brute[n, x] += (a_s - a_t) / (1 - a_t) * p_x[n, x]
            brute[n, MASK] += (1 - a_s) / (1 - a_t) * p_x[n, x]
    assert torch.allclose(post, brute, atol=1e-12)


def test_posterior_step_empirical_frequencies() -> None:
    g = torch.Generator().manual_seed(3)
    N = 40000
    logits = torch.randn(1, 1, K + 1, generator=g).expand(1, N, K + 1)
    z = torch.full((1, N), MASK)
    lp = subs_log_probs(logits, z, MASK)
    out = posterior_step(lp, z, 0.2, 0.6, MASK, g)
    freq = torch.bincount(out[0], minlength=K + 1).double() / N
    expected = posterior_probs(lp[0, :1].exp().double(), 0.2, 0.6, MASK)[0]
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / N))
    # unmasked positions unchanged; alpha_s = 1 resolves everything
    z2 = torch.tensor([[MASK, 3, MASK, 2]])
    lp2 = subs_log_probs(torch.randn(1, 4, K + 1, generator=g), z2, MASK)
    out2 = posterior_step(lp2, z2, 0.5, 1.0, MASK, g)
    assert out2[0, 1] == 3 and out2[0, 3] == 2 and bool((out2 < K).all())


# ---------------------------------------------------------------------------------------------- loss / bound


def _batch(L: int = 8, B: int = 3, seed: int = 0, pad_from: int | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, K, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if pad_from is not None:
        ids[-1, pad_from:] = SPECIALS.pad
        mask[-1, pad_from:] = False
    return Batch(ids, mask)


def test_loss_zero_at_t0_and_cross_entropy_at_t1() -> None:
    model = tiny_model()
    batch = _batch(pad_from=5)
    proc = make_process(schedule="linear")
    assert float(proc.schedule.mdlm_weight(1.0)) == 1.0
    g = torch.Generator().manual_seed(0)

    proc._times = lambda n, gen, dev: torch.full((n,), 1e-9, dtype=torch.float64)  # type: ignore[method-assign]
    loss0, stats0 = proc.loss(model, batch, g)
    assert float(loss0.detach()) == 0.0 and stats0["tokens"] == 18  # 21 real tokens less 3 context positions 0

    proc._times = lambda n, gen, dev: torch.ones(n, dtype=torch.float64)  # type: ignore[method-assign]
    loss1, _ = proc.loss(model, batch, g)
    scored = batch.mask_BL.clone()
    scored[:, 0] = False  # position 0 is context only
    z = torch.where(scored, MASK, batch.ids_BL)  # alpha_1 = 0: every scored token masked, padding and x^0 kept
    logits = model(z, attn="bidirectional")[..., :K]
    ce = F.cross_entropy(logits.reshape(-1, K), batch.ids_BL.reshape(-1), reduction="none").view(3, 8)
    expected = ce[scored].sum() / scored.sum()
    assert torch.allclose(loss1, expected, atol=1e-5)
    # gradient flows
    loss1.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


@torch.no_grad()
def _exact_nelbo_linear(model: nn.Module, x_L: torch.Tensor) -> float:
    """Linear schedule: NELBO = sum_M B(|M|, n-|M|+1) sum_{l in M} -log p(x^l | z_M) (exact t-integral), M over
    subsets of the n = L-1 scored positions 1..L-1 (position 0 is context, never masked)."""
    L = x_L.shape[0]
    n = L - 1
    total = 0.0
    for bits in itertools.product([0, 1], repeat=n):
        m = torch.tensor((0, *bits), dtype=torch.bool)
        k = int(m.sum())
        if k == 0:
            continue
        z = torch.where(m, MASK, x_L)[None]
        lp = subs_log_probs(model(z, attn="bidirectional"), z, MASK)[0].double()
        ce = -lp[m].gather(1, x_L[m][:, None]).sum()
        beta = math.gamma(k) * math.gamma(n - k + 1) / math.gamma(n + 1)
        total += beta * float(ce)
    return total


@torch.no_grad()
def test_nll_estimate_matches_exact_nelbo() -> None:
    L = 4
    model = CountingDouble(L=L)
    x = torch.tensor([2, 5, 3, 4])
    exact = _exact_nelbo_linear(model, x)
    # Cross-check the Beta integral against a fine midpoint quadrature of the t-integral.
    ts = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    quad = 0.0
    for bits in itertools.product([0, 1], repeat=L - 1):
        m = torch.tensor((0, *bits), dtype=torch.bool)
        k = int(m.sum())
        if k == 0:
            continue
        z = torch.where(m, MASK, x)[None]
        lp = subs_log_probs(model(z, attn="bidirectional"), z, MASK)[0].double()
        ce = float(-lp[m].gather(1, x[m][:, None]).sum())
        quad += ce * float((ts ** (k - 1) * (1 - ts) ** (L - 1 - k)).mean())
    assert abs(quad - exact) < 1e-3 * exact

    B = 16
    batch = Batch(x.expand(B, L).clone(), torch.ones(B, L, dtype=torch.bool))
    proc = make_process(schedule="linear", eval_t_samples=300, antithetic=False)
    res = proc.nll(model, batch, torch.Generator().manual_seed(5))
    assert res.exact is False and res.nats_B.dtype == torch.float64
    assert torch.equal(res.tokens_B, torch.full((B,), L - 1))
    se = float(res.nats_B.std()) / math.sqrt(B)
    assert abs(float(res.nats_B.mean()) - exact) < 3 * se, (float(res.nats_B.mean()), exact, se)
    # antithetic estimate is unbiased too (and at least as precise)
    proc_a = make_process(schedule="linear", eval_t_samples=300, antithetic=True)
    res_a = proc_a.nll(model, batch, torch.Generator().manual_seed(6))
    assert abs(float(res_a.nats_B.mean()) - exact) < 3 * se


def test_nll_padding_not_scored() -> None:
    model = tiny_model()
    batch = _batch(pad_from=3)
    proc = make_process(eval_t_samples=2)
    res = proc.nll(model, batch, torch.Generator().manual_seed(0))
    assert res.tokens_B.tolist() == [7, 7, 2]  # real positions 1..L-1
    assert bool(torch.isfinite(res.nats_B).all()) and bool((res.nats_B >= 0).all())


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("steps", [1, 3, 8, 20])
def test_ddpm_cache_equals_ddpm(steps: int) -> None:
    model = CountingDouble(L=8)
    proc = make_process()
    outs = {}
    for name in ("ddpm", "ddpm_cache"):
        model.calls = 0
        outs[name] = proc.sample(
            model, 4, 8, sampler=name, steps=steps, generator=torch.Generator().manual_seed(7), return_trajectory=True
        )
        assert model.calls == outs[name].nfe
    a, b = outs["ddpm"], outs["ddpm_cache"]
    assert torch.equal(a.ids_NL, b.ids_NL) and torch.equal(a.trajectory_NL, b.trajectory_NL)
    changed_steps = set(a.trajectory_NL[a.trajectory_NL >= 0].tolist())
    assert b.nfe == len(changed_steps)
    assert a.nfe == max(changed_steps) + 1 <= steps
    assert bool((a.ids_NL < K).all())


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache", "first_hitting"])
def test_fixed_positions_and_vocabulary(sampler: str) -> None:
    L = 8
    model = tiny_model(L)
    proc = make_process()
    fixed = torch.full((1, L), -1)
    fixed[0, 5] = 3
    fixed[0, 7] = 1
    res = proc.sample(
        model, 5, L, sampler=sampler, prompt_ids=[0, 2], fixed_ids=fixed, steps=4,
        generator=torch.Generator().manual_seed(1), return_trajectory=True,
    )  # fmt: skip
    ids = res.ids_NL
    assert ids.shape == (5, L) and res.prompt_len == 2 and res.lengths_N.tolist() == [L] * 5
    assert bool((ids[:, :2] == torch.tensor([0, 2])).all())
    assert bool((ids[:, 5] == 3).all()) and bool((ids[:, 7] == 1).all())
    assert bool((ids >= 0).all()) and bool((ids < K).all())
    traj = res.trajectory_NL
    assert bool((traj[:, [0, 1, 5, 7]] == -1).all()) and bool((traj[:, [2, 3, 4, 6]] >= 0).all())
    if sampler == "first_hitting":
        assert res.nfe == 4  # one reveal per step
        assert sorted(traj[0, [2, 3, 4, 6]].tolist()) == [0, 1, 2, 3]


def test_first_hitting_time_conditioned_and_reveal_times() -> None:
    """The next-event time: s = alpha^{-1}(1 - (1 - alpha_t) u^{1/n}); with n masked at t = 1 (linear),
    E[s] = n/(n+1). Times passed to the network decrease."""
    seen: list[torch.Tensor] = []

    def denoise(z, t):
        seen.append(t.clone())
        return subs_log_probs(torch.zeros(*z.shape, K + 1), z, MASK)

    sch = get_schedule("linear")
    B, L = 4000, 3
    g = torch.Generator().manual_seed(0)
    out = first_hitting(denoise, torch.full((B, L), MASK), sch, None, g, mask_id=MASK)
    assert out.nfe == L and bool((out.ids_BL < K).all())
    first = seen[0]
    assert abs(float(first.mean()) - L / (L + 1)) < 4 * 0.2 / math.sqrt(B)
    assert all(bool((seen[i + 1] <= seen[i]).all()) for i in range(L - 1))
    # also runs through the process with a time-conditioned real model
    model = tiny_model(6, time_cond=True)
    proc = make_process(time_cond=True)
    res = proc.sample(model, 2, 6, sampler="first_hitting", generator=torch.Generator().manual_seed(0))
    assert res.nfe == 6 and bool((res.ids_NL < K).all())
    res = proc.sample(model, 2, 6, sampler="ddpm", steps=3, generator=torch.Generator().manual_seed(0))
    assert res.nfe <= 3 and bool((res.ids_NL < K).all())


def test_samplers_more_steps_than_length_and_greedy() -> None:
    model = tiny_model(4)
    proc = make_process(schedule="cosine")
    g = torch.Generator().manual_seed(0)
    res = proc.sample(model, 3, 4, steps=50, generator=g, top_p=0.9, top_k=3)
    assert bool((res.ids_NL < K).all()) and res.nfe <= 50
    r1 = proc.sample(model, 2, 4, steps=4, temperature=0, generator=torch.Generator().manual_seed(0))
    r2 = proc.sample(model, 2, 4, steps=4, temperature=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1.ids_NL, r2.ids_NL)


def test_generic_samplers_direct() -> None:
    model = CountingDouble(L=5)

    def denoise(z, t):
        return subs_log_probs(model(z), z, MASK)

    sch = get_schedule("loglinear")
    z0 = torch.full((2, 5), MASK)
    z0[:, 0] = 4
    fixed = torch.zeros(2, 5, dtype=torch.bool)
    fixed[:, 0] = True
    for fn in (ddpm, ddpm_cache, first_hitting):
        out = fn(denoise, z0, sch, 5, torch.Generator().manual_seed(0), fixed, mask_id=MASK)
        assert bool((out.ids_BL[:, 0] == 4).all()) and bool((out.ids_BL < K).all())
    with pytest.raises(DlmError):
        ddpm(denoise, z0, sch, 0, None, fixed, mask_id=MASK)


# ---------------------------------------------------------------------------------------------- errors / registry


def test_bad_input() -> None:
    model = tiny_model(6, time_cond=True)
    proc = make_process(time_cond=True)
    assert proc.time_conditioned and proc.attention == "bidirectional" and proc.vocab_size == K + 1
    with pytest.raises(DlmError, match="ddpm_cache needs a time-independent model"):
        proc.sample(model, 1, 6, sampler="ddpm_cache")
    plain = make_process()
    assert not plain.time_conditioned and plain.default_sampler == "ddpm" and not plain.exact_likelihood
    m0 = tiny_model(6)
    with pytest.raises(DlmError):
        plain.sample(m0, 1, 6, steps=0)
    with pytest.raises(DlmError, match="unknown sampler"):
        plain.sample(m0, 1, 6, sampler="euler")
    with pytest.raises(DlmError, match="unknown option"):
        plain.sample(m0, 1, 6, beam=3)
    with pytest.raises(DlmError):
        plain.sample(m0, 1, 7)  # beyond the context
    with pytest.raises(DlmError):
        plain.sample(m0, 1, 6, fixed_ids=torch.full((1, 5), -1))
    with pytest.raises(DlmError):
        plain.sample(m0, 1, 6, prompt_ids=[MASK])
    with pytest.raises(DlmError):
        make_process(schedule="nope")
    with pytest.raises(DlmError):
        make_process(eval_t_samples=0)


# ---------------------------------------------------------------------------------------------- trainer


def test_trainer_smoke_bound_falls(tmp_path: Path) -> None:
    from tests.helpers import smoke_train

    steps = 40
    summary, vals = smoke_train(
        tmp_path, ["--process.name=mdlm", "--process.eval_t_samples=4"], steps=steps, val_every=20
    )
    assert summary["step"] == steps
    assert len(vals) >= 2 and all(math.isfinite(v) for v in vals)
    assert vals[-1] < vals[0], vals


@torch.no_grad()
def test_one_step_ddpm_draws_from_p_theta_given_all_mask() -> None:
    """With S = 1 the single step resolves every mask: x^l ~ p_theta(. | all MASK) independently."""
    L, N = 3, 6000
    model = CountingDouble(L=L, seed=3)
    proc = make_process()
    res = proc.sample(model, N, L, steps=1, generator=torch.Generator().manual_seed(11))
    assert res.nfe == 1
    z = torch.full((1, L), MASK)
    p = subs_log_probs(model(z), z, MASK)[0].exp().double()
    for pos in range(L):
        freq = torch.bincount(res.ids_NL[:, pos], minlength=K + 1).double() / N
        assert torch.allclose(freq, p[pos], atol=4 * math.sqrt(0.25 / N))


@torch.no_grad()
def test_first_hitting_with_exact_denoiser_samples_the_joint() -> None:
    """With the true conditionals p(x^l | revealed tokens) as denoiser, revealing one position at a time
    samples the joint exactly (any order): the empirical joint of 2-token rows matches the table."""
    g = torch.Generator().manual_seed(4)
    joint = torch.softmax(torch.randn(K, K, generator=g, dtype=torch.float64) * 1.5, dim=-1)
    joint = joint / joint.sum()

    def denoise(z, t):
        B = z.shape[0]
        probs = torch.zeros(B, 2, K + 1, dtype=torch.float64)
        m0, m1 = z[:, 0] == MASK, z[:, 1] == MASK
        c0 = joint[:, z[:, 1].clamp(max=K - 1)].T  # p(x0 | x1 = z1) unnormalised, [B, K]
        c1 = joint[z[:, 0].clamp(max=K - 1)]  # p(x1 | x0 = z0) unnormalised
        probs[:, 0, :K] = torch.where(m1[:, None], joint.sum(1).expand(B, K), c0)
        probs[:, 1, :K] = torch.where(m0[:, None], joint.sum(0).expand(B, K), c1)
        logits = torch.log(probs / probs.sum(-1, keepdim=True))
        return subs_log_probs(logits.float(), z, MASK)

    N = 20000
    out = first_hitting(denoise, torch.full((N, 2), MASK), get_schedule("loglinear"), None, g, mask_id=MASK)
    freq = torch.bincount(out.ids_BL[:, 0] * K + out.ids_BL[:, 1], minlength=K * K).double().view(K, K) / N
    assert torch.allclose(freq, joint, atol=4 * math.sqrt(0.25 / N))


def test_reveal_step_calls_the_network_only_when_something_reveals() -> None:
    """``reveal_step`` with a callable: not called when a = 0 (nothing reveals) nor when nothing is masked; with
    a = 1 every masked position is drawn from the rows it reads (the MASK column is never drawn)."""
    from dlm.process.absorbing import reveal_step

    calls = {"n": 0}
    z = torch.tensor([[MASK, 3, MASK, 1]])

    def logits():
        calls["n"] += 1
        out = torch.zeros(1, 4, K + 1)
        out[..., MASK] = 100.0  # would dominate if the MASK column were not dropped
        out[0, 0, 2] = 50.0
        out[0, 2, 4] = 50.0
        return out

    g = torch.Generator().manual_seed(0)
    assert torch.equal(reveal_step(logits, z, 0.0, MASK, g), z) and calls["n"] == 0
    assert torch.equal(reveal_step(logits, torch.tensor([[0, 3, 2, 1]]), 1.0, MASK, g), torch.tensor([[0, 3, 2, 1]]))
    assert calls["n"] == 0
    assert reveal_step(logits, z, 1.0, MASK, g).tolist() == [[2, 3, 4, 1]] and calls["n"] == 1
