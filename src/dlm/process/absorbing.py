"""Shared machinery of every absorbing-state family (MDLM, SEDD-absorb, D3PM-absorb; later BD3-LM), SPEC §3.2 and §4.

Forward process, independently per position l (m = the MASK id):

    q(z_t^l | x^l) = Cat(alpha_t onehot(x^l) + (1 - alpha_t) onehot(m))

Reverse posterior for s < t at a masked position (an unmasked position stays as it is):

    q(z_s = x^l | z_t = m, x) = (alpha_s - alpha_t) / (1 - alpha_t)
    q(z_s = m   | z_t = m, x) = (1 - alpha_s) / (1 - alpha_t)

The samplers put p_theta(x | z_t) in place of x (x0-parameterisation):

    p_theta(z_s = v | z_t = m) = (alpha_s - alpha_t) / (1 - alpha_t) * p_theta(x = v | z_t)   (v != m)
    p_theta(z_s = m | z_t = m) = (1 - alpha_s) / (1 - alpha_t)

A *denoiser* is a callable ``denoise(z_BL, t_B) -> logits`` of shape [B, L, V] (float): the network's logits of
p_theta(x | z_t), in any normalisation (SUBS log-probabilities from ``subs_log_probs`` are fine too). Samplers read
only the rows of positions being revealed, set the MASK logit to -inf there (SUBS: the MASK id is never
predicted) and convert just those rows to float64, so the per-step cost outside the network is proportional to
the number of revealed positions, not to L * V. The grid samplers draw every position's reveal step up front
(``reveal_steps``), so the steps at which anything is revealed, and the network calls, are known before the
loop; inside it nothing is read back to the host. Every random number comes from the ``generator`` passed in.

Because the denoiser's shapes never change within a sampler call, ``reveal_loop`` and ``first_hitting`` may replay
it as a CUDA graph (``capture_denoiser``, ``dlm.model.graphs.DenoiserGraph``): by default on CUDA for a denoiser
marked ``capturable`` (pure: no Python-side effects) that the loop calls at least MIN_CAPTURE_CALLS times. Its
output is then a static buffer that the next call overwrites; the samplers copy out the rows they read
(``index_select`` / advanced indexing) before calling again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.model.graphs import DenoiserGraph, is_capturable
from dlm.process.sampling import _uniforms, sample_categorical, sample_from_probs
from dlm.process.schedules import Schedule

Denoiser = Callable[[Tensor, Tensor], Tensor]

# What ``capture=None`` means in the samplers: None = capture a ``capturable`` denoiser on CUDA when the loop calls
# it at least MIN_CAPTURE_CALLS times; True = every denoiser through ``DenoiserGraph`` (on CPU its eager path on
# static buffers); False = never. A process-wide switch (e.g. ``absorbing.CAPTURE_DENOISER = False``) for the
# samplers that families call without a ``capture`` argument.
CAPTURE_DENOISER: bool | None = None
MIN_CAPTURE_CALLS = 3  # call 1 is eager, call 2 records (about one eager launch) and replays: a gain from call 3

__all__ = [
    "AbsorbingSample",
    "Denoiser",
    "capture_denoiser",
    "ddpm",
    "ddpm_cache",
    "first_hitting",
    "mask_tokens",
    "posterior_probs",
    "posterior_step",
    "reveal_cdf",
    "reveal_loop",
    "reveal_probability",
    "reveal_step",
    "reveal_steps",
    "subs_log_probs",
]


def _per_row(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] value as a float64 [B] tensor."""
    out = torch.as_tensor(value, dtype=torch.float64, device=device)
    return out.expand(batch) if out.ndim == 0 else out.reshape(batch)


def mask_tokens(
    x_BL: Tensor,
    alpha_B: Tensor | float,
    mask_id: int,
    generator: torch.Generator | None = None,
    keep_BL: Tensor | None = None,
) -> Tensor:
    """Draw z_t ~ q(z_t | x): z^l = m with probability 1 - alpha_t, else x^l, independently per position.

        q(z_t^l | x^l) = Cat(alpha_t onehot(x^l) + (1 - alpha_t) onehot(m))

    alpha_B: a scalar, [B] (one alpha_t per row) or [B, L]. Uses one float64 uniform u per position
    (all B*L are drawn, so the stream advances alike whatever ``keep_BL``) and masks iff u < 1 - alpha_t.
    Positions where ``keep_BL`` is True (padding, conditioning) stay clean.
    """
    B, L = x_BL.shape
    alpha = torch.as_tensor(alpha_B, dtype=torch.float64, device=x_BL.device)
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    u_BL = _uniforms((B, L), generator, x_BL.device)
    masked_BL = u_BL < (1.0 - alpha)
    if keep_BL is not None:
        masked_BL &= ~keep_BL.bool()
    return torch.where(masked_BL, torch.full_like(x_BL, mask_id), x_BL)


def subs_log_probs(logits_BLV: Tensor, z_BL: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterisation (Sahoo et al. 2024): float32 log p_theta(x | z_t) of shape [B, L, V].

        masked z^l = m:     log p_theta(x^l = v | z) = log softmax(logits^l with logit_m = -inf)_v
        unmasked z^l != m:  log p_theta(x^l = v | z) = 0 if v = z^l, -inf otherwise  (copy the input)

    The MASK id is never predicted (its log-probability is -inf everywhere).
    """
    logits = logits_BLV.float()
    V = logits.shape[-1]
    col_V = torch.arange(V, device=logits.device) == mask_id
    logp = torch.log_softmax(logits.masked_fill(col_V, float("-inf")), dim=-1)
    unmasked_BL = z_BL != mask_id
    copy_BLV = torch.full_like(logp, float("-inf"))
    copy_BLV.scatter_(-1, z_BL.clamp(0, V - 1).unsqueeze(-1), 0.0)
    return torch.where(unmasked_BL.unsqueeze(-1), copy_BLV, logp)


def posterior_probs(p_x_NV: Tensor, alpha_t: Tensor | float, alpha_s: Tensor | float, mask_id: int) -> Tensor:
    """float64 p_theta(z_s | z_t = m) for N masked positions, shape [N, V] (MASK column included):

        p(z_s = v) = (alpha_s - alpha_t) / (1 - alpha_t) * p_x(v)   for v != m
        p(z_s = m) = (1 - alpha_s) / (1 - alpha_t)

    ``p_x_NV`` are probabilities (rows summing to 1, zero on m); alpha_t / alpha_s are scalars or [N].
    Each row sums to 1.
    """
    N = p_x_NV.shape[0]
    a_t = _per_row(alpha_t, N, p_x_NV.device)
    a_s = _per_row(alpha_s, N, p_x_NV.device)
    stay_N = ((1.0 - a_s) / (1.0 - a_t)).clamp(0.0, 1.0)
    out = p_x_NV.to(torch.float64) * (1.0 - stay_N)[:, None]
    out[:, mask_id] = stay_N
    return out


def _draw_tokens(
    logits_NV: Tensor,
    mask_id: int,
    generator: torch.Generator | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    u_N: Tensor | None = None,
) -> Tensor:
    """One token per row from p_theta(x | z_t) = softmax(logits with logit_m = -inf), after temperature /
    top-k / top-p, by float64 inverse CDF (``sampling.sample_categorical``: one uniform per row, from
    ``generator`` or the pre-drawn ``u_N``; temperature 0 = argmax). The MASK id is never drawn."""
    logits = logits_NV.to(torch.float64, copy=True)  # the caller's (cached) logits stay untouched
    logits[:, mask_id] = float("-inf")
    if temperature == 0 or temperature != 1 or top_k is not None or top_p is not None:
        return sample_categorical(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, u_N=u_N
        )
    # Plain sampling: unnormalised weights exp(l - max l) in place (sample_from_probs normalises by the CDF's end).
    logits.sub_(logits.max(dim=-1, keepdim=True).values).exp_()
    return sample_from_probs(logits, generator, u_N=u_N)


def reveal_step(
    logits_BLV: Tensor | Callable[[], Tensor],
    z_BL: Tensor,
    reveal_B: Tensor | float,
    mask_id: int,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """One reverse step of an absorbing chain: returns z_s. At every masked position independently

        z_s = m                          with probability 1 - a
        z_s = v ~ p_theta(x | z_t)       with probability a          (p_theta: temperature / top-k / top-p)

    where ``reveal_B`` = a (a scalar or one per row [B], in [0, 1]; a = 1 resolves every mask). Unmasked
    positions are unchanged. The reveal decision comes first, from one float64 uniform per position (B*L drawn
    whatever the state: u < a reveals), then one inverse-CDF uniform per *revealed* position draws its token,
    so the float64 work over the vocabulary runs only on the revealed rows. This is the same distribution as a
    single draw from p_theta(z_s | z_t = m) (``posterior_probs``).

    ``logits_BLV``: network logits of p_theta(x | z_t) [B, L, V] (any normalisation; only masked rows are read;
    the MASK column is ignored), or a zero-argument callable returning them, called only if some position
    reveals (the lazy network call of ``ddpm_cache``).
    """
    B, L = z_BL.shape
    a_B = _per_row(reveal_B, B, z_BL.device)
    u_BL = _uniforms((B, L), generator, z_BL.device)
    reveal_BL = (z_BL == mask_id) & (u_BL < a_B[:, None])
    if not bool(reveal_BL.any()):
        return z_BL
    logits = logits_BLV() if callable(logits_BLV) else logits_BLV
    out = z_BL.clone()
    out[reveal_BL] = _draw_tokens(logits[reveal_BL], mask_id, generator, temperature, top_k, top_p)
    return out


def reveal_probability(alpha_t: Tensor | float, alpha_s: Tensor | float) -> Tensor:
    """a = (alpha_s - alpha_t) / (1 - alpha_t), float64 clamped to [0, 1]: the probability that a position
    masked at t is revealed by s < t (SPEC §3.2); 1 when alpha_s = 1."""
    a_t = torch.as_tensor(alpha_t, dtype=torch.float64)
    a_s = torch.as_tensor(alpha_s, dtype=torch.float64)
    out = (a_s - a_t) / (1.0 - a_t)
    return torch.where(a_s >= 1.0, torch.ones_like(out), out.nan_to_num(1.0)).clamp(0.0, 1.0)


def posterior_step(
    logp_BLV: Tensor,
    z_BL: Tensor,
    alpha_t: Tensor | float,
    alpha_s: Tensor | float,
    mask_id: int,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """One ancestral step s < t (SPEC §3.2 with p_theta in place of x): returns z_s ~ p_theta(z_s | z_t).

    ``reveal_step`` with a = ``reveal_probability(alpha_t, alpha_s)``: a masked position stays masked with
    probability (1 - alpha_s)/(1 - alpha_t), else takes a token drawn from p_theta(x | z_t). alpha_s = 1
    resolves every mask. alpha_t / alpha_s: scalars or one per row [B].
    """
    return reveal_step(
        logp_BLV, z_BL, reveal_probability(alpha_t, alpha_s), mask_id, generator,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip


@dataclass
class AbsorbingSample:
    """Result of an absorbing sampler.

    ids_BL:        int64 [B, L], no MASK left.
    nfe:           number of denoiser (network) calls.
    trajectory_BL: int64 [B, L], the step at which each position was revealed (0-based), -1 for fixed
                   positions; None unless asked for.
    """

    ids_BL: Tensor
    nfe: int
    trajectory_BL: Tensor | None = None


# (denoise, z_init, schedule, steps, generator, fixed_BL, *, mask_id, temperature, top_k, top_p, return_trajectory)
AbsorbingSampler = Callable[..., AbsorbingSample]


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DlmError(f"steps must be an integer >= 1, got {steps!r}")


def _start(z_init: Tensor, fixed_BL: Tensor | None, mask_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Initial state, the fixed mask and a trajectory filled with -1 (fixed) / -2 (not yet revealed)."""
    z = z_init.clone()
    fixed = torch.zeros_like(z, dtype=torch.bool) if fixed_BL is None else fixed_BL.bool().expand_as(z)
    if bool((z[fixed] == mask_id).any()):
        raise DlmError("a fixed (conditioning) position holds the MASK id")
    z = torch.where(fixed, z, torch.full_like(z, mask_id))
    traj = torch.where(fixed, -1, -2).to(torch.int64)
    return z, fixed, traj


def capture_denoiser(denoise: Denoiser, z_BL: Tensor, t_B: Tensor, calls: int, capture: bool | None) -> Denoiser:
    """The denoiser a sampler loop calls ``calls`` times with inputs shaped like (z_BL, t_B): ``denoise`` itself,
    or a ``DenoiserGraph`` around it (static buffers; a CUDA graph replayed on CUDA, the eager forward elsewhere).

    capture: True = always wrap; False = never; None = ``CAPTURE_DENOISER`` if that is set, else wrap on CUDA a
    denoiser marked ``capturable`` when calls >= MIN_CAPTURE_CALLS. The wrapper's output is overwritten by its
    next call: the caller consumes it (copies the rows it reads) first.
    """
    if capture is None:
        capture = CAPTURE_DENOISER
    if capture is None:
        capture = z_BL.device.type == "cuda" and is_capturable(denoise) and calls >= MIN_CAPTURE_CALLS
    return DenoiserGraph(denoise, z_BL, t_B) if capture and calls > 0 else denoise


def reveal_cdf(reveal_SB: Tensor) -> Tensor:
    """The law of a position's reveal step T under per-step reveal probabilities a_0..a_{S-1} (float64 [S, B]):

        P(T > i) = prod_{j <= i} (1 - a_j),     F_i = P(T <= i) = 1 - prod_{j <= i} (1 - a_j)

    float64 [S, B], non-decreasing in i; the last step reveals everything, so F_{S-1} = 1 whatever a_{S-1}.
    """
    F_SB = 1.0 - torch.cumprod(1.0 - reveal_SB.to(torch.float64).clamp(0.0, 1.0), dim=0)
    F_SB[-1] = 1.0
    return F_SB


def reveal_steps(reveal_SB: Tensor, pending_BL: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Every pending position's reveal step, drawn up front: int64 [B, L], T^l in 0..S-1, S where not pending.

        T^l = min { i : u^l < F_i },   u^l ~ U[0, 1)   (F: ``reveal_cdf``; P(T^l = i) = F_i - F_{i-1})

    One float64 uniform per position (all B*L drawn, whatever ``pending_BL``), independent across positions.
    """
    B, L = pending_BL.shape
    F_BS = reveal_cdf(reveal_SB).T.contiguous()
    u_BL = _uniforms((B, L), generator, pending_BL.device)
    T_BL = torch.searchsorted(F_BS.to(u_BL.device), u_BL, right=True).clamp(max=F_BS.shape[1] - 1)
    return torch.where(pending_BL, T_BL, F_BS.shape[1])


def _reveal_table(reveal: Callable[[int], Tensor | float], S: int, B: int) -> Tensor:
    """a_i = reveal(i) for i < S - 1 and a_{S-1} = 1, float64 [S, B] on the CPU (a scalar or [B] per step)."""
    rows = [
        _per_row(torch.as_tensor(reveal(i), dtype=torch.float64).cpu(), B, torch.device("cpu")) for i in range(S - 1)
    ]
    return torch.stack([*rows, torch.ones(B, dtype=torch.float64)])


def reveal_loop(
    denoise: Denoiser,
    z_init: Tensor,
    times: Sequence[float],
    reveal: Callable[[int], Tensor | float],
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    mask_id: int,
    lazy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    return_trajectory: bool = False,
    capture: bool | None = None,
) -> AbsorbingSample:
    """The reverse absorbing chain every grid sampler shares (MDLM ddpm / ddpm_cache, SEDD euler / analytic,
    D3PM-absorbing ancestral), S = len(times) steps: at step i a position still masked is revealed with
    probability a_i = reveal(i) (a_{S-1} = 1, so no MASK is left whatever the grid), its token drawn from
    p_theta(x | z_{t_i}) = denoise(z, times[i]), z the state before step i. Positions where ``fixed_BL`` is True
    keep z_init; all others start at MASK.

    Reveal steps up front. a_i depends on the grid only, and each masked position's reveal decision is a coin of
    its own, independent of the tokens and of the other positions, so the reveal steps T^l are independent with

        P(T^l = i) = a_i prod_{j < i} (1 - a_j) = F_i - F_{i-1}       (``reveal_cdf``)

    and independent of the network's outputs. They are drawn first (``reveal_steps``: one uniform per position,
    T^l = min {i : u^l < F_i}); then step i draws the tokens of {l : T^l = i} from p_theta(x^l | z_{t_i}), one
    inverse-CDF uniform each, exactly as the per-step chain does given its reveal decisions. The joint law of
    (T, x), hence of the sample, is the per-step chain's, for any denoiser (time-conditioned too).

    The random stream is not the former per-step one, so ids differ from that code's for the same seed (the law
    is the same; tests/test_reveal.py checks it against the chain's closed form). That stream drew B*L uniforms
    at every step, interleaved with the token uniforms; replaying it would take all S*B*L uniforms drawn up
    front and a sequential scan over the steps (where step i's block starts depends on every earlier step's
    reveal count): S times the random numbers and the per-step work this removes. Stream now: B*L reveal
    uniforms, then all N token uniforms in one call (N = masked positions), used in the order (step, row-major
    position).

    lazy = False (``ddpm``): one network call at every step 0..max_l T^l (nfe = last reveal step + 1 <= S).
    lazy = True (``ddpm_cache``): a call only at the steps where some position is revealed (nfe = number of
    distinct T^l). Both are known before the loop (one read-back of the per-step reveal counts); the loop reads
    nothing back to the host and calls ``denoise`` with static shapes: z int64 [B, L], t float64 [B].
    For the same stream lazy and non-lazy give identical samples when the denoiser does not depend on t.
    Trajectory: T^l (-1 for fixed positions). ``capture``: replay the denoiser as a CUDA graph (``capture_denoiser``;
    the rows each step reads are copied out of its output before the next call).
    """
    S = len(times)
    _check_steps(S)
    z, fixed, _ = _start(z_init, fixed_BL, mask_id)
    B, L = z.shape
    device = z.device
    T_BL = reveal_steps(_reveal_table(reveal, S, B).to(device), ~fixed, generator)
    count_S = torch.bincount(T_BL.flatten(), minlength=S + 1)[:S].tolist()  # the one read-back
    order_N = torch.sort(T_BL.flatten(), stable=True).indices[: sum(count_S)]  # by step, row-major within a step
    u_N = _uniforms((len(order_N),), generator, device)
    t_SB = torch.tensor(times, dtype=torch.float64, device=device)[:, None].expand(S, B).contiguous()
    last = max((i for i in range(S) if count_S[i]), default=-1)
    calls = sum(1 for i in range(last + 1) if count_S[i]) if lazy else last + 1
    denoise = capture_denoiser(denoise, z, t_SB[0], calls, capture)
    nfe, start = 0, 0
    for i in range(last + 1):
        n = count_S[i]
        if lazy and n == 0:
            continue
        logits_BLV = denoise(z, t_SB[i])
        nfe += 1
        if n == 0:
            continue
        idx_n = order_N[start : start + n]
        rows_nV = logits_BLV.reshape(B * L, -1).index_select(0, idx_n)
        tok_n = _draw_tokens(rows_nV, mask_id, None, temperature, top_k, top_p, u_N=u_N[start : start + n])
        z = z.reshape(-1).index_copy(0, idx_n, tok_n).view(B, L)
        start += n
    assert start == len(order_N), "every masked position is revealed exactly once"
    traj = torch.where(fixed, -1, T_BL) if return_trajectory else None
    return AbsorbingSample(z, nfe, traj)


def _uniform_grid(schedule: Schedule, steps: int) -> tuple[list[float], Callable[[int], Tensor]]:
    """t_i = 1 - i/S and the ancestral reveal probability from t_i to t_{i+1} (``reveal_probability``)."""
    _check_steps(steps)
    times = [1.0 - i / steps for i in range(steps)]
    alpha = schedule.alpha(torch.tensor([*times, 0.0], dtype=torch.float64))
    return times, lambda i: reveal_probability(alpha[i], alpha[i + 1])


def ddpm(
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
    capture: bool | None = None,
) -> AbsorbingSample:
    """Ancestral sampling on the uniform grid t_i = 1 - i/S, i = 0..S (SPEC §4 ``ddpm``).

    Step i goes from t = 1 - i/S to s = 1 - (i+1)/S: each masked position is revealed with probability
    (alpha_s - alpha_t)/(1 - alpha_t), its token drawn from p_theta(x | z_t) = denoise(z_t, t) (``reveal_step``);
    the last step reveals every remaining mask (any S >= 1, also S > L). One network call per step up to the
    last step at which anything is revealed (nfe <= S), as in the reference implementation; the reveal steps are
    drawn up front (``reveal_loop``), so nfe is known before the first call.
    """
    times, reveal = _uniform_grid(schedule, steps)
    return reveal_loop(
        denoise, z_init, times, reveal, generator, fixed_BL, mask_id=mask_id, lazy=False,
        temperature=temperature, top_k=top_k, top_p=top_p, return_trajectory=return_trajectory, capture=capture,
    )  # fmt: skip


def ddpm_cache(
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
    capture: bool | None = None,
) -> AbsorbingSample:
    """``ddpm`` without the network calls whose output cannot matter (Sahoo et al.'s cached sampler).

    The reference sampler reuses p_theta while no token changed since the last call. Here every position's
    reveal step is drawn before the loop (``reveal_loop``), so the steps at which some position reveals, and
    nfe = their number, are known up front, and the network is called at those steps only. For a
    time-independent denoiser (p_theta(x | z_t) does not depend on t) both are exact: the samples are identical
    to ``ddpm`` for the same random stream.
    """
    times, reveal = _uniform_grid(schedule, steps)
    return reveal_loop(
        denoise, z_init, times, reveal, generator, fixed_BL, mask_id=mask_id, lazy=True,
        temperature=temperature, top_k=top_k, top_p=top_p, return_trajectory=return_trajectory, capture=capture,
    )  # fmt: skip


def first_hitting(
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
    capture: bool | None = None,
) -> AbsorbingSample:
    """First-hitting sampler (Zheng et al. 2024): exactly one position is revealed per step, at its exact time.

    With n masked positions at time t, each independently is still masked at s < t with probability
    (1 - alpha_s)/(1 - alpha_t); the next reveal is the latest of the n reveal times, whose CDF is
    ((1 - alpha_s)/(1 - alpha_t))^n, so with u ~ U[0, 1):

        1 - alpha_s = (1 - alpha_t) u^{1/n},   s = alpha^{-1}(1 - (1 - alpha_t) u^{1/n})

    The revealed position is uniform among the masked ones (one uniform per row) and its token is drawn from
    p_theta(x | z_s) (the state is unchanged on (s, t], so the network sees z at time s). Rows run their own
    clocks; one network call per step on the whole batch, so nfe = max_b n_b (masked positions per row), known
    before the loop (one read-back); a row's count at step k is n_b - k, so the loop reads nothing back and calls
    ``denoise`` with static shapes (z int64 [B, L], s float64 [B]). ``steps`` is ignored. Each step uses three
    float64 uniforms per row (u, the position, the token), also for finished rows; all are drawn in one call of
    [nfe, 3, B] before the loop, which on a CPU generator is the same stream as three draws of B per step.
    ``capture``: replay the denoiser as a CUDA graph (``capture_denoiser``; each step copies its B rows out first).
    """
    del steps
    z, _, traj = _start(z_init, fixed_BL, mask_id)
    B, L = z.shape
    device = z.device
    rows_B = torch.arange(B, device=device)
    n0_B = (z == mask_id).sum(1)
    nfe = int(n0_B.max()) if B > 0 else 0  # the one read-back
    u_K3B = _uniforms((nfe, 3, B), generator, device)
    t_B = torch.ones(B, dtype=torch.float64, device=device)
    denoise = capture_denoiser(denoise, z, t_B, nfe, capture)
    for k in range(nfe):
        u_B, v_B, w_B = u_K3B[k]
        n_B = n0_B - k
        active_B = n_B > 0
        a_t = schedule.alpha(t_B)
        a_s = 1.0 - (1.0 - a_t) * u_B ** (1.0 / n_B.clamp(min=1).to(torch.float64))
        s_B = torch.where(active_B, schedule.t_of_alpha(a_s).clamp(max=t_B), t_B)
        # Position: the j-th masked one, j = floor(v n).
        j_B = torch.minimum((v_B * n_B).floor().to(torch.int64), n_B - 1).clamp(min=0)
        cum_BL = (z == mask_id).cumsum(1)
        pos_B = torch.searchsorted(cum_BL, (j_B + 1)[:, None]).squeeze(1).clamp(max=L - 1)
        logits = denoise(z, s_B)
        rows_BV = logits[rows_B, pos_B].to(torch.float64)
        rows_BV = torch.where(active_B[:, None], rows_BV, 0.0)  # finished rows: any valid row (draw discarded)
        tok_B = _draw_tokens(rows_BV, mask_id, None, temperature, top_k, top_p, u_N=w_B)
        z = z.scatter(1, pos_B[:, None], torch.where(active_B, tok_B, z[rows_B, pos_B])[:, None])
        traj = traj.scatter(1, pos_B[:, None], torch.where(active_B, k, traj[rows_B, pos_B])[:, None])
        t_B = s_B
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)
