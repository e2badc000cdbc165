"""Remasking and ordered unmasking for every absorbing family (issue 16): samplers beyond the seed papers.

All share the interface of ``dlm.process.absorbing`` (``denoise(z_BL, t_B) -> logits``, a start z_init whose
``fixed_BL`` positions are kept, every other position starting at MASK m) and return an ``AbsorbingSample``.
p_theta(x^l | z) below is softmax(logits^l) with the MASK logit at -inf (SUBS), read only at masked rows. Like
``reveal_loop``, each wraps ``denoise`` with ``absorbing.capture_denoiser`` (``capture``: a CUDA graph replayed on
CUDA for a denoiser marked capturable; eager and identical elsewhere); each call's output is read before the next.

remdm (Wang et al. 2025, ReMDM). On the grid t_i = 1 - i/S, step i goes from t = t_i to s = t_{i+1} with the
remasking posterior, which keeps the forward marginals q(z_t | x) of every position for any sigma_t:

    z_t^l != m:   z_s^l = m with probability sigma_t, else z_s^l = z_t^l
    z_t^l  = m:   z_s^l = x^l with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), else m,
                  x^l ~ p_theta(x^l | z_t)
    0 <= sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t)

with the strategies (``remask_strategy``; eta = ``remask_eta``) cap: sigma_t = min(eta, sigma_max); rescale:
sigma_t = eta sigma_max; conf: sigma_t^l = eta_conf^l sigma_max, eta_conf^l = exp(-psi^l) / sum_{l'} exp(-psi^l')
over the free unmasked positions, psi^l = p_theta of the token of l when it was decoded (masked positions take
sigma = 0: the MDLM posterior). sigma_max = 0 on the last step (alpha_s = 1), so it reveals every mask.
Loop (``remask_t_on`` > ``remask_t_off``): alpha is reparametrised as alpha~(t) = alpha(t) for t >= t_on,
alpha(t_on) on [t_off, t_on), alpha(t t_on / t_off) below t_off, and sigma_t = 0 outside t_off < t_i <= t_on: MDLM
down to alpha(t_on), then a loop of remask-and-predict at a constant masked fraction, then MDLM to the end. The
network sees the time whose alpha is alpha~(t_i).
Exactness: the marginals are kept, for any sigma and S, when x is drawn from the joint p(x | z_t) (the paper's
claim). The sampler draws each revealed position from its own conditional, so a step that reveals two positions
draws their product. Ancestral sampling (sigma = 0) reveals O(1/S) positions per step and converges as 1/S. A fixed
eta > 0 remasks, and so reveals, O(1) tokens per step at any S: every noise level runs many corrector rounds whose
parallel reveals bias them; near t = 0 a step rarely holds two masks, so the law still converges, but slowly (on
the tiny joints of tests/test_unmasking.py, eta = 0.5 at S = 128 is > 5x further from the joint in TV than
ancestral sampling).

confidence (MaskGIT / LLaDA ordered unmasking, several tokens per step). Step i reveals k_i^b positions of row b,
chosen as the masked ones of highest score under p_theta(. | z) (``unmask_score``; temperature 1, no filters):
confidence max_v p_v, margin p_(1) - p_(2), entropy -H(p), or drawn p_{x^l} of the token x^l drawn at l (LLaDA's
low-confidence remasking: every masked position is drawn, the k most confident draws are kept, the rest remasked).
Ties go to the lowest position. Counts from the schedule: with F_i = (alpha(t_{i+1}) - alpha(1)) / (1 - alpha(1))
(the expected revealed fraction of ancestral sampling, F_{S-1} = 1) and n_b free positions,

    k_i^b = floor(n_b (F_i - F_{i-1})) + [i < r_b],   r_b = n_b - sum_i floor(n_b (F_i - F_{i-1}))

so every position is revealed after S steps. On the linear / loglinear schedule this is LLaDA's split (n mod S
extra tokens on the first steps), so ``llada`` = ``confidence`` with unmask_score drawn (an alias). Tokens are
drawn from p_theta after temperature / top-k / top-p. One network call per step with k_i > 0 (nfe <= S).
Exactness: a score of p_theta alone (confidence, margin, entropy) picks the order from the current state only, and
any such adaptive order with one position per step (S >= n) draws the exact joint by the chain rule; drawn picks
by the value drawn, which favours likely tokens (lower entropy than p) even at one position per step; several
positions per step draw them independently (the product of their conditionals).

entropy_bounded (Ben-Hamu et al. 2025, EB-sampler). Each step orders the masked positions by the score and reveals
the longest prefix U with sum_{l in U} H(p^l) - max_{l in U} H(p^l) <= gamma (``entropy_bound``), at least one,
which bounds the KL of the product of conditionals to the joint of U. Calls until no mask is left (nfe <= n).

threshold (Wu et al. 2025, Fast-dLLM's confidence-aware parallel decoding). Each call scores the masked positions
with a probability-valued ``unmask_score`` s (confidence, margin or drawn; entropy is refused) and reveals, per row,

    U = {l masked : s^l > tau}   if that set is not empty, else {argmax_l s^l}       (tau = ``unmask_threshold``)

tokens drawn from p_theta after temperature / top-k / top-p (drawn: the score is the p of those draws, what
Fast-dLLM's code does at temperature > 0). Calls until no mask is left (nfe <= n; ``steps`` is ignored); the loop
is entropy_bounded's, with another rule. Exactness: tau >= every reachable score (tau = 1: no probability exceeds
1) reveals one position per call in score order, exact by the chain rule for a score of p_theta alone (as
confidence with one position per step); tau = 0 with confidence reveals every masked position at the first call
(max_v p_v > 0): the product of that call's marginals, biased; in between, the positions revealed together are
drawn independently (the product of their conditionals), biased wherever they depend on each other. Fast-dLLM's
Theorem 1 is about greedy decoding only (with every revealed marginal's top probability close enough to 1, the
argmax of the product of marginals is the joint's argmax); nothing is claimed here for sampling.

The network's time input for the ordered samplers is the time whose masked fraction matches the state's:
alpha(t) = 1 - (m_b / n_b) (1 - alpha(1)) (m_b masks left of n_b free positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.process.absorbing import (
    AbsorbingSample,
    AbsorbingSampler,
    Denoiser,
    _check_steps,
    _draw_tokens,
    _start,
    capture_denoiser,
)
from dlm.process.base import SampleResult, SamplerFn, SamplerOptions, SamplerSpec, SampleStart, full_length_result
from dlm.process.sampling import _uniforms
from dlm.process.schedules import Schedule

REMASK_STRATEGIES = ("cap", "rescale", "conf")
UNMASK_SCORES = ("confidence", "margin", "entropy", "drawn")
REMDM_OPTIONS = ("remask_strategy", "remask_eta", "remask_t_on", "remask_t_off")
CONFIDENCE_OPTIONS = ("unmask_score",)
ENTROPY_BOUNDED_OPTIONS = ("unmask_score", "entropy_bound")
THRESHOLD_SCORES = ("confidence", "margin", "drawn")  # the probability-valued scores
THRESHOLD_OPTIONS = ("unmask_score", "unmask_threshold")

__all__ = [
    "REMASK_STRATEGIES",
    "THRESHOLD_SCORES",
    "UNMASK_SCORES",
    "check_options",
    "check_threshold_options",
    "confidence",
    "entropy_bounded",
    "family_sampler",
    "remdm",
    "remdm_table",
    "reveal_counts",
    "sampler_specs",
    "threshold",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def check_options(o: SamplerOptions) -> None:
    """The options of this module's samplers; a bad one raises a one-line ``DlmError`` (before any network call)."""
    if o.remask_strategy not in REMASK_STRATEGIES:
        raise DlmError(f"remask_strategy must be one of {', '.join(REMASK_STRATEGIES)}, got {o.remask_strategy!r}")
    if not _is_number(o.remask_eta) or not 0 <= o.remask_eta <= 1:
        raise DlmError(f"remask_eta must be a number in [0, 1], got {o.remask_eta!r}")
    on, off = o.remask_t_on, o.remask_t_off
    if (on is None) != (off is None):
        raise DlmError("remask_t_on and remask_t_off (the ReMDM loop window) must be given together")
    if on is not None and not (_is_number(on) and _is_number(off) and 1 >= on > off >= 0):
        raise DlmError(f"the ReMDM loop window needs 1 >= remask_t_on > remask_t_off >= 0, got {on!r}, {off!r}")
    if o.unmask_score not in UNMASK_SCORES:
        raise DlmError(f"unmask_score must be one of {', '.join(UNMASK_SCORES)}, got {o.unmask_score!r}")
    if not _is_number(o.entropy_bound) or o.entropy_bound < 0:
        raise DlmError(f"entropy_bound (gamma, nats) must be a number >= 0, got {o.entropy_bound!r}")
    if not _is_number(o.unmask_threshold) or not 0 <= o.unmask_threshold <= 1:
        raise DlmError(f"unmask_threshold (tau) must be a number in [0, 1], got {o.unmask_threshold!r}")


def check_threshold_options(o: SamplerOptions) -> None:
    """``check_options`` and, for ``threshold``, a probability-valued score (one-line ``DlmError`` otherwise)."""
    check_options(o)
    if o.unmask_score not in THRESHOLD_SCORES:
        raise DlmError(f"threshold compares a probability with tau: unmask_score must be one of "
                       f"{', '.join(THRESHOLD_SCORES)}, got {o.unmask_score!r}")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- helpers


def _log_probs(logits_NV: Tensor, mask_id: int) -> Tensor:
    """float64 log p_theta(x | z) of N rows: log softmax with the MASK logit at -inf."""
    rows = logits_NV.to(torch.float64, copy=True)
    rows[:, mask_id] = float("-inf")
    return torch.log_softmax(rows, dim=-1)


def _scores(logp_NV: Tensor, score: str, tok_N: Tensor | None) -> Tensor:
    """float64 [N], higher = revealed earlier: max p, p_(1) - p_(2), -H(p) or p of the drawn token."""
    if score == "drawn":
        assert tok_N is not None
        return logp_NV.gather(1, tok_N[:, None]).squeeze(1).exp()
    if score == "confidence":
        return logp_NV.max(dim=-1).values.exp()
    if score == "margin":
        top_N2 = logp_NV.topk(2, dim=-1).values.exp()
        return top_N2[:, 0] - top_N2[:, 1]
    return -_entropy(logp_NV)


def _entropy(logp_NV: Tensor) -> Tensor:
    """H(p) = -sum_v p_v log p_v in nats, float64 [N] (0 log 0 = 0)."""
    return torch.special.entr(logp_NV.exp()).sum(-1)


def _state_time(schedule: Schedule, masked_B: Tensor, free_B: Tensor) -> Tensor:
    """float64 [B]: t with alpha(t) = 1 - (m / n)(1 - alpha(1)), m masks left of n free positions per row."""
    frac = masked_B.to(torch.float64) / free_B.clamp(min=1).to(torch.float64)
    a1 = schedule.alpha(torch.ones((), dtype=torch.float64))
    return schedule.t_of_alpha(1.0 - frac * (1.0 - a1)).to(masked_B.device)


def _ranks(score_BL: Tensor) -> Tensor:
    """int64 [B, L]: the rank of each position by decreasing score (ties: lowest position first)."""
    order_BL = torch.sort(score_BL, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order_BL)
    ranks.scatter_(1, order_BL, torch.arange(score_BL.shape[1], device=score_BL.device).expand_as(order_BL))
    return ranks


# --------------------------------------------------------------------------------------------------------- remdm


def remdm_table(
    schedule: Schedule,
    steps: int,
    strategy: str = "cap",
    eta: float = 0.02,
    t_on: float | None = None,
    t_off: float | None = None,
) -> dict[str, Tensor]:
    """ReMDM's per-step quantities on t_i = 1 - i/S (module docstring), float64 [S] each: ``alpha_t``, ``alpha_s``
    (alpha~ of the loop when a window is given; alpha_s = 1 on the last step), ``sigma`` (the strategy's sigma_t;
    conf: sigma_max, spread per position by the sampler), ``reveal`` (a masked position's reveal probability,
    (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t); conf: sigma = 0 there) and ``t_net`` (the network's time)."""
    _check_steps(steps)
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if t_on is None or t_off is None:
        t_net, active = t, torch.ones(steps + 1, dtype=torch.bool)
    else:
        below = t * (t_on / t_off) if t_off > 0 else torch.zeros_like(t)
        t_net = torch.where(t >= t_on, t, torch.where(t >= t_off, torch.full_like(t, t_on), below))
        active = (t > t_off) & (t <= t_on)
    alpha = schedule.alpha(t_net).to(torch.float64)
    a_t, a_s = alpha[:-1], alpha[1:].clone()
    a_s[-1] = 1.0
    sigma_max = torch.where(a_t > 0, (1.0 - a_s) / a_t.clamp(min=1e-300), torch.ones_like(a_t)).clamp(0.0, 1.0)
    sigma = {"cap": sigma_max.clamp(max=eta), "rescale": eta * sigma_max, "conf": sigma_max}[strategy]
    sigma = torch.where(active[:-1], sigma, torch.zeros_like(sigma))
    masked_sigma = torch.zeros_like(sigma) if strategy == "conf" else sigma
    reveal = ((a_s - (1.0 - masked_sigma) * a_t) / (1.0 - a_t)).nan_to_num(1.0).clamp(0.0, 1.0)
    reveal[-1] = 1.0
    return {"alpha_t": a_t, "alpha_s": a_s, "sigma": sigma, "reveal": reveal, "t_net": t_net[:-1]}


def remdm(
    denoise: Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
    remask_strategy: str = "cap",
    remask_eta: float = 0.02,
    remask_t_on: float | None = None,
    remask_t_off: float | None = None,
    capture: bool | None = None,
) -> AbsorbingSample:
    """ReMDM remasking sampler, S = ``steps`` steps (module docstring; ``remdm_table`` holds the per-step numbers).

    Step i draws one float64 uniform u^l per position (B*L, whatever the state): a free unmasked position is
    remasked iff u^l < sigma^l, a masked one revealed iff u^l < reveal_i, both decided on z_t; then one inverse-CDF
    uniform per revealed position draws its token from p_theta(x | z_t) (temperature / top-k / top-p). Fixed
    positions are never remasked. The network is called only at the steps where some position reveals (an output
    nobody reads is not computed; nfe <= S). Trajectory: the step at which each position's final token appeared
    (its last reveal), -1 for fixed positions.
    """
    check_options(SamplerOptions(remask_strategy=remask_strategy, remask_eta=remask_eta,
                                 remask_t_on=remask_t_on, remask_t_off=remask_t_off))  # fmt: skip
    table = remdm_table(schedule, steps, remask_strategy, remask_eta, remask_t_on, remask_t_off)
    z, fixed, traj = _start(z_init, fixed_BL, mask_id)
    B, L = z.shape
    device = z.device
    sigma_S, reveal_S = table["sigma"].tolist(), table["reveal"].tolist()
    t_SB = table["t_net"].to(device)[:, None].expand(steps, B).contiguous()
    denoise = capture_denoiser(denoise, z, t_SB[0], steps, capture)  # a CUDA graph on CUDA (absorbing)
    psi_BL = torch.zeros(B, L, dtype=torch.float64, device=device)  # p_theta of each token when decoded (conf)
    nfe = 0
    for i in range(steps):
        u_BL = _uniforms((B, L), generator, device)
        masked_BL = z == mask_id
        unmasked_BL = ~masked_BL & ~fixed
        if remask_strategy == "conf":
            w_BL = torch.where(unmasked_BL, torch.exp(-psi_BL), 0.0)
            sigma_BL = sigma_S[i] * w_BL / w_BL.sum(1, keepdim=True).clamp(min=1e-300)
        else:
            sigma_BL = torch.full((B, L), sigma_S[i], dtype=torch.float64, device=device)
        remask_BL = unmasked_BL & (u_BL < sigma_BL)
        reveal_BL = masked_BL & (u_BL < reveal_S[i])
        if bool(reveal_BL.any()):
            logits_BLV = denoise(z, t_SB[i])
            nfe += 1
            rows_NV = logits_BLV[reveal_BL]
            tok_N = _draw_tokens(rows_NV, mask_id, generator, temperature, top_k, top_p)
            if remask_strategy == "conf":
                psi_BL[reveal_BL] = _log_probs(rows_NV, mask_id).gather(1, tok_N[:, None]).squeeze(1).exp()
            z = z.clone()
            z[reveal_BL] = tok_N
            traj = torch.where(reveal_BL, i, traj)
        z = torch.where(remask_BL, mask_id, z)
    assert not bool((z == mask_id).any()), "the last step reveals every mask"
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)


# ---------------------------------------------------------------------------------------------------- confidence


def reveal_counts(schedule: Schedule, steps: int, free_B: Tensor) -> Tensor:
    """int64 [S, B]: k_i^b, the positions row b reveals at step i (module docstring), summing to n_b = free_B."""
    _check_steps(steps)
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    alpha = schedule.alpha(t).to(torch.float64).cpu()
    F_S = ((alpha[1:] - alpha[0]) / (1.0 - alpha[0])).clamp(0.0, 1.0)
    F_S[-1] = 1.0
    dF_S = torch.diff(F_S, prepend=torch.zeros(1, dtype=torch.float64)).clamp(min=0.0)
    n_B = free_B.to(torch.float64).cpu()
    base_SB = torch.floor(n_B[None] * dF_S[:, None] + 1e-9).to(torch.int64)
    rest_B = free_B.cpu().to(torch.int64) - base_SB.sum(0)
    assert bool((rest_B >= 0).all()) and bool((rest_B <= steps).all())
    counts = base_SB + (torch.arange(steps)[:, None] < rest_B[None]).to(torch.int64)
    return counts.to(free_B.device)


def confidence(
    denoise: Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
    unmask_score: str = "confidence",
    capture: bool | None = None,
) -> AbsorbingSample:
    """Ordered unmasking with k_i^b positions per step (``reveal_counts``), the most confident first (module
    docstring). Per call: the float64 log p_theta of every masked row; the score; the top k_i^b per row; one
    inverse-CDF uniform per revealed position (drawn: per masked position, all drawn before the choice). The
    counts are known up front (one read-back), so the network runs only at steps that reveal something.
    Trajectory: the step of each reveal, -1 for fixed positions.
    """
    check_options(SamplerOptions(unmask_score=unmask_score))
    z, fixed, traj = _start(z_init, fixed_BL, mask_id)
    free_B = (~fixed).sum(1)
    k_SB = reveal_counts(schedule, steps, free_B)
    active_S = (k_SB.sum(1) > 0).tolist()  # the one read-back
    t_B = _state_time(schedule, (z == mask_id).sum(1), free_B)
    denoise = capture_denoiser(denoise, z, t_B, sum(active_S), capture)  # a CUDA graph on CUDA (absorbing)
    nfe = 0
    for i in range(steps):
        if not active_S[i]:
            continue
        masked_BL = z == mask_id
        logits_BLV = denoise(z, _state_time(schedule, masked_BL.sum(1), free_B))
        nfe += 1
        pick_BL, tok_N = _choose(logits_BLV, masked_BL, k_SB[i], unmask_score, mask_id, generator,
                                 (temperature, top_k, top_p))  # fmt: skip
        z = z.clone()
        z[pick_BL] = tok_N
        traj = torch.where(pick_BL, i, traj)
    assert not bool((z == mask_id).any()), "the counts sum to the free positions"
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)


# (score_BL, entropy_BL, masked_BL), each in score order per row -> the length of the prefix to reveal, int64 [B]
# (``_choose`` raises it to at least one in every row that has a mask)
Rule = Callable[[Tensor, Tensor, Tensor], Tensor]


def _choose(
    logits_BLV: Tensor,
    masked_BL: Tensor,
    k_B: Tensor | Rule,
    score: str,
    mask_id: int,
    generator: torch.Generator | None,
    filters: tuple[float, int | None, float | None],
) -> tuple[Tensor, Tensor]:
    """The positions to reveal (bool [B, L]: the k_b masked ones of highest score per row) and their tokens
    (row-major). ``k_B``: counts, or a ``Rule``: a function of the scores (-inf at unmasked positions), the
    entropies of p_theta and the mask, all in score order -> the length of the prefix to reveal per row (the EB and
    threshold rules)."""
    rows_MV = logits_BLV[masked_BL]
    logp_MV = _log_probs(rows_MV, mask_id)
    tok_M = _draw_tokens(rows_MV, mask_id, generator, *filters) if score == "drawn" else None
    score_BL = torch.full(masked_BL.shape, float("-inf"), dtype=torch.float64, device=masked_BL.device)
    score_BL[masked_BL] = _scores(logp_MV, score, tok_M)
    ranks_BL = _ranks(score_BL)
    if callable(k_B):
        H_BL = torch.zeros_like(score_BL)
        H_BL[masked_BL] = _entropy(logp_MV)
        order_BL = torch.argsort(ranks_BL, dim=1)
        masked_sorted_BL = masked_BL.gather(1, order_BL)
        k_B = k_B(score_BL.gather(1, order_BL), H_BL.gather(1, order_BL), masked_sorted_BL)
        k_B = torch.where(masked_sorted_BL.any(1), k_B.clamp(min=1), 0)  # at least one per row with a mask
    pick_BL = masked_BL & (ranks_BL < k_B[:, None])
    if tok_M is not None:
        return pick_BL, tok_M[pick_BL[masked_BL]]
    return pick_BL, _draw_tokens(logits_BLV[pick_BL], mask_id, generator, *filters)


def _adaptive(
    denoise: Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    generator: torch.Generator | None,
    fixed_BL: Tensor | None,
    rule: Rule,
    score: str,
    *,
    mask_id: int,
    filters: tuple[float, int | None, float | None],
    return_trajectory: bool,
    capture: bool | None,
) -> AbsorbingSample:
    """The loop of the adaptive samplers (entropy_bounded, threshold): per call, ``_choose`` with ``rule`` (at
    least one position per row with a mask), until no mask is left: nfe = the largest number of calls any row
    needs (<= its free positions; one read-back per call). Trajectory: the call of each reveal, -1 if fixed."""
    z, fixed, traj = _start(z_init, fixed_BL, mask_id)
    free_B = (~fixed).sum(1)
    calls = int(free_B.max()) if free_B.numel() else 0  # at most one call per free position
    t_B = _state_time(schedule, (z == mask_id).sum(1), free_B)
    denoise = capture_denoiser(denoise, z, t_B, calls, capture)  # a CUDA graph on CUDA (absorbing)
    nfe = 0
    while True:
        masked_BL = z == mask_id
        if not bool(masked_BL.any()):
            break
        logits_BLV = denoise(z, _state_time(schedule, masked_BL.sum(1), free_B))
        pick_BL, tok_N = _choose(logits_BLV, masked_BL, rule, score, mask_id, generator, filters)
        z = z.clone()
        z[pick_BL] = tok_N
        traj = torch.where(pick_BL, nfe, traj)
        nfe += 1
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)


# ----------------------------------------------------------------------------------------------- entropy_bounded


def _eb_counts(gamma: float) -> Rule:
    """The EB rule on positions sorted by score: the longest prefix with cumsum H - cummax H <= gamma (this is
    non-decreasing along the prefix); ``_choose`` makes it at least one."""

    def counts(score_BL: Tensor, H_BL: Tensor, masked_BL: Tensor) -> Tensor:
        del score_BL
        excess_BL = torch.cumsum(H_BL, 1) - torch.cummax(H_BL, 1).values
        return ((excess_BL <= gamma) & masked_BL).sum(1)

    return counts


def entropy_bounded(
    denoise: Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
    unmask_score: str = "entropy",
    entropy_bound: float = 0.1,
    capture: bool | None = None,
) -> AbsorbingSample:
    """EB-sampler (module docstring): each call reveals, per row, the longest prefix of the masked positions in
    score order whose entropies satisfy sum H - max H <= gamma = ``entropy_bound`` (entropies of p_theta itself,
    temperature 1), at least one; tokens drawn after the filters. Calls until no mask is left: nfe = the largest
    number of steps any row needs (<= its free positions; one read-back per step). ``steps`` is ignored.
    Trajectory: the step of each reveal, -1 for fixed positions.
    """
    del steps
    check_options(SamplerOptions(unmask_score=unmask_score, entropy_bound=entropy_bound))
    return _adaptive(denoise, z_init, schedule, generator, fixed_BL, _eb_counts(float(entropy_bound)), unmask_score,
                     mask_id=mask_id, filters=(temperature, top_k, top_p), return_trajectory=return_trajectory,
                     capture=capture)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- threshold


def _threshold_counts(tau: float) -> Rule:
    """Fast-dLLM's rule on positions sorted by score: every masked position with score > tau (a prefix); ``_choose``
    makes it at least one (the top position)."""

    def counts(score_BL: Tensor, H_BL: Tensor, masked_BL: Tensor) -> Tensor:
        del H_BL
        return ((score_BL > tau) & masked_BL).sum(1)

    return counts


def threshold(
    denoise: Denoiser,
    z_init: Tensor,
    schedule: Schedule,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
    unmask_score: str = "confidence",
    unmask_threshold: float = 0.9,
    capture: bool | None = None,
) -> AbsorbingSample:
    """Fast-dLLM's threshold decoding (module docstring): each call reveals, per row, every masked position whose
    score (confidence, margin or drawn, of p_theta at temperature 1) exceeds tau = ``unmask_threshold``, or the
    single highest-scored one when none does; tokens drawn after the filters. Calls until no mask is left: nfe =
    the largest number of calls any row needs (<= its free positions). ``steps`` is ignored. Trajectory: the call
    of each reveal, -1 for fixed positions.
    """
    del steps
    check_threshold_options(SamplerOptions(unmask_score=unmask_score, unmask_threshold=unmask_threshold))
    rule = _threshold_counts(float(unmask_threshold))
    return _adaptive(denoise, z_init, schedule, generator, fixed_BL, rule, unmask_score, mask_id=mask_id,
                     filters=(temperature, top_k, top_p), return_trajectory=return_trajectory,
                     capture=capture)  # fmt: skip


# -------------------------------------------------------------------------------------------- the families' tables

# wrap(sampler, option names it reads, whether it spreads ``steps``) -> the family's ``SamplerFn``
Wrap = Callable[[AbsorbingSampler, tuple[str, ...], bool], SamplerFn]


def family_sampler(fn: AbsorbingSampler, names: tuple[str, ...] = (), uses_steps: bool = True) -> SamplerFn:
    """The ``Wrap`` of the whole-row absorbing families (MDLM, SEDD-absorbing, D3PM-absorbing): ``fn`` run from
    ``process.transition.start`` (all-MASK, fixed positions kept) on ``process.denoiser(model)`` and
    ``process.schedule`` (D3PM: alpha(t) on the sampler's own grid, its table's values when S divides T), MASK =
    ``specials.mask``; ``names``: the further ``SamplerOptions`` ``fn`` reads, passed as keywords of the same names.
    ``uses_steps`` is not needed: the whole row is one block."""
    del uses_steps

    def run(
        process: Any, model: torch.nn.Module, start: SampleStart, o: SamplerOptions, gen: torch.Generator | None
    ) -> SampleResult:
        assert o.steps is not None, "the dispatcher resolves the steps"
        out = fn(
            process.denoiser(model), process.transition.start(start.fixed_NL), process.schedule, o.steps, gen,
            start.fixed_NL >= 0, mask_id=process.specials.mask, temperature=o.temperature, top_k=o.top_k,
            top_p=o.top_p, return_trajectory=o.return_trajectory, **{name: getattr(o, name) for name in names},
        )  # fmt: skip
        return full_length_result(out.ids_BL, out.nfe, start.prompt_len, out.trajectory_BL)

    return run


def sampler_specs(
    wrap: Wrap, extra: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None
) -> dict[str, SamplerSpec]:
    """``remdm``, ``confidence``, ``llada`` (``confidence`` with unmask_score drawn), ``entropy_bounded`` and
    ``threshold`` as the ``SamplerSpec``s of an absorbing family whose ``wrap`` runs an absorbing sampler on its
    denoiser and schedule; ``extra`` / ``defaults``: the family's own further options and their defaults (BD3-LM)."""
    defaults = dict(defaults or {})
    run_confidence = wrap(confidence, CONFIDENCE_OPTIONS, True)

    def spec(run: SamplerFn, names: tuple[str, ...], **kw: Any) -> SamplerSpec:
        own = kw.pop("option_defaults", {})
        check = kw.pop("check", check_options)
        return SamplerSpec(run, extra_options=names + extra, option_defaults={**defaults, **own},
                           check=check, **kw)  # fmt: skip

    return {
        "remdm": spec(wrap(remdm, REMDM_OPTIONS, True), REMDM_OPTIONS),
        "confidence": spec(run_confidence, CONFIDENCE_OPTIONS),
        "llada": spec(run_confidence, CONFIDENCE_OPTIONS, option_defaults={"unmask_score": "drawn"}),
        "entropy_bounded": spec(
            wrap(entropy_bounded, ENTROPY_BOUNDED_OPTIONS, False),
            ENTROPY_BOUNDED_OPTIONS,
            nfe_within_steps=False,
            steps_ignored=True,
            option_defaults={"unmask_score": "entropy"},
        ),
        "threshold": spec(
            wrap(threshold, THRESHOLD_OPTIONS, False),
            THRESHOLD_OPTIONS,
            nfe_within_steps=False,
            steps_ignored=True,
            option_defaults={"unmask_score": "confidence"},
            check=check_threshold_options,
        ),
    }
