"""Everything ``train`` checks and builds before the first file is written (see ``dlm.train.loop``).

``prepare_session`` resolves the data and the process, checks the configuration (and, on ``--resume``, that it matches
the run), builds the model, optimizer, EMA, loader and noise generator, restores the last checkpoint, and returns
a ``Session`` the loop runs; nothing here writes to the run directory except taking its lock.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.config import EXTENDABLE_KEYS, OPERATIONAL_KEYS, RunConfig, config_diff, config_hash
from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.data.shards import ShardSplit, open_split
from dlm.errors import DlmError
from dlm.io import exclusive_lock
from dlm.model import build_model, count_params, flops_per_token
from dlm.process import Process, get_process
from dlm.rundir import checkpointed_window
from dlm.train.checkpoint import (
    LOCK_FILE,
    check_run_dir_free,
    list_checkpoints,
    load_model_state,
    load_optimizer_state,
    read_info,
    read_run_config,
    read_run_info,
    read_state,
    read_weights,
)
from dlm.train.ema import EMA
from dlm.train.optim import build_optimizer, lr_at
from dlm.train.runtime import (
    Runtime,
    derive_seed,
    peak_flops,
    preserved_rng,
    seed_everything,
    set_rng_state,
    wrap_model,
)

# Keys that may differ between a run and its resumption.
RESUME_EXCLUDE = OPERATIONAL_KEYS | EXTENDABLE_KEYS


def resume_hash(cfg: RunConfig) -> str:
    """state.json's config hash: the configuration minus the keys a resumption may change."""
    return config_hash(cfg, RESUME_EXCLUDE)


def lock_run(run_dir: Path, rt: Runtime, held: contextlib.ExitStack) -> None:
    """Rank 0 holds RUN/.lock for the rest of the run (a second dlm process is refused)."""
    if rt.is_main:
        held.enter_context(exclusive_lock(run_dir / LOCK_FILE, run_dir))


def check_resumable(stored: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """A resumption's configuration diff, before anything is built from it (the fields the trainer fills in
    from the data and the process, model.vocab_size and model.context when 0 and model.time_cond, are
    compared later)."""
    probe = RunConfig.from_dict(cfg.to_dict())
    if probe.model.vocab_size == 0:
        probe.model.vocab_size = stored.model.vocab_size
    if probe.model.context == 0:
        probe.model.context = stored.model.context
    probe.model.time_cond = stored.model.time_cond
    diff = config_diff(stored, probe, RESUME_EXCLUDE)
    if diff:
        raise DlmError(f"cannot resume {run_dir}: the configuration differs ({'; '.join(diff)})")


def _check_start(
    cfg: RunConfig, model: torch.nn.Module, process: Process, train_split: ShardSplit, rt: Runtime
) -> None:
    """What would otherwise fail only after the run directory is written: a batch larger than the data,
    and the model and process together on this device (one forward of one row, no RNG consumed)."""
    t = cfg.train
    if t.batch_size * rt.world_size > len(train_split):
        raise DlmError(
            f"train.batch_size {t.batch_size} x {rt.world_size} rank(s) exceeds the {len(train_split)} rows of "
            f"the {cfg.data.train_split!r} split"
        )
    row = next(Loader(train_split, 1, shuffle=False, infinite=False))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), preserved_rng(rt.device), rt.autocast():
            process.nll(model, row.to(rt.device), generator=torch.Generator(device=rt.device).manual_seed(0))
    finally:
        model.train(was_training)


def resolve_data(cfg: RunConfig) -> tuple[ShardSplit, ShardSplit, Process]:
    """Open the train/validation splits, build the process and fill in / check the model's vocabulary
    and context against the data (in place on ``cfg.model``): vocab_size 0 becomes the vocabulary the data
    and process need, context 0 the data's row length L."""
    if not cfg.data.dir:
        raise DlmError("data.dir is not set: give a prepared data directory (--data.dir DIR)")
    train_split = open_split(cfg.data.dir, cfg.data.train_split)
    val_split = open_split(cfg.data.dir, cfg.data.val_split)
    process = get_process(cfg.process, train_split.specials)
    need = process.vocab_size
    cfg.model.time_cond = process.time_conditioned  # the process decides; the backbone follows
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = need
    elif cfg.model.vocab_size < need:
        raise DlmError(
            f"model.vocab_size {cfg.model.vocab_size} is smaller than the vocabulary this data and process "
            f"need ({need}); use 0 to fill it from the data"
        )
    if cfg.model.context == 0:
        cfg.model.context = train_split.seq_len
    elif cfg.model.context < train_split.seq_len:
        raise DlmError(f"model.context {cfg.model.context} is shorter than the data rows ({train_split.seq_len})")
    cfg.model.validate()
    return train_split, val_split, process


def _grad_accum(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    if t.global_batch == 0:
        return t.grad_accum
    per_micro = t.batch_size * world_size
    if t.global_batch % per_micro:
        raise DlmError(f"train.global_batch {t.global_batch} is not a multiple of batch_size x ranks = {per_micro}")
    return t.global_batch // per_micro


def _total_steps(cfg: RunConfig, tokens_per_step: int) -> int:
    t = cfg.train
    from_tokens = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens else None
    if t.max_steps and from_tokens:
        return min(t.max_steps, from_tokens)
    return t.max_steps or from_tokens or 0


@dataclass
class Progress:
    """Counters a checkpoint carries (state.json) besides tensors."""

    step: int = 0
    tokens: int = 0
    nonfinite: int = 0
    elapsed: float = 0.0  # wall seconds of earlier sessions
    best_val: float | None = None


def _restore(
    path: Path,
    cfg: RunConfig,
    model: torch.nn.Module,
    process: Any,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    loader: Loader,
    gen: torch.Generator,
    rt: Runtime,
) -> tuple[Progress, str | None]:
    """Load checkpoint ``path`` into the training objects (the searched clip window into ``process``); returns
    its counters and a note, if any."""
    info = read_info(path)
    # checkpoints written before max_steps/max_tokens could change carry the hash of every key but the
    # operational ones: they resume with unchanged max_steps/max_tokens
    if info.get("config_hash") not in (resume_hash(cfg), config_hash(cfg)):
        raise DlmError(f"checkpoint {path} was written by a different configuration (config hash differs)")
    state = read_state(path)
    if ema is not None:  # the average goes through the model into the EMA, then the trained weights
        load_model_state(model, read_weights(path / "ema.safetensors"), str(path / "ema.safetensors"), rt)
        ema.copy_from_model()
    load_model_state(model, read_weights(path / "model.safetensors"), str(path / "model.safetensors"), rt)
    load_optimizer_state(model, optimizer, state["optimizer"], rt)
    loader.load_state_dict(state["loader"])
    if (window := checkpointed_window(state)) is not None:  # written with process.clip_search (loop._window_state)
        process.clip_window = window
    note = None
    ranks = state["ranks"]
    if len(ranks) == rt.world_size:
        set_rng_state(ranks[rt.rank]["rng"])
        gen.set_state(ranks[rt.rank]["generator"])
    else:
        note = f"checkpoint holds RNG states of {len(ranks)} ranks, this run has {rt.world_size}: not bitwise exact"
    progress = Progress(
        int(info["step"]), int(info["tokens"]), int(info["nonfinite"]), float(info["elapsed"]), info["best_val_nll"]
    )
    return progress, note


@dataclass
class Session:
    """What the checks before the first write produce: the training objects and the run's shape."""

    cfg: RunConfig
    process: Process
    model: torch.nn.Module
    fwd: torch.nn.Module  # the model as wrapped for the forward (DDP / FSDP / compile)
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    loader: Loader
    gen: torch.Generator  # the process noise
    val_batches: list[Batch]
    data_meta: dict[str, Any]
    grad_accum: int
    tokens_per_step: int
    total_steps: int
    prog: Progress
    notes: list[str]  # said once the log is open (an inexact resume, an extended schedule)
    n_params: int
    flops_per_token: float
    peak_flops: float | None
    loss_fn: LossFn | None = None  # the training loss (``training_loss``); None = process.loss


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def training_loss(process: Process, compile_loss: bool) -> LossFn:
    """``process.loss``, or (``train.compile_loss``) ``torch.compile(process.loss)``: called with the plain (or
    DDP-wrapped) model, dynamo traces the noise draw, the forward and the head's cross-entropy into one region
    (issue 14), where ``train.compile`` compiles the forward only. The values are the uncompiled loss's within
    float rounding (tests/test_graphs.py, CUDA-marked: compiling takes minutes on 2 CPU cores)."""
    return torch.compile(process.loss) if compile_loss else process.loss


def _check_resume(stored: RunConfig, cfg: RunConfig, run_dir: Path, train_split: ShardSplit) -> list[tuple[int, Path]]:
    """A resumption after the fields were filled in: the same configuration and data; its checkpoints."""
    diff = config_diff(stored, cfg, RESUME_EXCLUDE)
    if diff:
        raise DlmError(f"cannot resume {run_dir}: the configuration differs ({'; '.join(diff)})")
    trained_on = read_run_info(run_dir)["data_meta"].get("inputs_hash")
    if trained_on != train_split.meta.get("inputs_hash"):
        raise DlmError(f"cannot resume {run_dir}: {cfg.data.dir} holds different data than the run was trained on")
    return list_checkpoints(run_dir)


def _extension_note(
    stored: RunConfig, cfg: RunConfig, run_dir: Path, step: int, total_steps: int, tps: int
) -> str | None:
    """Refuses to shorten a resumed run below ``step``; a note when its length (and so its LR schedule) changes."""
    t = cfg.train
    old_total = _total_steps(stored, tps)
    if total_steps < step:
        raise DlmError(
            f"cannot resume {run_dir} with {total_steps} steps: it is already at step {step} "
            f"(a run can be extended, not shortened)"
        )
    if old_total == total_steps:
        return None
    old_lr = lr_at(min(step, old_total - 1), t, old_total)  # the last LR of the old schedule
    return (
        f"the run's length changes from {old_total} to {total_steps} steps: the {t.schedule} LR schedule "
        f"is recomputed over {total_steps} steps, so the LR jumps from {old_lr:.3e} to "
        f"{lr_at(step, t, total_steps):.3e} at step {step + 1}"
    )


def prepare_session(cfg: RunConfig, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack) -> Session:
    """Everything checked and built before a file is written: configuration, data, resumption, the model and
    process on the device, the training objects (restored from the last checkpoint when resuming)."""
    t = cfg.train
    stored = None
    if resume:
        if run_dir.is_dir():
            lock_run(run_dir, rt, held)  # before reading: another process may be writing this run
        stored = read_run_config(run_dir)
        check_resumable(stored, cfg, run_dir)
        if cfg.model.context == 0:  # "from the data" resumes with the context the run was given
            cfg.model.context = stored.model.context
    train_split, val_split, process = resolve_data(cfg)
    grad_accum = _grad_accum(cfg, rt.world_size)
    tokens_per_step = t.batch_size * grad_accum * rt.world_size * train_split.seq_len
    total_steps = _total_steps(cfg, tokens_per_step)
    ckpts: list[tuple[int, Path]] = []
    if stored is not None:
        ckpts = _check_resume(stored, cfg, run_dir, train_split)
    else:
        check_run_dir_free(run_dir)

    seed_everything(t.seed)
    model = build_model(cfg.model).to(rt.device)
    _check_start(cfg, model, process, train_split, rt)
    fwd = wrap_model(model, rt, compile=t.compile and not t.compile_loss)
    optimizer = build_optimizer(model, t, rt.device)
    ema = EMA(model, t.ema) if t.ema > 0 else None
    loader = Loader(train_split, t.batch_size, seed=t.seed, rank=rt.rank, world_size=rt.world_size)
    gen = torch.Generator(device=rt.device).manual_seed(derive_seed(t.seed, "process", rt.rank))
    if rt.rank > 0:  # distinct dropout streams per rank; the init above is identical on every rank
        torch.manual_seed(derive_seed(t.seed, "torch", rt.rank))
    prog, note = Progress(), None
    if ckpts:
        prog, note = _restore(ckpts[-1][1], cfg, model, process, optimizer, ema, loader, gen, rt)
    extended = None
    if stored is not None and prog.step > 0:
        extended = _extension_note(stored, cfg, run_dir, prog.step, total_steps, tokens_per_step)
    val_loader = Loader(val_split, t.batch_size, seed=t.seed, shuffle=False, infinite=False)
    val_batches = _take(val_loader, t.val_batches)
    _check_clip_search(cfg, process, len(val_batches))
    return Session(
        cfg,
        process,
        model,
        fwd,
        optimizer,
        ema,
        loader,
        gen,
        val_batches=val_batches,
        data_meta=train_split.meta,
        grad_accum=grad_accum,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        prog=prog,
        notes=[n for n in (note, extended) if n],
        n_params=count_params(model),
        flops_per_token=flops_per_token(cfg.model, train_split.seq_len, copies=process.train_copies)["train"],
        peak_flops=peak_flops(rt.device),
        loss_fn=training_loss(process, t.compile_loss),
    )


def _check_clip_search(cfg: RunConfig, process: Process, n_val_batches: int) -> None:
    """``process.clip_search`` needs a family that reads it (one with a clipped training window; every other one
    refuses it, since the search would run and change nothing) and two validation batches for a variance."""
    if not cfg.process.clip_search:
        return
    if "clip_search" not in process.config_fields(cfg.process):
        raise DlmError(f"process.clip_search: the {process.name} process has no clipped training window (bd3lm has)")
    if n_val_batches < 2:
        raise DlmError(
            f"process.clip_search needs at least 2 validation batches for a variance, got {n_val_batches} "
            f"(train.val_batches {cfg.train.val_batches}, the {cfg.data.val_split!r} split)"
        )


def _take(loader: Loader, n: int) -> list[Batch]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
