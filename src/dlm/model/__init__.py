"""The backbone: one transformer ("dlm") or Hugging Face GPT-2 ("gpt2-hf"), one forward signature.

model(ids_BL, *, attn="causal" | "bidirectional" | MaskFn, t_B=None, key_mask_BL=None,
      cache=None, commit=True, pos=None) -> logits_BLV (float32)
model.init_cache(batch_size, max_len=None, device=None, dtype=None) -> KVCache

The dlm Transformer also decodes token by token with static shapes (``static_decode`` = True):
model.decoder(cache, capture=None) -> Decoder;  Decoder.step(tok_B) -> logits_BV  (a CUDA graph on CUDA)
"""

from __future__ import annotations

from torch import nn

from dlm.model.cache import KVCache
from dlm.model.config import ModelConfig
from dlm.model.decode import Decoder
from dlm.model.flops import count_params, flops_per_token
from dlm.model.masks import (
    AttnSpec,
    MaskFn,
    bidirectional,
    block_causal,
    block_diffusion_train,
    causal,
    dense_mask,
)

__all__ = [
    "AttnSpec",
    "Decoder",
    "KVCache",
    "MaskFn",
    "ModelConfig",
    "bidirectional",
    "block_causal",
    "block_diffusion_train",
    "build_model",
    "causal",
    "count_params",
    "dense_mask",
    "flops_per_token",
]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate cfg and build its backbone: "dlm" -> Transformer, "gpt2-hf" -> GPT2Backbone."""
    cfg.validate()
    if cfg.backbone == "gpt2-hf":
        from dlm.model.hf_gpt2 import GPT2Backbone

        return GPT2Backbone(cfg)
    from dlm.model.transformer import Transformer

    return Transformer(cfg)
