"""Generation quality on formal languages: token error rate (TER) and sequence error rate (SER).

Definitions (MDM theory paper, §4.1 eq. 4–5, §5.1, appendix E.1; SPEC §6), for N generated sequences x_i of L
symbols and the true language p:

* SER = (1/N) #{i : p(x_i) = 0}: the fraction of sequences outside the support of the (pruned) true model;
  standard error sqrt(SER (1 - SER) / N).
* TER = generative perplexity under the ground-truth model, exp(sum_i -log q(x_i) / (N L)). The paper prunes
  the true model only for SER: "to add some deterministic to the language model in the evaluation of SER, we
  add the parameter of thres to prune the tail probabilities ... For the evaluation of TER, we set the thres to
  be [0], for the well definition of generative perplexity". So q is the true language with thres = 0
  (:meth:`FormalLanguage.unpruned`: the same random draws, nothing pruned), under which every sequence has
  probability > 0 and TER is finite; for an unpruned language q = p. ``ter_nll_se`` is the standard error of
  the mean per-token NLL across sequences, std_i(-log q(x_i) / L) / sqrt(N); ``ter_se`` = TER * ter_nll_se.
* ``ter_support``: the same perplexity under the pruned p itself, over the in-support sequences only
  (out-of-support ones are what SER counts). Exact samples of p reach exp(entropy rate) on it.

Reference values: ``entropy_rate`` = H_p(X_1..X_L) / L (exact for n-grams, Monte Carlo for HMMs) and
``ter_optimal`` = exp(E_p[-log q(X)] / L), the TER that exact samples of p attain in expectation.

Non-symbol ids. A generated row that holds an id which is not one of the language's V symbols (a special
token: BOS, EOS, PAD, UNK or MASK, e.g. an AR model that emitted EOS early) has probability 0 under p, so it
counts as out of support for SER; q gives it probability 0 too, so TER is taken over the rows made of symbols
only, and ``non_symbol_sequences`` says how many rows were left out of TER.

Run level (``dlm eval RUN --generation``, :func:`evaluate_generation`): the true language and length L come
from the ``formal:`` source recorded in the run's data meta (``RUN/run.json``); the data must be prepared in
``pad`` mode, rows ``[BOS] x_1..x_L [EOS] PAD...``, and every symbol i (written as the letter
chr(ord('a') + i)) must be one token of the run's tokenizer (``chars``: id i; ``bytes``: id 97 + i). AR
samples continue the prompt [BOS] for L tokens; a diffusion family fills the L symbol positions of a row whose
BOS, EOS and PAD positions are fixed as in the data (the conditioning is deterministic in the data, so this
is sampling the trained joint distribution). Positions 1..L of each row are mapped back to symbols.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.data.batch import Batch
from dlm.data.formal import FormalLanguage
from dlm.data.tokenizers import Tokenizer
from dlm.errors import DlmError
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.eval.run import run_tokenizer
from dlm.io import write_json_atomic
from dlm.rundir import LoadedRun, load_run

__all__ = [
    "GENERATION_DEFINITIONS",
    "MATCH_K",
    "ar_symbol_nll",
    "evaluate_generation",
    "formal_generation_metrics",
    "generation_settings",
    "matched_speedup",
    "run_language",
    "sample_symbols",
    "symbol_table",
]


def _per_token(nll_N: np.ndarray, length: int) -> tuple[float, float]:
    """Mean -log p per token over sequences of equal length, and its standard error across sequences."""
    per_seq = nll_N / length
    se = float(per_seq.std(ddof=1) / math.sqrt(len(per_seq))) if len(per_seq) > 1 else math.nan
    return float(per_seq.mean()), se


def formal_generation_metrics(
    language: FormalLanguage,
    seqs: Any,
    *,
    reference: FormalLanguage | None = None,
    reference_values: bool = True,
    allow_non_symbols: bool = False,
) -> dict[str, Any]:
    """TER and SER of generated symbol sequences ``seqs`` (int array [N, L], ids in [0, V)).

    SER = #{i : p(x_i) = 0} / N; TER = exp(sum_i -log q(x_i) / (N' L)) over the N' rows made of symbols only
    (module docstring). ``reference``: the TER model q (default ``language.unpruned()``, the paper's choice).
    ``reference_values`` adds ``entropy_rate`` and ``ter_optimal`` (costs a Monte Carlo run of ~2e5 tokens for
    an HMM, cached). ``allow_non_symbols``: rows with an id outside [0, V) (e.g. -1 for a special token) count
    as out of support and are left out of TER (``non_symbol_sequences``); otherwise such ids raise DlmError.
    Returns a JSON-able dict; undefined values (e.g. TER when q gives some sequence probability 0) are None.
    """
    x, symbol_rows = _symbol_rows(seqs, language.vocab_size, allow_non_symbols)
    q = reference if reference is not None else language.unpruned()
    N, L = x.shape
    lp_true = language.log_prob(x)  # -inf on rows with a non-symbol id
    support = np.isfinite(lp_true)
    n_in = int(support.sum())
    ser = 1.0 - n_in / N

    lp_ref = q.log_prob(x[symbol_rows]) if symbol_rows.any() else np.zeros(0)
    finite_ref = np.isfinite(lp_ref)
    ter_nll, ter_nll_se = _per_token(-lp_ref, L) if len(lp_ref) and finite_ref.all() else (None, None)
    sup_nll, sup_nll_se = _per_token(-lp_true[support], L) if n_in else (None, None)

    def _exp(v: float | None) -> float | None:
        return math.exp(v) if v is not None else None

    def _exp_se(v: float | None, se: float | None) -> float | None:
        return math.exp(v) * se if v is not None and se is not None and math.isfinite(se) else None

    out: dict[str, Any] = {
        "n_sequences": N,
        "length": L,
        "tokens": N * L,
        "in_support": n_in,
        "ser": ser,
        "ser_se": math.sqrt(ser * (1.0 - ser) / N),
        "ter": _exp(ter_nll),
        "ter_se": _exp_se(ter_nll, ter_nll_se),
        "ter_nll": ter_nll,
        "ter_nll_se": ter_nll_se if ter_nll_se is None or math.isfinite(ter_nll_se) else None,
        "ter_zero_prob_sequences": int((~finite_ref).sum()),
        "non_symbol_sequences": int(N - symbol_rows.sum()),
        "ter_support": _exp(sup_nll),
        "ter_support_se": _exp_se(sup_nll, sup_nll_se),
        "ter_support_nll": sup_nll,
        "ter_support_nll_se": sup_nll_se if sup_nll_se is None or math.isfinite(sup_nll_se) else None,
        "language": language.params(),
        "ter_reference": q.params(),
    }
    if reference_values:
        out.update(_reference_values(language, q, L))
    return out


def _symbol_rows(seqs: Any, V: int, allow_non_symbols: bool) -> tuple[np.ndarray, np.ndarray]:
    """``seqs`` as an integer array [N, L] and which of its rows hold symbols (ids in [0, V)) only."""
    if isinstance(seqs, torch.Tensor):
        seqs = seqs.detach().cpu().numpy()
    x = np.asarray(seqs)
    if x.ndim != 2 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.integer):
        raise DlmError(f"generated sequences must be a non-empty integer array [N, L], got shape {x.shape}")
    symbol_rows = ((x >= 0) & (x < V)).all(1)
    if not allow_non_symbols and not symbol_rows.all():
        raise DlmError(
            f"generated sequences hold ids outside the {V} symbols [0, {V}): map or strip special tokens "
            "(BOS, EOS, PAD, MASK) first"
        )
    return x, symbol_rows


def _reference_values(language: FormalLanguage, q: FormalLanguage, L: int) -> dict[str, Any]:
    """What exact samples of the language reach: its entropy rate, and the TER of its samples under q."""
    h, h_se = language.entropy_rate(L)
    xent, xent_se = language.cross_entropy_rate(q, L)
    return {
        "entropy_rate": h,
        "entropy_rate_se": h_se,
        "entropy_rate_method": "exact" if h_se == 0 else "monte_carlo",
        "ter_support_optimal": math.exp(h),
        "ter_optimal": math.exp(xent) if math.isfinite(xent) else None,
        "ter_optimal_nll": xent if math.isfinite(xent) else None,
        "ter_optimal_nll_se": xent_se if math.isfinite(xent) else None,
    }


@torch.no_grad()
def ar_symbol_nll(process: Any, model: torch.nn.Module, batch: Batch, eos: int) -> tuple[float, int]:
    """Summed AR NLL (nats) and count of the scored tokens that are not EOS, over a ``pad``-mode batch.

    The AR process scores targets 2..L of each row where the mask is True: on rows ``[BOS] x_1..x_L [EOS]``
    these are x_1..x_L and the EOS. Attention is causal, so dropping the EOS targets from the mask changes no
    other score, and nats / tokens is the model's NLL per symbol, comparable to the language's entropy rate.
    """
    if not getattr(process, "exact_likelihood", False):
        raise DlmError(
            "ar_symbol_nll needs a process with an exact, token-by-token likelihood (AR); a bound does not "
            "score tokens one by one"
        )
    mask_BL = batch.mask_BL & (batch.ids_BL != eos)
    res = process.nll(model, Batch(batch.ids_BL, mask_BL))
    return float(res.nats_B.sum()), int(res.tokens_B.sum())


# --------------------------------------------------------------------------------------------------
# Run level: sample a trained run and score the samples with its true language

GENERATION_DEFINITIONS = {
    "ter": "generative perplexity under the true language with thres 0 (q): exp(sum_i -log q(x_i) / (N' L)) over "
    "the N' generated rows made of symbols only; lower is better, ter_optimal is what exact samples reach",
    "ter_se": "TER x the standard error of the mean per-token NLL across sequences (delta method)",
    "ser": "fraction of the N generated rows with probability 0 under the true (pruned) language; a row holding "
    "a non-symbol id (BOS, EOS, PAD, UNK, MASK) counts as probability 0",
    "ser_se": "sqrt(SER (1 - SER) / N), binomial standard error",
    "entropy_rate": "H_p(X_1..X_L) / L in nats per symbol (exact for n-grams, Monte Carlo for HMMs)",
    "ter_optimal": "exp(E_p[-log q(X)] / L): the TER of exact samples of the true language, in expectation",
    "nfe": "network forward calls per batch of sample_batch_size rows (mean over the batches); ddpm_cache skips "
    "the call at a step where no row of the batch changed, AR makes one call per generated position",
    "wall_s_per_sequence": "sampling wall time (model calls, sampler and id mapping, not scoring) / N, "
    "sampling sample_batch_size rows at a time",
    "non_symbol_sequences": "rows with an id that is not a symbol: out of support for SER, left out of TER",
}


def run_language(run: LoadedRun) -> tuple[FormalLanguage, int]:
    """The true language and sequence length L of a run trained on a ``formal:`` corpus, read from the data
    meta saved in the run directory; DlmError for a run on another corpus or on data laid out otherwise."""
    meta = run.data_meta
    src = meta.get("source", {})
    if src.get("kind") != "formal":
        raise DlmError(
            f"--generation scores samples with the language that generated the training data, but this run was "
            f"trained on {src.get('spec', 'an unknown source')!r}, not on a formal: corpus"
        )
    L = int(src["length"])
    if meta.get("mode") != "pad" or int(meta.get("seq_len", 0)) < L + 2:
        raise DlmError(
            f"formal generation needs data prepared with --mode pad and --seq-len >= {L + 2} (rows [BOS] x_1..x_{L} "
            f"[EOS]); this run's data has mode {meta.get('mode')} and seq_len {meta.get('seq_len')}"
        )
    return FormalLanguage.from_params(src["language"]), L


def symbol_table(tokenizer: Tokenizer, vocab: int, size: int) -> np.ndarray:
    """int64 [size]: token id -> symbol i in [0, vocab) (symbol i is written as chr(ord('a') + i), exactly as
    the ``formal:`` source writes it), -1 for every other id. DlmError unless each symbol is one distinct token."""
    table = np.full(size, -1, dtype=np.int64)
    for i in range(vocab):
        letter = chr(ord("a") + i)
        ids = tokenizer.encode(letter)
        if len(ids) != 1 or not 0 <= ids[0] < size or table[ids[0]] >= 0 or tokenizer.decode(ids) != letter:
            raise DlmError(
                f"tokenizer {tokenizer.name} does not write each formal symbol as one distinct token "
                "(prepare formal data with --tokenizer chars or bytes)"
            )
        table[ids[0]] = i
    return table


def _row_template(run: LoadedRun, L: int) -> list[int]:
    """The data's row layout: [BOS] then L free positions (-1) then [EOS], PAD up to seq_len."""
    sp = run.process.specials
    if sp.bos is None:
        raise DlmError("formal generation needs a tokenizer with a BOS token (prepare with --tokenizer chars)")
    seq_len = int(run.data_meta["seq_len"])
    return [sp.bos] + [-1] * L + [sp.eos] + [sp.pad] * (seq_len - L - 2)


def sample_symbols(
    run: LoadedRun,
    table: np.ndarray,
    L: int,
    n: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Draw ``n`` rows from a run, ``batch_size`` at a time from one torch.Generator seeded with ``seed``, and
    map positions 1..L to symbols with ``table`` (-1 for a non-symbol id). ``progress(done, n)`` is called
    after every batch; ``log`` gets a line every 20 batches.

    AR: prompt [BOS], L generated tokens (an early EOS leaves EOS/PAD ids: non-symbol). Diffusion: the row
    template of :func:`_row_template` with BOS/EOS/PAD fixed, ``steps`` (default L) denoising steps.
    Returns symbols (int64 [n, L]), nfe per batch (list), wall_s (sampling only) and the resolved sampler.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DlmError(f"number of samples must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DlmError(f"sample batch size must be a positive integer, got {batch_size!r}")
    process = run.process
    name = process.resolve_sampler(sampler)
    prefix_only = process.conditioning == "prefix"  # continues BOS; else fills the fixed row template
    if process.step_sampler and steps is None:
        steps = L
    opts: dict[str, Any] = {} if steps is None else {"steps": steps}
    template = _row_template(run, L)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n, L), dtype=np.int64)
    nfes: list[int] = []
    wall = 0.0
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        t0 = time.perf_counter()
        if prefix_only:
            res = process.sample(run.model, b, 1 + L, sampler=name, prompt_ids=template[:1], generator=gen, **opts)
        else:
            fixed = torch.tensor(template, dtype=torch.int64, device=device)
            res = process.sample(run.model, b, len(template), sampler=name, generator=gen, fixed_ids=fixed, **opts)
        ids = res.ids_NL[:, 1 : 1 + L].cpu().numpy()
        wall += time.perf_counter() - t0
        if ids.shape[1] < L:  # cannot happen with the layouts above; guards the mapping below
            raise AssertionError(f"sampler returned rows of {ids.shape[1] + 1} tokens, expected {L + 1} or more")
        out[start : start + b] = np.where((ids >= 0) & (ids < len(table)), table[np.clip(ids, 0, len(table) - 1)], -1)
        nfes.append(int(res.nfe))
        if progress is not None:
            progress(start + b, n)
        if log is not None and (start + b == n or (start // batch_size) % 20 == 19):
            log(
                f"  {process.name} {name}{'' if prefix_only else f' {steps} steps'}: {start + b}/{n} sequences, "
                f"{wall:.1f}s"
            )
    return {"symbols": out, "nfe": nfes, "wall_s": wall, "sampler": name, "steps": steps}


#: Version of the generation protocol, part of every result's settings (bump when old results become
#: incomparable, so they are recomputed rather than reused).
GENERATION_PROTOCOL = 1


def generation_settings(
    run: LoadedRun, sampler: str, steps: int | None, n: int, seed: int, batch_size: int, device: str
) -> dict[str, Any]:
    """Every setting that changes a generation result; its hash names the file (:mod:`dlm.eval.results`).
    ``batch_size`` is in because rows are drawn batch by batch from one generator; ``device`` is its type."""
    return {
        "protocol": GENERATION_PROTOCOL,
        "sampler": sampler,
        "steps": steps,
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "process": dataclasses.asdict(run.cfg.process),
        "data": {
            "source": run.data_meta["source"].get("fingerprint"),
            "tokenizer": run.data_meta["tokenizer"]["fingerprint"],
        },
        "device": torch.device(device).type,
    }


def generation_path(run_dir: Path, settings: dict[str, Any]) -> Path:
    """RUN/eval/generation-{sampler}[-steps{S}]-n{N}-seed{seed}-step{checkpoint}-{settings hash}.json"""
    s = "" if settings["steps"] is None else f"-steps{settings['steps']}"
    readable = f"{settings['sampler']}{s}-n{settings['n']}-seed{settings['seed']}-step{settings['checkpoint_step']}"
    return result_path(run_dir, "generation", readable, settings)


def evaluate_generation(
    run_dir: str | Path,
    *,
    n: int = 1000,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    which: str | int = "last",
    ema: bool = True,
    device: str = "cpu",
    force: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Sample ``n`` sequences from a run trained on a ``formal:`` corpus and score them with its true language
    (TER, SER and their standard errors, :func:`formal_generation_metrics`); the record goes atomically to
    :func:`generation_path`. A result already there with the same :func:`generation_settings` is returned as
    it is (``log`` says so) unless ``force``. ``progress(done, n)`` is called after every batch of samples;
    without it ``log`` also gets a line every 20 batches. Returns (record, path)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DlmError(f"number of samples must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DlmError(f"sample batch size must be a positive integer, got {batch_size!r}")
    check_device(device)
    run = load_run(run_dir, which=which, ema=ema, device=device)
    language, L = run_language(run)
    tokenizer = run_tokenizer(run)
    table = symbol_table(tokenizer, language.vocab_size, run.process.vocab_size)
    name = run.process.resolve_sampler(sampler)
    if run.process.step_sampler and steps is None:
        steps = L  # sample_symbols' default, resolved here so that it is part of the settings
    settings = generation_settings(run, name, steps, n, seed, batch_size, device)
    path = generation_path(Path(run_dir), settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    with torch.no_grad():
        s = sample_symbols(
            run,
            table,
            L,
            n,
            sampler=name,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            device=device,
            log=log if progress is None else None,
            progress=progress,
        )
    metrics = formal_generation_metrics(language, s["symbols"], allow_non_symbols=True)
    record = _generation_record(run, s, metrics, settings, device)
    write_json_atomic(path, record)
    return record, path


def _generation_record(
    run: LoadedRun, s: dict[str, Any], metrics: dict[str, Any], settings: dict[str, Any], device: str
) -> dict[str, Any]:
    """The JSON record of one generation setting: the samples' TER / SER and how they were drawn."""
    n, L, batch_size = settings["n"], metrics["length"], settings["batch_size"]
    return {
        "metric": "formal_generation",
        "family": run.process.name,
        "sampler": s["sampler"],
        "steps": s["steps"],
        "n_sequences": n,
        "length": L,
        "ter": metrics["ter"],
        "ter_se": metrics["ter_se"],
        "ser": metrics["ser"],
        "ser_se": metrics["ser_se"],
        "entropy_rate": metrics["entropy_rate"],
        "ter_optimal": metrics["ter_optimal"],
        "nfe": float(np.mean(s["nfe"])),
        "nfe_per_batch": s["nfe"],
        "wall_s": s["wall_s"],
        "wall_s_per_sequence": s["wall_s"] / n,
        "sample_batch_size": batch_size,
        "seed": settings["seed"],
        "checkpoint_step": run.step,
        "ema": run.ema,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in metrics.items() if k not in ("n_sequences", "length")},
        "definitions": GENERATION_DEFINITIONS,
        "data_dir": str(Path(run.cfg.data.dir).resolve()),
        "source": run.data_meta["source"]["spec"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


#: ``matched_speedup``: a step count matches AR when within this many standard errors of the difference.
MATCH_K = 2.0


def matched_speedup(
    ar: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], metric: str = "ter", k: float = MATCH_K
) -> dict[str, Any]:
    """The smallest step count whose ``metric`` (``ter`` or ``ser``, lower is better) matches AR's, and the
    speedup there.

    Matched: m_S <= m_AR + k sqrt(se_AR^2 + se_S^2) (se = ``{metric}_se``, None counts as 0; a None metric
    never matches). speedup = AR ``wall_s_per_sequence`` / MDLM ``wall_s_per_sequence`` at S, nfe_ratio =
    AR ``nfe`` / MDLM ``nfe``; both None (and steps None) when no row matches.
    """
    m_ar = ar.get(metric)
    se_ar = ar.get(f"{metric}_se") or 0.0
    out: dict[str, Any] = {
        "metric": metric,
        "rule": f"smallest steps S with {metric}_S <= {metric}_AR + {k:g} sqrt(se_AR^2 + se_S^2)",
        "ar_value": m_ar,
        "steps": None,
        "value": None,
        "threshold": None,
        "speedup": None,
        "nfe_ratio": None,
    }
    if m_ar is None:
        return out
    for row in sorted(rows, key=lambda r: r["steps"]):
        m = row.get(metric)
        if m is None:
            continue
        threshold = m_ar + k * math.hypot(se_ar, row.get(f"{metric}_se") or 0.0)
        if m <= threshold:
            wall_ar, wall = ar.get("wall_s_per_sequence"), row.get("wall_s_per_sequence")
            out.update(
                steps=row["steps"],
                value=m,
                threshold=threshold,
                speedup=wall_ar / wall if wall_ar and wall else None,
                nfe_ratio=ar["nfe"] / row["nfe"] if ar.get("nfe") and row.get("nfe") else None,
            )
            return out
    return out
