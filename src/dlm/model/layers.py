"""Building blocks: normalisation, MLPs, rotary position embeddings, time conditioning (adaLN)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.model.config import T_FREQ_DIM, ModelConfig


def _wide(x: Tensor) -> Tensor:
    """x in float32, or in float64 when it is float64 (so gradcheck can run the custom functions in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _needs_grad(*xs: Tensor) -> bool:
    """Whether autograd will record a call on xs: otherwise the custom Functions below are skipped, since their
    bookkeeping costs more than the arithmetic at decoding shapes (B = 1, one token)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


class _RMSNormFn(torch.autograd.Function):
    """y = n * w with n = x r, r = (mean_d x_d^2 + eps)^(-1/2), in float32; a hand-written backward.

    Per row, with g = dL/dy and D the width:
        dL/dw = sum_rows g * n,    dL/dx = r (g w - n (g w . n) / D),
    where (g w . n) = (g n) @ w reuses the g n of dL/dw (one matrix-vector product instead of a pass). Saves n and
    r only (autograd of the plain formula keeps x, x^2, the mean and y as well).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32, w32 = _wide(x), _wide(weight)
        y = torch.empty_like(x32)  # holds x^2 first, then the output (one [N, D] allocation fewer)
        r = torch.rsqrt(torch.pow(x32, 2, out=y).mean(-1, keepdim=True) + eps)
        n = x32 * r
        ctx.save_for_backward(n, r, w32)
        ctx.dtypes = (x.dtype, weight.dtype)
        return torch.mul(n, w32, out=y).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        n, r, w32 = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        D = n.shape[-1]
        with torch.autocast(g.device.type, enabled=False):  # the matrix-vector product stays float32
            g32 = _wide(g)
            gn = g32 * n
            dw = gn.reshape(-1, D).sum(0).to(w_dtype) if ctx.needs_input_grad[1] else None
            if not ctx.needs_input_grad[0]:
                return None, dw, None
            dot = (gn.reshape(-1, D) @ w32).reshape(r.shape).div_(D)
            dx = torch.mul(g32, w32, out=gn)  # gn is spent: its buffer takes dx
            dx.addcmul_(n, dot, value=-1.0).mul_(r)
        return dx.to(x_dtype), dw, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 and cast back (``_RMSNormFn``: same values, a
    cheaper backward)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _needs_grad(x, self.weight):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The plain formula RMSNorm computes: its path when no gradient is recorded, and the tests' reference."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * w + b, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else LayerNorm(cfg.d_model, cfg.norm_eps)


class MLP(nn.Module):
    """gelu: W_2 GELU(W_1 x).  swiglu: W_d (SiLU(W_g x) * W_u x), W_g and W_u stored as one matrix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, hidden = cfg.mlp, cfg.mlp_hidden
        n_in = 2 * hidden if self.kind == "swiglu" else hidden
        self.fc_in = nn.Linear(cfg.d_model, n_in, bias=False)
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=False)
        self.fc_out.is_residual_out = True  # scaled init, see Transformer._init_weights

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        if self.kind == "swiglu":
            h = _SwiGLUFn.apply(h) if _needs_grad(h) else swiglu_reference(h)
        else:
            h = F.gelu(h)
        return self.fc_out(h)


class _SwiGLUFn(torch.autograd.Function):
    """a = SiLU(g) * u for h = [g, u] (the two halves of the last axis); a hand-written backward.

    With o = dL/da: dL/du = o SiLU(g), dL/dg = o u SiLU'(g), SiLU'(g) = s (1 + g (1 - s)), s = sigmoid(g), written
    straight into the two halves of one [.., 2H] gradient (autograd would build both and then concatenate them).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx: Any, o: Tensor) -> Tensor:
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(o, act, out=d_up)
        torch.mul(o, up, out=d_gate)  # o u, then SiLU'(g) o u in place (no [.., H] temporary)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        return dh


def swiglu_reference(h: Tensor) -> Tensor:
    """SiLU(g) * u for h = [g, u]: the MLP's path when no gradient is recorded, and the tests' reference."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_cos_sin(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """The rotary tables of positions pos, prepared once per forward and shared by every layer.

    With theta_i = pos * base^(-2i/head_dim), i < head_dim/2: cos = [cos theta, cos theta] and
    sin = [-sin theta, sin theta] (signed, so that ``apply_rotary`` needs no subtraction); float32, shape
    pos.shape + [head_dim].
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + swap(x) sin in float32 = (x1 cos - x2 sin, x2 cos + x1 sin) for the tables of rotary_cos_sin.

    The swapped product is formed a half at a time in one half-width buffer and added into the halves of the
    output: the same roundings as x cos + cat(x2, x1) sin, two full-width temporaries fewer.
    """
    x = _wide(x)
    out = x * cos
    _add_swapped_product(out, x, sin)
    return out


def _add_swapped_product(out: Tensor, x: Tensor, sin: Tensor, inverse: bool = False) -> None:
    """In place, on halves of the last axis: out += swap(x) sin, i.e. out_1 += x_2 sin_1, out_2 += x_1 sin_2;
    with ``inverse``, out += swap(x sin), i.e. out_1 += x_2 sin_2, out_2 += x_1 sin_1 (the rotation by -theta)."""
    h = x.shape[-1] // 2
    sin_1, sin_2 = (sin[..., h:], sin[..., :h]) if inverse else (sin[..., :h], sin[..., h:])
    p = torch.mul(x[..., h:], sin_1)
    out[..., :h] += p
    out[..., h:] += torch.mul(x[..., :h], sin_2, out=p)


def apply_rotary(x_BHLD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle (GPT-NeoX / LLaMA "rotate half" layout):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), computed as x cos + [x2, x1] sin with the signed tables.

    cos, sin: from ``rotary_cos_sin``, [L, D] or [B, L, D] (per-sequence positions); x: [..., B, H, L, D].
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    if _needs_grad(x_BHLD):  # out-of-place, for autograd (the same values)
        x = _wide(x_BHLD)
        h = x.shape[-1] // 2
        return (x * cos + torch.cat([x[..., h:], x[..., :h]], dim=-1) * sin).to(x_BHLD.dtype)
    return _rotate(x_BHLD, cos, sin).to(x_BHLD.dtype)


def _split_rotate(qkv_BL3HD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x_3BHLD = qkv_BL3HD.permute(2, 0, 3, 1, 4)
    qk = _rotate(x_3BHLD[:2], cos, sin).to(qkv_BL3HD.dtype)
    return qk[0], qk[1], x_3BHLD[2]


class _RotaryQKVFn(torch.autograd.Function):
    """q, k, v of a fused projection qkv [B, L, 3, H, D], with q and k rotated in one pass (``apply_rotary``).

    The rotation R is orthogonal, so the backward is the inverse rotation: dL/dx = g cos + swap(g sin) (the
    signed table flips the angle's sign). The gradients of q, k and v are written into one [B, L, 3, H, D]
    buffer, the layout the projection's backward reads (autograd would stack, then copy them).
    """

    @staticmethod
    def forward(ctx: Any, qkv_BL3HD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _split_rotate(qkv_BL3HD, cos, sin)

    @staticmethod
    def backward(ctx: Any, g_q: Tensor, g_k: Tensor, g_v: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        B, H, L, D = g_v.shape
        dqkv = g_v.new_empty(B, L, 3, H, D)
        d_3BHLD = dqkv.permute(2, 0, 3, 1, 4)
        for i, g in enumerate((g_q, g_k)):
            g = _wide(g)
            if dqkv.dtype == g.dtype:
                torch.mul(g, cos, out=d_3BHLD[i])
                _add_swapped_product(d_3BHLD[i], g, sin, inverse=True)
            else:
                d_i = g * cos
                _add_swapped_product(d_i, g, sin, inverse=True)
                d_3BHLD[i].copy_(d_i)
        d_3BHLD[2].copy_(g_v)
        return dqkv, None, None


def rotary_qkv(qkv_BLE: Tensor, n_head: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection [B, L, 3 H D] into q, k, v [B, H, L, D], q and k rotated by ``apply_rotary``."""
    B, L, E = qkv_BLE.shape
    assert E % (3 * n_head) == 0, (E, n_head)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    qkv_BL3HD = qkv_BLE.view(B, L, 3, n_head, E // (3 * n_head))
    if _needs_grad(qkv_BL3HD):
        return _RotaryQKVFn.apply(qkv_BL3HD, cos, sin)
    return _split_rotate(qkv_BL3HD, cos, sin)


def timestep_features(t_B: Tensor, dim: int = T_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """DiT sinusoidal features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/(dim/2)); float32 [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """c = SiLU(W_2 SiLU(W_1 features(t))): the conditioning vector of width cond_dim (MDLM's sigma map)."""

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(T_FREQ_DIM, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)

    def forward(self, t_B: Tensor) -> Tensor:
        h = self.fc2(F.silu(self.fc1(timestep_features(t_B).to(self.fc1.weight.dtype))))
        return F.silu(h)


class AdaLN(nn.Module):
    """Per-sequence modulation: zero-init Linear(cond_dim, n * d_model) split into n tensors [B, 1, d]."""

    def __init__(self, cond_dim: int, d_model: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.proj = nn.Linear(cond_dim, n * d_model)
        self.proj.is_zero_init = True

    def forward(self, c_BC: Tensor) -> tuple[Tensor, ...]:
        return self.proj(c_BC)[:, None, :].chunk(self.n, dim=-1)


def modulate(x_BLD: Tensor, shift_B1D: Tensor, scale_B1D: Tensor) -> Tensor:
    return x_BLD * (1 + scale_B1D) + shift_B1D
