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
import hashlib
import itertools
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.data.batch import Batch
from dlm.data.tokenizers import Tokenizer
from dlm.errors import DlmError
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import run_tokenizer
from dlm.io import write_json_atomic
from dlm.process.base import eval_mode, model_context, model_device, token_logprobs
from dlm.rundir import load_run

__all__ = [
    "Scored",
    "continuation_logprob",
    "continuation_logprobs",
    "encode_pair",
    "evaluate_tasks",
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


def row_multiple(process: Any) -> int:
    """The length every row of the family must be a multiple of (``Process.row_multiple``; BD3-LM: L')."""
    return int(process.row_multiple)


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
    mult, extra = row_multiple(run.process), len(row) % row_multiple(run.process)
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


def request_seed(seed: int, context_ids: Sequence[int]) -> int:
    """h(seed, c): the seed of the draws of a request whose row holds the context tokens ``context_ids`` under
    common random numbers (module docstring); 63 bits of BLAKE2b, stable across processes and platforms."""
    text = f"{seed}:" + ",".join(map(str, context_ids))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


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
    ``common_seed``, each request's own generator seeded by ``request_seed(common_seed, its context)`` (common
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
                    own = torch.Generator(device=device).manual_seed(request_seed(common_seed, context))
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
            if draws not in DRAWS:
                raise DlmError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
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


# ----------------------------------------------------------------------------------------------- tasks of a run

#: Version of this adapter's scoring (row building, bound, tokenization); part of every result's settings.
LMEVAL_PROTOCOL = 2  # 2: common random numbers across a question's choices (the "draws" setting)
DRAWS = ("common", "independent")


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a list, in order, without blanks or repeats; DlmError when none is left."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise DlmError("give at least one task name (--tasks a,b)")
    return names


def _dir_fingerprint(directory: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``directory`` (local task definitions)."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE = 1 while the tasks load and run (``offline``), restored after; the
    datasets library reads them when first imported, so this holds for a process that has not imported it yet."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    before = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ[n] = "1" if offline else "0"
    try:
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def registry_manager(task_dir: Path | None) -> Any:
    """lm-eval's ``TaskManager`` over its whole registry (it indexes ~15,000 task files: seconds), ``task_dir``'s
    files on top."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=None if task_dir is None else str(task_dir))


def task_manager(names: list[str], task_dir: Path | None) -> Any:
    """A ``TaskManager`` that knows every name: the local directory alone when it holds them all (fast), else
    lm-eval's registry with the directory on top; DlmError for a name neither knows."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = registry_manager(task_dir)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        raise DlmError(
            f"unknown lm-eval task {', '.join(map(repr, missing))}: list the names with `lm-eval ls tasks`, or give "
            "a directory of task YAML files with --task-dir"
        )
    return tm


def check_choices(loaded: dict[str, Any], limit: int | None) -> None:
    """Every multiple-choice task names its choices (``doc_to_choice``) and each evaluated document has at least
    one; DlmError naming the task otherwise."""
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice":
            continue
        if task.get_config("doc_to_choice") is None:
            raise DlmError(f"task {name} is multiple_choice but its file gives no choices (doc_to_choice)")
        for i, doc in enumerate(itertools.islice(task.eval_docs, limit)):
            if not task.doc_to_choice(doc):
                raise DlmError(f"task {name}: document {i} has no choices (doc_to_choice gives an empty list)")


def run_tasks(lm: Any, loaded: dict[str, Any], *, limit: int | None, seed: int) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on loaded tasks (zero-shot unless a task says otherwise, few-shot draws seeded):
    its ``results`` per task and the number of documents evaluated. (``simple_evaluate`` is not used: it spends
    seconds collecting environment information.)"""
    import numpy as np
    from lm_eval.evaluator import evaluate

    random.seed(seed)
    np.random.seed(seed)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=1000, log_samples=False)
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}


def _metrics(values: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` as ``{"acc": x, "acc_stderr": s}`` (filters other
    than "none" kept in the name); "N/A" and other non-numbers become None."""
    out: dict[str, float | None] = {}
    for key, v in values.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        out[name] = float(v) if ok else None
    return out


def task_record(lm: Any, results: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """Per task: its metrics with their standard errors (lm-eval's), documents, requests scored, the mean SE of a
    request's bound over the K draws (None when exact), requests whose context was left-truncated."""
    by_task: dict[str, list[Scored]] = defaultdict(list)
    for name, s in lm.scored:
        by_task[name].append(s)
    out = {}
    for name, values in results["results"].items():
        scored = by_task.get(name, [])
        ses = [s.se for s in scored if s.se is not None]
        task = loaded["tasks"].get(name)
        out[name] = {
            "metrics": _metrics(values),
            "documents": results["n-samples"].get(name, {}).get("effective"),
            "requests": len(scored),
            "mean_request_se": sum(ses) / len(ses) if ses else None,
            "truncated_requests": sum(s.truncated for s in scored),
            "output_type": None if task is None else task.get_config("output_type"),
        }
    return out


def _record(
    run: Any, lm: Any, results: Any, loaded: Any, settings: dict[str, Any], version: str, wall_s: float
) -> dict[str, Any]:
    """The lmeval-*.json record of one evaluate_tasks call (accuracies per task, K, the exact/bound label)."""
    exact = next_token_family(run.process)
    return {
        "metric": "lmeval",
        "family": run.process.name,
        "likelihood": "exact"
        if exact
        else f"lower bound: -(the family's NELBO), mean of K = {settings['k']} draws ({settings['draws']})",
        "exact": exact,
        "k": settings["k"],
        "tasks": task_record(lm, results, loaded),
        "requests": len(lm.scored),
        "lm_eval_version": version,
        "tokenization": "lm-eval's HF convention: encode(context + continuation) split after encode(context)",
        "truncation": f"rows of at most {row_limit(run)} tokens; longer contexts lose their oldest tokens",
        "checkpoint_step": run.step,
        "ema": run.ema,
        "seed": settings["seed"],
        "wall_s": wall_s,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


def evaluate_tasks(
    run_dir: str | Path,
    tasks: str | Sequence[str],
    *,
    k: int = 4,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    draws: str = "common",
    task_dir: str | Path | None = None,
    which: str | int = "last",
    ema: bool = True,
    device: str = "cpu",
    force: bool = False,
    online: bool = False,
    log: Any = None,
) -> tuple[dict[str, Any], Path]:
    """lm-eval tasks on a run's checkpoint; returns (record, path of ``RUN/eval/lmeval-step{N}-{hash}.json``).

    ``tasks``: names from lm-eval's registry or from ``task_dir`` (task YAML files, lm-eval's ``include_path``).
    ``k``: Monte-Carlo draws per request of a diffusion bound (an exact family scores once, K recorded as 1).
    ``draws``: "common" (common random numbers: the choices of one question share their draws; module
    docstring) or "independent".
    ``limit``: documents per task (None: all). Nothing downloads unless ``online`` (HF_*_OFFLINE=1 around the
    run): task data must be in the local Hugging Face cache or local files. A result with the same settings is
    reused (``log`` says so) unless ``force``. The numbers and the task directory are checked before the run is
    loaded, the task names and choices (they need lm-eval's task index) before anything is written.
    """
    names = parse_tasks(tasks)
    for what, v in (("K (Monte-Carlo draws per request)", k), ("batch size", batch_size), ("limit", limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DlmError(f"{what} must be an integer >= 1, got {v!r}")
    if draws not in DRAWS:
        raise DlmError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
    check_device(device)
    folder = None if task_dir is None else Path(task_dir).resolve()
    if folder is not None and not folder.is_dir():
        raise DlmError(f"--task-dir {task_dir} is not a directory")
    lm_eval = import_lm_eval()
    run = load_run(run_dir, which=which, ema=ema, device=device)
    tok = run_tokenizer(run)
    exact = next_token_family(run.process)
    settings = {
        "protocol": LMEVAL_PROTOCOL,
        "tasks": names,
        "task_dir": None if folder is None else _dir_fingerprint(folder),
        "k": 1 if exact else k,
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
        "draws": "exact" if exact else draws,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "process": asdict(run.cfg.process),
        "lm_eval_version": lm_eval.__version__,
        "device": torch.device(device).type,
    }
    path = result_path(run_dir, "lmeval", f"step{run.step}", settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    t0 = time.perf_counter()
    with _hub_offline(not online):
        tm = task_manager(names, folder)
        try:
            loaded = tm.load(names)
        except (FileNotFoundError, ConnectionError) as e:
            raise DlmError(f"cannot load the data of task(s) {', '.join(names)} offline: {e}") from None
        check_choices(loaded, limit)
        lm = lm_class()(run, tok, k=settings["k"], batch_size=batch_size, seed=seed, draws=draws)
        results = run_tasks(lm, loaded, limit=limit, seed=seed)
    record = _record(run, lm, results, loaded, settings, lm_eval.__version__, time.perf_counter() - t0)
    write_json_atomic(path, record)
    return record, path
