"""The masked-count estimator of an absorbing-state bound: the time integral done in closed form per mask count.

MDLM's NELBO and SEDD-absorbing's DSE bound of a row with n scored positions have the same shape,

    B(x) = int_0^1 w(t) E_{M ~ Bern(s_t)^n} [ sum_{l in M} h_l(x_{not M}, t) ] dt,     w(t) = s'_t / s_t,

with s_t = 1 - alpha_t the masking probability, M the masked positions and h_l the family's per-position term
(MDLM: -log p_theta(x^l | z); SEDD: its DSE term). Drawing t ~ U[0, 1] (``monte_carlo_bound``) gives an unbiased
estimate whose variance is infinite up to the clamp t >= T_MIN: a draw with t ~ 1e-5 that masks one token
weighs it by 1/t, so the per-row value is heavy-tailed (measured: single values of 229 nats/token for a
bound of 6.3), and the standard error computed from a sample of rows understates the spread of the estimate
over evaluation seeds by ~2-3x (docs/LOG.md 2026-11-29).

Grouping the masks by their size k = |M| and changing variables to s (w dt = ds / s) integrates the weight out:

    B(x) = sum_{k=1..n} C(n, k)^-1 sum_{|M| = k} c_k E_{s ~ rho_k} [ sum_{l in M} h_l(x_{not M}, t(s)) ],
    c_k  = C(n, k) int_{s0}^{s1} s^{k-1} (1 - s)^{n-k} ds = ( P(Bin(n, s1) >= k) - P(Bin(n, s0) >= k) ) / k,
    rho_k(s) ∝ s^{k-1} (1 - s)^{n-k} on [s0, s1],

with s0 = s_0, s1 = s_1 (the schedule's masking probability at t = 0 and 1) and t(s) = ``t_of_alpha(1 - s)``.
(C(n, k) B(k, n-k+1) I_x(k, n-k+1) = I_x(k, n-k+1) / k and I_x(k, n-k+1) = P(Bin(n, x) >= k).) The estimator
draws k ~ U{1..n} (stratified over the batch's draws), M uniform among the k-subsets of the scored positions and
s ~ rho_k (the k-th order statistic of n uniforms, redrawn while it falls outside [s0, s1]), and returns

    nats = n c_k sum_{l in M} h_l(x_{not M}, t(s)),

unbiased for B(x) (the k = 0 term is 0: nothing masked, nothing scored). Its weight n c_k <= n / k is bounded,
so every moment is finite; for a model that ignores t it is the Rao-Blackwellisation of the uniform-time
estimator over t given M (lower variance, and the draw of s only feeds a time-conditioned network). With n
identical terms h_l = h it is exact: n c_k k h, which for s0 = 0, s1 = 1 is n h for every k.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.process.base import NLLResult, scored_positions
from dlm.process.schedules import Schedule, sample_times

__all__ = [
    "binomial_upper_tail",
    "count_weights",
    "draw_masked_count",
    "draw_masks",
    "masked_count_bound",
    "monte_carlo_bound",
]


def binomial_upper_tail(n: int, p: float) -> Tensor:
    """P(Bin(n, p) >= k) for k = 0..n, float64 [n + 1] (from the pmf in log space, summed from the top)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_upper_tail needs n >= 0 and p in [0, 1], got n={n}, p={p}")
    k = torch.arange(n + 1, dtype=torch.float64)
    if p in (0.0, 1.0):
        pmf = (k == (n if p == 1.0 else 0)).to(torch.float64)
    else:
        log_comb = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        pmf = torch.exp(log_comb + k * math.log(p) + (n - k) * math.log1p(-p))
    return torch.flip(torch.cumsum(torch.flip(pmf, [0]), 0), [0]).clamp(max=1.0)


def count_weights(n: int, s0: float, s1: float) -> Tensor:
    """c_k = (P(Bin(n, s1) >= k) - P(Bin(n, s0) >= k)) / k for k = 0..n, float64 [n + 1] (c_0 = 0)."""
    tail = binomial_upper_tail(n, s1) - binomial_upper_tail(n, s0)
    k = torch.arange(n + 1, dtype=torch.float64)
    return torch.where(k > 0, tail / k.clamp(min=1), torch.zeros_like(tail))


def draw_masks(
    scored_BL: Tensor, generator: torch.Generator | None, antithetic: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The mask part of a masked-count draw, per row: (M [B, L] bool, k [B], n [B]): n_b scored positions,
    k_b = floor(u_b n_b) + 1 with u from ``sample_times`` (stratified over the rows when ``antithetic``), M_b a
    uniform k_b-subset of the scored positions (rows with none: k = 1, no mask)."""
    device = scored_BL.device
    B, L = scored_BL.shape
    n_B = scored_BL.sum(1)
    u_B = sample_times(B, generator, antithetic=antithetic, device=device)
    k_B = torch.minimum((u_B * n_B).floor().long() + 1, n_B.clamp(min=1))
    keys_BL = torch.rand(B, L, generator=generator, dtype=torch.float64, device=device).masked_fill(~scored_BL, 2.0)
    rank_BL = keys_BL.argsort(1).argsort(1)
    return (rank_BL < k_B[:, None]) & scored_BL, k_B, n_B


def draw_masked_count(
    scored_BL: Tensor, schedule: Schedule, generator: torch.Generator | None, antithetic: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """One masked-count draw per row: (masked positions M [B, L] bool, t [B] float64, weight n c_k [B] float64).

    M and k from ``draw_masks``, s_b ~ rho_k (module docstring), t_b = t(s_b). Rows with no scored position get
    no mask and weight 0.
    """
    device = scored_BL.device
    masked_BL, k_B, n_B = draw_masks(scored_BL, generator, antithetic)
    s0 = float(1.0 - schedule.alpha(0.0))
    s1 = float(1.0 - schedule.alpha(1.0))
    s_B = _order_statistic(n_B, k_B, s0, s1, generator)
    t_B = schedule.t_of_alpha(1.0 - s_B)
    weight_B = torch.zeros(n_B.shape[0], dtype=torch.float64, device=device)
    for n in torch.unique(n_B).tolist():
        if n == 0:
            continue
        rows = n_B == n
        weight_B[rows] = n * count_weights(n, s0, s1).to(device)[k_B[rows]]
    return masked_BL, t_B, weight_B


def _order_statistic(
    n_B: Tensor, k_B: Tensor, s0: float, s1: float, generator: torch.Generator | None, max_rounds: int = 1000
) -> Tensor:
    """s_b ~ Beta(k_b, n_b - k_b + 1) restricted to [s0, s1]: the k-th smallest of n_b uniforms, redrawn for the
    rows that fall outside (acceptance P(Bin(n, s1) >= k) - P(Bin(n, s0) >= k), above 1/3 for the schedules
    here); rows with n_b = 0 get s0."""
    device = n_B.device
    B, n_max = n_B.shape[0], max(int(n_B.max()), 1)
    s_B = torch.full((B,), s0, dtype=torch.float64, device=device)
    todo_B = n_B > 0
    cols = torch.arange(n_max, device=device)
    for _ in range(max_rounds):
        if not bool(todo_B.any()):
            return s_B
        u_BN = torch.rand(B, n_max, generator=generator, dtype=torch.float64, device=device)
        u_BN = u_BN.masked_fill(cols[None, :] >= n_B[:, None], 2.0).sort(1).values
        draw_B = u_BN.gather(1, (k_B - 1).clamp(min=0)[:, None]).squeeze(1)
        ok_B = todo_B & (draw_B >= s0) & (draw_B <= s1)
        s_B = torch.where(ok_B, draw_B, s_B)
        todo_B &= ~ok_B
    raise RuntimeError(f"masked-count draw: no s in [{s0}, {s1}] after {max_rounds} rounds")


def masked_count_bound(
    batch: Batch,
    K: int,
    schedule: Schedule,
    generator: torch.Generator | None,
    masked_sum: Callable[[Tensor, Tensor], Tensor],
    antithetic: bool = True,
) -> NLLResult:
    """The K-draw masked-count estimate of an absorbing-state bound per row (module docstring), exact = False:

        nats_b = (1/K) sum_{j=1..K} n_b c_{k_bj} masked_sum(t_bj, M_bj)_b,

    ``masked_sum(t_B, masked_BL)`` gives sum_{l in M_b} h_l(z_b, t_b) per row (float64 [B]), z_b = x_b with the
    positions M_b replaced by the family's mask id (the family builds z from M). The K B
    draws are made at once (stratified over all of them, draw j of row b at index j B + b, as
    ``monte_carlo_bound``). tokens_b = |S_b|, the scored positions.
    """
    scored_BL = scored_positions(batch)
    B = scored_BL.shape[0]
    masked_KBL, t_KB, weight_KB = draw_masked_count(scored_BL.repeat(K, 1), schedule, generator, antithetic)
    nats_B = torch.zeros(B, dtype=torch.float64, device=scored_BL.device)
    for j in range(K):
        rows = slice(j * B, (j + 1) * B)
        value_B = masked_sum(t_KB[rows], masked_KBL[rows]).to(torch.float64)
        nats_B += torch.where(weight_KB[rows] > 0, weight_KB[rows] * value_B, torch.zeros_like(value_B))
    return NLLResult(nats_B=nats_B / K, tokens_B=scored_BL.sum(1).to(torch.int64), exact=False)


def monte_carlo_bound(
    batch: Batch, K: int, draw_times: Callable[[int], Tensor], integrand: Callable[[Tensor], Tensor]
) -> NLLResult:
    """The K-sample uniform-time estimate of a continuous-time bound per sequence (SEDD-uniform), exact = False:

        nats_b = (1/K) sum_{k=1..K} integrand(t_k)_b,   t = draw_times(B K) viewed as [K, B] (t_{k*B+b})

    ``integrand(t_B)`` draws z_t itself and returns the per-row integrand [B] (float64 or cast to it);
    tokens_b = |S_b|, the scored positions (``scored_positions``).
    """
    x_BL = batch.ids_BL
    B = x_BL.shape[0]
    t_KB = draw_times(B * K).view(K, B)
    nats_B = torch.zeros(B, dtype=torch.float64, device=x_BL.device)
    for k in range(K):
        nats_B += integrand(t_KB[k]).to(torch.float64)
    return NLLResult(nats_B=nats_B / K, tokens_B=scored_positions(batch).sum(1).to(torch.int64), exact=False)
