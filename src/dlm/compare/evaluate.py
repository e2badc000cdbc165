"""The per-run evaluation stages of ``dlm compare``: samples, their quality, sampling speed (docs/COMPARE.md).

Each stage reads a run directory and writes one file into ``RUN/eval/`` named by its settings
(:func:`dlm.eval.results.result_path`): the same settings reuse the file, other settings give another one.

- :func:`sample_set`: N unconditional samples of one (sampler, steps), continuing the document boundary
  (``dlm.eval.run.start_ids``) up to the data's row length; ``samples-{sampler}-steps{S|none}-step{N}-{hash}.json``.
- :func:`quality_set`: an :class:`Evaluator` scores a samples file (generative perplexity by a judge, or TER/SER
  under the true language of a ``formal:`` corpus) next to the samples' diversity;
  ``quality-{sampler}-steps{S|none}-step{N}-{hash}.json`` beside the samples file.
- ``dlm.compare.speedset.speed_set`` (its own module): ``dlm.eval.speed.measure_sampling`` per (sampler, steps,
  batch size) and the thesis protocol per (sampler, steps); ``speed-step{N}-{hash}.json``.

Every check of the caller's input is made before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.errors import DlmError
from dlm.eval.diversity import diversity_summary, repetition_rate, unigram_entropy
from dlm.eval.formal import GENERATION_DEFINITIONS, formal_generation_metrics, run_language, symbol_table
from dlm.eval.genppl import ARRunJudge, Judge, gen_ppl_summary
from dlm.eval.results import check_device, check_writable, find_results, result_path, reuse, settings_hash
from dlm.eval.run import resolve_setting, run_tokenizer, start_ids
from dlm.io import write_json_atomic
from dlm.process.base import SampleResult
from dlm.rundir import LoadedRun, load_run, read_run_info

__all__ = ["Evaluator", "JudgeEvaluator", "Scores", "TrueLanguageEvaluator", "judge_from_run", "quality_set"]
__all__ += ["readable_name", "resolve_setting", "sample_set"]

#: Versions of the three protocols, part of each file's settings: bump one when a change makes old files
#: incomparable, so they are recomputed rather than reused.
SAMPLES_PROTOCOL = 2
QUALITY_PROTOCOL = 1

Log = Callable[[str], None] | None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DlmError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def readable_name(sampler: str, steps: int | None, checkpoint_step: int, temperature: float = 1.0) -> str:
    """``{sampler}-steps{S|none}[-temp{T}]-step{N}``: the readable part of the samples and quality file names
    (``sampler``: the sweep entry's label; the temperature only when it is not 1)."""
    temp = "" if float(temperature) == 1.0 else f"-temp{float(temperature):g}"
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", sampler)
    return f"{name}-steps{'none' if steps is None else steps}{temp}-step{checkpoint_step}"


def _data_fingerprints(run: LoadedRun) -> dict[str, Any]:
    return {
        "source": run.data_meta.get("source", {}).get("fingerprint"),
        "tokenizer": run.data_meta["tokenizer"]["fingerprint"],
    }


# ----------------------------------------------------------------------------- samples


def sample_set(
    run_dir: str | Path,
    *,
    sampler: str | None,
    steps: int | None,
    n: int,
    seed: int,
    temperature: float,
    batch_size: int,
    device: str = "cpu",
    force: bool = False,
    log: Log = None,
    progress: Callable[[int, int | None], None] | None = None,
    options: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """``n`` unconditional samples of a run's last checkpoint (EMA weights when kept) for one (sampler, steps).

    ``options``: further sampler options (``SamplerOptions`` fields, e.g. a remasking rate) and ``label`` the
    sweep entry's name (``dlm.compare.sweep``); both enter the settings only when given, so a plain sampler's
    settings (and file) are what they were before the sweep existed.

    Each row starts with the document boundary and runs up to the data's row length ``seq_len`` (an AR row may
    stop earlier at its EOS); rows are drawn ``batch_size`` at a time from one ``torch.Generator`` seeded with
    ``seed``. Every sample drawn is kept. Per batch wall_s_batch = perf_counter around ``process.sample`` (device
    synchronised) and its NFE; nfe = mean NFE over batches, wall_s = sum of wall_s_batch, wall_s_per_sequence =
    wall_s / n. Returns (record, path); an existing file with the same settings is returned as it is (``log``
    says "reused PATH") unless ``force``. ``progress(done, n)`` after each batch.
    """
    _check_sample_args(n, batch_size, seed, temperature)
    dev = check_device(device)
    run = load_run(run_dir, device=device)
    tok = run_tokenizer(run)
    prompt = start_ids(run.data_meta, tok, None)
    length = int(run.data_meta["seq_len"])
    name, steps = resolve_setting(run.process, sampler, steps, length)
    settings = {
        "protocol": SAMPLES_PROTOCOL,
        "family": run.process.name,
        "sampler": name,
        "steps": steps,
        "temperature": float(temperature),
        "n": n,
        "length": length,
        "seed": seed,
        "batch_size": batch_size,
        "checkpoint_step": run.step,
        "ema": run.ema,
        "device": dev.type,
        "process": asdict(run.cfg.process),
        "data": _data_fingerprints(run),
    }
    if options:
        settings["options"] = dict(sorted(options.items()))
    if label is not None and label != name:
        settings["label"] = label
    readable = readable_name(settings.get("label", name), steps, run.step, temperature)
    path = result_path(run_dir, "samples", readable, settings)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    samples, nfes, wall = _draw(run, tok.decode, prompt, settings, dev, progress)
    record = _samples_record(settings, prompt, tok.name, dev, samples, nfes, wall)
    write_json_atomic(path, record)
    if log is not None:
        log(f"{n} samples {run.process.name} {name} steps {steps}: {wall / n:.4f} s/sequence -> {path}")
    return record, path


def _check_sample_args(n: Any, batch_size: Any, seed: Any, temperature: Any) -> None:
    _check_int("number of samples", n, 1)
    _check_int("sample batch size", batch_size, 1)
    _check_int("sample seed", seed, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise DlmError(f"temperature must be a number >= 0, got {temperature!r}")


def _samples_record(
    settings: dict[str, Any], prompt: list[int], tokenizer: str, dev: torch.device, samples: list, nfes: list,
    wall: float,
) -> dict[str, Any]:  # fmt: skip
    """The samples-*.json record: the settings, the samples, NFE per batch, wall time (``sample_set``)."""
    n = settings["n"]
    return {
        "kind": "samples",
        "settings": settings,
        **{k: settings[k] for k in ("family", "sampler", "steps", "temperature", "n", "length", "seed")},
        **{k: settings[k] for k in ("batch_size", "checkpoint_step", "ema")},
        "label": settings.get("label", settings["sampler"]),
        "options": settings.get("options", {}),
        "prompt_ids": prompt,
        "tokenizer": tokenizer,
        "device": str(dev),
        "nfe": sum(nfes) / len(nfes),
        "nfe_per_batch": nfes,
        "wall_s": wall,
        "wall_s_per_sequence": wall / n,
        "created": _now(),
        "samples": samples,
    }


def _draw(
    run: LoadedRun,
    decode: Callable[[list[int]], str],
    prompt: list[int],
    settings: dict[str, Any],
    dev: torch.device,
    progress: Callable[[int, int | None], None] | None,
) -> tuple[list[dict[str, Any]], list[int], float]:
    """The samples of ``settings`` drawn batch by batch from one generator: (per-sample records, NFE per batch,
    total wall seconds); each batch timed by perf_counter around ``process.sample``, the device synchronised."""
    name, steps, n, bs, length = (settings[k] for k in ("sampler", "steps", "n", "batch_size", "length"))
    opts: dict[str, Any] = {**settings.get("options", {}), "temperature": settings["temperature"]}
    if steps is not None:
        opts["steps"] = steps
    if run.process.sampler_specs()[name].trajectory:
        opts["return_trajectory"] = True
    # pad mode (one document per row): every family's sample ends at its first EOS, as AR's does
    eos = int(run.process.specials.eos) if run.data_meta.get("mode") == "pad" else None
    gen = torch.Generator(device=dev).manual_seed(settings["seed"])
    samples: list[dict[str, Any]] = []
    nfes: list[int] = []
    wall = 0.0
    for batch, start in enumerate(range(0, n, bs)):
        b = min(bs, n - start)
        _sync(dev)
        t0 = time.perf_counter()
        result = run.process.sample(run.model, b, length, sampler=name, prompt_ids=prompt, generator=gen, **opts)
        _sync(dev)
        dt = time.perf_counter() - t0
        wall += dt
        nfes.append(int(result.nfe))
        samples += _sample_rows(result, decode, start=start, batch=batch, wall_s=dt, length=length, eos=eos)
        if progress is not None:
            progress(start + b, n)
    return samples, nfes, wall


def _sample_rows(
    result: SampleResult,
    decode: Callable[[list[int]], str],
    *,
    start: int,
    batch: int,
    wall_s: float,
    length: int,
    eos: int | None = None,
) -> list[dict[str, Any]]:
    """The per-sample records of one batch: generated ids (after the prompt, up to the row's returned length,
    an EOS that stopped it included), their text, and the step that revealed each (or None). ``eos`` (pad-mode
    data): a row is cut after its first generated EOS (kept), so a diffusion row's PAD tail after the document's
    end is never scored, the same rule as AR's stop; such a row's stop is "eos"."""
    P = result.prompt_len
    ids_NL = result.ids_NL.cpu()
    lengths_N = result.lengths_N.cpu()
    traj_NL = result.trajectory_NL.cpu() if result.trajectory_NL is not None else None
    rows = []
    for i in range(ids_NL.shape[0]):
        end = int(lengths_N[i])
        if eos is not None:
            hits = (ids_NL[i, P:end] == eos).nonzero()
            end = P + int(hits[0, 0]) + 1 if hits.numel() else end
        ids = ids_NL[i, P:end].tolist()
        rows.append(
            {
                "index": start + i,
                "batch": batch,
                "ids": ids,
                "text": decode(ids),
                "pieces": [decode([t]) for t in ids],  # one string per id, for the report's trajectory view
                "tokens": len(ids),
                "nfe": int(result.nfe),
                "wall_s_batch": wall_s,
                "stop": "eos" if end < length else "length",
                "reveal_step": traj_NL[i, P:end].tolist() if traj_NL is not None else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------- evaluators


@dataclass
class Scores:
    """What an evaluator says of a set of samples: gen PPL figures (or None), formal TER/SER figures (or None),
    and per sample the judge's nats and scored tokens (None where the evaluator has no per-sample NLL)."""

    gen_ppl: dict[str, Any] | None
    formal: dict[str, Any] | None
    nats: list[float | None]
    tokens: list[int | None]


_INFO_KEYS = ("kind", "name", "tokenizer", "retokenisation", "likelihood")


class Evaluator(ABC):
    """Scores the generated ids of a samples file. ``info`` is written into every quality file (the keys of
    docs/COMPARE.md and any further identity such as a judge's run directory); ``identity()`` is the part that
    goes into the quality settings (no figure that could change when the evaluator is re-measured)."""

    info: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What goes into a quality file's settings: ``info`` less the likelihood and the absolute paths (a
        comparison directory that is moved or copied keeps its quality files)."""
        return {k: v for k, v in self.info.items() if k not in ("likelihood", "run_dir", "path")}

    def check(self, run_dir: Path) -> None:  # noqa: B027 - the default evaluator accepts every run
        """Refuse (DlmError, one line) the samples of a run this evaluator cannot score."""

    @abstractmethod
    def score(self, ids_list: list[list[int]]) -> Scores:
        """Score the samples (generated ids only, as in the samples file)."""


def _check_info(info: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise DlmError(f"evaluator info lacks {', '.join(missing)} (needs {', '.join(_INFO_KEYS)})")
    return dict(info)


class JudgeEvaluator(Evaluator):
    """Generative perplexity by a judge (``dlm.eval.genppl.Judge``): gen_ppl_summary of its per-sample nats.

    The judge reads the arms' token ids as they are, so it must share their tokenizer: ``tokenizer_fingerprint``
    (the judge's) must equal that of the samples' run, unless the judge retokenises text itself (an attribute
    ``retokenises = True``).
    """

    def __init__(self, judge: Judge, info: dict[str, Any], tokenizer_fingerprint: str | None = None) -> None:
        self.judge = judge
        self.info = _check_info(info)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.retokenises = bool(getattr(judge, "retokenises", False))

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        if self.tokenizer_fingerprint is not None:
            out["tokenizer_fingerprint"] = self.tokenizer_fingerprint
        return out

    def check(self, run_dir: Path) -> None:
        if self.retokenises:
            return
        arm = read_run_info(run_dir)["data_meta"]["tokenizer"]
        if self.tokenizer_fingerprint != arm.get("fingerprint"):
            raise DlmError(
                f"judge {self.info['name']} reads token ids of tokenizer {self.info['tokenizer']} with another "
                f"vocabulary than the {arm.get('name')} of run {run_dir} (fingerprints differ) and does not "
                "retokenise; judge with a run trained on the same data"
            )

    def score(self, ids_list: list[list[int]]) -> Scores:
        nats_S, tokens_S = self.judge.token_nll(ids_list)
        return Scores(gen_ppl_summary(nats_S, tokens_S), None, nats_S.tolist(), tokens_S.tolist())


def judge_from_run(judge_run_dir: str | Path, device: str = "cpu", batch_size: int = 32) -> JudgeEvaluator:
    """An AR run as judge (``ARRunJudge``, last checkpoint, EMA weights when kept); its info holds the run's
    directory name, path and checkpoint step, tokenizer, and its newest likelihood record at that checkpoint
    (``find_results(judge_run, "likelihood")``) or None."""
    check_device(device)
    run = load_run(judge_run_dir, device=device)
    judge = ARRunJudge.from_run(run, batch_size=batch_size)
    found = find_results(judge_run_dir, "likelihood", checkpoint_step=run.step)
    path = Path(judge_run_dir).resolve()
    tok = run.data_meta["tokenizer"]
    info = {
        "kind": "judge-ar",
        "name": path.name,
        "tokenizer": tok["name"],
        "retokenisation": "none: the judge shares the arms' tokenizer",
        "likelihood": found[-1][1] if found else None,
        "run_dir": str(path),
        # which trained judge, wherever its directory is: run.json holds its config, data and creation time
        "run_fingerprint": hashlib.sha256((path / "run.json").read_bytes()).hexdigest()[:16],
        "checkpoint_step": run.step,
        "ema": run.ema,
    }
    return JudgeEvaluator(judge, info, tokenizer_fingerprint=tok["fingerprint"])


class TrueLanguageEvaluator(Evaluator):
    """TER / SER of samples of a run on a ``formal:`` corpus under the language that generated its data
    (``dlm.eval.formal``: ``run_language``, ``symbol_table``, ``formal_generation_metrics``).

    A sample's document is its ids up to its first EOS (the rows of the data are ``[BOS] x_1..x_L [EOS] PAD``);
    a document of exactly L ids maps id by id to symbols (``symbol_table``; a non-symbol id becomes -1), a
    document of another length becomes a row of -1. ``formal_generation_metrics(..., allow_non_symbols=True)``
    counts every row holding -1 as out of support for SER and leaves it out of TER, as ``evaluate_generation``
    does.
    """

    def __init__(self, run_dir: str | Path) -> None:
        run = load_run(run_dir, device="cpu")
        self.language, self.length = run_language(run)
        tok = run_tokenizer(run)
        self.table = symbol_table(tok, self.language.vocab_size, run.process.vocab_size)
        self.eos = int(run.process.specials.eos)
        self.source_fingerprint = run.data_meta["source"].get("fingerprint")
        self.info = {
            "kind": "true-language",
            "name": run.data_meta["source"].get("spec"),
            "tokenizer": tok.name,
            "retokenisation": "none: each token id of a symbol is that symbol (dlm.eval.formal.symbol_table)",
            "likelihood": None,
            "language": self.language.params(),
            "length": self.length,
            "source_fingerprint": self.source_fingerprint,
        }

    def check(self, run_dir: Path) -> None:
        source = read_run_info(run_dir)["data_meta"].get("source", {})
        if source.get("fingerprint") != self.source_fingerprint:
            raise DlmError(
                f"run {run_dir} was trained on {source.get('spec')!r}, not on the corpus of this true-language "
                f"evaluator ({self.info['name']!r}); score each run with its own language"
            )

    def symbols(self, ids_list: Sequence[Sequence[int]]) -> np.ndarray:
        """int64 [N, L]: each sample's document as symbols, -1 for a non-symbol id or a document not of length L."""
        out = np.full((len(ids_list), self.length), -1, dtype=np.int64)
        size = len(self.table)
        for s, ids in enumerate(ids_list):
            doc = list(ids[: list(ids).index(self.eos)] if self.eos in ids else ids)
            if len(doc) == self.length:
                x = np.asarray(doc, dtype=np.int64)
                out[s] = np.where((x >= 0) & (x < size), self.table[np.clip(x, 0, size - 1)], -1)
        return out

    def score(self, ids_list: list[list[int]]) -> Scores:
        if not ids_list:
            raise DlmError("no samples to score")
        m = formal_generation_metrics(self.language, self.symbols(ids_list), allow_non_symbols=True)
        formal = {**m, "definitions": {k: v for k, v in GENERATION_DEFINITIONS.items() if k in m}}
        return Scores(None, formal, [None] * len(ids_list), [None] * len(ids_list))


# ----------------------------------------------------------------------------- quality


def _read_samples(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except OSError as e:
        raise DlmError(f"cannot read samples file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DlmError(f"corrupt samples file {path}: {e}") from None
    if not isinstance(record, dict) or record.get("kind") != "samples" or not isinstance(record.get("samples"), list):
        raise DlmError(f"{path} is not a samples file (dlm.compare.evaluate.sample_set)")
    return record


def quality_set(
    samples_path: str | Path, *, evaluator: Evaluator, window: int = 100, force: bool = False, log: Log = None
) -> tuple[dict[str, Any], Path]:
    """Score a samples file (``RUN/eval/samples-*.json``) with ``evaluator`` and measure its diversity.

    Writes ``quality-{sampler}-steps{S|none}-step{N}-{hash}.json`` beside it. Settings: the samples file's name,
    the hashes of its settings and of its ids (a forced resample that drew other ids is scored again),
    ``evaluator.identity()`` and the repetition ``window``; an existing file with
    the same settings is returned (``log`` says "reused PATH") unless ``force``. Per sample: the judge's nats
    (``judge_nll``, None without a judge) and scored tokens, unigram entropy and repetition rate (``window``).
    """
    samples_path = Path(samples_path).resolve()
    _check_int("repetition window", window, 1)
    rec = _read_samples(samples_path)
    run_dir = samples_path.parent.parent
    evaluator.check(run_dir)
    settings = {
        "protocol": QUALITY_PROTOCOL,
        "samples_file": samples_path.name,
        "samples_settings_hash": settings_hash(rec["settings"]),
        "samples_ids_hash": settings_hash({"ids": [s["ids"] for s in rec["samples"]]}),
        "evaluator": evaluator.identity(),
        "window": window,
    }
    label = rec.get("label") or rec["sampler"]
    readable = readable_name(label, rec["steps"], rec["checkpoint_step"], rec.get("temperature", 1.0))
    path = result_path(run_dir, "quality", readable, settings)
    assert path.parent == samples_path.parent, (path, samples_path)
    if (old := reuse(path, settings, force=force, log=log)) is not None:
        return old, path
    check_writable(path.parent)
    ids_list = [s["ids"] for s in rec["samples"]]
    scores = evaluator.score(ids_list)
    per_sample = [
        {
            "index": s["index"],
            "judge_nll": nats,
            "judge_tokens": toks,
            "entropy": unigram_entropy(s["ids"]),
            "repetition_rate": repetition_rate(s["ids"], window),
        }
        for s, nats, toks in zip(rec["samples"], scores.nats, scores.tokens, strict=True)
    ]
    record = {
        "kind": "quality",
        "settings": settings,
        "samples_file": samples_path.name,
        "family": rec.get("family"),
        "sampler": rec["sampler"],
        "label": label,
        "steps": rec["steps"],
        "temperature": rec.get("temperature"),
        "checkpoint_step": rec["checkpoint_step"],
        "nfe": rec["nfe"],
        "wall_s_per_sequence": rec["wall_s_per_sequence"],
        "evaluator": evaluator.info,
        "gen_ppl": scores.gen_ppl,
        "diversity": diversity_summary(ids_list, window),
        "formal": scores.formal,
        "per_sample": per_sample,
        "created": _now(),
    }
    write_json_atomic(path, record)
    if log is not None:
        g = scores.gen_ppl
        shown = f"gen PPL {g['gen_ppl_pooled']}" if g else f"TER {scores.formal and scores.formal.get('ter')}"
        log(f"quality {rec['sampler']} steps {rec['steps']} ({evaluator.info['kind']}): {shown} -> {path}")
    return record, path
