"""The dlm transformer: pre-norm blocks, rotary attention, optional DiT-style adaLN time conditioning.

    h_0 = Emb(ids)
    h_{i+1} = h_i + g_1 * Attn(mod(Norm(h_i), a_1, b_1));  h_{i+1} += g_2 * MLP(mod(Norm(h_{i+1}), a_2, b_2))
    logits = W_out mod(Norm(h_n), a_f, b_f)         (float32, the first V of ``padded_vocab`` rows)

with mod(x, a, b) = x (1 + b) + a. Without time conditioning a = b = 0 and g = 1; with it, (a, b, g) come
from zero-initialised linear maps of c = TimeEmbedding(t), so at init every block is the identity and the
model does not depend on t (as DiT / MDLM).

Token-by-token decoding has a static-shape step (``decode_step``, ``decoder``; see ``dlm.model.decode``).
With ``model.vocab_multiple`` = m the embedding and head have ceil(V / m) * m rows; the padded rows are never
looked up (ids < V) and their logits are sliced off, so every output is over the true vocabulary V.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dlm.errors import DlmError
from dlm.model.attention import Attention, AttnPlan, plan_attention
from dlm.model.cache import KVCache, KVStore, cache_length
from dlm.model.config import ModelConfig
from dlm.model.decode import Decoder, StepWrite, key_valid_mask
from dlm.model.layers import MLP, AdaLN, TimeEmbedding, make_norm, modulate, rotary_cos_sin
from dlm.model.masks import AttnSpec, resolve


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.adaln = AdaLN(cfg.cond_dim, cfg.d_model, 6) if cfg.time_cond else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        plan: AttnPlan,
        c_BC: Tensor | None,
        cache: KVStore | None,
        layer: int,
        commit: bool,
    ) -> Tensor:
        if self.adaln is None:
            x = x + self.drop(self.attn(self.norm1(x), cos, sin, plan, cache, layer, commit))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c_BC)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, plan, cache, layer, commit)
        x = x + gate1 * self.drop(h)
        return x + gate2 * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class Transformer(nn.Module):
    """The "dlm" backbone. See the module docstring for the equations.

    static_decode: a capability flag the AR sampler reads: True = decode token by token through ``decoder``
    (static shapes, CUDA graph on CUDA); set it False on an instance to use the growing-slice cached forward.
    """

    static_decode: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.time_emb = TimeEmbedding(cfg.cond_dim) if cfg.time_cond else None
        self.adaln_f = AdaLN(cfg.cond_dim, cfg.d_model, 2) if cfg.time_cond else None
        self.head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self._init_weights()
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """normal(0, init_std); residual output projections init_std / sqrt(2 n_layer); adaLN zero."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "is_zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    scale = 1 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "is_residual_out", 0) else 1
                    nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def embedding_params(self) -> list[nn.Parameter]:
        """Parameters that count_params(exclude_embeddings=True) leaves out: token embedding, untied head."""
        params = [self.tok_emb.weight]
        if self.head.weight is not self.tok_emb.weight:
            params.append(self.head.weight)
        return params

    def init_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for up to max_len tokens (default: context), on the model's device and dtype."""
        max_len = cache_length(max_len, self.cfg.context)
        weight = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layer,
            batch_size,
            self.cfg.n_head,
            self.cfg.head_dim,
            max_len,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )

    def forward(
        self,
        ids_BL: Tensor,
        *,
        attn: AttnSpec = "causal",
        t_B: Tensor | None = None,
        key_mask_BL: Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
        pos: Tensor | None = None,
        head_rows: int | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Float32 logits [B, L, V] (with ``head_rows`` = R: [B, R, V]); with ``return_hidden`` the final hidden
        states h [B, L, D] (or [B, R, D]) that the head would read, for ``head_logits`` on selected rows.

        attn:        "causal", "bidirectional" or a MaskFn of absolute (query, key) indices.
        t_B:         diffusion time in [0, 1], required iff the model is time-conditioned.
        key_mask_BL: bool, True = real token; keys at False positions are not attended to. With a cache it
                     covers the new tokens only; the cache remembers the mask of committed tokens.
        cache:       KVCache; new tokens take indices cache.length + arange(L) and see the cached keys.
        commit:      store the new keys/values in the cache and advance cache.length.
        pos:         rotary positions, [L] or [B, L] (default: the indices). BD3-LM's x_t ⊕ x_0 pass uses
                     arange(L).repeat(2) so both copies share positions. Must be < context.
        head_rows:   apply the final norm and the output head to the first R positions only (1 <= R <= L) and
                     return their logits; the others still serve as keys/values in every layer. BD3-LM's
                     one-pass loss needs the noisy half only: R = L of the 2L input saves the clean half's
                     head (V x d per token, forward and backward).
        return_hidden: return h = mod(Norm(x), a_f, b_f) in the compute dtype instead of W_out h: a loss then
                     applies the head to the rows it scores only (``dlm.process.losses.rows_weighted_loss``).
        """
        if ids_BL.dim() != 2 or ids_BL.dtype not in (torch.int64, torch.int32):
            raise DlmError(f"ids_BL must be an int64 tensor [B, L], got {ids_BL.dtype} {tuple(ids_BL.shape)}")
        B, L = ids_BL.shape
        c_BC = self._condition(t_B, B)
        if key_mask_BL is not None and key_mask_BL.shape != ids_BL.shape:
            raise DlmError(f"key_mask_BL shape {tuple(key_mask_BL.shape)} != ids shape {tuple(ids_BL.shape)}")
        offset = 0
        if cache is not None:
            cache.check(B, L)
            offset = cache.length
        device = ids_BL.device
        if pos is None:
            if offset + L > self.cfg.context:
                raise DlmError(f"sequence of {offset + L} tokens exceeds model.context={self.cfg.context}")
            pos = torch.arange(offset, offset + L, device=device)
        else:
            if pos.shape[-1] != L or pos.dim() not in (1, 2):
                raise DlmError(f"pos must have shape [{L}] or [B, {L}], got {tuple(pos.shape)}")
            if int(pos.max()) >= self.cfg.context or int(pos.min()) < 0:
                raise DlmError(f"positions must lie in [0, model.context={self.cfg.context})")
        cos, sin = rotary_cos_sin(pos.to(device), self.cfg.head_dim, self.cfg.rope_base)

        key_mask_BK = key_mask_BL if cache is None else cache.key_mask(key_mask_BL, L, commit)
        plan = plan_attention(resolve(attn), L, offset + L, offset, key_mask_BK, self.cfg.attn_backend, device)

        if head_rows is not None and not 1 <= head_rows <= L:
            raise DlmError(f"head_rows must lie in [1, {L}] (the input length), got {head_rows!r}")

        x = self.drop(self.tok_emb(ids_BL))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan, c_BC, cache, i, commit)
        if head_rows is not None:
            x = x[:, :head_rows]
        if cache is not None and commit:
            cache.advance(L)
        h_BLD = self._hidden(x, c_BC)
        return h_BLD if return_hidden else self.head_logits(h_BLD)

    def _hidden(self, x_BLD: Tensor, c_BC: Tensor | None) -> Tensor:
        """The head's input h = mod(Norm(x), a_f, b_f) (per row: the head may be applied to any subset)."""
        x_BLD = self.norm_f(x_BLD)
        if self.adaln_f is not None:
            shift, scale = self.adaln_f(c_BC)
            x_BLD = modulate(x_BLD, shift, scale)
        return x_BLD

    @property
    def head_weight(self) -> Tensor:
        """W_out over the true vocabulary, [V, D] (a view: the padded rows, if any, are left out; tied or not)."""
        weight = self.head.weight
        return weight if self.cfg.padded_vocab == self.cfg.vocab_size else weight[: self.cfg.vocab_size]

    def head_logits(self, h_ND: Tensor) -> Tensor:
        """Float32 logits W_out h over the true vocabulary, [..., V], for hidden states from ``return_hidden``."""
        logits_NV = self.head(h_ND)
        if self.cfg.padded_vocab != self.cfg.vocab_size:
            logits_NV = logits_NV[..., : self.cfg.vocab_size]
        return logits_NV.float()

    def decode_step(self, tok_B1: Tensor, pos_1: Tensor, cache: KVCache) -> Tensor:
        """Float32 logits [B, V] after feeding tok_B1 (int64 [B, 1]) at the position p held in pos_1 (int64 [1],
        on the model's device), causal attention over the cached keys j <= p.

        Static shapes and no host synchronisation (capturable as a CUDA graph): k_p, v_p are written at index p
        of the cache (``decode.StepWrite``), the query attends over all max_len cached keys with the mask
        j <= p computed on the device (``decode.key_valid_mask``), rotary angles come from pos_1. Equals
        ``forward(tok_B1, cache=cache)`` at cache.length = p, except that cache.length is not advanced and
        nothing is checked (p < max_len is the caller's invariant; ``Decoder`` keeps it). No time conditioning.
        """
        c_BC = self._condition(None, tok_B1.shape[0])
        cos, sin = rotary_cos_sin(pos_1, self.cfg.head_dim, self.cfg.rope_base)
        plan = AttnPlan(mask=key_valid_mask(cache.max_len, pos_1))
        writer = StepWrite(cache, pos_1)
        x = self.drop(self.tok_emb(tok_B1))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan, c_BC, writer, i, True)
        return self.head_logits(self._hidden(x, c_BC))[:, -1]

    def decoder(self, cache: KVCache, capture: bool | None = None) -> Decoder:
        """A ``dlm.model.decode.Decoder`` stepping this model over ``cache`` from cache.length on (a CUDA graph
        on CUDA unless capture=False)."""
        return Decoder(self, cache, capture)

    def _condition(self, t_B: Tensor | None, batch_size: int) -> Tensor | None:
        if self.time_emb is None:
            if t_B is not None:
                raise DlmError("model has no time conditioning (model.time_cond=False) but t_B was given")
            return None
        if t_B is None:
            raise DlmError("model is time-conditioned (model.time_cond=True): t_B is required")
        if t_B.shape != (batch_size,):
            raise DlmError(f"t_B must have shape [{batch_size}], got {tuple(t_B.shape)}")
        return self.time_emb(t_B)
