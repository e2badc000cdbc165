"""AR vs MDLM on a formal language: TER and SER against the number of sampling steps (MDM theory paper §5 and
figure 1; SPEC §6). ``dlm experiment formal --language 3gram-cpu --out DIR``.

Pipeline; every piece lives under ``DIR`` and is reused when it is already there with the same settings, so a
killed experiment resumes where it stopped:

    DIR/data/          formal:LANGUAGE, tokenizer chars, pad mode, rows [BOS] x_1..x_L [EOS] (seeded)
    DIR/ar/, DIR/mdlm/ an AR model and an MDLM (process.time_cond false, so ddpm_cache is exact) with the same
                       backbone config, data, training steps, optimizer and seed; only the vocabulary differs
                       (MDLM appends the MASK id)
    RUN/eval/generation-*-HASH.json  N samples of each setting scored by ``dlm.eval.formal.evaluate_generation``
                       (one file per distinct setting, listed by ``dlm.eval.results.find_results``):
                       AR ancestral with a KV cache, MDLM ddpm_cache at every step count of the sweep
    DIR/experiment.json, DIR/ter_ser_vs_steps.png   the results and the two-panel figure

Definitions (also written into experiment.json):

* TER, SER, their standard errors, NFE and wall time per sequence: ``dlm.eval.formal.GENERATION_DEFINITIONS``.
* Matched TER (:func:`matched_speedup`): the smallest step count S of the sweep with
  TER_S <= TER_AR + k sqrt(se_AR^2 + se_S^2), k = 2 (the MDLM is not worse than AR by more than two standard
  errors of the difference); speedup = AR wall time per sequence / MDLM wall time per sequence at S; None when
  no step count matches. The same rule on SER gives ``matched_ser``.
* Validation NLL per symbol (nats), on the validation split, of the same L symbols for both families (the
  project's scoring rule, ``dlm.process.base.scored_positions``: BOS is context; here the EOS, deterministic in
  the data, is left out of the scored set for both): AR exact, -log p_theta(x_1..x_L | BOS) / L; MDLM an upper
  bound on the same quantity, the NELBO of x_1..x_L given BOS (EOS shown clean, never masked) / L, averaged over
  ``nll_t_samples`` draws of (t, z_t) per sequence; gap = NLL - entropy rate (exact for n-grams).
  ``true_model_nll`` is -log p(x) / L of the same validation sequences under the true language: the floor a
  perfect model would reach on them.

temp_mode: see :data:`TEMP_MODE_DECISION`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.config import RunConfig, config_diff, load_config
from dlm.data.batch import Batch
from dlm.data.formal import PRESETS, TEMP_MODES, get_language
from dlm.data.loader import Loader
from dlm.data.shards import ShardSplit, inputs_hash, open_split, prepare, read_meta
from dlm.data.sources import get_source
from dlm.errors import DlmError
from dlm.eval.formal import GENERATION_DEFINITIONS, MATCH_K, evaluate_generation, matched_speedup
from dlm.eval.likelihood import sequence_nll
from dlm.eval.speed import machine_info
from dlm.io import write_json_atomic
from dlm.rundir import CONFIG_FILE, list_checkpoints, load_run, read_info, read_run_config, read_run_info
from dlm.train import train
from dlm.train.loop import resolve_data

__all__ = [
    "RESULT_FILE",
    "TEMP_MODE_DECISION",
    "FormalExperimentConfig",
    "default_config",
    "matched_speedup",
    "run_formal_experiment",
]

RESULT_FILE = "experiment.json"
FIGURE_FILE = "ter_ser_vs_steps.png"
TEMP_MODE_DECISION = (
    "multiply: rows are softmax(g * temp). With the SPEC's softmax(g / temp) the paper's thresholds prune no "
    "entry of a vocabulary-8 row (2gram: p < 0.008 needs g < -5.3), so every sequence is in the support and "
    "SER is 0 for any model; softmax(g * temp) prunes 13-26% of the n-gram transitions (3gram: 26%), which "
    "the paper's nonzero SER curves require (dlm.data.formal docstring)."
)


@dataclass
class FormalExperimentConfig:
    """One formal-language experiment (``default_config`` fills in the CPU or the paper-scale preset).

    language:          formal language preset: 2gram, 3gram, 4gram, hmm, or a -cpu twin (length 64).
                       Default 2gram-cpu: the one whose MDLM gets near AR in the CPU budget (docs/LOG.md).
    temp_mode:         multiply (default, TEMP_MODE_DECISION) or divide (SPEC §6; SER is then always 0).
    language_seed:     seed of the language's random parameters; None = the preset's (0).
    length:            symbols per sequence L; None = the preset's (64 for -cpu, else 512).
    seed:              seed of the data, of both trainings and of the samples.
    n_train:           training sequences.
    n_valid:           validation sequences (the NLL comparison).
    n_test:            test sequences.
    n_layer:           transformer blocks of the shared backbone.
    d_model:           residual width of the shared backbone.
    n_head:            attention heads of the shared backbone.
    train_steps:       optimizer steps of each training.
    batch_size:        training sequences per step.
    lr:                peak learning rate (warm-up, then cosine to 0.1 lr).
    warmup_steps:      linear warm-up steps.
    steps:             MDLM ddpm_cache step counts of the sweep.
    n_samples:         sequences sampled per setting (AR, and MDLM at each step count).
    sample_batch_size: rows sampled at once, for both families (the paper's speed test used 16).
    nll_t_samples:     MDLM NELBO: draws of (t, z_t) per validation sequence.
    device:            auto (CUDA when available), cpu or cuda; training and sampling.
    threads:           torch CPU threads for the whole experiment; None (or 0) = torch's default. The
                       CPU preset uses 1: on the 2-core dev machine shared with other jobs, 2 threads made a
                       training step 6x slower than 1 (oversubscription; quiet, 1 thread costs ~1.3x).
    """

    language: str = "2gram-cpu"
    temp_mode: str = "multiply"
    language_seed: int | None = None
    length: int | None = None
    seed: int = 0
    n_train: int = 20_000
    n_valid: int = 500
    n_test: int = 500
    n_layer: int = 4
    d_model: int = 64
    n_head: int = 4
    train_steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    steps: tuple[int, ...] = field(default=(8, 16, 32, 64))
    n_samples: int = 500
    sample_batch_size: int = 16
    nll_t_samples: int = 4
    device: str = "auto"
    threads: int | None = 1

    def validate(self) -> FormalExperimentConfig:
        if self.language not in PRESETS:
            raise DlmError(f"unknown formal language {self.language!r} (presets: {', '.join(PRESETS)})")
        if self.length is None:
            self.length = PRESETS[self.language][1]
        _positive("length", self.length)
        if self.temp_mode not in TEMP_MODES:
            raise DlmError(f"temp_mode must be one of {', '.join(TEMP_MODES)}, got {self.temp_mode!r}")
        for key in ("n_train", "n_valid", "n_test", "n_layer", "d_model", "n_head", "train_steps", "batch_size"):
            _positive(key, getattr(self, key))
        for key in ("n_samples", "sample_batch_size", "nll_t_samples"):
            _positive(key, getattr(self, key))
        if self.warmup_steps < 0 or not self.lr > 0:
            raise DlmError(f"need lr > 0 and warmup_steps >= 0, got lr={self.lr!r}, warmup_steps={self.warmup_steps!r}")
        if not self.steps:
            raise DlmError("steps: give at least one MDLM step count")
        for s in self.steps:
            _positive("steps", s)
        if len(set(self.steps)) != len(self.steps):
            raise DlmError(f"steps must be distinct, got {list(self.steps)}")
        if self.threads == 0:
            self.threads = None  # torch's default
        if self.threads is not None:
            _positive("threads", self.threads)
        if self.device not in ("auto", "cpu", "cuda"):
            raise DlmError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return self


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DlmError(f"{key} must be a positive integer, got {value!r}")


def default_config(language: str = "2gram-cpu", **overrides: Any) -> FormalExperimentConfig:
    """The preset for ``language``: ``-cpu`` languages (L = 64) get the CPU preset (the dataclass defaults:
    4 layers, d 64, 1500 steps each, sweep 8..L, 500 samples, 1 thread; measured in docs/LOG.md to finish in
    under 20 minutes on the 2-core dev machine), the others the paper's (tables 2-3: 8 layers, d 512, 8 heads,
    10 layers for 4gram, lr 3e-4, steps 8..2048, 1000 samples; for GPUs). ``overrides`` (None values ignored)
    replace fields."""
    if language not in PRESETS:
        raise DlmError(f"unknown formal language {language!r} (presets: {', '.join(PRESETS)})")
    if language.endswith("-cpu"):
        cfg = FormalExperimentConfig(language=language)
    else:
        cfg = FormalExperimentConfig(
            language=language,
            n_train=100_000,
            n_layer=10 if language == "4gram" else 8,
            d_model=512,
            n_head=8,
            train_steps=30_000,
            batch_size=64,
            lr=3e-4,
            warmup_steps=3000,
            steps=(8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            n_samples=1000,
            threads=None,
        )
    names = {f.name for f in dataclasses.fields(FormalExperimentConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DlmError(f"unknown experiment option(s): {', '.join(unknown)}")
    changes = {k: (tuple(v) if k == "steps" else v) for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **changes).validate()


# --------------------------------------------------------------------------------------------------
# Matched TER / SER


# --------------------------------------------------------------------------------------------------
# The two arms


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: a label (its run directory DIR/label and its key in experiment.json), the
    process it trains, the sampler it is scored with, and its own configuration overrides."""

    label: str
    process: str
    sampler: str
    overrides: tuple[str, ...] = ()


#: AR samples once (ancestral, KV cache); the MDLM is swept over ``steps`` with ddpm_cache, which is exact only
#: for a time-independent denoiser, hence process.time_cond false.
AR_ARM = Arm("ar", "ar", "ancestral")
MDLM_ARM = Arm("mdlm", "mdlm", "ddpm_cache", ("--process.time_cond=false",))
ARMS = (AR_ARM, MDLM_ARM)


# --------------------------------------------------------------------------------------------------
# Pieces: data, trainings, NLL, samples


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DlmError("device cuda requested but CUDA is not available")
    return device


def _remove(path: Path, marker: str, log: Callable[[str], None]) -> None:
    """Delete a piece of this experiment (a directory holding ``marker``) before it is redone with --force."""
    if not (path / marker).exists():
        raise DlmError(f"{path} exists but holds no {marker}; not deleting it (choose another --out)")
    log(f"--force: removing {path} (made with other settings)")
    shutil.rmtree(path)


def _prepare_data(cfg: FormalExperimentConfig, out: Path, force: bool, log: Callable[[str], None]) -> Path:
    opts: dict[str, Any] = {"n_train": cfg.n_train, "n_valid": cfg.n_valid, "n_test": cfg.n_test, "seed": cfg.seed}
    opts["temp_mode"] = cfg.temp_mode
    opts["length"] = cfg.length
    if cfg.language_seed is not None:
        opts["language_seed"] = cfg.language_seed
    source = get_source(f"formal:{cfg.language}", **opts)
    data = out / "data"
    seq_len = cfg.length + 2
    if (data / "meta.json").exists() and read_meta(data).get("inputs_hash") != inputs_hash(
        source, "chars", seq_len, "pad", None
    ):
        if not force:
            raise DlmError(f"{data} holds data of other settings; use --force to replace it, or another --out")
        _remove(data, "meta.json", log)
    return prepare(source, "chars", seq_len=seq_len, mode="pad", out_dir=data, log=log)


def _run_config(cfg: FormalExperimentConfig, arm: Arm, data: Path, device: str) -> RunConfig:
    every = max(1, cfg.train_steps // 4)
    overrides = [
        f"--data.dir={data.resolve()}",
        f"--process.name={arm.process}",
        f"--model.n_layer={cfg.n_layer}",
        f"--model.d_model={cfg.d_model}",
        f"--model.n_head={cfg.n_head}",
        f"--model.context={cfg.length + 2}",
        f"--train.device={device}",
        f"--train.seed={cfg.seed}",
        f"--train.batch_size={cfg.batch_size}",
        f"--train.max_steps={cfg.train_steps}",
        f"--train.warmup_steps={min(cfg.warmup_steps, cfg.train_steps)}",
        f"--train.lr={cfg.lr}",
        f"--train.val_every={every}",
        f"--train.ckpt_every={every}",
        "--train.val_batches=4",
        f"--train.log_every={max(1, cfg.train_steps // 20)}",
        "--eval.split=validation",
        *arm.overrides,
    ]
    return load_config(None, overrides)


def _train(
    cfg: FormalExperimentConfig, arm: Arm, data: Path, out: Path, device: str, force: bool, log: Callable
) -> tuple[Path, float]:
    """Train (or reuse, or resume) DIR/label; returns the run directory and the wall seconds spent here."""
    run_cfg = _run_config(cfg, arm, data, device)
    resolved = RunConfig.from_dict(run_cfg.to_dict())
    resolve_data(resolved)  # fills model.vocab_size and time_cond as the trainer records them
    run_dir = out / arm.label
    resume = False
    if (run_dir / CONFIG_FILE).exists():
        diff = config_diff(read_run_config(run_dir), resolved)
        same_data = read_run_info(run_dir)["data_meta"].get("inputs_hash") == read_meta(data).get("inputs_hash")
        if diff or not same_data:
            if not force:
                why = "; ".join(diff) if diff else "other data"
                raise DlmError(f"{run_dir} holds a run with other settings ({why}); use --force or another --out")
            _remove(run_dir, CONFIG_FILE, log)
        else:
            ckpts = list_checkpoints(run_dir)
            if ckpts and ckpts[-1][0] >= cfg.train_steps:
                log(f"reusing the finished {arm.label} run {run_dir} (step {ckpts[-1][0]})")
                return run_dir, 0.0
            resume = True
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise DlmError(f"{run_dir} exists and is not a run directory; choose another --out")
    log(f"== train {arm.label}: {cfg.n_layer} layers, d {cfg.d_model}, {cfg.train_steps} steps -> {run_dir}")
    t0 = time.perf_counter()
    train(run_cfg, run_dir, resume=resume)
    return run_dir, time.perf_counter() - t0


def _val_nll(run_dir: Path, data: Path, L: int, passes: int, seed: int, device: str) -> dict[str, Any]:
    """Validation NLL per symbol of x_1..x_L given BOS (module docstring): AR exact, MDLM its NELBO, per sequence
    averaged over ``passes`` noise draws; mean and standard error across sequences."""
    run = load_run(run_dir, device=device)
    ar = run.process.exact_likelihood
    gen = torch.Generator(device=device).manual_seed(seed)
    nats_PS, tokens_S = symbol_nats(run.process, run.model, open_split(data, "validation"), 1 if ar else passes, gen)
    if not bool((tokens_S == L).all()):
        raise AssertionError("a family scored a number of tokens per row other than L")
    per_symbol = (nats_PS.mean(0) / L).numpy()
    return {
        "nll": float(per_symbol.mean()),
        "nll_se": float(per_symbol.std(ddof=1) / math.sqrt(len(per_symbol))),
        "exact": ar,
        "bound": "=" if ar else "<=",
        "sequences": len(per_symbol),
        "noise_draws_per_sequence": 1 if ar else passes,
        "checkpoint_step": run.step,
    }


def symbol_nats(
    process: Any, model: torch.nn.Module, split: ShardSplit, passes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence nats of x_1..x_L given BOS, the EOS left out of the scored set (``dlm.eval.formal.ar_symbol_nll``),
    over ``split`` in order, batches of 100 rows: float64 [passes, S] (each pass draws new noise from
    ``generator``), and the scored tokens of each sequence, int64 [S]."""
    device = generator.device
    eos = split.specials.eos
    per_pass, tokens = [], torch.zeros(0, dtype=torch.int64)
    for _ in range(passes):
        loader = Loader(split, 100, shuffle=False, infinite=False)
        batches = (Batch(b.ids_BL, b.mask_BL & (b.ids_BL != eos)) for b in loader)
        results = sequence_nll(process, model, batches, device=device, generator=generator)
        per_pass.append(torch.cat([res.nats_B.cpu() for res in results]))
        tokens = torch.cat([res.tokens_B.cpu() for res in results])
    return torch.stack(per_pass), tokens


def _true_val_nll(language: Any, data: Path, L: int) -> dict[str, Any]:
    """-log p(x) / L of the validation sequences under the true language (chars: symbol i is id i)."""
    split = open_split(data, "validation")
    x = np.asarray(split.ids, dtype=np.int64)[:, 1 : L + 1]
    per = -language.log_prob(x) / L
    return {"nll": float(per.mean()), "nll_se": float(per.std(ddof=1) / math.sqrt(len(per)))}


def _generation(
    run_dir: Path, sampler: str, steps: int | None, cfg: FormalExperimentConfig, device: str, force: bool, log: Callable
) -> dict[str, Any]:
    """A generation record of RUN/eval, reused when one with the same settings is there (and not --force):
    :func:`dlm.eval.formal.evaluate_generation` names its files by the hash of every setting."""
    rec, _ = evaluate_generation(
        run_dir,
        n=cfg.n_samples,
        sampler=sampler,
        steps=steps,
        seed=cfg.seed,
        batch_size=cfg.sample_batch_size,
        device=device,
        force=force,
        log=log,
    )
    return rec


_ROW_KEYS = ("steps", "ter", "ter_se", "ser", "ser_se", "nfe", "wall_s_per_sequence", "in_support")


def _row(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in _ROW_KEYS} | {"non_symbol_sequences": rec["non_symbol_sequences"]}


def _load_avg() -> float | None:
    """1-minute load average (other jobs on the machine slow every timing down), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _machine(device: str) -> dict[str, Any]:
    m = machine_info(device)  # the one description of a machine (dlm.eval.speed), under this file's keys
    cuda = m["device_name"] if device == "cuda" else None
    return {"device": device, "cuda": cuda, "cpu": m["cpu_model"], "torch": m["torch"],
            "torch_threads": m["torch_threads"], "python": m["python"]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The experiment


def run_formal_experiment(
    cfg: FormalExperimentConfig, out: str | Path, *, force: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the experiment into ``out``; writes ``experiment.json`` and the figure atomically and
    returns the result. A finished experiment (experiment.json present) is refused unless ``force``; with
    ``force`` the samples are redrawn, and data or runs made with other settings are replaced (finished ones
    with the same settings are reused: training is deterministic)."""
    cfg = cfg.validate()
    out = Path(out)
    if (out / RESULT_FILE).exists() and not force:
        raise DlmError(f"{out} holds a finished experiment ({RESULT_FILE}); use --force to redo it, or another --out")
    if out.exists() and not out.is_dir():
        raise DlmError(f"--out {out} is not a directory")
    device = _resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, device, force, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: FormalExperimentConfig, out: Path, device: str, force: bool, log: Callable[[str], None]) -> dict:
    """The stages in order, each reading what the one before wrote: data, trainings, NLL, samples, result."""
    from dlm.experiment.report import format_table, plot_ter_ser

    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    load_start = _load_avg()

    log(f"== data: formal:{cfg.language} (temp_mode {cfg.temp_mode}), L={cfg.length}, {cfg.n_train} training sequences")
    t0 = time.perf_counter()
    data = _prepare_data(cfg, out, force, log)
    language = get_language(read_meta(data)["source"]["language"])
    wall["prepare"] = time.perf_counter() - t0

    runs = {}
    for arm in ARMS:
        runs[arm.label], wall[f"train_{arm.label}"] = _train(cfg, arm, data, out, device, force, log)

    t0 = time.perf_counter()
    nll = _nll_stage(cfg, runs, data, language, device, log)
    wall["nll"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = _sample_stage(cfg, runs, device, force, log)
    wall["sample"] = time.perf_counter() - t0

    result = _result(cfg, language, data, runs, nll, samples, device)
    result["machine"]["load_avg_1min"] = {"start": load_start, "end": _load_avg()}
    plot_ter_ser(result, out / FIGURE_FILE)
    wall["total"] = time.perf_counter() - t_start
    result["wall_s"] = wall
    write_json_atomic(out / RESULT_FILE, result)
    for line in format_table(result):
        log(line)
    log(f"results: {out / RESULT_FILE}, figure: {out / FIGURE_FILE}")
    return result


def _nll_stage(
    cfg: FormalExperimentConfig, runs: dict[str, Path], data: Path, language: Any, device: str, log: Callable
) -> dict[str, Any]:
    """Validation NLL per symbol of every arm, the exact entropy rate and the true language's NLL."""
    L = cfg.length
    assert L is not None  # validate() filled it in
    log("== validation NLL per symbol vs the exact entropy rate")
    H, H_se = language.entropy_rate(L)
    true_nll = _true_val_nll(language, data, L)
    nll: dict[str, Any] = {"entropy_rate": H, "entropy_rate_se": H_se, "true_model_nll": true_nll}
    for arm in ARMS:
        r = _val_nll(runs[arm.label], data, L, cfg.nll_t_samples, cfg.seed, device)
        nll[arm.label] = r | {"gap": r["nll"] - H}
    log(
        f"entropy rate {H:.4f} | true model on these sequences {true_nll['nll']:.4f} | "
        f"AR {nll['ar']['nll']:.4f} (gap {nll['ar']['gap']:+.4f}) | "
        f"MDLM <= {nll['mdlm']['nll']:.4f} (gap <= {nll['mdlm']['gap']:+.4f}) nats/symbol"
    )
    return nll


@dataclass
class _Samples:
    """The sampling stage's output: AR's record and row, one row per MDLM step count."""

    ar_rec: dict[str, Any]
    ar_row: dict[str, Any]
    rows: list[dict[str, Any]]
    mdlm_step: int | None


def _sample_stage(
    cfg: FormalExperimentConfig, runs: dict[str, Path], device: str, force: bool, log: Callable
) -> _Samples:
    """AR sampled once; the MDLM at every step count of the sweep (generation records reused when present)."""
    from dlm.experiment.report import format_row

    log(f"== sample: {cfg.n_samples} sequences per setting, {cfg.sample_batch_size} at a time, on {device}")
    ar_rec = _generation(runs[AR_ARM.label], AR_ARM.sampler, None, cfg, device, force, log)
    ar_row = _row(ar_rec)
    log(format_row(f"{AR_ARM.label} {AR_ARM.sampler}", ar_row))
    rows, mdlm_step = [], None
    for steps in sorted(cfg.steps):
        rec = _generation(runs[MDLM_ARM.label], MDLM_ARM.sampler, steps, cfg, device, force, log)
        mdlm_step = rec["checkpoint_step"]
        row = _row(rec)
        row["speedup_vs_ar"] = ar_row["wall_s_per_sequence"] / row["wall_s_per_sequence"]
        rows.append(row)
        log(format_row(f"{MDLM_ARM.label} {MDLM_ARM.sampler}", row))
    return _Samples(ar_rec, ar_row, rows, mdlm_step)


def _result(
    cfg: FormalExperimentConfig,
    language: Any,
    data: Path,
    runs: dict[str, Path],
    nll: dict[str, Any],
    samples: _Samples,
    device: str,
) -> dict[str, Any]:
    """experiment.json's content (without the wall times): settings, results, definitions, provenance."""
    ar_row, rows = samples.ar_row, samples.rows
    return {
        "experiment": "formal",
        "language_preset": cfg.language,
        "language": language.params(),
        "length": cfg.length,
        "temp_mode": cfg.temp_mode,
        "temp_mode_decision": TEMP_MODE_DECISION,
        "entropy_rate": nll["entropy_rate"],
        "ter_optimal": samples.ar_rec["ter_optimal"],
        "ter_support_optimal": samples.ar_rec.get("ter_support_optimal"),
        "ar": ar_row | {"sampler": "ancestral (KV cache)"},
        "mdlm": rows,
        "mdlm_sampler": MDLM_ARM.sampler,
        "matched_ter": matched_speedup(ar_row, rows, "ter"),
        "matched_ser": matched_speedup(ar_row, rows, "ser"),
        "nll": nll,
        "n_samples": cfg.n_samples,
        "sample_batch_size": cfg.sample_batch_size,
        "seed": cfg.seed,
        "checkpoint_step": {"ar": samples.ar_rec["checkpoint_step"], "mdlm": samples.mdlm_step},
        "backbone": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "context": cfg.length + 2,
            "params": {label: read_run_info(run).get("params") for label, run in runs.items()},
            "note": "one ModelConfig for both; the MDLM's vocabulary has the appended MASK id (one more row)",
        },
        "config": dataclasses.asdict(cfg),
        "definitions": _DEFINITIONS,
        "runs": {"data": str(data.resolve()), **{label: str(run.resolve()) for label, run in runs.items()}},
        "figure": FIGURE_FILE,
        "machine": _machine(device),
        "training_wall_s": {
            label: read_info(list_checkpoints(run)[-1][1]).get("elapsed") for label, run in runs.items()
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


_DEFINITIONS = {
    **GENERATION_DEFINITIONS,
    "speedup_vs_ar": "AR wall_s_per_sequence / MDLM wall_s_per_sequence at that step count",
    "matched_ter": f"smallest steps S with TER_S <= TER_AR + {MATCH_K:g} sqrt(se_AR^2 + se_S^2); speedup = "
    "AR wall / MDLM wall per sequence at S; None when no S matches",
    "matched_ser": "the same rule on SER",
    "wall_s": "wall seconds of this invocation per stage (a reused run or sample file costs ~0) and in total",
    "training_wall_s": "wall seconds of each training over all its sessions (its last checkpoint's elapsed)",
    "nll": "validation NLL per symbol in nats of x_1..x_L given BOS (EOS not scored, for both): AR exact "
    "-log p(x_1..x_L | BOS) / L; MDLM its NELBO / L (an upper bound); gap = nll - entropy_rate; "
    "true_model_nll = -log p(x) / L of the same sequences under the true language",
}
