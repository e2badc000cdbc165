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
the number of revealed positions, not to L * V. Every reveal decision is drawn before any token: a step first
draws one float64 uniform per position (reveal iff u < a), then one inverse-CDF uniform per revealed position
(``dlm.process.sampling``). Every random number comes from the ``generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.process.sampling import _uniforms, sample_categorical, sample_from_probs
from dlm.process.schedules import Schedule

Denoiser = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "AbsorbingSample",
    "Denoiser",
    "ddpm",
    "ddpm_cache",
    "first_hitting",
    "inverse_alpha",
    "mask_tokens",
    "posterior_probs",
    "posterior_step",
    "reveal_loop",
    "reveal_probability",
    "reveal_step",
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
) -> Tensor:
    """One token per row from p_theta(x | z_t) = softmax(logits with logit_m = -inf), after temperature /
    top-k / top-p, by float64 inverse CDF (``sampling.sample_categorical``: one uniform per row; temperature 0 =
    argmax). The MASK id is never drawn."""
    logits = logits_NV.to(torch.float64, copy=True)  # the caller's (cached) logits stay untouched
    logits[:, mask_id] = float("-inf")
    if temperature == 0 or temperature != 1 or top_k is not None or top_p is not None:
        return sample_categorical(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    # Plain sampling: unnormalised weights exp(l - max l) in place (sample_from_probs normalises by the CDF's end).
    logits.sub_(logits.max(dim=-1, keepdim=True).values).exp_()
    return sample_from_probs(logits, generator)


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
) -> AbsorbingSample:
    """The reverse absorbing chain every grid sampler shares (MDLM ddpm / ddpm_cache, SEDD euler / analytic,
    D3PM-absorbing ancestral): step i = 0..S-1 (S = len(times)) runs ``reveal_step`` with
    p_theta = denoise(z, times[i]) and reveal probability a_i = reveal(i); the last step uses a = 1, so no MASK
    is left whatever the grid. Positions where ``fixed_BL`` is True keep z_init; all others start at MASK.

    lazy = False: one network call per step while a mask remains (nfe <= S).
    lazy = True:  the network is called only at steps where some position is revealed (its output is unused
                  otherwise). For a time-independent denoiser the samples are identical to lazy = False for the
                  same random stream, and nfe = the number of steps at which at least one token changed.
    The loop stops early once nothing is masked. Trajectory: the step at which each position was revealed.
    """
    S = len(times)
    _check_steps(S)
    z, _, traj = _start(z_init, fixed_BL, mask_id)
    B = z.shape[0]
    nfe = 0

    def call(z_BL: Tensor, t_B: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return denoise(z_BL, t_B)

    for i, t in enumerate(times):
        if not bool((z == mask_id).any()):
            break
        a = 1.0 if i == S - 1 else reveal(i)
        t_B = torch.full((B,), float(t), dtype=torch.float64, device=z.device)
        logits = (lambda z=z, t_B=t_B: call(z, t_B)) if lazy else call(z, t_B)
        z_new = reveal_step(logits, z, a, mask_id, generator, temperature=temperature, top_k=top_k, top_p=top_p)
        if return_trajectory and z_new is not z:
            traj[z_new != z] = i
        z = z_new
    assert not bool((z == mask_id).any()), "the final step must resolve every mask"
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)


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
) -> AbsorbingSample:
    """Ancestral sampling on the uniform grid t_i = 1 - i/S, i = 0..S (SPEC §4 ``ddpm``).

    Step i goes from t = 1 - i/S to s = 1 - (i+1)/S: each masked position is revealed with probability
    (alpha_s - alpha_t)/(1 - alpha_t), its token drawn from p_theta(x | z_t) = denoise(z_t, t) (``reveal_step``);
    the last step reveals every remaining mask (any S >= 1, also S > L). One network call per step while a
    mask remains (nfe <= S), as in the reference implementation.
    """
    times, reveal = _uniform_grid(schedule, steps)
    return reveal_loop(
        denoise, z_init, times, reveal, generator, fixed_BL, mask_id=mask_id, lazy=False,
        temperature=temperature, top_k=top_k, top_p=top_p, return_trajectory=return_trajectory,
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
) -> AbsorbingSample:
    """``ddpm`` without the network calls whose output cannot matter (Sahoo et al.'s cached sampler).

    The reference sampler reuses p_theta while no token changed since the last call. Here the reveal decisions
    of a step are drawn before the network is called, and the call is made only if some position reveals; for
    a time-independent denoiser (p_theta(x | z_t) does not depend on t) both are exact: the samples are
    identical to ``ddpm`` for the same random stream, and nfe = the number of steps at which at least one
    token changed.
    """
    times, reveal = _uniform_grid(schedule, steps)
    return reveal_loop(
        denoise, z_init, times, reveal, generator, fixed_BL, mask_id=mask_id, lazy=True,
        temperature=temperature, top_k=top_k, top_p=top_p, return_trajectory=return_trajectory,
    )  # fmt: skip


def inverse_alpha(schedule: Schedule, alpha: Tensor, iters: int = 64) -> Tensor:
    """t with alpha_t = alpha (float64, elementwise) by bisection on [0, 1]; alpha_t is non-increasing.

    Values above alpha_0 map to 0 and below alpha_1 to 1.
    """
    lo = torch.zeros_like(alpha, dtype=torch.float64)
    hi = torch.ones_like(alpha, dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > alpha  # alpha_mid still above the target: t lies later
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


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
) -> AbsorbingSample:
    """First-hitting sampler (Zheng et al. 2024): exactly one position is revealed per step, at its exact time.

    With n masked positions at time t, each independently is still masked at s < t with probability
    (1 - alpha_s)/(1 - alpha_t); the next reveal is the latest of the n reveal times, whose CDF is
    ((1 - alpha_s)/(1 - alpha_t))^n, so with u ~ U[0, 1):

        1 - alpha_s = (1 - alpha_t) u^{1/n},   s = alpha^{-1}(1 - (1 - alpha_t) u^{1/n})

    The revealed position is uniform among the masked ones (one uniform per row) and its token is drawn from
    p_theta(x | z_s) (the state is unchanged on (s, t], so the network sees z at time s). Rows run their own
    clocks; one network call per step on the whole batch, so nfe = max_b n_b (masked positions per row).
    ``steps`` is ignored (the number of steps is the number of masked positions). Each step draws three
    float64 uniforms per row, also for rows already finished, so the stream is independent of the others.
    """
    del steps
    z, _, traj = _start(z_init, fixed_BL, mask_id)
    B, L = z.shape
    device = z.device
    t_B = torch.ones(B, dtype=torch.float64, device=device)
    nfe = 0
    step = 0
    while True:
        masked_BL = z == mask_id
        n_B = masked_BL.sum(1)
        if not bool((n_B > 0).any()):
            break
        active_B = n_B > 0
        u_B = _uniforms((B,), generator, device)
        a_t = schedule.alpha(t_B)
        a_s = 1.0 - (1.0 - a_t) * u_B ** (1.0 / n_B.clamp(min=1).to(torch.float64))
        s_B = torch.where(active_B, inverse_alpha(schedule, a_s).clamp(max=t_B), t_B)
        # Position: the k-th masked one, k = floor(u n).
        k_B = torch.minimum((_uniforms((B,), generator, device) * n_B).floor().to(torch.int64), n_B - 1).clamp(min=0)
        cum_BL = masked_BL.cumsum(1)
        pos_B = torch.searchsorted(cum_BL, (k_B + 1)[:, None]).squeeze(1).clamp(max=L - 1)
        logits = denoise(z, s_B)
        nfe += 1
        rows_BV = logits[torch.arange(B, device=device), pos_B].to(torch.float64)
        rows_BV[~active_B] = 0.0  # finished rows: any valid row (their draw is discarded)
        tok_B = _draw_tokens(rows_BV, mask_id, generator, temperature, top_k, top_p)
        rows = active_B.nonzero(as_tuple=True)[0]
        z[rows, pos_B[rows]] = tok_B[rows]
        traj[rows, pos_B[rows]] = step
        t_B = s_B
        step += 1
    return AbsorbingSample(z, nfe, traj if return_trajectory else None)
