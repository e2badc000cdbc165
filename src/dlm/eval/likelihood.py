"""Likelihood evaluation under one protocol for every process (SPEC §5).

All accumulation is in float64. With a_s the nats and t_s the scored tokens of sequence s (n sequences
with t_s > 0, A = sum a_s, T = sum t_s):

    nll          = A / T                                 nats per token (an upper bound for diffusion)
    bpt          = nll / ln 2                            bits per token
    ppl          = exp(nll)                              perplexity over all tokens (None if it overflows)
    ppl_seq_mean = (1/n) sum_s exp(a_s / t_s)            mean per-sequence perplexity (SEDD's code)
    nll_se       = sqrt( n/(n-1) * sum_s (a_s - nll t_s)^2 ) / T
                   the delta-method standard error of the ratio estimator A / T, treating sequences as the
                   independent units (None when n < 2)
    bits_per_byte = A / (ln 2 * bytes)                   tokenizer-independent, bytes = sum over the scored
                   tokens of the UTF-8 bytes each contributes (``Tokenizer.token_bytes``)

Every family scores the same positions (``dlm.process.base.scored_positions``: the real positions 1..L-1 of a
row; position 0 is context only), so T and bytes count the same tokens for every family.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dlm.data.batch import Batch
from dlm.errors import DlmError
from dlm.process.base import NLLResult, Process, scored_positions


def bits_per_byte(nll_nats_per_token: float, tokens: int, bytes: int) -> float:
    """Bits per UTF-8 byte of the evaluated text: nll * tokens / (ln 2 * bytes)."""
    if bytes <= 0:
        raise DlmError(f"bits_per_byte needs a positive byte count, got {bytes!r}")
    return float(nll_nats_per_token) * float(tokens) / (math.log(2.0) * float(bytes))


def _exp_or_none(x: float) -> float | None:
    """exp(x), or None (JSON null) when it overflows a float (an untrained model's bound can exceed 709 nats)."""
    return math.exp(x) if x < math.log(sys.float_info.max) else None


def summarize_nll(
    nats_S: torch.Tensor, tokens_S: torch.Tensor, exact: bool, bytes_S: torch.Tensor | None = None
) -> dict[str, Any]:
    """The metrics of the module docstring from per-sequence nats (float64) and token counts; with ``bytes_S``
    (UTF-8 bytes of each sequence's scored tokens) also ``bytes``, their total (``bits_per_byte`` takes it).

    Sequences with no scored token are left out of every figure.
    """
    nats = nats_S.to(torch.float64).cpu()
    toks = tokens_S.to(torch.int64).cpu()
    keep = toks > 0
    nats, toks = nats[keep], toks[keep]
    n = int(toks.numel())
    total_tokens = int(toks.sum())
    if total_tokens == 0:
        raise DlmError("likelihood evaluation scored no tokens (empty loader or rows of padding only)")
    total_nats = float(nats.sum())
    nll = total_nats / total_tokens
    toks64 = toks.to(torch.float64)
    if n >= 2:
        resid = nats - nll * toks64
        nll_se: float | None = math.sqrt(n / (n - 1) * float((resid * resid).sum())) / total_tokens
    else:
        nll_se = None
    seq_ppl = float(torch.exp(nats / toks64).mean())
    extra = {} if bytes_S is None else {"bytes": int(bytes_S.to(torch.int64).cpu()[keep].sum())}
    return {
        "nll": nll,
        "bpt": nll / math.log(2.0),
        "ppl": _exp_or_none(nll),
        "ppl_seq_mean": seq_ppl if math.isfinite(seq_ppl) else None,
        "nll_se": nll_se,
        "nats": total_nats,
        "tokens": total_tokens,
        "sequences": n,
        "exact": bool(exact),
        "bound": "=" if exact else "<=",
        **extra,
    }


def sequence_nll(
    process: Process,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | Callable[[int], torch.Generator] | None = None,
    max_batches: int | None = None,
    each: Callable[[int, Batch, NLLResult], None] | None = None,
) -> list[NLLResult]:
    """Per-sequence NLL sums, batch by batch: for batch i, ``process.nll`` gives a_s = -log p(x_s) (or its
    upper bound) summed over the scored tokens of each row s, and t_s, their number (``NLLResult.nats_B``,
    float64 [B], and ``tokens_B``, on ``device``); returned in batch order.

    The one loop behind training validation (``dlm.train.loop.validate``), ``dlm eval`` (:func:`evaluate_nll`)
    and the formal experiment. Runs under ``torch.no_grad`` with the model in eval mode (its mode restored
    afterwards). ``generator``: one generator every batch draws its noise from in turn, or a function giving
    batch i its own, ``generator(i)`` (validation seeds it by (seed, i), so the figure does not depend on how
    ranks split the batches). At most ``max_batches`` batches; ``each(i, batch, result)`` after batch i.
    """
    results: list[NLLResult] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                gen = generator(i) if callable(generator) else generator
                result = process.nll(model, batch.to(device), generator=gen)
                results.append(result)
                if each is not None:
                    each(i, batch, result)
    finally:
        model.train(was_training)
    return results


def evaluate_nll(
    process: Process,
    model: torch.nn.Module,
    loader: Iterable[Batch],
    *,
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int | None], None] | None = None,
    token_bytes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per-token NLL of ``model`` under ``process`` over a finite loader (see ``summarize_nll``).

    Runs ``process.nll`` batch by batch (:func:`sequence_nll`: under ``torch.no_grad`` with the model in eval
    mode, its mode restored afterwards), at most ``max_batches`` batches. ``exact`` is True only when every
    batch gave an exact likelihood; otherwise the figures are upper bounds ("<="). ``progress(done, total)`` is
    called after every batch (``total``: the batches this call evaluates, None for a loader without a length).
    With ``token_bytes`` (the tokenizer's per-id byte table, ``Tokenizer.token_bytes``) the result also has
    ``bytes``, the UTF-8 bytes of exactly the scored tokens (``scored_positions``), for ``bits_per_byte``.
    """
    if max_batches is not None and max_batches < 1:
        raise DlmError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    n_bytes: list[torch.Tensor] = []
    table = torch.as_tensor(list(token_bytes), dtype=torch.int64) if token_bytes is not None else None
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if total is not None and max_batches is not None:
        total = min(total, max_batches)

    def each(i: int, batch: Batch, result: NLLResult) -> None:
        if table is not None:
            n_bytes.append(_scored_bytes(batch, table, result.tokens_B.detach().to("cpu", torch.int64)))
        if progress is not None:
            progress(i + 1, total)

    results = sequence_nll(
        process, model, loader, device=device, generator=generator, max_batches=max_batches, each=each
    )
    if not results:
        raise DlmError("likelihood evaluation got no batches from the loader")
    nats = torch.cat([r.nats_B.detach().to("cpu", torch.float64) for r in results])
    tokens = torch.cat([r.tokens_B.detach().to("cpu", torch.int64) for r in results])
    exact = all(r.exact for r in results)
    return summarize_nll(nats, tokens, exact, torch.cat(n_bytes) if table is not None else None)


def _scored_bytes(batch: Batch, table: torch.Tensor, tokens_B: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes of the scored tokens of each row, int64 [B]: sum_l table[x^l] over ``scored_positions``."""
    scored_BL = scored_positions(batch).cpu()
    assert torch.equal(scored_BL.sum(1), tokens_B), "the process scored other positions than scored_positions"
    ids_BL = batch.ids_BL.cpu()
    if int(ids_BL.max()) >= len(table) or int(ids_BL.min()) < 0:
        raise DlmError(f"token ids outside the tokenizer's {len(table)} ids: is the data tokenized with another one?")
    return (table[ids_BL] * scored_BL).sum(1)
