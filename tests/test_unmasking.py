"""Remasking (ReMDM) and ordered unmasking (confidence / LLaDA / EB-sampler), judged where the truth is known.

An exact denoiser of a tiny joint over K^L cells (K = 2 or 3 tokens, L = 3 positions) gives p(x^l | revealed tokens)
exactly. Checked: ReMDM's sample law against its chain's closed-form law (propagated over all (K+1)^L states), and,
from that law, that a fixed eta converges far more slowly in S than eta = 0 (ancestral); confidence ordering
with one position per step is exact (adaptive-order chain rule) and several per step are not; LLaDA's drawn score
lowers the entropy; the EB rule's counts and its gamma = 0 exactness; the threshold rule (Fast-dLLM): exact at
tau = 1, the product of the marginals at tau = 0, its reveals in between; fixed positions, NFE and refused options.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

import dlm.process  # noqa: F401  (registers every family)
from dlm.data.specials import SpecialIds
from dlm.errors import DlmError
from dlm.model import ModelConfig, build_model
from dlm.process import ProcessConfig, get_process
from dlm.process.absorbing import ddpm
from dlm.process.schedules import get_schedule
from dlm.process.unmasking import confidence, entropy_bounded, remdm, reveal_counts, threshold

LOGLINEAR = get_schedule("loglinear")


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof > stat) (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def chi2_p(counts: Tensor, probs: Tensor) -> float:
    expected = probs * counts.sum()
    return chi2_sf(float(((counts - expected) ** 2 / expected).sum()), len(probs) - 1)


def entropy(p: Tensor) -> float:
    return float(torch.special.entr(p).sum())


def cells(K: int, L: int) -> Tensor:
    return torch.tensor(list(itertools.product(range(K), repeat=L)))  # cell c = (x^0, .., x^{L-1}), row-major


def exact_denoiser(joint: Tensor, tempered: bool = False):
    """denoise(z, t): log p(x^l | the revealed tokens of z) at every position (MASK = K column -inf), exact for
    ``joint`` ([K] * L); ``tempered``: the time-dependent target p_t ∝ joint^(1 + t) (a wrong time is detected)."""
    K, L = joint.shape[0], joint.ndim
    digits_CL = cells(K, L)
    onehot_CLK = torch.nn.functional.one_hot(digits_CL, K).double()

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        w_BC = joint.flatten()[None] ** (1.0 + t_B.double()[:, None]) if tempered else joint.flatten()[None]
        agree_BC = ((digits_CL[None] == z_BL[:, None]) | (z_BL[:, None] == K)).all(-1)
        marg_BLK = torch.einsum("bc,clk->blk", w_BC * agree_BC, onehot_CLK)
        out = torch.full((z_BL.shape[0], L, K + 1), float("-inf"), dtype=torch.float64)
        out[..., :K] = torch.log(marg_BLK / marg_BLK.sum(-1, keepdim=True))
        return out

    return denoise


def correlated(K: int, L: int, seed: int, scale: float = 1.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(K**L, generator=g, dtype=torch.float64) * scale, 0).view([K] * L)


def law_of(ids_BL: Tensor, K: int) -> Tensor:
    L = ids_BL.shape[1]
    code = (ids_BL * torch.tensor([K ** (L - 1 - l) for l in range(L)])).sum(1)
    return torch.bincount(code, minlength=K**L).double()


# --------------------------------------------------------------------------------------- ReMDM: its chain's law


def remdm_numbers(S: int, strategy: str, eta: float, window: tuple[float, float] | None) -> list[tuple]:
    """(sigma, reveal, t_net) per step, derived here from the paper's formulas (independently of the module):
    sigma_max = min(1, (1 - alpha_s)/alpha_t), cap min(eta, sigma_max) / rescale eta sigma_max, reveal
    (alpha_s - (1 - sigma) alpha_t)/(1 - alpha_t); loop: alpha~ held at alpha(t_on) on [t_off, t_on)."""

    def t_tilde(t: float) -> float:
        if window is None or t >= window[0]:
            return t
        return window[0] if t >= window[1] else t * window[0] / window[1]

    out = []
    for i in range(S):
        t, s = 1 - i / S, 1 - (i + 1) / S
        a_t = float(LOGLINEAR.alpha(t_tilde(t)))
        a_s = 1.0 if i == S - 1 else float(LOGLINEAR.alpha(t_tilde(s)))
        smax = min(1.0, (1 - a_s) / a_t)
        sigma = min(eta, smax) if strategy == "cap" else eta * smax
        if window is not None and not window[1] < t <= window[0]:
            sigma = 0.0
        reveal = 1.0 if i == S - 1 else (a_s - (1 - sigma) * a_t) / (1 - a_t)
        out.append((sigma, reveal, t_tilde(t)))
    return out


def remdm_chain_law(denoise, K: int, L: int, numbers: list[tuple]) -> Tensor:
    """The law of the final sample of the chain, propagated over all (K+1)^L states: per step and position, an
    unmasked token is masked with probability sigma, a MASK becomes v with probability reveal * p(x^l = v | z)."""
    states_ZL = torch.tensor(list(itertools.product(range(K + 1), repeat=L)))
    Z = len(states_ZL)
    dist = torch.zeros(Z, dtype=torch.float64)
    dist[-1] = 1.0  # all MASK
    masked_ZL = states_ZL == K
    for sigma, reveal, t in numbers:
        p_ZLK = denoise(states_ZL, torch.full((Z,), t, dtype=torch.float64))[..., :K].exp().nan_to_num(0.0)
        nxt_ZLV = torch.zeros(Z, L, K + 1, dtype=torch.float64)
        nxt_ZLV[..., :K] = torch.where(masked_ZL[..., None], reveal * p_ZLK, 0.0)
        keep = torch.nn.functional.one_hot(states_ZL, K + 1).double() * (1 - sigma)
        nxt_ZLV += torch.where(masked_ZL[..., None], 0.0, keep)
        nxt_ZLV[..., K] += torch.where(masked_ZL, torch.tensor(1 - reveal, dtype=torch.float64), sigma)
        T_ZZ = torch.ones(Z, Z, dtype=torch.float64)
        for pos in range(L):
            T_ZZ *= nxt_ZLV[:, pos, states_ZL[:, pos]]
        dist = dist @ T_ZZ
    final = ~masked_ZL.any(1)
    assert float(dist[final].sum()) == pytest.approx(1.0, abs=1e-12)
    return dist[final]  # the clean states in the row-major cell order


@torch.no_grad()
@pytest.mark.parametrize(
    ("strategy", "eta", "window"),
    [("cap", 0.5, None), ("rescale", 0.8, None), ("cap", 0.6, (0.6, 0.2))],
    ids=["cap", "rescale", "loop"],
)
def test_remdm_has_its_chains_law(strategy: str, eta: float, window: tuple[float, float] | None) -> None:
    """Time-dependent exact denoiser, K = 2, L = 3, S = 5: the empirical law of remdm's samples matches the
    closed-form law of its chain (chi-square), which the ancestral chain's (sigma = 0) law is rejected against."""
    K, L, S, N = 2, 3, 5, 30000
    joint = correlated(K, L, seed=3, scale=2.0)
    denoise = exact_denoiser(joint, tempered=True)
    numbers = remdm_numbers(S, strategy, eta, window)
    law = remdm_chain_law(denoise, K, L, numbers)
    ancestral = remdm_chain_law(denoise, K, L, remdm_numbers(S, "cap", 0.0, window))
    g = torch.Generator().manual_seed(0)
    on, off = window or (None, None)
    out = remdm(denoise, torch.full((N, L), K), LOGLINEAR, S, g, mask_id=K, remask_strategy=strategy,
                remask_eta=eta, remask_t_on=on, remask_t_off=off)  # fmt: skip
    counts = law_of(out.ids_BL, K)
    assert chi2_p(counts, law) > 1e-4
    assert chi2_p(counts, ancestral) < 1e-9  # remasking changed the law, and the test sees it


@torch.no_grad()
def test_remdm_with_fixed_eta_converges_more_slowly_than_ancestral_sampling() -> None:
    """From the chain's law (checked against the sampler above): with each position drawn from its own
    conditional, ancestral sampling (eta = 0) converges to the joint as S grows (TV ~ 1/S). ReMDM-cap with a fixed
    eta remasks O(1) tokens per step at every S (a corrector that sometimes reveals two masks together); it
    converges too (near t = 0 a step rarely holds two masks), but at S = 128 it is still > 5x further off."""
    K, L = 2, 3
    joint = correlated(K, L, seed=3, scale=2.0)
    denoise = exact_denoiser(joint)
    truth = joint.flatten()

    def tv(S: int, eta: float) -> float:
        return 0.5 * float((remdm_chain_law(denoise, K, L, remdm_numbers(S, "cap", eta, None)) - truth).abs().sum())

    anc = [tv(S, 0.0) for S in (8, 32, 128)]
    cap = [tv(S, 0.5) for S in (8, 32, 128)]
    assert anc[0] > anc[1] > anc[2] and anc[2] < 0.01
    assert cap[0] > cap[1] > cap[2] and cap[0] > anc[0] and cap[2] > 5 * anc[2]


# ---------------------------------------------------------------------------------- confidence / LLaDA ordering


@torch.no_grad()
@pytest.mark.parametrize("score", ["confidence", "margin", "entropy"])
def test_confidence_order_with_one_position_per_step_is_exact(score: str) -> None:
    """A score of p_theta alone orders by the current state only, and any such adaptive order with one position
    per step draws the exact joint (chain rule); all positions in one step draw the product of the marginals."""
    K, L, N = 3, 3, 20000
    joint = correlated(K, L, seed=5)
    denoise = exact_denoiser(joint)
    g = torch.Generator().manual_seed(1)
    one = confidence(denoise, torch.full((N, L), K), LOGLINEAR, L, g, mask_id=K, unmask_score=score)
    assert one.nfe == L
    assert chi2_p(law_of(one.ids_BL, K), joint.flatten()) > 1e-4
    par = confidence(denoise, torch.full((N, L), K), LOGLINEAR, 1, g, mask_id=K, unmask_score=score)
    assert par.nfe == 1
    assert chi2_p(law_of(par.ids_BL, K), joint.flatten()) < 1e-12


@torch.no_grad()
def test_llada_drawn_score_favours_likely_tokens_and_lowers_the_entropy() -> None:
    """Independent positions, each 0 w.p. 0.7: the conditionals never change, so any order of p_theta alone is
    exact, but LLaDA keeps the most probable *draw* first: with two positions, P(x^0 = 0) = 0.7 + 0.3 * 0.7 * 0.7
    = 0.847 exactly (position 0 is kept first unless it drew 1 and the other 0, then redrawn)."""
    K, L, N = 2, 2, 40000
    p0 = torch.tensor([0.7, 0.3], dtype=torch.float64)
    joint = torch.outer(p0, p0)
    denoise = exact_denoiser(joint)
    g = torch.Generator().manual_seed(2)
    out = confidence(denoise, torch.full((N, L), K), LOGLINEAR, L, g, mask_id=K, unmask_score="drawn")
    freq0 = float((out.ids_BL[:, 0] == 0).double().mean())
    assert abs(freq0 - 0.847) < 4 * math.sqrt(0.847 * 0.153 / N)
    law = law_of(out.ids_BL, K) / N
    assert entropy(law) < entropy(joint.flatten()) - 0.05
    exact = confidence(denoise, torch.full((N, L), K), LOGLINEAR, L, g, mask_id=K, unmask_score="confidence")
    assert chi2_p(law_of(exact.ids_BL, K), joint.flatten()) > 1e-4


def test_llada_is_confidence_with_the_drawn_score_and_its_step_split() -> None:
    """The counts on the loglinear schedule are LLaDA's split (n // S per step, n mod S extra on the first steps),
    and at temperature 0 (the drawn token is the argmax) llada and confidence give the same samples."""
    for n, S in [(10, 4), (7, 7), (8, 4), (3, 5), (64, 12)]:
        counts = reveal_counts(LOGLINEAR, S, torch.tensor([n]))[:, 0].tolist()
        assert counts == [n // S + (i < n % S) for i in range(S)]
    cos = reveal_counts(get_schedule("cosine"), 6, torch.tensor([0, 5, 20]))
    assert cos.sum(0).tolist() == [0, 5, 20] and bool((cos >= 0).all())
    proc = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    model = _model(proc)
    a, b = (
        proc.sample(model, 4, L_MODEL, sampler=s, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(0))
        for s in ("llada", "confidence")
    )
    assert torch.equal(a.ids_NL, b.ids_NL)


# ------------------------------------------------------------------------------------------------ EB-sampler


@torch.no_grad()
def test_entropy_bounded_reveals_by_the_rule_and_is_exact_at_gamma_zero() -> None:
    """A symmetric joint (flipping every bit keeps it) has uniform marginals, H = log 2 at each of the three
    positions at the start, so the first step reveals 1 position for gamma < log 2, 2 for log 2 <= gamma < 2 log 2,
    all 3 above (sum H - max H); gamma = 0 reveals one per step (exact), gamma = inf all at once (the product)."""
    K, L, N = 2, 3, 20000
    digits = cells(K, L)
    agree = (digits[:, :, None] == digits[:, None, :]).sum((1, 2)).double()
    joint = torch.softmax(agree * 0.8 + torch.tensor([0.0, 0.3, 0.1, 0.4, 0.4, 0.1, 0.3, 0.0]), 0).view(K, K, K)
    denoise = exact_denoiser(joint)
    z0 = torch.full((200, L), K)
    log2 = math.log(2)
    for gamma, first in [(0.0, 1), (log2 - 1e-6, 1), (log2 + 1e-6, 2), (2 * log2 - 1e-6, 2), (2 * log2 + 1e-6, 3)]:
        out = entropy_bounded(denoise, z0, LOGLINEAR, generator=torch.Generator().manual_seed(0), mask_id=K,
                              entropy_bound=gamma, return_trajectory=True)  # fmt: skip
        assert bool(((out.trajectory_BL == 0).sum(1) == first).all())
    g = torch.Generator().manual_seed(3)
    exact = entropy_bounded(denoise, torch.full((N, L), K), LOGLINEAR, None, g, mask_id=K, entropy_bound=0.0)
    assert exact.nfe == L and chi2_p(law_of(exact.ids_BL, K), joint.flatten()) > 1e-4
    at_once = entropy_bounded(denoise, torch.full((N, L), K), LOGLINEAR, None, g, mask_id=K, entropy_bound=math.inf)
    assert at_once.nfe == 1 and chi2_p(law_of(at_once.ids_BL, K), joint.flatten()) < 1e-12


# ------------------------------------------------------------------------------------------ threshold (Fast-dLLM)


@torch.no_grad()
@pytest.mark.parametrize("score", ["confidence", "margin"])
def test_threshold_at_tau_one_reveals_one_per_call_and_is_exact(score: str) -> None:
    """No probability exceeds 1: every call reveals the single top-scored position, an adaptive order of p_theta
    alone, so the samples follow the joint (chain rule) with nfe = n and one reveal per call in every row."""
    K, L, N = 3, 3, 20000
    joint = correlated(K, L, seed=5)
    g = torch.Generator().manual_seed(4)
    out = threshold(exact_denoiser(joint), torch.full((N, L), K), LOGLINEAR, None, g, mask_id=K, unmask_score=score,
                    unmask_threshold=1.0, return_trajectory=True)  # fmt: skip
    assert out.nfe == L
    assert torch.equal(out.trajectory_BL.sort(1).values, torch.arange(L).expand(N, L))
    assert chi2_p(law_of(out.ids_BL, K), joint.flatten()) > 1e-4


@torch.no_grad()
def test_threshold_at_tau_zero_draws_the_product_of_the_first_marginals() -> None:
    """max_v p_v > 0 everywhere: one call reveals every position, each from its marginal under the joint, so the
    law is the product of the marginals (chi-square), which the joint is rejected against."""
    K, L, N = 3, 3, 20000
    joint = correlated(K, L, seed=5)
    g = torch.Generator().manual_seed(5)
    out = threshold(exact_denoiser(joint), torch.full((N, L), K), LOGLINEAR, None, g, mask_id=K,
                    unmask_threshold=0.0)  # fmt: skip
    assert out.nfe == 1
    m0, m1, m2 = joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1))
    product = torch.einsum("a,b,c->abc", m0, m1, m2).flatten()
    counts = law_of(out.ids_BL, K)
    assert chi2_p(counts, product) > 1e-4 and chi2_p(counts, joint.flatten()) < 1e-12


@torch.no_grad()
@pytest.mark.parametrize(("score", "tau"), [("confidence", 0.6), ("margin", 0.4), ("drawn", 0.6)])
def test_threshold_reveals_every_position_above_tau_else_the_top_one(score: str, tau: float) -> None:
    """A joint of K = 3, L = 5 with marginals near tau: replaying each call from the trajectory with the exact
    denoiser, the positions revealed at call c are the masked ones whose score exceeds tau, or the single
    top-scored one when none does (drawn: the revealed tokens' own p, each > tau unless revealed alone). Both
    cases occur, and 1 < nfe <= n."""
    K, L, B = 3, 5, 400
    joint = correlated(K, L, seed=7, scale=2.0)
    denoise = exact_denoiser(joint)
    out = threshold(denoise, torch.full((B, L), K), LOGLINEAR, None, torch.Generator().manual_seed(6), mask_id=K,
                    unmask_score=score, unmask_threshold=tau, return_trajectory=True)  # fmt: skip
    assert 1 < out.nfe <= L
    traj, ids = out.trajectory_BL, out.ids_BL
    seen_many = seen_fallback = False
    for c in range(out.nfe):
        masked = traj >= c
        p_BLK = denoise(torch.where(masked, K, ids), torch.ones(B, dtype=torch.float64))[..., :K].exp()
        top2 = p_BLK.topk(2, dim=-1).values
        s_BL = {"confidence": top2[..., 0], "margin": top2[..., 0] - top2[..., 1],
                "drawn": p_BLK.gather(2, ids[..., None]).squeeze(2)}[score]  # fmt: skip
        s_BL = torch.where(masked, s_BL, -1.0)
        revealed = traj == c
        alone = revealed.sum(1) == 1
        assert bool((revealed.sum(1) >= masked.any(1).long()).all())
        assert bool(((s_BL > tau) | ~revealed | alone[:, None]).all())
        if score != "drawn":  # every position above tau; the fallback is the top one
            above = masked & (s_BL > tau)
            assert torch.equal(revealed[above.any(1)], above[above.any(1)])
            lone = masked.any(1) & ~above.any(1)
            assert bool((revealed[lone].sum(1) == 1).all())
            assert torch.equal(revealed[lone].long().argmax(1), s_BL[lone].argmax(1))
        seen_many |= bool((revealed.sum(1) > 1).any())
        seen_fallback |= bool((alone & (revealed & (s_BL <= tau)).any(1)).any())
    assert seen_many and seen_fallback


def test_threshold_refuses_bad_options_before_any_call() -> None:
    denoise, calls = smooth_denoiser(5)
    for opts, match in [
        ({"unmask_threshold": -0.1}, "unmask_threshold"),
        ({"unmask_threshold": 1.5}, "unmask_threshold"),
        ({"unmask_threshold": float("nan")}, "unmask_threshold"),
        ({"unmask_score": "entropy"}, "unmask_score must be one of confidence, margin, drawn"),
    ]:
        with pytest.raises(DlmError, match=match) as info:
            threshold(denoise, torch.full((2, 4), 4), LOGLINEAR, mask_id=4, **opts)
        assert "\n" not in str(info.value)
    assert calls == []


# ------------------------------------------------------------------------ conditioning, NFE, options, families

K_MODEL, L_MODEL = 11, 8
SPECIALS = SpecialIds(bos=0, eos=1, pad=2, mask=K_MODEL, vocab_size=K_MODEL)
NEW = ("remdm", "confidence", "llada", "entropy_bounded", "threshold")


def _model(proc) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=proc.vocab_size, context=L_MODEL, n_layer=1, d_model=16, n_head=2,
                      time_cond=proc.time_conditioned)  # fmt: skip
    return build_model(cfg)


def smooth_denoiser(V: int):
    """A state- and time-dependent denoiser that counts its calls."""
    W = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    calls = []

    def denoise(z_BL: Tensor, t_B: Tensor) -> Tensor:
        calls.append(t_B.clone())
        e = torch.nn.functional.one_hot(z_BL, V).float()
        return e @ W + e.roll(1, 1) @ W.T + t_B[:, None, None].float()

    return denoise, calls


@torch.no_grad()
@pytest.mark.parametrize(
    ("sampler", "opts"),
    [
        (remdm, {"remask_strategy": "cap", "remask_eta": 1.0}),
        (remdm, {"remask_strategy": "rescale", "remask_eta": 1.0, "remask_t_on": 0.7, "remask_t_off": 0.3}),
        (remdm, {"remask_strategy": "conf"}),
        (confidence, {"unmask_score": "margin"}),
        (confidence, {"unmask_score": "drawn"}),
        (entropy_bounded, {"entropy_bound": 0.5}),
        (threshold, {"unmask_threshold": 0.4}),
        (threshold, {"unmask_score": "drawn", "unmask_threshold": 0.3}),
    ],
    ids=[
        "remdm-cap",
        "remdm-loop",
        "remdm-conf",
        "confidence",
        "llada",
        "entropy_bounded",
        "threshold",
        "threshold-drawn",
    ],
)
def test_fixed_positions_never_change_and_nfe_counts_every_call(sampler, opts: dict) -> None:
    """Prefix and infill positions (ReMDM at maximal remasking too) keep their ids, no MASK is left, the trajectory
    is -1 exactly there, and nfe is the number of denoiser calls (<= S for the step samplers)."""
    V, B, L, S = 5, 64, 12, 6
    mask = V - 1
    denoise, calls = smooth_denoiser(V)
    z0 = torch.full((B, L), mask)
    z0[:, :2] = torch.tensor([1, 2])
    z0[::2, 7] = 3  # infill in every other row
    fixed = z0 != mask
    out = sampler(denoise, z0, LOGLINEAR, S, torch.Generator().manual_seed(0), fixed, mask_id=mask,
                  return_trajectory=True, top_k=3, **opts)  # fmt: skip
    assert torch.equal(out.ids_BL[fixed], z0[fixed]) and bool((out.ids_BL != mask).all())
    assert torch.equal(out.trajectory_BL == -1, fixed)
    assert out.nfe == len(calls) and out.nfe >= 1
    if sampler not in (entropy_bounded, threshold):
        assert out.nfe <= S and int(out.trajectory_BL.max()) < S
    else:
        assert out.nfe <= L - 2
    assert all(c.shape == (B,) and c.dtype == torch.float64 for c in calls)


@torch.no_grad()
def test_remdm_remasks_and_its_trajectory_is_the_last_reveal() -> None:
    """With heavy remasking some final tokens appear after the ancestral chain would have fixed them: in every row
    the trajectory covers steps up to S - 1, and eta = 0 draws exactly ddpm's reveal-step law (its mean)."""
    V, B, L, S = 5, 400, 10, 8
    denoise, _ = smooth_denoiser(V)
    z0 = torch.full((B, L), V - 1)
    heavy = remdm(denoise, z0, LOGLINEAR, S, torch.Generator().manual_seed(0), mask_id=V - 1, remask_eta=1.0,
                  return_trajectory=True)  # fmt: skip
    none = remdm(denoise, z0, LOGLINEAR, S, torch.Generator().manual_seed(0), mask_id=V - 1, remask_eta=0.0,
                 return_trajectory=True)  # fmt: skip
    anc = ddpm(denoise, z0, LOGLINEAR, S, torch.Generator().manual_seed(0), mask_id=V - 1, return_trajectory=True)
    assert float(heavy.trajectory_BL.double().mean()) > float(none.trajectory_BL.double().mean()) + 1.0
    assert abs(float(none.trajectory_BL.double().mean()) - float(anc.trajectory_BL.double().mean())) < 0.15


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"remask_strategy": "nope"}, "remask_strategy"),
        ({"remask_eta": 1.5}, "remask_eta"),
        ({"remask_eta": True}, "remask_eta"),
        ({"remask_t_on": 0.5}, "together"),
        ({"remask_t_on": 0.2, "remask_t_off": 0.5}, "loop window"),
    ],
)
def test_bad_remdm_options_are_refused_in_one_line(opts: dict, match: str) -> None:
    proc = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    with pytest.raises(DlmError, match=match) as info:
        proc.sample(_model(proc), 1, L_MODEL, sampler="remdm", steps=4, **opts)
    assert "\n" not in str(info.value)


def test_options_of_other_samplers_and_bad_scores_are_refused() -> None:
    proc = get_process(ProcessConfig(name="mdlm"), SPECIALS)
    model = _model(proc)
    for sampler, opts, match in [
        ("confidence", {"unmask_score": "loudness"}, "unmask_score"),
        ("entropy_bounded", {"entropy_bound": -0.1}, "entropy_bound"),
        ("entropy_bounded", {"entropy_bound": float("nan")}, "entropy_bound"),
        ("threshold", {"unmask_threshold": -0.1}, "unmask_threshold"),
        ("threshold", {"unmask_threshold": 1.5}, "unmask_threshold"),
        ("threshold", {"unmask_threshold": float("nan")}, "unmask_threshold"),
        ("threshold", {"unmask_score": "entropy"}, "confidence, margin, drawn"),
        ("threshold", {"entropy_bound": 0.1}, "unknown option"),
        ("entropy_bounded", {"unmask_threshold": 0.5}, "unknown option"),
        ("confidence", {"remask_eta": 0.1}, "unknown option"),
        ("remdm", {"unmask_score": "margin"}, "unknown option"),
        ("ddpm", {"entropy_bound": 0.1}, "unknown option"),
    ]:
        with pytest.raises(DlmError, match=match) as info:
            proc.sample(model, 1, L_MODEL, sampler=sampler, steps=4, **opts)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "cfg",
    [
        ProcessConfig(name="mdlm"),
        ProcessConfig(name="d3pm", T=8),
        ProcessConfig(name="sedd"),
        ProcessConfig(name="bd3lm", block_size=4),
    ],
    ids=["mdlm", "d3pm", "sedd", "bd3lm"],
)
def test_every_absorbing_family_offers_them_with_infill_kept(cfg: ProcessConfig) -> None:
    """MDLM, D3PM-absorbing, SEDD-absorbing and BD3-LM (inside each block) list the five samplers; their ids are
    in the vocabulary; an infill position is kept; uniform-state transitions do not offer them (no MASK)."""
    proc = get_process(cfg, SPECIALS)
    assert set(NEW) <= set(proc.samplers)
    model = _model(proc)
    fixed = torch.full((L_MODEL,), -1)
    fixed[5] = 7
    for name in NEW:
        out = proc.sample(model, 3, L_MODEL, sampler=name, steps=4, fixed_ids=fixed, prompt_ids=[0],
                          generator=torch.Generator().manual_seed(0), return_trajectory=True)  # fmt: skip
        assert bool((out.ids_NL[:, 5] == 7).all()) and bool((out.ids_NL[:, 0] == 0).all())
        assert bool(((out.ids_NL >= 0) & (out.ids_NL < K_MODEL)).all()) and out.nfe >= 1
        assert bool((out.trajectory_NL[:, [0, 5]] == -1).all())
    if cfg.name in ("d3pm", "sedd"):
        uniform = get_process(ProcessConfig(name=cfg.name, T=8, transition="uniform"), SPECIALS)
        assert not set(NEW) & set(uniform.samplers)
