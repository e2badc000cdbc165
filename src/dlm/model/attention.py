"""Multi-head self-attention with rotary embeddings; one mask function, two backends (SDPA, FlexAttention).

The mask of a forward is planned once (``plan_attention``) and shared by every layer:
  - sdpa: ``is_causal=True`` for the plain causal case, no mask for plain bidirectional, otherwise a dense
    bool mask [B|1, 1, Lq, Lk] = mask_fn(q_offset + i, j) & key_mask[b, j]. A query row that would see no key
    at all (e.g. a padded first token) is allowed to see its own key, so softmax never meets an empty row
    and no NaN appears; such rows are padding and their outputs are meaningless but finite.
  - flex: ``create_block_mask`` from the same function (CUDA only; imported lazily). Empty rows give 0.
    Without a key mask the BlockMask is cached (``block_mask``): a mask function is identified by its code and
    the values it closes over, so ``block_causal(4)`` built anew each forward still hits the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.errors import DlmError
from dlm.model.cache import KVStore
from dlm.model.config import ModelConfig
from dlm.model.layers import rotary_qkv
from dlm.model.masks import MaskFn, bidirectional, causal, dense_mask

FLEX_CPU_ERROR = "flex attention needs CUDA (no backward on CPU); use attn_backend=sdpa"
_compiled_flex: Any = None
BLOCK_MASK_CACHE_SIZE = 32  # BlockMasks kept (least recently used dropped): one per (mask, shape, offset, device)
_block_masks: OrderedDict[tuple, Any] = OrderedDict()


@dataclass
class AttnPlan:
    """How every layer of one forward attends: exactly one of the three modes below."""

    mask: Tensor | None = None  # sdpa: bool [B|1, 1, Lq, Lk], True = may attend; None = all keys
    is_causal: bool = False  # sdpa fast path (Lq == Lk, no cache, no key mask)
    block_mask: Any = None  # flex: a BlockMask

    def attend(self, q_BHLD: Tensor, k_BHKD: Tensor, v_BHKD: Tensor, dropout_p: float) -> Tensor:
        if self.block_mask is not None:
            return _flex()(q_BHLD, k_BHKD, v_BHKD, block_mask=self.block_mask)
        return F.scaled_dot_product_attention(
            q_BHLD, k_BHKD, v_BHKD, attn_mask=self.mask, dropout_p=dropout_p, is_causal=self.is_causal
        )


def _flex() -> Any:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def plan_attention(
    mask_fn: MaskFn,
    Lq: int,
    Lk: int,
    q_offset: int,
    key_mask_BK: Tensor | None,
    backend: str,
    device: torch.device,
) -> AttnPlan:
    """Plan the attention of Lq queries at indices [q_offset, q_offset + Lq) over keys [0, Lk)."""
    if backend == "flex":
        return _plan_flex(mask_fn, Lq, Lk, q_offset, key_mask_BK, device)
    if key_mask_BK is None:
        if mask_fn is bidirectional:
            return AttnPlan()
        if mask_fn is causal and q_offset == 0 and Lq == Lk:
            return AttnPlan(is_causal=True)
    m = dense_mask(mask_fn, Lq, Lk, q_offset, device)[None, None]
    if key_mask_BK is not None:
        m = m & key_mask_BK.to(device=device, dtype=torch.bool)[:, None, None, :]
    empty = ~m.any(dim=-1, keepdim=True)
    own_key = dense_mask(lambda q, kv: q == kv, Lq, Lk, q_offset, device)
    return AttnPlan(mask=m | (empty & own_key))


def _plan_flex(
    mask_fn: MaskFn, Lq: int, Lk: int, q_offset: int, key_mask_BK: Tensor | None, device: torch.device
) -> AttnPlan:
    if device.type != "cuda":
        raise DlmError(FLEX_CPU_ERROR)
    return AttnPlan(block_mask=block_mask(mask_fn, Lq, Lk, q_offset, key_mask_BK, device))


def mask_identity(mask_fn: MaskFn) -> tuple | None:
    """A hashable identity of a mask function: its code, defaults and closed-over values (so two closures made by
    ``block_causal(4)`` are the same mask); None when it has no code (e.g. a partial) or unhashable values."""
    code = getattr(mask_fn, "__code__", None)
    if code is None:
        return None
    cells = tuple(c.cell_contents for c in getattr(mask_fn, "__closure__", None) or ())
    key = (code, cells, getattr(mask_fn, "__defaults__", None))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def block_mask(
    mask_fn: MaskFn, Lq: int, Lk: int, q_offset: int, key_mask_BK: Tensor | None, device: torch.device
) -> Any:
    """FlexAttention BlockMask of mask_fn(q_offset + i, j) [& key_mask_BK[b, j]] for Lq queries over Lk keys.

    Without a key mask it is cached per (``mask_identity``, Lq, Lk, q_offset, device), so a training loop builds
    each mask once instead of every forward; with one (its content varies per batch) it is built every time.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if key_mask_BK is not None:
        key_mask_BK = key_mask_BK.to(device=device, dtype=torch.bool)

        def masked(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return mask_fn(q_idx + q_offset, kv_idx) & key_mask_BK[b, kv_idx]

        return create_block_mask(masked, key_mask_BK.shape[0], None, Lq, Lk, device=device)
    identity = mask_identity(mask_fn)
    key = None if identity is None else (identity, Lq, Lk, q_offset, str(device))
    if key is not None and key in _block_masks:
        _block_masks.move_to_end(key)
        return _block_masks[key]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_fn(q_idx + q_offset, kv_idx)

    out = create_block_mask(mask_mod, None, None, Lq, Lk, device=device)
    if key is not None:
        _block_masks[key] = out
        if len(_block_masks) > BLOCK_MASK_CACHE_SIZE:
            _block_masks.popitem(last=False)
    return out


class Attention(nn.Module):
    """q, k, v = x W_qkv; rotary on q, k; softmax(q k^T / sqrt(Dh) + mask) v; output projection W_o."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj.is_residual_out = True  # scaled init, see Transformer._init_weights

    def forward(
        self,
        x_BLD: Tensor,
        cos: Tensor,
        sin: Tensor,
        plan: AttnPlan,
        cache: KVStore | None = None,
        layer: int = 0,
        commit: bool = True,
    ) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = rotary_qkv(self.qkv(x_BLD), self.n_head, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, commit)
        dropout_p = self.dropout if self.training else 0.0
        if plan.block_mask is not None and dropout_p > 0:
            raise DlmError("flex attention has no attention dropout; set model.dropout=0 or use sdpa")
        y = plan.attend(q, k, v, dropout_p)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))
