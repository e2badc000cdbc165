"""GPT-2 from Hugging Face transformers behind the dlm backbone interface (causal only).

Random init from a ModelConfig, or ``from_pretrained(cfg.hf_path)`` from a local directory (a hub name
only when the environment sets DLM_ONLINE=1). transformers is imported lazily so the package imports
without it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn

from dlm.errors import DlmError
from dlm.model.cache import CacheState, cache_length
from dlm.model.config import ModelConfig
from dlm.model.masks import AttnSpec, causal

MIN_TRANSFORMERS = "5.24"  # the tested version with GPT2LMHeadModel.forward(cache=...); pyproject.toml agrees


class GPT2Cache(CacheState):
    """KVCache's interface (length, max_len, batch_size, key mask, truncate, reset) over a DynamicCache."""

    def __init__(self, batch_size: int, max_len: int, device: torch.device | str | None = None) -> None:
        from transformers import DynamicCache

        super().__init__(batch_size, max_len, device)
        self.dynamic = DynamicCache()

    def _forget(self, length: int) -> None:
        self.dynamic.crop(length - self.length)  # a negative crop removes that many tokens (transformers 4, 5)


class GPT2Backbone(nn.Module):
    """transformers.GPT2LMHeadModel with the dlm forward signature; returns float32 logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.backbone != "gpt2-hf":
            raise DlmError(f"GPT2Backbone needs model.backbone='gpt2-hf', got {cfg.backbone!r}")
        self.cfg = cfg
        self.hf = _load(cfg) if cfg.hf_path is not None else _random(cfg)
        if "cache" not in inspect.signature(type(self.hf).forward).parameters:  # older: past_key_values, and
            import transformers  # a `cache=` keyword would vanish into **kwargs, decoding without the cache

            raise DlmError(
                f"backbone 'gpt2-hf' needs transformers >= {MIN_TRANSFORMERS} (its `cache` argument), "
                f"found {transformers.__version__}: pip install -c constraints.txt -e '.[hf]'"
            )

    def embedding_params(self) -> list[nn.Parameter]:
        """Token and position embeddings, and the head when it is not tied (Kaplan's N excludes them)."""
        wte, wpe, head = (
            self.hf.transformer.wte.weight,
            self.hf.transformer.wpe.weight,
            self.hf.lm_head.weight,
        )
        return [wte, wpe] if head is wte else [wte, wpe, head]

    def init_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> GPT2Cache:
        """An empty cache; dtype is unused (DynamicCache takes the dtype of the keys it receives)."""
        max_len = cache_length(max_len, self.cfg.context)
        device = self.hf.transformer.wte.weight.device if device is None else device
        return GPT2Cache(batch_size, max_len, device)

    def forward(
        self,
        ids_BL: Tensor,
        *,
        attn: AttnSpec = "causal",
        t_B: Tensor | None = None,
        key_mask_BL: Tensor | None = None,
        cache: GPT2Cache | None = None,
        commit: bool = True,
        pos: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Float32 logits [B, L, V]; same arguments as Transformer.forward, attn must be causal. With
        ``return_hidden`` the final hidden states h [B, L, D] (after ln_f), for ``head_logits``."""
        if attn != "causal" and attn is not causal:
            raise DlmError(f"backbone 'gpt2-hf' supports only attn='causal', got {attn!r}")
        if t_B is not None:
            raise DlmError("model has no time conditioning (backbone 'gpt2-hf') but t_B was given")
        if ids_BL.dim() != 2:
            raise DlmError(f"ids_BL must be [B, L], got shape {tuple(ids_BL.shape)}")
        if key_mask_BL is not None and key_mask_BL.shape != ids_BL.shape:
            raise DlmError(f"key_mask_BL shape {tuple(key_mask_BL.shape)} != ids shape {tuple(ids_BL.shape)}")
        B, L = ids_BL.shape
        offset = 0
        if cache is not None:
            cache.check(B, L)
            offset = cache.length
        if pos is None and offset + L > self.cfg.context:
            raise DlmError(f"sequence of {offset + L} tokens exceeds model.context={self.cfg.context}")
        if pos is not None and (int(pos.max()) >= self.cfg.context or int(pos.min()) < 0):
            raise DlmError(f"positions must lie in [0, model.context={self.cfg.context})")
        position_ids = torch.arange(offset, offset + L, device=ids_BL.device)[None] if pos is None else pos
        attention_mask = key_mask_BL if cache is None else cache.key_mask(key_mask_BL, L, commit)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=ids_BL.device, dtype=torch.long)
        out = self.hf.transformer(  # GPT2LMHeadModel.forward = transformer, then lm_head (applied below)
            input_ids=ids_BL,
            attention_mask=attention_mask,
            position_ids=position_ids.expand(B, L),
            cache=None if cache is None else cache.dynamic,  # not past_key_values: deprecated, gone in 5.40
            use_cache=cache is not None,
        )
        if cache is not None:
            if commit:
                cache.advance(L)
            else:
                cache.dynamic.crop(-L)
        h_BLD = out.last_hidden_state
        return h_BLD if return_hidden else self.head_logits(h_BLD)

    @property
    def head_weight(self) -> Tensor:
        """The LM head's weight [V, D] (tied to wte when model.tie_weights)."""
        return self.hf.lm_head.weight

    def head_logits(self, h_ND: Tensor) -> Tensor:
        """Float32 logits [..., V] = lm_head(h) for hidden states from ``return_hidden``."""
        return self.hf.lm_head(h_ND).float()


def _gpt2_config(cfg: ModelConfig) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_hidden,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_weights,
        bos_token_id=None,  # the tokenizer owns the specials; GPT-2's 50256 may not exist in this vocabulary
        eos_token_id=None,
    )


def _random(cfg: ModelConfig) -> nn.Module:
    from transformers import GPT2LMHeadModel

    config = _gpt2_config(cfg)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def _load(cfg: ModelConfig) -> nn.Module:
    """from_pretrained(hf_path); the architecture fields of cfg must agree with the checkpoint."""
    from transformers import GPT2LMHeadModel

    online = os.environ.get("DLM_ONLINE") == "1"
    try:
        model = GPT2LMHeadModel.from_pretrained(
            cfg.hf_path,
            local_files_only=not online,
            attn_implementation="sdpa",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
        )
    except OSError as err:
        where = "" if online else " (offline: a local directory is needed; set DLM_ONLINE=1 to download)"
        raise DlmError(f"model.hf_path: cannot load GPT-2 from {cfg.hf_path!r}{where}: {err}") from err
    hf = model.config
    fields = (
        ("n_layer", hf.n_layer),
        ("n_head", hf.n_head),
        ("d_model", hf.n_embd),
        ("mlp_hidden", hf.n_inner or 4 * hf.n_embd),
        ("tie_weights", bool(hf.tie_word_embeddings)),
    )
    for field, theirs in fields:
        if getattr(cfg, field) != theirs:
            name = "mlp_ratio (MLP width mlp_ratio * d_model)" if field == "mlp_hidden" else field
            raise DlmError(f"model.{name} gives {getattr(cfg, field)} but {cfg.hf_path!r} has {theirs}")
    if cfg.context > hf.n_positions:
        raise DlmError(f"model.context={cfg.context} exceeds the checkpoint's n_positions={hf.n_positions}")
    if cfg.vocab_size < hf.vocab_size:
        raise DlmError(f"model.vocab_size={cfg.vocab_size} is smaller than the checkpoint's {hf.vocab_size}")
    if cfg.vocab_size > hf.vocab_size:  # e.g. an appended MASK id
        model.resize_token_embeddings(cfg.vocab_size)
    return model
