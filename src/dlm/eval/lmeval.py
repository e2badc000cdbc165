"""Downstream tasks through lm-eval-harness: any dlm run as an ``lm_eval`` model, and ``dlm lm-eval RUN``.

The scoring core (``continuation_logprobs``) needs no lm_eval; the adapter class (``lm_class``) and the task runner
(``evaluate_tasks``) import it when called (the optional extra ``dlm[lmeval]``).

What a request scores. A request is (context ids c, continuation ids y, |y| = m >= 1). The row is x = c ⊕ y, left-
truncated to the longest row the family scores at once (lm-eval's convention: the context loses its oldest tokens;
``row_limit``: the model context, plus one for a next-token family whose network never reads the last token), and
the scored positions are the last m (never position 0: an empty context becomes [BOS], or [EOS] without a BOS, as
lm-eval's prefix token). A continuation longer than the row limit minus one is refused.

- Next-token families (``process.exact_likelihood`` and ``process.conditioning == "prefix"``: AR), exactly,

      log p(y | c) = sum_{i in y} log softmax(f_theta(x_{<i}))[x_i],     greedy = every x_i is the argmax,

  from one causal forward of x_{<L} (float64 log-softmax of the float32 logits; equal to ``Process.nll`` on the
  same row with only y scored).
- Every other family, a lower bound: the family's own bound (``Process.nll``) of the row with only y scored. Every
  family noises only the scored positions (``scored_positions``: the batch mask) and shows the others clean, so

      log p(y | c) >= -B(y | c),   B = E[ Bhat ],   Bhat = the family's single-draw estimate (MDLM, SEDD-absorbing,
      BD3-LM: the masked-count estimator of ``dlm.process.estimators``; D3PM, SEDD-uniform: a uniform time/step),

  estimated by K independent draws (the row repeated K times, one draw each, antithetic sampling off so the draws
  are independent): logprob = -(1/K) sum_j Bhat_j, se = sd_j(Bhat_j) / sqrt(K) (None for K = 1). greedy = None.
  For MDLM with a linear schedule and one continuation token every draw masks that token with weight 1, so the
  estimate is exactly log p_theta(y | c, y masked) (SE 0); for two tokens its mean is the order-average
  (1/2) sum_{orders} log prod p_theta (the any-order ELBO), below the mixture log p of the order-random sampler.

Rows of equal length are batched (``batch_size`` rows of the network at once, K copies per request included), never
padded: a diffusion network attends to every position, so padding would change the conditional. The network sees
exactly c ⊕ (noised) y.

Tokenization, as lm-eval's Hugging Face model: trailing spaces of the context move to the continuation, then
whole = encode(context + continuation), c = encode(context), y = whole[len(c):]; no special token is added (the run's
tokenizer never adds one).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.data.tokenizers import Tokenizer
from dlm.errors import DlmError
from dlm.process.base import eval_mode, model_context, model_device, token_logprobs

__all__ = ["Scored", "continuation_logprob", "continuation_logprobs", "encode_pair", "next_token_family", "row_limit"]


@dataclass(frozen=True)
class Scored:
    """log p(continuation | context) of one request: exact (``exact``) or the mean of K draws of a lower bound,
    ``se`` its standard error over the draws (None for an exact value or K = 1), ``greedy`` whether greedy
    decoding would produce the continuation (None where undefined), ``truncated`` the context lost tokens."""

    logprob: float
    se: float | None
    greedy: bool | None
    exact: bool
    truncated: bool = False


def next_token_family(process: Any) -> bool:
    """A family whose exact likelihood is next-token prediction (AR): exact and prefix-conditioned."""
    return bool(process.exact_likelihood) and process.conditioning == "prefix"


def row_limit(run: Any) -> int:
    """Longest row (context ⊕ continuation) scored at once: the model context, + 1 for a next-token family (its
    network reads x_{<L} only)."""
    context = model_context(run.model)
    if context is None:
        raise DlmError("the model does not state its context length")
    return context + int(next_token_family(run.process))


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF model splits them (module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


def _row(run: Any, context: Sequence[int], continuation: Sequence[int], limit: int) -> tuple[list[int], int, bool]:
    """(row ids, number of scored positions m, context truncated) of one request (module docstring)."""
    m = len(continuation)
    if m > limit - 1:
        raise DlmError(
            f"a continuation of {m} tokens does not fit the model's rows of {limit} tokens (one context token at least)"
        )
    ctx = list(context)
    if not ctx:
        specials = run.process.specials
        ctx = [specials.bos if specials.bos is not None else specials.eos]
    whole = ctx + list(continuation)
    return whole[-limit:], m, len(whole) > limit


def continuation_logprob(
    run: Any, context_ids: Sequence[int], continuation_ids: Sequence[int], k: int, generator: torch.Generator | None
) -> tuple[float, float | None, bool | None, bool]:
    """One request: (logprob, se, is_greedy | None, exact) as ``continuation_logprobs``."""
    s = continuation_logprobs(run, [(context_ids, continuation_ids)], k=k, generator=generator)[0]
    return s.logprob, s.se, s.greedy, s.exact


def continuation_logprobs(
    run: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    k: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
) -> list[Scored]:
    """log p(y | c) for each (c, y) in ``requests`` (module docstring): exact for a next-token family, else the
    K-draw estimate of the family's lower bound with its standard error. ``run``: a ``LoadedRun`` (or anything with
    ``model`` and ``process``). Rows of equal length go through the network together, ``batch_size`` rows at once
    (K per request for a bound); the draws follow ``generator`` in the order of the sorted row lengths."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DlmError(f"K (Monte-Carlo draws per request) must be an integer >= 1, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DlmError(f"batch size must be a positive integer, got {batch_size!r}")
    limit = row_limit(run)
    rows = [_row(run, c, y, limit) for c, y in requests]
    out: list[Scored | None] = [None] * len(rows)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (ids, m, _) in enumerate(rows):
        if m == 0:
            out[i] = Scored(0.0, None, True if next_token_family(run.process) else None, run.process.exact_likelihood)
        else:
            groups[len(ids)].append(i)
    exact = next_token_family(run.process)
    copies = 1 if exact else k
    per_batch = max(1, batch_size // copies)
    device = model_device(run.model)
    with eval_mode(run.model), torch.no_grad():
        for length in sorted(groups):
            for chunk in _chunks(groups[length], per_batch):
                ids_RL = torch.tensor([rows[i][0] for i in chunk], dtype=torch.int64, device=device)
                m_R = torch.tensor([rows[i][1] for i in chunk], device=device)
                scored_RL = torch.arange(length, device=device)[None, :] >= (length - m_R)[:, None]
                if exact:
                    scored = _next_token(run, ids_RL, scored_RL)
                else:
                    scored = _bound(run, ids_RL, scored_RL, k, generator)
                for i, s in zip(chunk, scored):
                    out[i] = replace(s, truncated=rows[i][2])
    assert all(s is not None for s in out)
    return out  # type: ignore[return-value]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for a in range(0, len(items), size):
        yield items[a : a + size]


def _next_token(run: Any, ids_RL: Tensor, scored_RL: Tensor) -> list[Scored]:
    """Exact log p(y | c) = sum_{i scored} log softmax(f(x_{<i}))[x_i] and the greedy check, one causal forward."""
    logits_RLV = run.model(ids_RL[:, :-1], attn=run.process.attention)
    targets_RL, sel_RL = ids_RL[:, 1:], scored_RL[:, 1:]
    logp_RL = torch.zeros(targets_RL.shape, dtype=torch.float64, device=ids_RL.device)
    logp_RL[sel_RL] = token_logprobs(logits_RLV[sel_RL], targets_RL[sel_RL])
    hit_RL = (logits_RLV.argmax(-1) == targets_RL) | ~sel_RL
    logp_R, greedy_R = logp_RL.sum(1).tolist(), hit_RL.all(1).tolist()
    return [Scored(lp, None, bool(g), True) for lp, g in zip(logp_R, greedy_R)]


def _bound(run: Any, ids_RL: Tensor, scored_RL: Tensor, k: int, generator: torch.Generator | None) -> list[Scored]:
    """-(1/K) sum_j Bhat_j and sd_j / sqrt(K) per request: K independent single-draw bounds (module docstring)."""
    process = copy.copy(run.process)  # the run's process, with one independent draw per row
    process.cfg = replace(run.process.cfg, eval_t_samples=1, antithetic=False)
    batch = Batch(ids_RL.repeat_interleave(k, 0), scored_RL.repeat_interleave(k, 0))
    nats_RK = process.nll(run.model, batch, generator).nats_B.to(torch.float64).view(-1, k).cpu()
    mean_R = nats_RK.mean(1)
    se_R = nats_RK.std(1) / math.sqrt(k) if k > 1 else None
    return [
        Scored(-float(mean_R[r]), None if se_R is None else float(se_R[r]), None, False) for r in range(len(mean_R))
    ]
