"""Shared machinery of uniform-state (non-absorbing) diffusion: SEDD-uniform and D3PM-uniform (SPEC §3.3, §3.5, §4).

Forward process, independently per position over the K tokens (alpha_t = e^{-sigma_t}, Q = (1/K) 11^T - I):

    p_{t|0}(y | x) = [exp(sigma_t Q)](y, x) = alpha_t 1{y = x} + (1 - alpha_t) / K
    exp(c Q)       = e^{-c} I + (1 - e^{-c}) (1/K) 11^T        (Q is symmetric, so rows and columns agree)

and between s < t, p_{t|s} = exp((sigma_t - sigma_s) Q) with e^{-(sigma_t - sigma_s)} = alpha_t / alpha_s =: beta.
No K x K matrix is ever built: every per-position quantity below is O(K).

Two kinds of network output, [B, L, >= K] (columns from K on are ignored):

    score (SEDD):      log_score(z_BL, t_B) = log s_theta(z_t)_{l,y} ≈ log p_t(z^{l <- y}) / p_t(z); the entry
                       y = z^l is ignored (taken as s_{z^l} = 1, the true ratio, wherever it is used).
    x0 logits (D3PM):  denoise(z_BL, t_B) = logits of p_theta(x^l | z_t).

Tweedie x0 estimate from a score, per position with z = z_t^l and S = sum_y s_y (SEDD's "analytic" denoiser):

    p_hat(x0 = x | z_t) ∝ [exp(-sigma_t Q) s]_x exp(sigma_t Q)(z, x)
                        ∝ max(0, s_x - (1 - alpha_t) S / K) (alpha_t 1{x = z} + (1 - alpha_t) / K)

exact for the true score (p_0 = exp(-sigma_t Q) p_t and Bayes). The inverse map is the denoising-score identity

    s_y = sum_x p(x0 = x | z_t) p_{t|0}(y | x) / p_{t|0}(z | x) = alpha_t w_y + (1 - alpha_t) / K W,
    w_x = p(x0 = x | z_t) / (alpha_t 1{x = z} + (1 - alpha_t) / K),  W = sum_x w_x;

the two maps are inverse to each other when nothing is clamped (true scores never are).

Temperature / top-k / top-p, the same for all three samplers: they act on the per-position clean-token posterior
p(x0^l | z_t) -- the network's p_theta for D3PM, the Tweedie estimate p_hat for the score samplers -- exactly as
``sampling.filter_logits`` filters logits (p_tilde ∝ p^{1/tau} on the kept set; tau = 0 is the argmax). The step
then uses p_tilde: the ancestral and analytic samplers draw z_s ~ sum_x q(z_s | z_t, x) p_tilde(x) (with
p_tilde = p_hat of an unclamped score this is exactly SEDD's analytic step, see ``analytic``), the Euler sampler
uses the score implied by p_tilde (the identity above), and the last step of ``analytic``, ``ancestral`` and
``euler(denoise=True)`` draws x0 ~ p_tilde. With temperature 1 and no filters the score samplers never form p_hat
and run SEDD's formulas verbatim.

All three samplers: one network call per step (nfe = steps), free positions start from ``uniform_prior`` (one
float64 uniform each) unless ``draw_prior=False``, fixed positions keep z_init (their draws are made and discarded,
so the random stream does not depend on which positions are fixed), every categorical draw is a float64 inverse-CDF
draw (``sampling.sample_from_probs``) of one uniform per position, and all randomness comes from ``generator``.
The trajectory is the last step (0-based) at which a position's token changed: -1 at fixed positions and at free
positions that kept their prior draw throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.process.absorbing import _check_steps
from dlm.process.sampling import _uniforms, filter_logits, sample_from_probs
from dlm.process.schedules import Schedule

Network = Callable[[Tensor, Tensor], Tensor]  # (z_BL, t_B) -> [B, L, >= K]
StepProbs = Callable[[int, Tensor], Tensor]  # (step i, z_BL) -> float64 [B*L, K] (need not be normalised)

__all__ = [
    "UniformSample",
    "analytic",
    "analytic_probs",
    "ancestral",
    "euler",
    "reverse_probs",
    "score_from_x0",
    "tweedie_x0",
    "uniform_prior",
]


@dataclass
class UniformSample:
    """Result of a uniform-state sampler.

    ids_BL:        int64 [B, L], ids in [0, K).
    nfe:           number of network calls (= steps).
    trajectory_BL: int64 [B, L], the last step (0-based) at which a position's token changed; -1 at fixed
                   positions and at free ones that kept their prior draw; None unless asked for.
    """

    ids_BL: Tensor
    nfe: int
    trajectory_BL: Tensor | None = None


# ------------------------------------------------------------------------------------------- per-position maps


def _col(value: Tensor | float, n: int, device: torch.device) -> Tensor:
    """A scalar or [N] value as a float64 [N, 1] column."""
    out = torch.as_tensor(value, dtype=torch.float64, device=device)
    return (out.expand(n) if out.ndim == 0 else out.reshape(n))[:, None]


def analytic_probs(log_s_NK: Tensor, z_N: Tensor, alpha_t: Tensor | float, alpha_s: Tensor | float = 1.0) -> Tensor:
    """SEDD's analytic (Tweedie tau-leaping) step for the uniform graph, float64 [N, K] rows summing to 1:

        p(z_s = y | z_t = z) ∝ [exp(-c Q) s]_y exp(c Q)(z, y),   c = sigma_t - sigma_s,  beta = e^{-c} = alpha_t/alpha_s
                             ∝ max(0, s_y - (1 - beta) S / K) (beta 1{y = z} + (1 - beta) / K),   S = sum_y s_y

    (beta [exp(-cQ) s]_y = s_y - (1 - beta) S / K.) Negative entries of exp(-cQ) s (an imperfect score) are clamped
    to 0 as in SEDD's code; a row left with no mass (a flat score at beta = 0, where z_t says nothing) falls back to
    the flat-score answer exp(cQ)(z, .). The entry y = z of ``log_s_NK`` is replaced by 0 (s_z = 1); the formula is
    invariant to scaling s, so it is computed from s / max(s). alpha_s = 1 gives the Tweedie x0 estimate
    (``tweedie_x0``). alpha_t / alpha_s: scalars or [N]. For the true score of a distribution that factorises over
    positions this is the exact reverse posterior p(z_s^l | z_t) (tests/test_uniform.py proves it by brute force).
    """
    N, K = log_s_NK.shape
    beta = _col(alpha_t, N, log_s_NK.device) / _col(alpha_s, N, log_s_NK.device)
    is_z = torch.nn.functional.one_hot(z_N, K).bool()
    log_s = log_s_NK.to(torch.float64).masked_fill(is_z, 0.0)
    s = torch.exp(log_s - log_s.amax(-1, keepdim=True))
    stag = (s - (1.0 - beta) * s.sum(-1, keepdim=True) / K).clamp(min=0.0)
    kernel = beta * is_z + (1.0 - beta) / K
    probs = stag * kernel
    probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, kernel)
    return probs / probs.sum(-1, keepdim=True)


def tweedie_x0(log_s_NK: Tensor, z_N: Tensor, alpha_t: Tensor | float) -> Tensor:
    """p_hat(x0 | z_t) ∝ max(0, s_x - (1 - alpha_t) S / K) (alpha_t 1{x = z} + (1 - alpha_t) / K), float64 [N, K].

    = ``analytic_probs`` with alpha_s = 1 (module docstring).
    """
    return analytic_probs(log_s_NK, z_N, alpha_t, 1.0)


def score_from_x0(p_NK: Tensor, z_N: Tensor, alpha_t: Tensor | float) -> Tensor:
    """Concrete score implied by an x0 posterior, float64 [N, K] (s_z = 1 exactly in exact arithmetic):

        s_y = sum_x p(x) p_{t|0}(y | x) / p_{t|0}(z | x) = alpha_t w_y + (1 - alpha_t) / K W,
        w_x = p(x) / (alpha_t 1{x = z} + (1 - alpha_t) / K),   W = sum_x w_x.

    p_NK: probabilities; alpha_t: a scalar or [N].
    """
    N, K = p_NK.shape
    a = _col(alpha_t, N, p_NK.device)
    is_z = torch.nn.functional.one_hot(z_N, K).bool()
    w = p_NK.to(torch.float64) / (a * is_z + (1.0 - a) / K)
    return a * w + (1.0 - a) / K * w.sum(-1, keepdim=True)


def reverse_probs(p_NK: Tensor, z_N: Tensor, alpha_t: Tensor | float, alpha_s: Tensor | float) -> Tensor:
    """D3PM-uniform reverse step p(z_s | z_t = y) = sum_x p(x) q(z_s | z_t = y, x), float64 [N, K], O(K) per row:

        A_j = beta 1{j = y} + (1 - beta) / K     (= q(z_t = y | z_s = j)),  beta = alpha_t / alpha_s
        w_x = p(x) / (alpha_t 1{x = y} + (1 - alpha_t) / K)     (= p(x) / q(z_t = y | x))
        p(z_s = j | z_t = y) = A_j [ alpha_s w_j + (1 - alpha_s) / K sum_x w_x ]

    The same arithmetic as ``d3pm.uniform_reverse`` (bit for bit; argument order alpha_t, alpha_s as in
    ``absorbing.posterior_probs``). p_NK: probabilities (float64); alpha_t / alpha_s: scalars or [N].
    """
    N, K = p_NK.shape
    a_s, a_t = _col(alpha_s, N, p_NK.device), _col(alpha_t, N, p_NK.device)
    beta = a_t / a_s
    is_y = torch.arange(K, device=p_NK.device)[None] == z_N[:, None]
    A = beta * is_y + (1 - beta) / K
    w = p_NK / (a_t * is_y + (1 - a_t) / K)
    return A * (a_s * w + (1 - a_s) / K * w.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------------------- shared pieces


def _check_vocab(vocab: int) -> None:
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise DlmError(f"vocab must be an integer >= 1, got {vocab!r}")


def _fixed_mask(z_init: Tensor, fixed_BL: Tensor | None) -> Tensor:
    return torch.zeros_like(z_init, dtype=torch.bool) if fixed_BL is None else fixed_BL.bool().expand_as(z_init)


def uniform_prior(
    z_init: Tensor, vocab: int, generator: torch.Generator | None = None, fixed_BL: Tensor | None = None
) -> Tensor:
    """z_1 ~ Uniform(K) independently at free positions; fixed positions keep z_init. int64 [B, L].

    One float64 uniform u per position (all B*L are drawn, whatever ``fixed_BL``): token = min(floor(u K), K - 1),
    the draw of ``sedd.euler_uniform``. Fixed ids must lie in [0, vocab) (else DlmError).
    """
    _check_vocab(vocab)
    fixed = _fixed_mask(z_init, fixed_BL)
    if bool(((z_init[fixed] < 0) | (z_init[fixed] >= vocab)).any()):
        raise DlmError(f"fixed (conditioning) ids must lie in [0, {vocab})")
    u = _uniforms(tuple(z_init.shape), generator, z_init.device)
    prior = torch.minimum((u * vocab).floor().to(torch.int64), torch.full_like(z_init, vocab - 1))
    return torch.where(fixed, z_init, prior)


def _start(
    z_init: Tensor, vocab: int, generator: torch.Generator | None, fixed_BL: Tensor | None, draw_prior: bool
) -> tuple[Tensor, Tensor]:
    """(z_1, fixed): the prior draw (or z_init as given when ``draw_prior`` is False), all ids in [0, vocab)."""
    _check_vocab(vocab)
    fixed = _fixed_mask(z_init, fixed_BL)
    z = uniform_prior(z_init, vocab, generator, fixed) if draw_prior else z_init.clone()
    if bool(((z < 0) | (z >= vocab)).any()):
        raise DlmError(f"the starting state must hold ids in [0, {vocab}) (draw_prior=False)")
    return z, fixed


def _check_filters(temperature: float, top_k: int | None, top_p: float | None) -> None:
    filter_logits(torch.zeros(1, 1), temperature=temperature, top_k=top_k, top_p=top_p)  # DlmError if bad


def _is_plain(temperature: float, top_k: int | None, top_p: float | None) -> bool:
    """True for temperature 1 without filters (after validating the options)."""
    _check_filters(temperature, top_k, top_p)
    return temperature == 1 and top_k is None and top_p is None


def _filtered(logits_NK: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """float64 p_tilde = softmax(filter_logits(logits)) (temperature 0: one-hot on the argmax)."""
    filtered = filter_logits(logits_NK, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(filtered.argmax(-1), filtered.shape[-1]).to(torch.float64)
    return torch.softmax(filtered, dim=-1)


def _run(
    step_probs: StepProbs,
    z: Tensor,
    fixed: Tensor,
    steps: int,
    generator: torch.Generator | None,
    return_trajectory: bool,
) -> UniformSample:
    """``steps`` draws z <- Cat(step_probs(i, z)) at every position (free ones updated), with the trajectory."""
    B, L = z.shape
    traj = torch.full((B, L), -1, dtype=torch.int64, device=z.device)
    for i in range(steps):
        probs = step_probs(i, z)
        new = torch.where(fixed, z, sample_from_probs(probs, generator).view(B, L))
        traj[new != z] = i
        z = new
    return UniformSample(z, steps, traj if return_trajectory else None)


# ------------------------------------------------------------------------------------------- samplers


def euler(
    log_score: Network,
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    vocab: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    denoise: bool = False,
    draw_prior: bool = True,
    return_trajectory: bool = False,
) -> UniformSample:
    """Euler sampler of the reverse uniform CTMC (SEDD-uniform) on the grid t_i = 1 - i/S, i = 0..S-1.

    Reverse rate z -> y (y != z) = sigma'(t) s_theta(z_t)_y / K; one step of length dt = 1/S at position l:

        p(z_s = y) = sigma'(t) dt / K s_y  (y != z),   p(z_s = z) = 1 - sum_{y != z} sigma'(t) dt / K s_y

    and a row whose jump mass exceeds 1 is renormalised onto the jumps (stay = 0). ``log_score(z_BL, t_B)`` with
    t_B float64 [B] returns log s_theta [B, L, >= vocab] (module docstring; the y = z entry is ignored). With
    temperature 1 and no filters s = exp(log_score): the samples equal ``sedd.euler_uniform``'s for the same
    generator. Otherwise s is replaced by the score implied by the filtered Tweedie estimate,
    s_tilde = score_from_x0(p_tilde(x0 | z_t), z, alpha_t) with p_tilde = filter(tweedie_x0(log s)).
    denoise=True replaces the last Euler step (t = 1/S -> 0) by the Tweedie denoising draw x0 ~ p_tilde(x0 | z_t)
    (SEDD's reference sampler ends so; default False as ``sedd.euler_uniform``); nfe stays S. Needs a finite
    sigma'(t) on the grid (alpha_1 > 0: loglinear, geometric; DlmError for the linear schedule).
    """
    _check_steps(steps)
    plain = _is_plain(temperature, top_k, top_p)
    z, fixed = _start(z_init, vocab, generator, fixed_BL, draw_prior)
    B, L = z.shape
    device = z.device

    def step_probs(i: int, z: Tensor) -> Tensor:
        t = 1.0 - i / steps
        logs = log_score(z, torch.full((B,), t, dtype=torch.float64, device=device))[..., :vocab]
        if denoise and i == steps - 1:
            p0 = tweedie_x0(logs.reshape(B * L, vocab), z.reshape(-1), schedule.alpha(t))
            return _filtered(torch.log(p0), temperature, top_k, top_p)
        dsigma = schedule.dsigma(t)
        if not bool(torch.isfinite(dsigma)):
            raise DlmError(f"the Euler sampler needs a finite sigma'(t); the schedule gives {float(dsigma)} at t={t}")
        scale = float(dsigma * (1.0 / steps)) / vocab
        onehot = torch.nn.functional.one_hot(z, vocab).bool()
        if plain:
            s = logs.to(torch.float64).exp()
        else:
            z_N = z.reshape(-1)
            a_t = schedule.alpha(t)
            p0 = _filtered(torch.log(tweedie_x0(logs.reshape(B * L, vocab), z_N, a_t)), temperature, top_k, top_p)
            s = score_from_x0(p0, z_N, a_t).view(B, L, vocab)
        rates = (s * scale).masked_fill(onehot, 0.0)
        total = rates.sum(-1, keepdim=True)
        rates = torch.where(total > 1.0, rates / total, rates)
        stay = (1.0 - rates.sum(-1)).clamp(min=0.0)
        probs = rates + onehot.to(torch.float64) * stay.unsqueeze(-1)
        return probs.view(B * L, vocab)

    return _run(step_probs, z, fixed, steps, generator, return_trajectory)


def analytic(
    log_score: Network,
    z_init: Tensor,
    schedule: Schedule,
    steps: int,
    vocab: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    draw_prior: bool = True,
    return_trajectory: bool = False,
) -> UniformSample:
    """SEDD's analytic (Tweedie tau-leaping) sampler, uniform graph, on the grid t_i = 1 - i/S, s = t - 1/S.

    Step i, per position (``analytic_probs``, s = s_theta(z_t), c = sigma_t - sigma_s):

        p(z_s = y | z_t) ∝ [exp(-c Q) s]_y exp(c Q)(z_t, y)

    The last step goes to alpha_s = 1 (sigma_s = 0) whatever alpha_0 is, i.e. it draws x0 from the Tweedie
    denoiser p_hat(x0 | z_t) (SEDD's final denoising step; here it is step S, so nfe = S). Exact for the true score
    of a distribution that factorises over positions. With temperature / top-k / top-p (module docstring):
    p_tilde = filter(tweedie_x0(log s)) and z_s ~ reverse_probs(p_tilde, z_t, alpha_t, alpha_s) (the last step
    draws x0 ~ p_tilde); for an unclamped score and no filter this is the same distribution as the formula above.
    ``log_score`` as in ``euler``. alpha_t = 0 (linear schedule at t = 1) is allowed: the score is flat there.
    """
    _check_steps(steps)
    plain = _is_plain(temperature, top_k, top_p)
    z, fixed = _start(z_init, vocab, generator, fixed_BL, draw_prior)
    B, L = z.shape
    device = z.device

    def step_probs(i: int, z: Tensor) -> Tensor:
        t = 1.0 - i / steps
        last = i == steps - 1
        logs = log_score(z, torch.full((B,), t, dtype=torch.float64, device=device))[..., :vocab]
        logs, z_N = logs.reshape(B * L, vocab), z.reshape(-1)
        a_t = schedule.alpha(t)
        a_s = torch.ones((), dtype=torch.float64) if last else schedule.alpha(1.0 - (i + 1) / steps)
        if plain:
            return analytic_probs(logs, z_N, a_t, a_s)
        p0 = _filtered(torch.log(tweedie_x0(logs, z_N, a_t)), temperature, top_k, top_p)
        return p0 if last else reverse_probs(p0, z_N, a_t, a_s)

    return _run(step_probs, z, fixed, steps, generator, return_trajectory)


def _check_grid(alphas: Tensor, times: Tensor | None) -> Tensor:
    """The grid times (default k / S, float64) after checking alphas (and times)."""
    if alphas.ndim != 1 or alphas.shape[0] < 2:
        raise DlmError(f"alphas must be a 1-D grid of S + 1 >= 2 values (steps S >= 1), got {tuple(alphas.shape)}")
    S = alphas.shape[0] - 1
    times = torch.arange(S + 1, dtype=torch.float64) / S if times is None else torch.as_tensor(times)
    if times.shape != alphas.shape:
        raise DlmError(f"times must have the shape of alphas {tuple(alphas.shape)}, got {tuple(times.shape)}")
    a = alphas.to(torch.float64)
    if not bool(((a >= 0) & (a <= 1)).all()) or not bool((a[1:] <= a[:-1]).all()):
        raise DlmError("alphas must lie in [0, 1] and be non-increasing along the grid (alphas[0]: the clean end)")
    if bool((a[1:-1] <= 0).any()):
        raise DlmError("alphas[1..S-1] must be positive (each is the alpha_s of a reverse step)")
    return times


def ancestral(
    denoise: Network,
    z_init: Tensor,
    alphas: Tensor,
    vocab: int,
    generator: torch.Generator | None = None,
    fixed_BL: Tensor | None = None,
    *,
    times: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    draw_prior: bool = True,
    return_trajectory: bool = False,
) -> UniformSample:
    """D3PM-uniform ancestral sampler, x0-parameterised, over a grid k = S, S-1, ..., 0 (S = len(alphas) - 1).

    Step i = S - k goes from grid point k to k - 1 with alpha_t = alphas[k], alpha_s = alphas[k-1]:
    p_tilde = filtered softmax of denoise(z_t, times[k]) (temperature / top-k / top-p; ``sampling.filter_logits``)
    and, per position, ``reverse_probs``

        p_theta(z_s | z_t) = sum_x q(z_s | z_t, x) p_tilde(x | z_t)

    The last step (k = 1) draws x0 ~ p_tilde(x | z_t) (alphas[0] is not used). ``denoise(z_BL, t_B)`` returns logits
    [B, L, >= vocab] and gets t_B = times[k] repeated B times (dtype and values as given; default times[k] = k / S,
    float64). D3PM passes its step indices (times = tensor([i_0 = 0, ..., i_S = T])) and alphas = alpha(i / T);
    with its randint prior and ``draw_prior=False`` the draws equal ``D3PMProcess.sample``'s for the same generator.
    """
    grid_t = _check_grid(alphas, times)
    S = alphas.shape[0] - 1
    _check_filters(temperature, top_k, top_p)
    z, fixed = _start(z_init, vocab, generator, fixed_BL, draw_prior)
    B, L = z.shape
    device = z.device
    a = alphas.to(torch.float64).to(device)

    def step_probs(i: int, z: Tensor) -> Tensor:
        k = S - i
        t_B = grid_t[k].repeat(B).to(device)
        logits = denoise(z, t_B)[..., :vocab].reshape(B * L, vocab)
        p0 = _filtered(logits, temperature, top_k, top_p)
        return p0 if k == 1 else reverse_probs(p0, z.reshape(-1), a[k], a[k - 1])

    return _run(step_probs, z, fixed, steps=S, generator=generator, return_trajectory=return_trajectory)
