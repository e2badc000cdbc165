"""Parameter counts and forward/training FLOPs per token (Kaplan et al. 2020; PaLM appendix B; nanoGPT).

    N_matmul  = n_layer * (4 d^2 + m d h)        m = 3 (swiglu: gate, up, down) or 2 (gelu), h = mlp_hidden
    forward   = 2 N_matmul                       one multiply-add per weight per token
              + 2 * 2 * n_layer * seq_len * d    attention scores q k^T and weighted sum of v
              + 2 d V                            output head
    train     = 3 * forward                      backward costs twice the forward

A training forward over ``copies`` x seq_len input tokens per seq_len data tokens (BD3-LM's z_t ⊕ x: copies = 2,
``Process.train_copies``), every input token attending over all of them and the head on the seq_len data rows:

    forward   = copies (2 N_matmul + 2 * 2 * n_layer * (copies seq_len) * d) + 2 d V       per data token

(copies = 1 is the formula above).

Conventions: attention is counted over the full seq_len for every token (as PaLM's 6N + 12 L H Q T and
nanoGPT's MFU estimate), i.e. causal (and block) masking is not discounted; norms, activations, softmax, rotary and
the embedding lookup are not counted; the adaLN time conditioning is computed once per sequence, not per
token, so its cost (about 2 cond_dim (256 + cond_dim + 6 d n_layer + 2 d) per sequence) is left out. V is the
head's row count as executed: ``cfg.padded_vocab`` (vocab_size rounded up to model.vocab_multiple; the padded
rows' logits are computed, then sliced off).
"""

from __future__ import annotations

from torch import nn

from dlm.model.config import ModelConfig


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Trainable parameters, tied weights counted once; the padded embedding/head rows of model.vocab_multiple
    are parameters and are counted (they are embeddings, so exclude_embeddings leaves them out).

    exclude_embeddings: leave out the token embedding and an untied output head (and GPT-2's learned
    position embedding), i.e. Kaplan's non-embedding N. Uses ``model.embedding_params()`` when the model
    has it, else every nn.Embedding weight.
    """
    params = list(model.parameters())  # deduplicated: a tied weight appears once
    total = sum(p.numel() for p in params)
    if not exclude_embeddings:
        return total
    if hasattr(model, "embedding_params"):
        excluded = model.embedding_params()
    else:
        excluded = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    unique = {id(p): p for p in excluded}
    return total - sum(p.numel() for p in unique.values())


def flops_per_token(cfg: ModelConfig, seq_len: int, copies: int = 1) -> dict[str, int]:
    """{"forward", "train", "matmul_params", "attention", "head"}: FLOPs per (data) token at sequence length
    seq_len, the forward running over ``copies`` x seq_len input tokens with the head on seq_len rows.

    See the module docstring for the formula; gpt2-hf is counted with its GELU MLP. "attention" is the attention
    FLOPs per data token (copies x those of one input token over copies x seq_len keys); "matmul_params" is N_matmul.
    """
    cfg.validate()
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    d, h = cfg.d_model, cfg.mlp_hidden
    n_mlp_mats = 3 if (cfg.mlp == "swiglu" and cfg.backbone == "dlm") else 2
    matmul_params = cfg.n_layer * (4 * d * d + n_mlp_mats * d * h)
    attention = copies * 2 * 2 * cfg.n_layer * (copies * seq_len) * d
    head = 2 * d * cfg.padded_vocab
    forward = copies * 2 * matmul_params + attention + head
    return {
        "forward": forward,
        "train": 3 * forward,
        "matmul_params": matmul_params,
        "attention": attention,
        "head": head,
    }
