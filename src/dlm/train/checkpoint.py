"""Writing the run directory: config and provenance, atomic checkpoints (reading it: :mod:`dlm.rundir`).

Layout::

    RUN/config.json                  the resolved RunConfig (``RunConfig.from_dict`` reads it back)
    RUN/run.json                     provenance: dlm version, git commit, start time, the data's meta.json
    RUN/metrics.jsonl                training and validation lines (see dlm.train.logging)
    RUN/.lock                        exists while a dlm process trains the run (flock; removed at the end)
    RUN/checkpoints/step-0000100/    model.safetensors, ema.safetensors (when train.ema > 0),
                                     state.pt (optimizer, RNG states of every rank, loader position),
                                     state.json (step, tokens, elapsed, val_nll, non-finite count, config
                                     hash, "stopped": "time_limit" / "signal" when the run stopped early there)

A checkpoint is written into ``step-XXXXXXX.tmp-<pid>`` and renamed when complete, so a killed process
never leaves a half-written ``step-*`` directory. ``state.pt`` holds only tensors and primitive containers
and loads with ``torch.load(weights_only=True)``. The readers (``read_run_config``, ``list_checkpoints``,
``find_checkpoint``, ``read_info``, ``read_weights``, ``read_state``, ``load_run``) live in :mod:`dlm.rundir` and
are re-exported here for the trainer and older callers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dlm import __version__
from dlm.config import RunConfig
from dlm.errors import DlmError
from dlm.io import honour_umask, write_json_atomic
from dlm.rundir import (
    CKPT_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    RUN_FILE,
    LoadedRun,
    find_checkpoint,
    list_checkpoints,
    load_run,
    match_state,
    read_info,
    read_run_config,
    read_run_info,
    read_state,
    read_weights,
    step_dir_name,
    tied_aliases,
)
from dlm.train.ema import EMA
from dlm.train.runtime import Runtime

__all__ = [
    "CKPT_DIR",
    "CONFIG_FILE",
    "LOCK_FILE",
    "RUN_FILE",
    "LoadedRun",
    "check_run_dir_free",
    "find_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_optimizer_state",
    "load_run",
    "model_state",
    "optimizer_state",
    "prune_checkpoints",
    "read_info",
    "read_run_config",
    "read_run_info",
    "read_state",
    "read_weights",
    "remove_stale_tmp",
    "save_checkpoint",
    "step_dir_name",
    "write_run_files",
]


# ----------------------------------------------------------------------------- run files


def check_run_dir_free(run_dir: Path) -> None:
    """A fresh run needs a missing or empty directory (its lock file aside)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DlmError(f"run directory {run_dir} is not a directory")
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        what = "already has a run" if (run_dir / CONFIG_FILE).exists() else "is not empty"
        raise DlmError(f"run directory {run_dir} {what}; use --resume or another --run-dir")


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout dlm is imported from, or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def write_run_files(run_dir: Path, cfg: RunConfig, data_meta: dict[str, Any], **extra: Any) -> None:
    """config.json and run.json (provenance) at the start of a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_dict())
    write_json_atomic(
        run_dir / RUN_FILE,
        {
            "dlm_version": __version__,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
            "data_meta": data_meta,
        },
    )


# ----------------------------------------------------------------------------- model state


def model_state(model: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Full state dict on the CPU (a copy), tied weights once. Collective under FSDP (rank 0 gets it)."""
    if rt.dist == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    skip = tied_aliases(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items() if k not in skip}


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor], origin: str, rt: Runtime | None = None) -> None:
    """Load a ``model_state`` dict; any missing, extra or mis-shaped tensor raises DlmError naming ``origin``."""
    sd = match_state(model, sd, origin)
    if rt is not None and rt.dist == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(sd, strict=True)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict[str, Any]:
    if rt.dist == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=opts)
    return optimizer.state_dict()


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], rt: Runtime
) -> None:
    try:
        if rt.dist == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=opts)
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise DlmError(f"optimizer state does not match the model: {str(e).splitlines()[0]}") from None


def all_finite(model: nn.Module, rt: Runtime) -> bool:
    """True when every (local shard of every) parameter is finite, agreed over all ranks."""
    bad = torch.zeros((), device=rt.device)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            bad += 1
            break
    return float(rt.all_reduce(bad, "max")) == 0.0


# ----------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    rt: Runtime,
    state: dict[str, Any],
    rank_state: dict[str, Any],
    info: dict[str, Any],
    keep_last: int,
) -> Path | None:
    """Write checkpoint ``step`` atomically and prune old ones. Collective: every rank calls it.

    state:      rank-independent state for state.pt (loader position ...).
    rank_state: this rank's RNG states; gathered from every rank into state.pt["ranks"].
    info:       state.json (step, tokens, val_nll ...).
    Refuses (DlmError) to write non-finite weights. Returns the directory on rank 0, None elsewhere.
    """
    if not all_finite(model, rt):
        raise DlmError(f"weights are not finite at step {step}: refusing to write a checkpoint")
    model_sd = model_state(model, rt)
    ema_sd = None
    if ema is not None:
        with ema.applied():
            if not all_finite(model, rt):
                raise DlmError(f"EMA weights are not finite at step {step}: refusing to write a checkpoint")
            ema_sd = model_state(model, rt)
    optim_sd = optimizer_state(model, optimizer, rt)
    ranks = rt.gather_objects(rank_state)
    if not rt.is_main:
        rt.barrier()
        return None
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(model_sd, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
        if ema_sd is not None:
            save_file(ema_sd, tmp / "ema.safetensors", metadata={"format": "pt", "step": str(step)})
        torch.save({**state, "optimizer": optim_sd, "ranks": ranks}, tmp / "state.pt")
        write_json_atomic(tmp / "state.json", info)
        for f in tmp.iterdir():
            honour_umask(f)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError) as e:  # disk full, quota, permissions (torch.save raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        raise DlmError(f"cannot write checkpoint {final}: {why}; the last complete checkpoint is kept") from None
    prune_checkpoints(run_dir, keep_last)
    rt.barrier()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints and the best one (lowest val_nll); remove the rest."""
    ckpts = list_checkpoints(run_dir)
    keep = {s for s, _ in ckpts[-keep_last:]}
    scored = [(read_info(p).get("val_nll"), s) for s, p in ckpts]
    scored = [(v, s) for v, s in scored if v is not None]
    if scored:
        keep.add(min(scored)[1])
    for s, p in ckpts:
        if s not in keep:
            shutil.rmtree(p)


def remove_stale_tmp(run_dir: Path) -> None:
    """Delete half-written checkpoint directories left by a killed process."""
    root = run_dir / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp-" in p.name and p.is_dir():
                shutil.rmtree(p)
