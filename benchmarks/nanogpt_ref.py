"""A nanoGPT-style GPT-2 reference model and training step, the yardstick of dlm's training speed.

Written for dlm's benchmarks (not copied): the GPT-2 architecture as nanoGPT trains it, i.e.

    h_0     = W_te[ids] + W_pe[0..L-1]                                   (learned positions)
    h_{i+1} = h_i + W_o Attn(LN_1(h_i)),  q, k, v = split(LN_1(h_i) W_qkv)   (fused QKV, SDPA causal)
    h_{i+1} = h_{i+1} + W_2 GELU(W_1 LN_2(h_{i+1}))                       (MLP width 4 d)
    logits  = LN_f(h_n) W_te^T                                            (tied head)
    loss    = mean_{b, i} -log softmax(logits_{b,i})[y_{b,i}]             (inside forward: compiled with it)

no biases (nanoGPT's train.py default ``bias=False``), init N(0, 0.02) with the residual projections at
0.02 / sqrt(2 n_layer), and AdamW over two groups (matrices decay, vectors do not) with the fused kernel on CUDA
only, as nanoGPT's ``configure_optimizers`` does. A training step is nanoGPT's: forward with loss, backward,
clip the gradient norm, optimizer step, zero the gradients; no host synchronisation inside the step.
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
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

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
        model: RefGPT,
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
