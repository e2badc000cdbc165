"""Categorical sampling in float64, shared by every sampler.

Gumbel-max in float32 caps the Gumbel noise near -log(-log(1 - 2^-24)) ≈ 16.6, so rare tokens are never
drawn and generative perplexity looks too good (bf16 is worse). Here logits are converted to float64,
filtered (temperature, top-k, top-p), normalised, and a token is drawn by inverse CDF with exactly ONE
uniform per row:

    p_v   = softmax(l / tau)_v  restricted to the kept set S, renormalised
    C_v   = sum_{w <= v} p_w
    u     ~ U[0, 1)   (``torch.rand(N, dtype=float64, generator=...)``)
    token = min { v : C_v > u }

Because every draw consumes exactly N uniforms from the generator, whatever the options (greedy included),
two code paths that consume one random stream alike draw the same tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.errors import DlmError

TOP_P_TOL = 1e-12  # a kept set whose mass is within this of p counts as reaching p (float rounding)


def _check(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise DlmError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise DlmError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise DlmError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(
    logits_NV: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Float64 logits with temperature applied and filtered-out tokens set to -inf.

    temperature tau > 0: l / tau (tau = 0 is handled by ``sample_categorical`` as argmax; here it leaves
                         the logits unscaled).
    top_k:  keep tokens whose logit is >= the k-th largest (ties at the boundary are all kept).
    top_p:  nucleus: sort p = softmax(l / tau) in decreasing order and keep the smallest prefix whose
            mass is >= top_p, i.e. token j (in sorted order) is kept iff sum_{i < j} p_(i) < top_p; the most
            likely token is always kept.
    """
    _check(temperature, top_k, top_p)
    out = logits_NV.to(torch.float64)
    if temperature > 0 and temperature != 1:
        out = out / temperature
    V = out.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs = torch.softmax(out, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p - TOP_P_TOL
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _uniforms(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Float64 U[0, 1) drawn on the generator's device (so a CPU generator drives GPU sampling too)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=where).to(device)


def sample_from_probs(
    probs_NV: Tensor, generator: torch.Generator | None = None, *, u_N: Tensor | None = None
) -> Tensor:
    """Inverse-CDF draw, one float64 uniform per row; probs need not be normalised (non-negative, sum > 0).

    token = min { v : C_v > u * C_V },  C_v = sum_{w <= v} p_w. Tokens of zero probability are never drawn.
    ``u_N``: the row uniforms, drawn beforehand (float64 [N] in [0, 1)); then ``generator`` is not used. A sampler
    that draws all its uniforms in one call passes slices of them here (on a CPU generator one call of n + m
    uniforms gives the same numbers as two calls of n and m). No host synchronisation: the positive-mass check
    is an asynchronous device assertion.
    """
    probs = probs_NV.to(torch.float64)
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[..., -1:]
    torch._assert_async((total > 0).all(), "every row needs positive probability mass")
    u = _uniforms(probs.shape[:-1], generator, probs.device) if u_N is None else u_N.to(probs.device)
    # u * total < total up to rounding; clamp below total so the last positive-mass token is the ceiling.
    target = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample_categorical(
    logits_NV: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    u_N: Tensor | None = None,
) -> Tensor:
    """Draw one token per row from softmax(logits / temperature) after top-k and top-p filtering.

    Returns int64 [N] (any leading shape is kept: logits [..., V] -> ids [...]). temperature = 0 is greedy
    (argmax, first index on ties); it still consumes one uniform per row so the random stream advances
    identically whatever the options. ``u_N``: the row uniforms drawn beforehand (``sample_from_probs``).
    """
    filtered = filter_logits(logits_NV, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        if u_N is None:
            _uniforms(filtered.shape[:-1], generator, filtered.device)
        return filtered.argmax(dim=-1)
    probs = torch.softmax(filtered, dim=-1)
    return sample_from_probs(probs, generator, u_N=u_N)
