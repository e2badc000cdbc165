"""Downstream tasks through lm-eval-harness: any dlm run as an ``lm_eval`` model (tasks of a run: ``lmeval_tasks``).

The scoring core (``continuation_logprobs``) needs no lm_eval; the adapter class (``lm_class``) imports it when
called (the optional extra ``dlm[lmeval]``), and so does the task runner, ``dlm.eval.lmeval_tasks.evaluate_tasks``.

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
  Common random numbers (``common_seed``, the lm-eval model's default): request r's K draws come from their own
  generator, seeded by h(seed, c_r) with c_r the row's context tokens, so the choices of one question (same
  context) share their draws: the same times / mask counts, and the same masks where their lengths are equal.
  Each estimate keeps its law (unbiased, the same variance), and a request's value no longer depends on which
  other requests are scored with it, or in what order. The difference between two choices a and b has
  Var(Bhat_a - Bhat_b) = Var_a + Var_b - 2 Cov(Bhat_a, Bhat_b): smaller where the choices' per-position terms
  move together (positions hard for one are hard for the other), larger where they move against each other.
  Measured on a trained tiny-cpu MDLM (docs/LOG.md 2026-12-07): -40% on dlm_lastword, unchanged on dlm_cloze.
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
from dlm.seeds import derive_seed

__all__ = [
    "Scored",
    "check_draws",
    "continuation_logprob",
    "continuation_logprobs",
    "encode_pair",
    "import_lm_eval",
    "lm_class",
    "next_token_family",
    "row_limit",
]


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
    """(row ids, number of scored positions m, context truncated) of one request (module docstring). A block
    family's row is cut to a multiple of its block by dropping the oldest context tokens, or, when the context is
    too short for that, filled on the left with the boundary id up to the next multiple."""
    m = len(continuation)
    if m > limit - 1:
        raise DlmError(
            f"a continuation of {m} tokens does not fit the model's rows of {limit} tokens (one context token at least)"
        )
    specials = run.process.specials
    boundary = specials.bos if specials.bos is not None else specials.eos
    whole = (list(context) or [boundary]) + list(continuation)
    row, truncated = whole[-limit:], len(whole) > limit
    mult = run.process.row_multiple  # BD3-LM: rows of whole blocks
    extra = len(row) % mult
    if extra and len(row) - extra >= m + 1:
        row, truncated = row[extra:], True
    elif extra:
        row = [boundary] * (mult - extra) + row
        if len(row) > limit:
            raise DlmError(f"a continuation of {m} tokens does not fit the model's blocks of {mult} within {limit}")
    return row, m, truncated


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
    common_seed: int | None = None,
) -> list[Scored]:
    """log p(y | c) for each (c, y) in ``requests`` (module docstring): exact for a next-token family, else the
    K-draw estimate of the family's lower bound with its standard error. ``run``: a ``LoadedRun`` (or anything with
    ``model`` and ``process``). Rows of equal length go through the network together, ``batch_size`` rows at once
    (K per request for a bound); the draws follow ``generator`` in the order of the sorted row lengths, or, with
    ``common_seed``, each request's own generator seeded by h(common_seed, its context) (``derive_seed``: common
    random numbers; a bound's K rows then go through the network per request)."""
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
    per_batch = 1 if common_seed is not None and not exact else max(1, batch_size // copies)
    device = model_device(run.model)
    with eval_mode(run.model), torch.no_grad():
        for length in sorted(groups):
            for chunk in _chunks(groups[length], per_batch):
                ids_RL = torch.tensor([rows[i][0] for i in chunk], dtype=torch.int64, device=device)
                m_R = torch.tensor([rows[i][1] for i in chunk], device=device)
                scored_RL = torch.arange(length, device=device)[None, :] >= (length - m_R)[:, None]
                if exact:
                    scored = _next_token(run, ids_RL, scored_RL)
                elif common_seed is not None:  # one request: its own stream, keyed by its context
                    context = rows[chunk[0]][0][: length - rows[chunk[0]][1]]
                    own_seed = derive_seed(common_seed, "lmeval", tuple(int(c) for c in context))
                    own = torch.Generator(device=device).manual_seed(own_seed)
                    scored = _bound(run, ids_RL, scored_RL, k, own)
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
    greedy_R = _single_token_greedy(run, ids_RL, scored_RL, generator)
    return [
        Scored(-float(mean_R[r]), None if se_R is None else float(se_R[r]), greedy_R[r], False)
        for r in range(len(mean_R))
    ]


def _single_token_greedy(
    run: Any, ids_RL: Tensor, scored_RL: Tensor, generator: torch.Generator | None
) -> list[bool | None]:
    """A diffusion family's greedy check of a one-token continuation (LAMBADA-style): its default sampler at
    temperature 0, every other position fixed, in the fewest steps it takes (one, or one per block), draws exactly
    the continuation token (MDLM: y = argmax_v p_theta(v | c, y masked)). None for longer continuations."""
    one_R = scored_RL.sum(1) == 1
    out: list[bool | None] = [None] * ids_RL.shape[0]
    if not bool(one_R.any()):
        return out
    rows_N = one_R.nonzero().squeeze(1)
    fixed_NL = ids_RL[rows_N].masked_fill(scored_RL[rows_N], -1)
    process, L = run.process, ids_RL.shape[1]
    steps = {"steps": process.min_steps(L)} if process.step_sampler else {}
    res = process.sample(run.model, len(rows_N), L, fixed_ids=fixed_NL, generator=generator, temperature=0.0, **steps)
    for r, hit in zip(rows_N.tolist(), (res.ids_NL == ids_RL[rows_N]).all(1).tolist()):
        out[r] = bool(hit)
    return out


# ----------------------------------------------------------------------------------------------- the lm_eval model

EXTRA_HINT = "pip install 'dlm[lmeval]'"


def import_lm_eval() -> Any:
    """The ``lm_eval`` package with its evaluator and task manager; a one-line DlmError naming the extra when it
    is not installed."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.evaluator
        import lm_eval.tasks
    except ImportError as e:
        raise DlmError(f"lm-eval tasks need the lm-eval package ({e.name} is missing): {EXTRA_HINT}") from None
    return lm_eval


def lm_class() -> type:
    """``DlmLM``, the ``lm_eval.api.model.LM`` subclass that scores requests with a dlm run (built on first use,
    so this module imports without lm_eval)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        _LM_CLASS = _make_lm_class(import_lm_eval())
    return _LM_CLASS


_LM_CLASS: type | None = None


def _make_lm_class(lm_eval: Any) -> type:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class DlmLM(lm_eval.api.model.LM):
        """A dlm run as an lm-eval model. ``loglikelihood``: ``continuation_logprobs`` (exact for a next-token
        family, else the K-draw bound; is_greedy False where undefined). ``loglikelihood_rolling``: the sum over
        lm-eval's rolling windows (rows of ``row_limit`` tokens, one token of context after the first window, as
        its HF model). ``generate_until``: the family's default sampler continuing the prompt (AR: its KV cache;
        diffusion: ``max_gen_toks`` positions after the prompt, fixed length), greedy unless ``do_sample``, cut
        at the first stop string; the prompt is left-truncated to leave ``max_gen_toks`` within the context.
        Every scored request is recorded in ``self.scored`` as (task name, ``Scored``). ``draws``: "common"
        (common random numbers keyed by each request's context, module docstring) or "independent" (one stream
        over all requests in lm-eval's order)."""

        def __init__(
            self, run: Any, tok: Tokenizer, *, k: int = 1, batch_size: int = 32, seed: int = 0, draws: str = "common"
        ) -> None:
            super().__init__()
            check_draws(draws)
            self.run, self.tok, self.k, self.batch = run, tok, k, batch_size
            self.common_seed = seed if draws == "common" else None
            self.generator = torch.Generator(device=model_device(run.model)).manual_seed(seed)
            self.scored: list[tuple[str, Scored]] = []

        def _score(self, pairs: list[tuple[list[int], list[int]]], names: list[str]) -> list[Scored]:
            out = continuation_logprobs(
                self.run, pairs, k=self.k, generator=self.generator, batch_size=self.batch,
                common_seed=self.common_seed,
            )  # fmt: skip
            self.scored += list(zip(names, out))
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [encode_pair(self.tok, *r.args) for r in requests]
            scored = self._score(pairs, [str(getattr(r, "task_name", "")) for r in requests])
            return [(s.logprob, bool(s.greedy)) for s in scored]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            limit, specials = row_limit(self.run), self.run.process.specials
            prefix = specials.bos if specials.bos is not None else specials.eos
            owner, pairs, names = [], [], []
            for i, r in enumerate(requests):
                windows = get_rolling_token_windows(self.tok.encode(r.args[0]), prefix, limit - 1, 1)
                for ctx, cont in map(make_disjoint_window, windows):
                    owner.append(i)
                    pairs.append((ctx, cont))
                    names.append(str(getattr(r, "task_name", "")))
            totals = [0.0] * len(requests)
            for i, s in zip(owner, self._score(pairs, names)):
                totals[i] += s.logprob
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return [self._generate(*r.args) for r in requests]

        def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            context_len = model_context(self.run.model) or 0
            gen = min(int(kwargs.get("max_gen_toks", 256)), context_len - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.tok.encode(context)[-(context_len - gen) :] if context else []
            process = self.run.process
            if not prompt and process.conditioning == "prefix":
                prompt = [process.specials.bos if process.specials.bos is not None else process.specials.eos]
            res = process.sample(
                self.run.model, 1, len(prompt) + gen, prompt_ids=prompt, generator=self.generator,
                temperature=temperature,
            )  # fmt: skip
            text = self.tok.decode(res.ids_NL[0, len(prompt) : int(res.lengths_N[0])].tolist())
            for stop in until:
                text = text.split(stop)[0]
            return text

    return DlmLM


DRAWS = ("common", "independent")  # a bound's draws: common random numbers per context, or one shared stream


def check_draws(draws: Any) -> None:
    """A ``draws`` setting is one of DRAWS (one-line ``DlmError`` otherwise)."""
    if draws not in DRAWS:
        raise DlmError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
