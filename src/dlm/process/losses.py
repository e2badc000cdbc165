"""Cross-entropy through the output head on the rows that carry a loss, chunk by chunk.

For hidden states h_n (the head's input, ``model(..., return_hidden=True)``), head weight W [V, D] and targets y_n:

    ce_n = logsumexp_{v != e} (W h_n)_v - (W h_n)_{y_n}            (e: an optional excluded column, logit -inf)

computed ``chunk`` rows at a time, so at most [chunk, V] float32 logits exist at once. The backward recomputes
each chunk's logits (the forward keeps only h, W and lse_n, never [N, V]):

    g_n = dL/dce_n,   G_nv = g_n (softmax(W h_n)_v - [v = y_n])     (G_ne = 0)
    dL/dh_n = sum_v G_nv W_v,   dL/dW_v = sum_n G_nv h_n

A loss that is a fixed weighting of the rows, loss = sum_n u_n ce_n (u without gradient: every family's loss),
needs no recomputation: ``head_weighted_cross_entropy`` forms dL/dh = u_n G_n W and dL/dW in the forward while
each chunk's logits exist (3 head matmuls per row, as the full-logits path, instead of 4), keeps them ([N, D]
and [V, D]) and scales them by the incoming scalar gradient in the backward.

The head matmul runs in the dtype the full-logits path would use (the autocast dtype under autocast, else h's),
its output is taken to float32 before the softmax, as ``model.head_logits`` does; dL/dW is accumulated over the
chunks in float32. ``fused_head`` asks the model for the capability (``head_weight`` and ``head_logits``); for
any other callable the losses take the full float32 logits (``logits_cross_entropy``), with the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 25  # default chunk: rows such that [chunk, V] float32 logits take at most 128 MiB
# How ``rows_weighted_loss`` applies a row selection: False = gather the selected rows (one nonzero: a host
# synchronisation on a GPU, and a dynamic shape); True = every row through the head with weight 0 off the
# selection (static shapes, no synchronisation, the head's work on every row); None = static inside a compiled
# region (``torch.compiler.is_compiling()``: no graph break at the nonzero), else the gather.
STATIC_ROWS: bool | None = None


def logits_cross_entropy(logits_NV: Tensor, targets_N: Tensor, exclude: int | None = None) -> Tensor:
    """The reference: ce_n = -log softmax(logits_n with logit_e = -inf)_{y_n} from full logits, float32 [N]."""
    sel = logits_NV.float()
    if exclude is not None:
        sel = sel.index_fill(1, torch.tensor([exclude], device=sel.device), float("-inf"))
    return F.cross_entropy(sel, targets_N, reduction="none")


def fused_head(model: Any) -> nn.Module | None:
    """The backbone inside ``model`` (itself, or under torch.compile / DDP) when its head can be applied apart
    from its forward (``head_weight``, ``head_logits`` and ``forward(..., return_hidden=True)``); else None:
    a callable without the capability (test doubles), or FSDP2-sharded parameters (W is a shard outside the
    forward). The caller then takes the full logits."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile's OptimizedModule
    if not (callable(getattr(inner, "head_logits", None)) and hasattr(type(inner), "head_weight")):
        return None
    if any(c.__name__ == "FSDPModule" for m in (model, inner) for c in type(m).__mro__):  # FSDP2's fully_shard
        return None
    return inner


def _compute_dtype(h: Tensor) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


def _chunk_logits(h_cD: Tensor, w_VD: Tensor, exclude: int | None) -> Tensor:
    """Float32 logits W h for one chunk (h and W already in the compute dtype), excluded column -inf."""
    logits_cV = (h_cD @ w_VD.t()).float()
    if exclude is not None:
        logits_cV[:, exclude] = float("-inf")
    return logits_cV


class _HeadCrossEntropy(torch.autograd.Function):
    """ce_N over chunks of rows; backward recomputes each chunk's logits (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, exclude: int | None, chunk: int, dtype: torch.dtype
    ) -> Tensor:
        N = h_ND.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        ce_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        with torch.autocast(h_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            for a in range(0, N, chunk):
                logits_cV = _chunk_logits(h_ND[a : a + chunk].to(dtype), w, exclude)
                lse_N[a : a + chunk] = torch.logsumexp(logits_cV, dim=-1)
                picked_c = logits_cV.gather(1, targets_N[a : a + chunk, None]).squeeze(1)
                ce_N[a : a + chunk] = lse_N[a : a + chunk] - picked_c
        ctx.save_for_backward(h_ND, w_VD, targets_N, lse_N)
        ctx.exclude, ctx.chunk, ctx.dtype = exclude, chunk, dtype
        return ce_N

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, chunk, N = ctx.dtype, ctx.chunk, h_ND.shape[0]
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        with torch.autocast(h_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            for a in range(0, N, chunk):
                h_cD = h_ND[a : a + chunk].to(dtype)
                p_cV = torch.exp(_chunk_logits(h_cD, w, ctx.exclude) - lse_N[a : a + chunk, None])
                rows = torch.arange(p_cV.shape[0], device=p_cV.device)
                p_cV[rows, targets_N[a : a + chunk]] -= 1.0
                g_cV = (p_cV * grad_N[a : a + chunk, None].float()).to(dtype)
                if grad_h is not None:
                    grad_h[a : a + chunk] = (g_cV @ w).to(h_ND.dtype)
                if grad_w is not None:
                    grad_w += (g_cV.t() @ h_cD).float()
        return grad_h, None if grad_w is None else grad_w.to(w_VD.dtype), None, None, None, None


class _HeadWeightedCrossEntropy(torch.autograd.Function):
    """sum_n u_n ce_n with the gradients formed in the forward, chunk by chunk (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_ND: Tensor,
        w_VD: Tensor,
        targets_N: Tensor,
        u_N: Tensor,
        exclude: int | None,
        chunk: int,
        dtype: torch.dtype,
        record: bool,
    ) -> Tensor:
        # needs_input_grad says requires_grad even under no_grad: ``record`` (grad mode at the call) decides too
        need_h, need_w = record and ctx.needs_input_grad[0], record and ctx.needs_input_grad[1]
        N = h_ND.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        with torch.autocast(h_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            for a in range(0, N, chunk):
                h_cD, y_c, u_c = h_ND[a : a + chunk].to(dtype), targets_N[a : a + chunk], u_N[a : a + chunk].float()
                logits_cV = _chunk_logits(h_cD, w, exclude)
                # ce = m + log sum_v exp(z_v - m) - z_y (logsumexp's own form), with exp(z - m) formed once, in
                # place, and reused for the gradient u (softmax - onehot): no second [chunk, V] buffer or exp pass
                picked_c = logits_cV.gather(1, y_c[:, None]).squeeze(1)
                m_c1 = logits_cV.amax(-1, keepdim=True)
                e_cV = logits_cV.sub_(m_c1).exp_()  # in place: the chunk's logits are done
                s_c1 = e_cV.sum(-1, keepdim=True)
                ce_c = (s_c1.log() + m_c1).squeeze(1) - picked_c
                total = total + (u_c * ce_c).sum()
                if grad_h is None and grad_w is None:
                    continue
                g_cV = e_cV.mul_(u_c[:, None] / s_c1)
                g_cV[torch.arange(g_cV.shape[0], device=g_cV.device), y_c] -= u_c
                g_cV = g_cV.to(dtype)
                if grad_h is not None:
                    grad_h[a : a + chunk] = (g_cV @ w).to(h_ND.dtype)
                if grad_w is not None:
                    grad_w += (g_cV.t() @ h_cD).float()
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(w_VD.dtype))  # intermediates, not inputs
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("head_weighted_cross_entropy: a second backward through the same graph is not supported")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        for g in (grad_h, grad_w):  # owned by this node: scaled in place (no second [V, D] buffer)
            if g is not None:
                g.mul_(grad.to(g.dtype))
        return grad_h, grad_w, None, None, None, None, None, None


def head_weighted_cross_entropy(
    model: nn.Module,
    h_ND: Tensor,
    targets_N: Tensor,
    weights_N: Tensor,
    *,
    exclude: int | None = None,
    chunk: int | None = None,
) -> Tensor:
    """loss = sum_n u_n ce_n, a float32 scalar, with ce_n as in ``head_cross_entropy`` and weights u_n
    (``weights_N``, no gradient) over W = ``model.head_weight``; at most [chunk, V] float32 logits at once and
    no recomputation (gradients formed in the forward, module docstring). Equals
    ``(weights_N * logits_cross_entropy(model.head_logits(h), y, exclude)).sum()``, gradients included."""
    w_VD = model.head_weight
    assert not weights_N.requires_grad and weights_N.shape == targets_N.shape == h_ND.shape[:1]
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // w_VD.shape[0])
    if h_ND.shape[0] == 0:
        return (h_ND.sum() + w_VD.sum() * 0).float()  # 0, with the graph to h and W
    dtype = _compute_dtype(h_ND)
    return _HeadWeightedCrossEntropy.apply(
        h_ND, w_VD, targets_N, weights_N, exclude, chunk, dtype, torch.is_grad_enabled()
    )


def head_cross_entropy(
    model: nn.Module, h_ND: Tensor, targets_N: Tensor, *, exclude: int | None = None, chunk: int | None = None
) -> Tensor:
    """ce_n = logsumexp_{v != exclude} (W h_n)_v - (W h_n)_{y_n}, float32 [N], W = ``model.head_weight`` [V, D]
    (the true vocabulary; tied or not), without ever holding more than [chunk, V] float32 logits, forward or
    backward (module docstring). ``model``: a backbone with the capability (``fused_head`` finds it); ``chunk``
    defaults to CHUNK_ELEMENTS // V rows. Equals ``logits_cross_entropy(model.head_logits(h), y, exclude)``."""
    w_VD = model.head_weight
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // w_VD.shape[0])
    assert chunk >= 1 and h_ND.dim() == 2 and targets_N.shape == h_ND.shape[:1]
    if h_ND.shape[0] == 0:
        return (h_ND.sum(-1) + w_VD.sum() * 0).float()  # [0]; keeps the graph to h and W
    return _HeadCrossEntropy.apply(h_ND, w_VD, targets_N, exclude, chunk, _compute_dtype(h_ND))


def rows_weighted_loss(
    model: Any,
    run: Callable[[bool], Tensor],
    targets_BL: Tensor,
    weights_BL: Tensor,
    rows_BL: Tensor | None = None,
    *,
    exclude: int | None = None,
    static: bool | None = None,
) -> Tensor:
    """loss = sum_{(b, l) in rows} u_bl ce_bl (all positions when ``rows_BL`` is None), a float32 scalar; only
    those rows reach the head. ``run(hidden)`` calls the backbone: hidden states [B, L, D] when ``hidden``, else
    float32 logits [B, L, V]; ``weights_BL`` (no gradient) gives u. With the ``fused_head`` capability:
    ``head_weighted_cross_entropy`` (no [B, L, V] logits, no recomputation); else the sum from full logits
    (``logits_cross_entropy``).

    ``static`` (default ``STATIC_ROWS``): the same sum with static shapes, every position through the head with
    u'_bl = u_bl [(b, l) in rows] (a position outside the rows whose target is ``exclude`` is given another
    target: its ce would be +inf, and 0 * inf = nan); its u' = 0 makes its gradient exactly 0, so loss and
    gradients equal the gathered form's up to summation order."""
    head = fused_head(model)
    out = run(head is not None)
    sel, targets_N, u_N = out.reshape(-1, out.shape[-1]), targets_BL.reshape(-1), weights_BL.reshape(-1)
    static = STATIC_ROWS if static is None else static
    if static is None:
        static = torch.compiler.is_compiling()
    if rows_BL is not None and static:
        keep_N = rows_BL.reshape(-1).bool()
        u_N = torch.where(keep_N, u_N, torch.zeros_like(u_N))
        if exclude is not None:
            other = 0 if exclude != 0 else 1
            targets_N = torch.where(keep_N | (targets_N != exclude), targets_N, torch.full_like(targets_N, other))
    elif rows_BL is not None:  # one nonzero (a host synchronisation on a GPU: N sizes the head), then gathers
        idx_N = rows_BL.reshape(-1).nonzero().squeeze(1)
        sel, targets_N, u_N = sel.index_select(0, idx_N), targets_N[idx_N], u_N[idx_N]
    if head is None:
        return (u_N.float() * logits_cross_entropy(sel, targets_N, exclude)).sum()
    return head_weighted_cross_entropy(head, sel, targets_N, u_N.float(), exclude=exclude)
