"""Evaluate and sample a trained run; results go into the run directory.

``evaluate_run`` writes ``RUN/eval/likelihood-{split}-step{N}-{hash}.json``, one file per distinct setting
(:mod:`dlm.eval.results`: a rerun with the same settings reuses it, ``force`` recomputes), or with ``data`` (a
zero-shot corpus) ``RUN/eval/zeroshot-{split}-step{N}-{hash}.json``; ``sample_run`` writes
``RUN/samples/samples-step{N}-{time}.jsonl``. Both read only the run directory and the data directory
recorded in its config (or the one given), so they work on any finished or interrupted run. Every check of the
user's input (device, lengths, prompt characters, the data directory's tokenizer, a writable output directory) is
done before the work.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dlm.data.loader import Loader
from dlm.data.shards import ShardSplit, open_split, read_meta
from dlm.data.specials import SpecialIds
from dlm.data.tokenizers import Tokenizer, load_tokenizer
from dlm.errors import DlmError
from dlm.eval.likelihood import bits_per_byte, evaluate_nll
from dlm.eval.results import check_device, check_writable, result_path, reuse
from dlm.io import json_line, write_json_atomic, write_text_atomic
from dlm.rundir import LoadedRun, load_run

#: Version of the likelihood protocol (what is scored, how it is summed), part of every result's settings:
#: bump it when a change makes old results incomparable, so they are recomputed rather than reused.
LIKELIHOOD_PROTOCOL = 3  # 3: absorbing-state bounds (MDLM, SEDD-absorbing, BD3-LM) by the masked-count estimator

#: What every family scores (``dlm.process.base.scored_positions``), written into every likelihood JSON.
SCORED_RULE = (
    "the real positions 1..L-1 of each row, the same tokens for every family; position 0 (BOS in pad mode, a "
    "mid-stream token in wrap mode) is context only: never noised, never scored, always shown clean"
)


def check_tokenizer(run: LoadedRun, fingerprint: str, name: str, data_dir: str | Path | None = None) -> None:
    """The one check that the data directory's tokenizer (its shards' meta, or the tokenizer files that
    eval, sample and infill load) is the tokenizer the run was trained on (the fingerprint in RUN/run.json).
    ``data_dir``: another prepared corpus (zero-shot evaluation) instead of the run's own data directory."""
    trained = run.data_meta.get("tokenizer", {})
    if fingerprint != trained.get("fingerprint"):
        where, hint = (
            (run.cfg.data.dir, "point the run at its own data")
            if data_dir is None
            else (
                data_dir,
                f"prepare that corpus with the run's tokenizer ({trained.get('name')}; a trained one: "
                f"dlm prepare SOURCE --tokenizer-from {run.cfg.data.dir})",
            )
        )
        raise DlmError(
            f"the data directory {where} holds tokenizer {name} with another vocabulary than the "
            f"{trained.get('name')} the run was trained on (fingerprints differ); {hint}"
        )


def _open_run_split(run: LoadedRun, split: str) -> ShardSplit:
    """The split from the run's data directory, checked to be the data the run was trained on."""
    s = open_split(Path(run.cfg.data.dir), split)
    check_tokenizer(run, s.meta["tokenizer"]["fingerprint"], s.meta["tokenizer"]["name"])
    return s


def _check_other_split(run: LoadedRun, s: ShardSplit) -> None:
    """A split of another prepared corpus (zero-shot evaluation): the run's tokenizer, rows within the context."""
    check_tokenizer(run, s.meta["tokenizer"]["fingerprint"], s.meta["tokenizer"]["name"], data_dir=s.data_dir)
    if s.seq_len > run.cfg.model.context:
        raise DlmError(
            f"the rows of {s.data_dir} are {s.seq_len} tokens, longer than the model context of "
            f"{run.cfg.model.context}; prepare it with --seq-len {run.cfg.model.context} or less"
        )


def run_tokenizer(run: LoadedRun) -> Tokenizer:
    """The run's tokenizer, loaded from its data directory (an exported run: its own copy of the tokenizer files)
    and checked with :func:`check_tokenizer`."""
    tok = load_tokenizer(run.data_meta["tokenizer"]["name"], run.tokenizer_dir or Path(run.cfg.data.dir))
    check_tokenizer(run, tok.fingerprint(), tok.name)
    return tok


def resolve_setting(process: Any, sampler: str | None, steps: int | None, length: int) -> tuple[str, int | None]:
    """(sampler name, steps) as they go into a file: the family's default sampler for None; steps None for a
    sampler without steps (``SamplerSpec.takes_steps`` False; steps given for it is refused), else ``steps`` or
    the family's ``default_steps(length)``."""
    name = process.resolve_sampler(sampler)
    if not process.sampler_specs()[name].takes_steps:
        if steps is not None:
            raise DlmError(
                f"the {process.name} sampler {name!r} takes no steps (one network call per token); give steps=None"
            )
        return name, None
    steps = process.default_steps(length) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DlmError(f"steps must be an integer >= 1, got {steps!r}")
    return name, steps


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DlmError(f"{name} must be a positive integer, got {value!r}")


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    which: str | int = "last",
    ema: bool = True,
    batch_size: int | None = None,
    max_batches: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    force: bool = False,
    data: str | Path | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Likelihood of a run's checkpoint on a split (SPEC §5); returns (record, path of the JSON).

    The result goes to :func:`likelihood_settings`' file; when that file already holds a result with the same
    settings it is returned as it is (``log`` says so) unless ``force``. ``progress(done, total)`` is called
    after every batch.

    ``data``: zero-shot evaluation on a split of another prepared corpus (``dlm prepare`` output) with the
    run's tokenizer and rows no longer than the model context; the same estimator, seed and scored positions
    as in-domain, written to ``RUN/eval/zeroshot-{split}-step{N}-{hash}.json`` (``settings.data`` holds that
    corpus's fingerprints and ``zero_shot: true``, so in-domain and zero-shot results never share a file).
    """
    _positive("batch size", batch_size)
    _positive("max batches", max_batches)
    check_device(device)
    other = None if data is None else Path(data).resolve()
    if other is not None:
        read_meta(other)  # not a prepared corpus: refused before the run is loaded
    run = load_run(run_dir, which=which, ema=ema, device=device)
    ecfg = run.cfg.eval
    split = split or ecfg.split
    bs = batch_size or ecfg.batch_size or run.cfg.train.batch_size
    max_b = max_batches if max_batches is not None else (ecfg.max_batches or None)
    seed = ecfg.seed if seed is None else seed
    if other is None:
        s = _open_run_split(run, split)
    else:
        s = open_split(other, split)
        _check_other_split(run, s)
    loader = Loader(s, bs, seed=seed, shuffle=False, infinite=False)
    settings = likelihood_settings(run, s, split=split, seed=seed, batch_size=bs, max_batches=max_b, n=len(loader))
    if other is not None:
        settings["data"]["zero_shot"] = True  # only here: the in-domain settings (and their hashes) stay as they were
    kind = "likelihood" if other is None else "zeroshot"
    path = result_path(run_dir, kind, f"{split}-step{run.step}", settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    gen = torch.Generator(device=device).manual_seed(seed)
    tok = s.tokenizer()
    t0 = time.perf_counter()
    result = evaluate_nll(
        run.process, run.model, loader, max_batches=max_b, generator=gen, device=device, progress=progress,
        token_bytes=tok.token_bytes(),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    record = _likelihood_record(run, s, tok, result, settings, n_batches=len(loader), wall=wall)
    write_json_atomic(path, record)
    return record, path


def _likelihood_record(
    run: LoadedRun,
    s: ShardSplit,
    tok: Tokenizer,
    result: dict[str, Any],
    settings: dict[str, Any],
    *,
    n_batches: int,
    wall: float,
) -> dict[str, Any]:
    """The JSON record of one likelihood setting: ``evaluate_nll``'s figures, bits per byte, what was scored
    and on which data (``data``: the directory scored, its source and fingerprints, ``zero_shot``: another
    corpus than ``trained_on``, the run's own data directory)."""
    split, bs, max_b, seed = settings["split"], settings["batch_size"], settings["max_batches"], settings["seed"]
    zero_shot = bool(settings["data"].get("zero_shot", False))
    return {
        "metric": "likelihood",
        "family": run.process.name,
        "likelihood": "exact" if result["exact"] else "upper bound (NELBO)",
        **result,
        "bits_per_byte": bits_per_byte(result["nll"], result["tokens"], result["bytes"]) if result["bytes"] else None,
        "bits_per_byte_note": "nats of the scored tokens / (ln 2 x UTF-8 bytes of exactly those tokens); BOS, EOS "
        "and padding count 0 bytes"
        + (
            ""
            if tok.token_bytes_exact
            else f"; APPROXIMATE: {tok.name} drops whitespace and lower-cases, its per-token byte counts are estimates"
        ),
        "split": split,
        "split_rows_evaluated": f"{min(n_batches, max_b or math.inf) * bs} of {len(s)} (at most)",
        "whole_split": max_b is None or max_b >= n_batches,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "seed": seed,
        "eval_seed": seed,
        "train_seed": run.cfg.train.seed,
        "batch_size": bs,
        "data_dir": str(Path(s.data_dir).resolve()),
        "zero_shot": zero_shot,
        "data": {
            "dir": str(Path(s.data_dir).resolve()),
            "zero_shot": zero_shot,
            "source": s.meta["source"]["spec"],
            "source_fingerprint": s.meta["source"]["fingerprint"],
            "inputs_hash": s.meta.get("inputs_hash"),
            "trained_on": str(Path(run.cfg.data.dir).resolve()),
        },
        "source": s.meta["source"]["spec"],
        "tokenizer": s.meta["tokenizer"]["name"],
        "mode": s.meta["mode"],
        "seq_len": s.meta["seq_len"],
        "layout": s.meta["layout"],
        "scored": SCORED_RULE,
        "process": asdict(run.cfg.process),
        "wall_s": wall,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
    }


def likelihood_settings(
    run: LoadedRun, s: ShardSplit, *, split: str, seed: int, batch_size: int, max_batches: int | None, n: int
) -> dict[str, Any]:
    """Every setting that changes a likelihood figure; its hash names the result file (:mod:`dlm.eval.results`).

    ``max_batches`` is None for the whole split (also when it is at least the ``n`` batches of the split);
    ``batch_size`` is in because it changes the diffusion noise draws; ``device`` is the device type (CPU and
    CUDA generators draw different noise); ``data`` holds the fingerprints of the corpus and the tokenizer.
    """
    return {
        "protocol": LIKELIHOOD_PROTOCOL,
        "split": split,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "seed": seed,
        "batch_size": batch_size,
        "max_batches": None if max_batches is None or max_batches >= n else max_batches,
        "process": asdict(run.cfg.process),
        "data": {
            "source": s.meta["source"]["fingerprint"],
            "tokenizer": s.meta["tokenizer"]["fingerprint"],
            "mode": s.meta["mode"],
            "seq_len": s.meta["seq_len"],
        },
        "device": torch.device(next(run.model.parameters()).device).type,
    }


def boundary_id(meta: dict[str, Any], specials: SpecialIds) -> int:
    """The id a fresh document starts after: EOS in ``wrap`` data (documents follow an EOS), BOS in ``pad``
    data (rows start with BOS) when the tokenizer has one, else EOS."""
    return specials.eos if meta["mode"] == "wrap" or specials.bos is None else specials.bos


def start_ids(meta: dict[str, Any], tokenizer: Tokenizer, prompt: str | None) -> list[int]:
    """The conditioning ids of a sample: a document boundary (``boundary_id``), then the prompt."""
    head = [boundary_id(meta, tokenizer.specials)]
    if prompt is None:
        return head
    ids = encode_text(tokenizer, prompt, "prompt")
    if not ids:
        raise DlmError(f"prompt {prompt!r} tokenizes to nothing")
    return head + ids


def _unk_id(tokenizer: Tokenizer) -> int | None:
    """The id a tokenizer gives to text it cannot represent (chars: ``unk``; WordPiece: [UNK]), or None for the
    byte-level tokenizers (bytes, gpt2, bpe:N), which represent every text."""
    unk = getattr(tokenizer, "unk", None)
    if unk is not None:
        return int(unk)
    hf = getattr(tokenizer, "_hf", None)
    token = getattr(getattr(hf, "model", None), "unk_token", None)
    return hf.token_to_id(token) if token else None


def encode_text(tokenizer: Tokenizer, text: str, what: str) -> list[int]:
    """``tokenizer.encode(text)``; DlmError naming the characters the tokenizer cannot represent (they would
    become UNK ids while the output echoes the text as written). ``encode`` never turns the literal text of a
    special token into its id, so every UNK id comes from such characters."""
    ids = tokenizer.encode(text)
    unk = _unk_id(tokenizer)
    if unk is not None and unk in ids:
        bad = sorted({c for c in text if unk in tokenizer.encode(c)})
        shown = " ".join(repr(c) for c in bad) if bad else "(a word longer than the tokenizer handles)"
        raise DlmError(f"{what} has characters outside the vocabulary of tokenizer {tokenizer.name}: {shown}")
    return ids


def sample_run(
    run_dir: str | Path,
    *,
    n: int = 4,
    length: int | None = None,
    prompt: str | None = None,
    sampler: str | None = None,
    seed: int = 0,
    which: str | int = "last",
    ema: bool = True,
    device: str = "cpu",
    batch_size: int = 16,
    progress: Callable[[int, int | None], None] | None = None,
    **opts: Any,
) -> tuple[list[dict[str, Any]], Path]:
    """Draw ``n`` samples of up to ``length`` tokens (default: the data's row length) from a run. A length above
    the model context is refused unless the family generates past it (``Process.beyond_context``: BD3-LM).

    ``opts`` go to the process's sampler (temperature, top_k, top_p, ...). The rows are drawn ``batch_size``
    at a time from one generator seeded with ``seed`` (so the samples depend on ``batch_size`` when n exceeds
    it); ``progress(done, n)`` is called after each batch. Returns the records written to the JSONL file and
    its path. A record carries ``stop`` (what ended the row: "eos", "entropy" or "length") when the family
    records it (``SampleResult.stop_N``).
    """
    if n < 1:
        raise DlmError(f"number of samples must be >= 1, got {n}")
    _positive("length", length)
    _positive("batch size", batch_size)
    check_device(device)
    run = load_run(run_dir, which=which, ema=ema, device=device)
    tok = run_tokenizer(run)
    meta = run.data_meta
    prompt_ids = start_ids(meta, tok, prompt)
    if length is not None and length <= len(prompt_ids):
        raise DlmError(
            f"--length {length} leaves no token to generate: it counts the prompt's {len(prompt_ids)} tokens "
            "(with the document boundary); give a larger --length"
        )
    length = length or meta["seq_len"]
    samples_dir = Path(run_dir) / "samples"
    check_writable(samples_dir)
    gen = torch.Generator(device=device).manual_seed(seed)
    settings = {
        "family": run.process.name,
        "sampler": run.process.resolve_sampler(sampler),
        "length": length,
        "seed": seed,
        "batch_size": batch_size,
        "checkpoint_step": run.step,
        "ema": run.ema,
        **{k: v for k, v in opts.items() if v is not None},
    }
    records = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        t0 = time.perf_counter()
        result = run.process.sample(run.model, b, length, sampler=sampler, prompt_ids=prompt_ids, generator=gen, **opts)
        wall = time.perf_counter() - t0
        records += _sample_records(result, tok, start, start // batch_size, prompt, wall, settings)
        if progress is not None:
            progress(start + b, n)
    return records, _write_jsonl(samples_dir, f"samples-step{run.step}", records)


def _sample_records(
    result: Any, tok: Tokenizer, first: int, batch: int, prompt: str | None, wall: float, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """One JSONL record per row of a ``SampleResult`` (rows numbered from ``first``), with what ended the row
    (``stop``) and the step each position was revealed (``reveal_step``) when the family records them."""
    trajectory = getattr(result, "trajectory_NL", None)
    stop = getattr(result, "stop_N", None)
    records = []
    for i in range(result.ids_NL.shape[0]):
        ids = result.ids_NL[i, : int(result.lengths_N[i])].tolist()
        gen_ids = ids[result.prompt_len :]
        record = {
            "index": first + i,
            "batch": batch,
            "prompt": prompt,
            "ids": ids,
            "text": tok.decode(gen_ids),
            "generated_tokens": len(gen_ids),
            "nfe": result.nfe,
            "wall_s_batch": wall,
            **settings,
        }
        if stop is not None:  # what ended the row (BD3-LM's stop rules)
            record["stop"] = stop[i]
        if trajectory is not None:  # step at which each position was revealed (-1: fixed / prompt)
            record["reveal_step"] = trajectory[i, : len(ids)].tolist()
        records.append(record)
    return records


_MASK_SPAN = re.compile(r"\[MASK(?::(\d+))?\]")


def infill_ids(pattern: str, tokenizer: Tokenizer, head: list[int], span: int, max_len: int | None = None) -> list[int]:
    """Fixed ids of an infill pattern, -1 where the model fills in.

    ``"The [MASK] sat on the [MASK:3] ."``: text segments are tokenized as written (with their spaces);
    ``[MASK]`` stands for ``span`` free tokens, ``[MASK:n]`` for n. ``head`` (a document boundary) comes first.
    ``max_len`` (the model context): the pattern's total length is checked against it before anything is built.
    """
    if span < 1:
        raise DlmError(f"mask span must be >= 1, got {span}")
    parts = _MASK_SPAN.split(pattern)
    if len(parts) == 1:
        raise DlmError(f"infill pattern {pattern!r} has no [MASK] span")
    texts = [encode_text(tokenizer, part, "infill pattern") if part else [] for part in parts[::2]]
    spans = [span if part is None else int(part) for part in parts[1::2]]
    if min(spans) < 1:
        raise DlmError(f"mask span must be >= 1 in {pattern!r}")
    total = len(head) + sum(map(len, texts)) + sum(spans)
    if max_len is not None and total > max_len:
        raise DlmError(f"infill pattern is {total} tokens, longer than the model context of {max_len}")
    ids = list(head)
    for i, text in enumerate(texts):  # text, span, text, ..., text
        ids += text
        if i < len(spans):
            ids += [-1] * spans[i]
    return ids


def infill_run(
    run_dir: str | Path,
    pattern: str,
    *,
    n: int = 2,
    span: int = 1,
    sampler: str | None = None,
    seed: int = 0,
    which: str | int = "last",
    ema: bool = True,
    device: str = "cpu",
    **opts: Any,
) -> tuple[list[dict[str, Any]], Path]:
    """Fill the [MASK] spans of ``pattern`` with a diffusion run; every other position stays as given."""
    _positive("number of infills (--n)", n)
    check_device(device)
    run = load_run(run_dir, which=which, ema=ema, device=device)
    if run.process.conditioning == "prefix":
        raise DlmError(
            f"infill needs a diffusion family (one that conditions on any positions); {run.process.name} only "
            "continues a prefix (use dlm sample)"
        )
    tok = run_tokenizer(run)
    fixed = infill_ids(pattern, tok, start_ids(run.data_meta, tok, None), span, max_len=run.cfg.model.context)
    samples_dir = Path(run_dir) / "samples"
    check_writable(samples_dir)
    fixed_NL = torch.tensor(fixed, dtype=torch.int64, device=device).expand(n, -1)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    result = run.process.sample(run.model, n, len(fixed), sampler=sampler, generator=gen, fixed_ids=fixed_NL, **opts)
    wall = time.perf_counter() - t0
    free = [i for i, t in enumerate(fixed) if t < 0]
    records = []
    head = len(start_ids(run.data_meta, tok, None))
    for i in range(n):
        ids = result.ids_NL[i].tolist()
        records.append(
            {
                "index": i,
                "pattern": pattern,
                "ids": ids,
                "filled_positions": free,
                "text": tok.decode(ids[head:]),
                "nfe": result.nfe,
                "wall_s_batch": wall,
                "family": run.process.name,
                "sampler": run.process.resolve_sampler(sampler),
                "seed": seed,
                "checkpoint_step": run.step,
                **{k: v for k, v in opts.items() if v is not None},
            }
        )
    return records, _write_jsonl(samples_dir, f"infill-step{run.step}", records)


def _write_jsonl(directory: Path, stem: str, records: list[dict[str, Any]]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    path = directory / f"{stem}-{stamp}.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json_line(r) + "\n" for r in records))  # strict JSON, umask honoured
    return path
