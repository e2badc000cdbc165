"""The training loop: ``train(cfg, run_dir, resume=False)``.

One optimizer step (G = global batch, A = grad_accum micro-batches of batch_size rows per rank):

    loss  = (1/A) sum_a process.loss(model, micro-batch a)      (averaged over ranks for logging)
    g     = grad loss,   clipped to norm grad_clip
    theta = AdamW(theta, g, lr_s)                               lr_s from dlm.train.optim.lr_at
    ema   = decay ema + (1 - decay) theta                        when train.ema > 0

A step whose loss or gradient norm is not finite is skipped (no update, gradients dropped) and counted;
more than train.max_nonfinite of them stop the run with DlmError. Everything is checked (config, data,
vocabulary, context, batch size against the data, one forward of the model and process on the device,
run directory, the checkpoint to resume) before the first file is written, so a failed start leaves the
directory as it was. Rank 0 holds RUN/.lock for the whole run: a second dlm process is refused.

Stopping early: at train.time_limit_min, or on SIGINT / SIGTERM, the current step is checkpointed and the
run stops saying so ("stopped early at step N of M"; a signal raises TrainingInterrupted, exit 128 + signal);
``--resume`` continues it exactly. Resuming with a larger train.max_steps / max_tokens extends a finished
run: the LR schedule is recomputed over the new total (the cosine jumps back up), which the log states.

The one seed train.seed determines the model init, the data order (loader seed), dropout and the
process noise (a torch.Generator per rank); resuming restores all of them, the optimizer, the EMA and the
loader position, so a resumed run reproduces the uninterrupted one bit for bit on the same hardware.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.config import EXTENDABLE_KEYS, OPERATIONAL_KEYS, RunConfig, config_diff, config_hash
from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.data.shards import ShardSplit, open_split
from dlm.errors import DlmError
from dlm.eval.likelihood import sequence_nll
from dlm.io import exclusive_lock, finite_or_none, write_json_atomic
from dlm.model import build_model, count_params, flops_per_token
from dlm.process import Process, get_process
from dlm.train.checkpoint import (
    CONFIG_FILE,
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
    remove_stale_tmp,
    save_checkpoint,
    write_run_files,
)
from dlm.train.ema import EMA
from dlm.train.logging import METRICS_FILE, RunLogger, progress_line, truncate_metrics
from dlm.train.optim import build_optimizer, lr_at, set_lr
from dlm.train.runtime import (
    Runtime,
    derive_seed,
    get_rng_state,
    peak_flops,
    preserved_rng,
    seed_everything,
    set_rng_state,
    setup_runtime,
    shutdown_runtime,
    wrap_model,
)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (a fresh, empty directory, or an existing run with ``resume``).

    Returns a summary: step, tokens, why it stopped, last loss and validation NLL, checkpoint path.
    Under torchrun every rank calls it; only rank 0 writes.
    """
    cfg = RunConfig.from_dict(cfg.to_dict()).validate()  # a private copy; vocab_size, context get filled in
    rt = setup_runtime(cfg.train)
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, Path(run_dir), resume, rt, held)
    finally:
        shutdown_runtime(rt)


# Keys that may differ between a run and its resumption.
RESUME_EXCLUDE = OPERATIONAL_KEYS | EXTENDABLE_KEYS


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training after a checkpoint at the current step; ``exit_status`` is 128 + signal.

    A KeyboardInterrupt, so callers that do not catch it (``dlm demo``, ``dlm experiment``) stop as on Ctrl-C.
    """

    def __init__(self, signum: int, step: int, total_steps: int, run_dir: Path) -> None:
        self.signum, self.step, self.exit_status = signum, step, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step} of {total_steps}: checkpoint written; "
            f"continue with dlm train --run-dir {run_dir} --resume"
        )


def resume_hash(cfg: RunConfig) -> str:
    """state.json's config hash: the configuration minus the keys a resumption may change."""
    return config_hash(cfg, RESUME_EXCLUDE)


def _lock_run(run_dir: Path, rt: Runtime, held: contextlib.ExitStack) -> None:
    """Rank 0 holds RUN/.lock for the rest of the run (a second dlm process is refused)."""
    if rt.is_main:
        held.enter_context(exclusive_lock(run_dir / LOCK_FILE, run_dir))


def _check_before_data(stored: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
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


@contextlib.contextmanager
def _stop_signals(received: list[int]) -> Iterator[None]:
    """SIGINT / SIGTERM append their number to ``received`` (the loop checkpoints and stops); a second
    signal acts at once. Only in the main thread (elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults: dict[int, Callable[..., Any] | int] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
    }

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, defaults[signum])

    old = {sig: signal.signal(sig, handler) for sig in defaults}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _agree(rt: Runtime, *flags: bool) -> list[bool]:
    """Flags OR-ed over all ranks (one all-reduce when distributed)."""
    if not rt.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=rt.device)
    return [bool(x > 0) for x in rt.all_reduce(t, "max").tolist()]


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


@torch.no_grad()
def validate(model: torch.nn.Module, process: Process, batches: list[Batch], rt: Runtime, seed: int) -> dict[str, Any]:
    """NLL per token over a fixed list of batches; batch i uses a noise generator seeded by (seed, i).

    Ranks split the batches (i = rank, rank + W, ...) and sum nats and tokens, so the result does not
    depend on the number of ranks. The global RNG streams are left untouched.
    """
    nats = torch.zeros((), dtype=torch.float64, device=rt.device)
    toks = torch.zeros((), dtype=torch.float64, device=rt.device)
    exact = process.exact_likelihood
    n = len(batches)
    # FSDP needs every rank in every forward: ranks with fewer batches run batch 0 and discard it.
    rounds = math.ceil(n / rt.world_size) if rt.dist == "fsdp" else None
    indices = list(
        range(rt.rank, n, rt.world_size) if rounds is None else range(rt.rank, rounds * rt.world_size, rt.world_size)
    )

    def generator(k: int) -> torch.Generator:  # the k-th batch of this rank is batch indices[k]
        return torch.Generator(device=rt.device).manual_seed(derive_seed(seed, "validation", indices[k]))

    with preserved_rng(rt.device), rt.autocast():
        mine = [batches[i if i < n else 0] for i in indices]
        results = sequence_nll(process, model, mine, device=rt.device, generator=generator)
        for i, res in zip(indices, results, strict=True):
            if i < n:
                nats += res.nats_B.sum().to(torch.float64)
                toks += res.tokens_B.sum().to(torch.float64)
                exact = exact and res.exact
    rt.all_reduce(nats)
    rt.all_reduce(toks)
    tokens = float(toks)
    nll = float(nats) / tokens if tokens > 0 else float("nan")
    return {
        "val_nll": nll,
        "val_bpt": nll / math.log(2),
        "val_ppl": math.exp(nll) if nll < 700 else None,  # None: beyond float range (JSON null)
        "val_tokens": int(tokens),
        "exact": bool(exact),
    }


@dataclass
class _Progress:
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
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    loader: Loader,
    gen: torch.Generator,
    rt: Runtime,
) -> tuple[_Progress, str | None]:
    """Load checkpoint ``path`` into the training objects; returns its counters and a note, if any."""
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
    note = None
    ranks = state["ranks"]
    if len(ranks) == rt.world_size:
        set_rng_state(ranks[rt.rank]["rng"])
        gen.set_state(ranks[rt.rank]["generator"])
    else:
        note = f"checkpoint holds RNG states of {len(ranks)} ranks, this run has {rt.world_size}: not bitwise exact"
    progress = _Progress(
        int(info["step"]), int(info["tokens"]), int(info["nonfinite"]), float(info["elapsed"]), info["best_val_nll"]
    )
    return progress, note


def _train_step(
    fwd: torch.nn.Module,
    model: torch.nn.Module,
    process: Process,
    loader: Loader,
    gen: torch.Generator,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    grad_accum: int,
    grad_clip: float,
    rt: Runtime,
) -> tuple[float, float, bool]:
    """One optimizer step over ``grad_accum`` micro-batches; (loss, grad norm, finite). Not finite: no update."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        batch = next(loader).to(rt.device)
        with rt.grad_sync(fwd, enabled=micro == grad_accum - 1):
            with rt.autocast():
                loss, _ = process.loss(fwd, batch, generator=gen)
            (loss / grad_accum).backward()
        loss_sum += loss.detach().float()
    loss_t = rt.all_reduce(loss_sum / grad_accum, "mean")
    gnorm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(gnorm_t, "full_tensor"):  # a DTensor under FSDP
        gnorm_t = gnorm_t.full_tensor()
    loss_v, gnorm_v = float(loss_t), float(gnorm_t)
    finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
    if finite:
        optimizer.step()
        if ema is not None:
            ema.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_v, gnorm_v, finite


@dataclass
class _Session:
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
    prog: _Progress
    notes: list[str]  # said once the log is open (an inexact resume, an extended schedule)
    n_params: int
    flops_per_token: float
    peak_flops: float | None


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


def _prepare(cfg: RunConfig, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack) -> _Session:
    """Everything checked and built before a file is written: configuration, data, resumption, the model and
    process on the device, the training objects (restored from the last checkpoint when resuming)."""
    t = cfg.train
    stored = None
    if resume:
        if run_dir.is_dir():
            _lock_run(run_dir, rt, held)  # before reading: another process may be writing this run
        stored = read_run_config(run_dir)
        _check_before_data(stored, cfg, run_dir)
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
    fwd = wrap_model(model, rt, compile=t.compile)
    optimizer = build_optimizer(model, t, rt.device)
    ema = EMA(model, t.ema) if t.ema > 0 else None
    loader = Loader(train_split, t.batch_size, seed=t.seed, rank=rt.rank, world_size=rt.world_size)
    gen = torch.Generator(device=rt.device).manual_seed(derive_seed(t.seed, "process", rt.rank))
    if rt.rank > 0:  # distinct dropout streams per rank; the init above is identical on every rank
        torch.manual_seed(derive_seed(t.seed, "torch", rt.rank))
    prog, note = _Progress(), None
    if ckpts:
        prog, note = _restore(ckpts[-1][1], cfg, model, optimizer, ema, loader, gen, rt)
    extended = None
    if stored is not None and prog.step > 0:
        extended = _extension_note(stored, cfg, run_dir, prog.step, total_steps, tokens_per_step)
    val_loader = Loader(val_split, t.batch_size, seed=t.seed, shuffle=False, infinite=False)
    return _Session(
        cfg,
        process,
        model,
        fwd,
        optimizer,
        ema,
        loader,
        gen,
        val_batches=_take(val_loader, t.val_batches),
        data_meta=train_split.meta,
        grad_accum=grad_accum,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        prog=prog,
        notes=[n for n in (note, extended) if n],
        n_params=count_params(model),
        flops_per_token=flops_per_token(cfg.model, train_split.seq_len)["train"],
        peak_flops=peak_flops(rt.device),
    )


def _open_run_files(
    s: _Session, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack
) -> RunLogger | None:
    """Rank 0 creates and locks the run directory (a fresh run), writes config.json and run.json (or, when
    resuming, config.json again and metrics.jsonl cut back to the checkpoint) and opens the logger."""
    if not rt.is_main:
        return None
    cfg = s.cfg
    if resume:
        write_json_atomic(run_dir / CONFIG_FILE, cfg.to_dict())  # operational keys may have changed
        truncate_metrics(run_dir / METRICS_FILE, s.prog.step)
        remove_stale_tmp(run_dir)
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DlmError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None
        _lock_run(run_dir, rt, held)
        check_run_dir_free(run_dir)  # again, now that no other dlm process can start here
        write_run_files(
            run_dir,
            cfg,
            s.data_meta,
            world_size=rt.world_size,
            device=str(rt.device),
            grad_accum=s.grad_accum,
            tokens_per_step=s.tokens_per_step,
            total_steps=s.total_steps,
            params=s.n_params,
        )
    logger = RunLogger(run_dir, cfg.to_dict(), tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb)
    logger.note(
        f"{'resuming at' if s.prog.step else 'starting'} step {s.prog.step}/{s.total_steps}: "
        f"{s.n_params / 1e6:.2f}M params, process {s.process.name}, {rt.world_size} x {rt.device}, "
        f"{s.tokens_per_step} tokens/step"
    )
    for note in s.notes:
        logger.note(note)
    return logger


@dataclass
class _Clock:
    """Wall time of this session: its start and the last progress line (for tok/s and the ETA)."""

    start: float
    start_step: int
    last_log_t: float
    last_log_tokens: int


def _log_step(
    logger: RunLogger,
    s: _Session,
    rt: Runtime,
    clock: _Clock,
    now: float,
    loss: float,
    lr: float,
    gnorm: float,
    finite: bool,
) -> None:
    """One metrics line and one progress line for the step just taken."""
    prog = s.prog
    tok_s = (prog.tokens - clock.last_log_tokens) / max(now - clock.last_log_t, 1e-9)
    record = {
        "step": prog.step,
        "tokens": prog.tokens,
        "epoch": round(s.loader.epoch, 4),
        "loss": loss if finite else None,
        "lr": lr,
        "grad_norm": gnorm if finite else None,
        "tok_s": tok_s,
        "mfu": tok_s * s.flops_per_token / (s.peak_flops * rt.world_size) if s.peak_flops else None,
        "elapsed": prog.elapsed + now - clock.start,
        "skipped": prog.nonfinite,
        **({} if finite else {"nonfinite": True}),
    }
    logger.write(record)
    eta = (now - clock.start) / (prog.step - clock.start_step) * (s.total_steps - prog.step)
    logger.progress(progress_line(record, s.total_steps, eta))
    clock.last_log_t, clock.last_log_tokens = now, prog.tokens


def _validate_and_log(s: _Session, rt: Runtime, logger: RunLogger | None, elapsed: float) -> float | None:
    """Validation NLL of the current weights (the EMA's with train.eval_with_ema), logged; the best is kept."""
    t = s.cfg.train
    use_ema = s.ema is not None and t.eval_with_ema
    with s.ema.applied() if use_ema and s.ema is not None else contextlib.nullcontext():
        v = validate(s.model, s.process, s.val_batches, rt, t.seed)
    nll = finite_or_none(v["val_nll"])
    if nll is not None and (s.prog.best_val is None or nll < s.prog.best_val):
        s.prog.best_val = nll
    if logger is not None:
        step = s.prog.step
        logger.write({"step": step, "split": "validation", **v, "ema": use_ema, "elapsed": elapsed})
        logger.note(f"step {step}: val nll {v['val_nll']:.4f} ({v['val_bpt']:.4f} bits/token)")
    return nll


def _checkpoint(
    s: _Session,
    run_dir: Path,
    rt: Runtime,
    elapsed: float,
    loss: float | None,
    val_nll: float | None,
    stopped: str | None,
) -> Path | None:
    """Checkpoint the current step (every rank calls it); ``val_nll`` is of this step's weights only."""
    prog = s.prog
    return save_checkpoint(
        run_dir,
        prog.step,
        model=s.model,
        optimizer=s.optimizer,
        ema=s.ema,
        rt=rt,
        state={"step": prog.step, "loader": s.loader.state_dict()},
        rank_state={"rng": get_rng_state(), "generator": s.gen.get_state()},
        info={
            "step": prog.step,
            "tokens": prog.tokens,
            "elapsed": elapsed,
            "nonfinite": prog.nonfinite,
            "loss": finite_or_none(loss),
            "val_nll": val_nll,  # the "best" checkpoint
            "best_val_nll": prog.best_val,
            "config_hash": resume_hash(s.cfg),
            "world_size": rt.world_size,
            "stopped": stopped,
        },
        keep_last=s.cfg.train.keep_last,
    )


def _check_nonfinite(prog: _Progress, max_nonfinite: int) -> None:
    if prog.nonfinite > max_nonfinite:
        raise DlmError(
            f"stopping at step {prog.step}: {prog.nonfinite} steps had a non-finite loss or gradient (more "
            f"than train.max_nonfinite={max_nonfinite}); lower train.lr or check the data"
        )


def _train(cfg: RunConfig, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack) -> dict[str, Any]:
    s = _prepare(cfg, run_dir, resume, rt, held)  # ---- every check, before anything is written
    rt.barrier()  # ---- from here on files are written (rank 0), once every rank has passed the checks
    logger = _open_run_files(s, run_dir, resume, rt, held)
    rt.barrier()
    try:
        return _loop(s, run_dir, rt, logger)
    finally:
        if logger is not None:
            logger.close()


def _loop(s: _Session, run_dir: Path, rt: Runtime, logger: RunLogger | None) -> dict[str, Any]:
    """Optimizer steps until the run's length, the time limit or a signal; logs, validates and checkpoints
    on their schedules. Returns the summary; a signal raises TrainingInterrupted after its checkpoint."""
    t, prog, total = s.cfg.train, s.prog, s.total_steps
    start = time.perf_counter()
    clock = _Clock(start, prog.step, start, prog.tokens)
    stopped = "max_steps" if t.max_steps and total == t.max_steps else "max_tokens"
    last_loss = val_nll = last_ckpt = None
    received: list[int] = []  # SIGINT / SIGTERM: checkpoint at the current step, then stop
    s.model.train()
    with _stop_signals(received):
        while prog.step < total:
            lr = lr_at(prog.step, t, total)
            set_lr(s.optimizer, lr)
            loss, gnorm, finite = _train_step(
                s.fwd, s.model, s.process, s.loader, s.gen, s.optimizer, s.ema, s.grad_accum, t.grad_clip, rt
            )
            prog.step += 1
            prog.tokens += s.tokens_per_step
            prog.nonfinite += not finite
            last_loss = loss if finite else last_loss
            now = time.perf_counter()
            step = prog.step
            if logger is not None and (step % t.log_every == 0 or not finite or step == total):
                _log_step(logger, s, rt, clock, now, loss, lr, gnorm, finite)
            _check_nonfinite(prog, t.max_nonfinite)
            # rank 0's clock (and signals) decide for everyone
            late = t.time_limit_min is not None and now - start >= 60 * t.time_limit_min
            out_of_time, interrupted = _agree(rt, late, bool(received))
            ckpt_due = step == total or out_of_time or (t.ckpt_every > 0 and step % t.ckpt_every == 0)
            validated = None
            if ckpt_due or (t.val_every > 0 and step % t.val_every == 0):
                val_nll = validated = _validate_and_log(s, rt, logger, prog.elapsed + now - start)
            stopping = (out_of_time or interrupted) and step < total
            if stopping:
                stopped = "time_limit" if out_of_time else "signal"
            if ckpt_due or interrupted:  # an interruption's checkpoint skips validation (exact resume)
                elapsed = prog.elapsed + time.perf_counter() - start
                last_ckpt = _checkpoint(s, run_dir, rt, elapsed, last_loss, validated, stopped if stopping else None)
            if stopping:
                if logger is not None:
                    why = "time limit" if out_of_time else signal.Signals(received[0]).name
                    logger.note(
                        f"stopped early at step {step} of {total} ({why}); "
                        f"continue with dlm train --run-dir {run_dir} --resume"
                    )
                break
    if stopped == "signal":
        raise TrainingInterrupted(received[0], prog.step, total, run_dir)
    return {
        "run_dir": str(run_dir),
        "step": prog.step,
        "total_steps": total,
        "tokens": prog.tokens,
        "stopped": "already_done" if clock.start_step >= total else stopped,
        "loss": last_loss,
        "val_nll": val_nll,
        "best_val_nll": prog.best_val,
        "nonfinite": prog.nonfinite,
        "elapsed": prog.elapsed + time.perf_counter() - start,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
    }


def _take(loader: Loader, n: int) -> list[Batch]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
