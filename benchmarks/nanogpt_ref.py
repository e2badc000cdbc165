"""nanoGPT-style reference models and their training step, the yardstick of dlm's training speed.

Written for dlm's benchmarks (not copied). ``RefGPT``: the GPT-2 architecture as nanoGPT trains it, i.e.

    h_0     = W_te[ids] + W_pe[0..L-1]                                   (learned positions)
    h_{i+1} = h_i + W_o Attn(LN_1(h_i)),  q, k, v = split(LN_1(h_i) W_qkv)   (fused QKV, SDPA causal)
    h_{i+1} = h_{i+1} + W_2 GELU(W_1 LN_2(h_{i+1}))                       (MLP width 4 d)
    logits  = LN_f(h_n) W_te^T                                            (tied head)
    loss    = mean_{b, i} -log softmax(logits_{b,i})[y_{b,i}]             (inside forward: compiled with it)

no biases (nanoGPT's train.py default ``bias=False``), init N(0, 0.02) with the residual projections at
0.02 / sqrt(2 n_layer), and AdamW over two groups (matrices decay, vectors do not) with the fused kernel on CUDA
only, as nanoGPT's ``configure_optimizers`` does. A training step is nanoGPT's: forward with loss, backward,
clip the gradient norm, optimizer step, zero the gradients; no host synchronisation inside the step.

``RefLlama``: the same code style (plain modules, autograd only) for dlm's own block, as a researcher would write
it in nanoGPT, so that a comparison with dlm measures the framework and not the architecture:

    h_0     = W_te[ids]                                                   (no learned positions)
    h_{i+1} = h_i + W_o Attn(RoPE(q), RoPE(k), v),  q, k, v = split(RMS_1(h_i) W_qkv)   (SDPA causal)
    h_{i+1} = h_{i+1} + W_2 (SiLU(a) * b),  [a, b] = RMS_2(h_{i+1}) W_1    (fused up-projection, width 2 H)
    logits  = RMS_f(h_n) W_te^T,  loss as above (F.cross_entropy on the full logits)

with RMS(x) = x rsqrt(mean(x^2) + eps) w and RoPE(x) = x cos + rotate_half(x) sin, rotate_half(x1, x2) =
(-x2, x1) (the "rotate half" pair layout), cos and sin tables built once in ``__init__``. H is dlm's
``ModelConfig.mlp_hidden`` (given in ``RefConfig.mlp_hidden``), so the parameter count equals dlm's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RefConfig:
    """The shape: vocabulary V, context (rows of L <= context), layers, heads, width d."""

    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int
    mlp_hidden: int = 0  # RefLlama's SwiGLU width H (0: 4 d); RefGPT's MLP is always 4 d
    rope_base: float = 10000.0  # RefLlama only
    norm_eps: float = 1e-5  # RefLlama only (RefGPT's LayerNorm keeps torch's 1e-5)


class RefAttention(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.c_attn(x_BLD).split(D, dim=2)
        q_BHLD, k_BHLD, v_BHLD = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, is_causal=True)
        return self.c_proj(y_BHLD.transpose(1, 2).contiguous().view(B, L, D))


class RefBlock(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.attn = RefAttention(cfg)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        x_BLD = x_BLD + self.attn(self.ln_1(x_BLD))
        return x_BLD + self.c_proj(F.gelu(self.c_fc(self.ln_2(x_BLD))))


class RefGPT(nn.Module):
    """GPT-2 as nanoGPT writes it; ``forward(ids, targets)`` returns (logits, mean cross-entropy or None)."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        _init_normal(self, cfg.n_layer)

    def forward(self, ids_BL: Tensor, targets_BL: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        L = ids_BL.shape[1]
        x_BLD = self.wte(ids_BL) + self.wpe(torch.arange(L, device=ids_BL.device))
        for block in self.blocks:
            x_BLD = block(x_BLD)
        logits_BLV = self.lm_head(self.ln_f(x_BLD))
        if targets_BL is None:
            return logits_BLV, None
        loss = F.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]).float(), targets_BL.reshape(-1))
        return logits_BLV, loss


def _init_normal(model: nn.Module, n_layer: int) -> None:
    """N(0, 0.02) for matrices, 0.02 / sqrt(2 n_layer) for the residual output projections (``c_proj``)."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


class RefRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RefLlamaAttention(RefAttention):
    def forward(self, x_BLD: Tensor, cos_LD: Tensor, sin_LD: Tensor) -> Tensor:  # type: ignore[override]
        B, L, D = x_BLD.shape
        q, k, v = self.c_attn(x_BLD).split(D, dim=2)
        q_BHLD, k_BHLD, v_BHLD = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        q_BHLD = q_BHLD * cos_LD + rotate_half(q_BHLD) * sin_LD
        k_BHLD = k_BHLD * cos_LD + rotate_half(k_BHLD) * sin_LD
        y_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, is_causal=True)
        return self.c_proj(y_BHLD.transpose(1, 2).contiguous().view(B, L, D))


class RefLlamaBlock(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        d, hidden = cfg.d_model, cfg.mlp_hidden or 4 * cfg.d_model
        self.ln_1 = RefRMSNorm(d, cfg.norm_eps)
        self.attn = RefLlamaAttention(cfg)
        self.ln_2 = RefRMSNorm(d, cfg.norm_eps)
        self.c_fc = nn.Linear(d, 2 * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x_BLD: Tensor, cos_LD: Tensor, sin_LD: Tensor) -> Tensor:
        x_BLD = x_BLD + self.attn(self.ln_1(x_BLD), cos_LD, sin_LD)
        a, b = self.c_fc(self.ln_2(x_BLD)).chunk(2, dim=-1)
        return x_BLD + self.c_proj(F.silu(a) * b)


class RefLlama(nn.Module):
    """dlm's block (RMSNorm, rotary, SwiGLU) written nanoGPT's way; ``forward`` as ``RefGPT.forward``."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(RefLlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RefRMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        head_dim = cfg.d_model // cfg.n_head
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(cfg.context, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        _init_normal(self, cfg.n_layer)

    def forward(self, ids_BL: Tensor, targets_BL: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        L = ids_BL.shape[1]
        cos_LD, sin_LD = self.cos[:L], self.sin[:L]
        x_BLD = self.wte(ids_BL)
        for block in self.blocks:
            x_BLD = block(x_BLD, cos_LD, sin_LD)
        logits_BLV = self.lm_head(self.ln_f(x_BLD))
        if targets_BL is None:
            return logits_BLV, None
        loss = F.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]).float(), targets_BL.reshape(-1))
        return logits_BLV, loss


REF_MODELS: dict[str, type[nn.Module]] = {"gpt2": RefGPT, "llama": RefLlama}


def ref_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """nanoGPT's AdamW: decay on parameters with ndim >= 2, none on the others; fused on CUDA only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if device.type == "cuda" else None)


class RefStep:
    """One nanoGPT training step on a batch of rows ``ids_BL`` (inputs ids[:, :-1], targets ids[:, 1:]): forward
    with loss (autocast when ``amp_dtype``), backward, clip to ``grad_clip``, AdamW step, zero grad. ``fwd`` is the
    (possibly compiled) model."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
        amp_dtype: torch.dtype | None = None,
        compile_: bool = False,
    ) -> None:
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.fwd = torch.compile(model) if compile_ else model
        self.amp_dtype = amp_dtype

    def __call__(self, ids_BL: Tensor) -> Tensor:
        ctx = (
            torch.autocast(ids_BL.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            _, loss = self.fwd(ids_BL[:, :-1], ids_BL[:, 1:])
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
