"""The backbone's configuration: one typed dataclass, checked by ``validate``."""

from __future__ import annotations

from dataclasses import dataclass

from dlm.errors import DlmError

MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("rmsnorm", "layernorm")
BACKBONES = ("dlm", "gpt2-hf")
ATTN_BACKENDS = ("sdpa", "flex")
T_FREQ_DIM = 256  # width of the sinusoidal time features fed to the conditioning MLP (as DiT / MDLM)


@dataclass
class ModelConfig:
    """Transformer backbone.

    vocab_size:   network vocabulary (K, or K + 1 with an appended MASK); 0 = fill from the data.
    context:      longest sequence the model accepts: rotary positions are < context, and a KV cache
                  holds at most context tokens. 0 in a run config: the data's row length L (filled in by
                  the trainer, like vocab_size).
    n_layer:      transformer blocks.
    n_head:       attention heads; d_model / n_head must be even (rotary).
    d_model:      residual width.
    mlp:          "gelu" (Linear-GELU-Linear) or "swiglu" (SiLU(x W_g) * (x W_u) W_d).
    mlp_ratio:    MLP hidden width = mlp_ratio * d_model for gelu; for swiglu 2/3 of that rounded up to a
                  multiple of 64 (same parameter count as gelu up to rounding), see ``mlp_hidden``.
    dropout:      dropout on embeddings, attention weights and residual branches (0 <= p < 1).
    tie_weights:  share the token embedding and the output head.
    norm:         "rmsnorm" or "layernorm" (pre-norm blocks).
    time_cond:    DiT-style adaLN conditioning on t_B (MDLM's DiT): sinusoidal t features -> MLP -> per-block
                  shift/scale/gate and a final-layer shift/scale; the modulation layers start at zero.
    cond_dim:     width of the time-conditioning vector.
    rope_base:    rotary embedding base.
    norm_eps:     epsilon of the normalisation layers.
    attn_backend: "sdpa" (any device) or "flex" (FlexAttention, CUDA only).
    backbone:     "dlm" (this package's transformer) or "gpt2-hf" (transformers' GPT2LMHeadModel; learned
                  positions, GELU MLP of width mlp_ratio * d_model; mlp, norm, rope_base are not used).
    hf_path:      gpt2-hf only: a local directory for from_pretrained (a hub name only with DLM_ONLINE=1);
                  None = random init from this config.
    init_std:     std of the normal init; residual output projections use init_std / sqrt(2 n_layer).
    vocab_multiple: "dlm" only: the embedding and the output head get ``padded_vocab`` = ceil(V / m) * m rows
                  (m = 64 makes the head matmul tile evenly on GPUs); every forward still returns logits over
                  the true V only, so likelihoods and samples never see the padded rows. 1 = no padding.
    """

    vocab_size: int = 0
    context: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_weights: bool = True
    norm: str = "rmsnorm"
    time_cond: bool = False
    cond_dim: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attn_backend: str = "sdpa"
    backbone: str = "dlm"
    hf_path: str | None = None
    init_std: float = 0.02
    vocab_multiple: int = 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width: mlp_ratio * d_model (gelu, gpt2-hf); for swiglu 2/3 of it rounded up to 64."""
        hidden = round(self.mlp_ratio * self.d_model)
        if self.mlp == "swiglu" and self.backbone == "dlm":
            hidden = -(-(2 * hidden // 3) // 64) * 64
        return hidden

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def validate(self) -> None:
        """Raise ``DlmError`` (a ValueError) naming the first bad field."""
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                hint = " (0 means 'fill from the data'; set it before building)" if name == "vocab_size" else ""
                raise DlmError(f"model.{name} must be a positive integer, got {value!r}{hint}")
        if self.d_model % self.n_head:
            raise DlmError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.backbone not in BACKBONES:
            raise DlmError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "dlm" and self.head_dim % 2:
            raise DlmError(
                f"model.n_head: head dim d_model/n_head = {self.head_dim} must be even for rotary embeddings"
            )
        if self.mlp not in MLP_KINDS:
            raise DlmError(f"model.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.norm not in NORM_KINDS:
            raise DlmError(f"model.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise DlmError(f"model.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if not self.mlp_ratio > 0:
            raise DlmError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DlmError(f"model.dropout must satisfy 0 <= dropout < 1, got {self.dropout!r}")
        if self.time_cond and self.cond_dim <= 0:
            raise DlmError(f"model.cond_dim must be a positive integer, got {self.cond_dim!r}")
        if not self.rope_base > 0:
            raise DlmError(f"model.rope_base must be > 0, got {self.rope_base!r}")
        if not self.norm_eps > 0:
            raise DlmError(f"model.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise DlmError(f"model.init_std must be > 0, got {self.init_std!r}")
        m = self.vocab_multiple
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise DlmError(f"model.vocab_multiple must be a positive integer, got {m!r}")
        if self.backbone == "gpt2-hf":
            if m != 1:
                raise DlmError("model.vocab_multiple is not supported by backbone 'gpt2-hf'; leave it at 1")
            if self.time_cond:
                raise DlmError("model.time_cond is not supported by backbone 'gpt2-hf'; use backbone 'dlm'")
            if self.attn_backend != "sdpa":
                raise DlmError("model.attn_backend must be 'sdpa' for backbone 'gpt2-hf'")
        elif self.hf_path is not None:
            raise DlmError("model.hf_path is only used with backbone 'gpt2-hf'")
