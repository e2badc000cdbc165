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

BD3-LM with ``process.clip_search``: after every validation, the grid of clipped windows is searched on the
validation batches (``clip_search``) and the window of least variance is the training window until the next one;
it is logged (a ``clip_search`` line) and checkpointed.

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

from dlm.config import RunConfig
from dlm.data.batch import Batch
from dlm.data.loader import Loader
from dlm.errors import DlmError
from dlm.eval.likelihood import sequence_nll
from dlm.eval.variance import batch_elbo_variance, pick_window
from dlm.io import finite_or_none, write_json_atomic
from dlm.process import Process
from dlm.process.bd3lm import check_clip_grid
from dlm.train.checkpoint import (
    CONFIG_FILE,
    check_run_dir_free,
    remove_stale_tmp,
    save_checkpoint,
    write_run_files,
)
from dlm.train.ema import EMA
from dlm.train.logging import METRICS_FILE, RunLogger, progress_line, truncate_metrics
from dlm.train.optim import lr_at, set_lr
from dlm.train.runtime import (
    Runtime,
    derive_seed,
    get_rng_state,
    preserved_rng,
    setup_runtime,
    shutdown_runtime,
)
from dlm.train.setup import LossFn, Progress, Session, lock_run, prepare_session, resume_hash
from dlm.train.setup import resolve_data as resolve_data  # re-exported: callers import it from here


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


Window = tuple[float, float]


@torch.no_grad()
def clip_search(
    process: Any, model: torch.nn.Module, batches: list[Batch], windows: list[Window], rt: Runtime, seed: int
) -> dict[Window, float]:
    """The variance of the per-batch training objective for each clipped window (paper §5.3, table 2):

        L_m(beta, omega) = process.loss(model, X^m) with mask rates 1 - alpha_t ~ U[beta, omega]
                         = sum_{r, n} w(t_rn) sum_{l in S_r ∩ n, z_r^l = MASK} -log p_theta(x_r^l | z_r^n, x_r^{<n})
                           / sum_r |S_r|                      (rows r of X^m, blocks n; nats per scored token, eq. 8)
        Var(beta, omega) = 1/(M-1) sum_m (L_m - Lbar)^2                       (``batch_elbo_variance``)

    over the M fixed validation batches X^m. What is estimated is the objective as trained: the paper minimises
    Var_{X,t}[L(theta, beta, omega; X)] of the batch estimator whose gradient the optimizer takes (eq. 8 with t
    drawn from the clipped window; its U[0, 1] column is the unbiased NELBO estimate), as a cheap proxy for the
    gradient variance of eq. 9; one time draw per row and block, so the variance is over batches and times
    together. Batch m uses a generator seeded by (seed, "clip_search", m), the same for every window: the
    (antithetic) uniforms are shared and mapped affinely into each window, and the masking uniforms are the same
    (common random numbers). The model runs in eval mode (no dropout) with the global RNG streams untouched; every
    rank computes every batch and the variances are averaged over ranks, so all ranks choose the same window.
    ``process.clip_window`` is left as it was.
    """
    assert len(batches) >= 2 and windows, "the search needs two batches and a window"
    before, was_training = process.clip_window, model.training
    values_WM = torch.zeros(len(windows), len(batches), dtype=torch.float64)
    model.eval()
    try:
        with preserved_rng(rt.device), rt.autocast():
            for w, window in enumerate(windows):
                process.clip_window = window
                for m, batch in enumerate(batches):
                    gen = torch.Generator(device=rt.device).manual_seed(derive_seed(seed, "clip_search", m))
                    loss, _ = process.loss(model, batch.to(rt.device), generator=gen)
                    values_WM[w, m] = float(loss)
    finally:
        process.clip_window = before
        model.train(was_training)
    var_W = torch.tensor([batch_elbo_variance(v.tolist()) for v in values_WM], dtype=torch.float64)
    var_W = rt.all_reduce(var_W.to(rt.device), "mean").cpu()
    return {window: float(v) for window, v in zip(windows, var_W, strict=True)}


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
    loss_fn: LossFn | None = None,
) -> tuple[float, float, bool]:
    """One optimizer step over ``grad_accum`` micro-batches; (loss, grad norm, finite). Not finite: no update.
    ``loss_fn``: the training loss (``setup.training_loss``: compiled with ``train.compile_loss``), default
    ``process.loss``."""
    loss_of = process.loss if loss_fn is None else loss_fn
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        batch = next(loader).to(rt.device)
        with rt.grad_sync(fwd, enabled=micro == grad_accum - 1):
            with rt.autocast():
                loss, _ = loss_of(fwd, batch, generator=gen)
            (loss / grad_accum).backward()
        loss_sum += loss.detach().float()
    loss_t = rt.all_reduce(loss_sum / grad_accum, "mean")
    # foreach: one multi-tensor norm (torch picks it by itself on CUDA only; on CPU 12 -> 4 ms for tiny-cpu)
    gnorm_t = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf"), foreach=rt.device.type == "cpu" or None
    )
    if hasattr(gnorm_t, "full_tensor"):  # a DTensor under FSDP
        gnorm_t = gnorm_t.full_tensor()
    loss_v, gnorm_v = torch.stack([loss_t.float(), gnorm_t.float()]).tolist()  # one host sync, not two
    finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
    if finite:
        optimizer.step()
        if ema is not None:
            ema.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_v, gnorm_v, finite


def _open_run_files(
    s: Session, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack
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
        lock_run(run_dir, rt, held)
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
    s: Session,
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


def _validate_and_log(s: Session, rt: Runtime, logger: RunLogger | None, elapsed: float) -> float | None:
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


def _clip_search_and_log(s: Session, rt: Runtime, logger: RunLogger | None) -> None:
    """With ``process.clip_search``: the window of least variance (``clip_search``, ``pick_window``; the trained
    weights, not the EMA's) becomes the training window from the next step on; one metrics line records it."""
    windows = check_clip_grid(s.cfg.process.clip_search)
    if not windows:
        return
    table = clip_search(s.process, s.model, s.val_batches, windows, rt, s.cfg.train.seed)
    chosen = pick_window(table)
    s.process.clip_window = chosen  # type: ignore[attr-defined]  # setup checked the family has one
    if logger is not None:
        step = s.prog.step
        rows = [[b, w, v] for (b, w), v in table.items()]
        logger.write({"step": step, "split": "clip_search", "windows": rows, "chosen": list(chosen)})
        logger.note(f"step {step}: clipped window U[{chosen[0]:g}, {chosen[1]:g}] (variance {table[chosen]:.4g})")


def _checkpoint(
    s: Session,
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
        state={"step": prog.step, "loader": s.loader.state_dict(), **_window_state(s)},
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


def _window_state(s: Session) -> dict[str, Any]:
    """The searched training window, checkpointed so that a resumed run trains on it (none without a search)."""
    if not s.cfg.process.clip_search:
        return {}
    return {"clip_window": list(s.process.clip_window)}  # type: ignore[attr-defined]


def _check_nonfinite(prog: Progress, max_nonfinite: int) -> None:
    if prog.nonfinite > max_nonfinite:
        raise DlmError(
            f"stopping at step {prog.step}: {prog.nonfinite} steps had a non-finite loss or gradient (more "
            f"than train.max_nonfinite={max_nonfinite}); lower train.lr or check the data"
        )


def _train(cfg: RunConfig, run_dir: Path, resume: bool, rt: Runtime, held: contextlib.ExitStack) -> dict[str, Any]:
    s = prepare_session(cfg, run_dir, resume, rt, held)  # ---- every check, before anything is written
    rt.barrier()  # ---- from here on files are written (rank 0), once every rank has passed the checks
    logger = _open_run_files(s, run_dir, resume, rt, held)
    rt.barrier()
    try:
        return _loop(s, run_dir, rt, logger)
    finally:
        if logger is not None:
            logger.close()


def _loop(s: Session, run_dir: Path, rt: Runtime, logger: RunLogger | None) -> dict[str, Any]:
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
                s.fwd, s.model, s.process, s.loader, s.gen, s.optimizer, s.ema, s.grad_accum, t.grad_clip, rt,
                s.loss_fn,
            )  # fmt: skip
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
                _clip_search_and_log(s, rt, logger)
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
