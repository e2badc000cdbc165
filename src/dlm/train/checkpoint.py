"""The run directory: config and provenance, atomic checkpoints, and ``load_run`` for evaluation.

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
and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dlm import __version__
from dlm.config import RunConfig
from dlm.errors import DlmError
from dlm.io import honour_umask, write_json_atomic
from dlm.train.ema import EMA
from dlm.train.runtime import Runtime

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"  # held (flock) by the training process for the whole run, see dlm.io.exclusive_lock
CKPT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def read_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DlmError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise DlmError(f"corrupt {path}: {e}") from None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json (provenance and the data's meta.json)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise DlmError(f"{run_dir} is not a complete run directory (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DlmError(f"corrupt {path}: {e}") from None


# ----------------------------------------------------------------------------- model state


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameter names -> the first name of the same tensor (saved once)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def model_state(model: nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Full state dict on the CPU (a copy), tied weights once. Collective under FSDP (rank 0 gets it)."""
    if rt.dist == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    skip = _aliases(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items() if k not in skip}


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor], origin: str, rt: Runtime | None = None) -> None:
    """Load a ``model_state`` dict; any missing, extra or mis-shaped tensor raises DlmError naming ``origin``."""
    sd = dict(sd)
    for alias, name in _aliases(model).items():
        if name in sd:
            sd[alias] = sd[name]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise DlmError(f"{origin} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DlmError(
                f"{origin} does not match the model config: {k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(expected[k].shape)} (a different vocabulary or size?)"
            )
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


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_info(path: Path) -> dict[str, Any]:
    f = path / "state.json"
    if not f.is_file():
        raise DlmError(f"checkpoint {path} is incomplete: state.json is missing")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DlmError(f"checkpoint {path} is corrupt: state.json: {e}") from None


def find_checkpoint(run_dir: Path, which: str | int = "last") -> tuple[int, Path]:
    """``"last"``, ``"best"`` (lowest validation NLL) or a step number."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise DlmError(f"run directory {run_dir} has no checkpoints")
    if which == "last":
        return ckpts[-1]
    if which == "best":
        scored = [(info["val_nll"], s, p) for s, p in ckpts if (info := read_info(p)).get("val_nll") is not None]
        if not scored:
            return ckpts[-1]
        _, s, p = min(scored, key=lambda x: (x[0], x[1]))
        return s, p
    try:
        step = int(which)
    except ValueError:
        raise DlmError(f"checkpoint must be 'last', 'best' or a step number, got {which!r}") from None
    for s, p in ckpts:
        if s == step:
            return s, p
    raise DlmError(f"no checkpoint at step {step} in {run_dir} (have {', '.join(str(s) for s, _ in ckpts)})")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing, truncated or corrupt file, or one holding a NaN or infinity (a bit
    flip; training never writes one), raises DlmError naming the file and the tensor."""
    if not path.is_file():
        raise DlmError(f"checkpoint file missing: {path}")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DlmError(f"checkpoint file {path} is truncated or corrupt: {e}") from None
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DlmError(f"checkpoint file {path} is corrupt: tensor {name} holds non-finite values")
    return sd


def read_state(path: Path) -> dict[str, Any]:
    """state.pt of a checkpoint directory, loaded with weights_only=True."""
    f = path / "state.pt"
    if not f.is_file():
        raise DlmError(f"checkpoint file missing: {f}")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        why = (str(e).splitlines() or [f"{type(e).__name__} (empty or cut short)"])[0]
        raise DlmError(f"checkpoint file {f} is truncated or corrupt: {why}") from None


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


# ----------------------------------------------------------------------------- for evaluation


@dataclass
class LoadedRun:
    """A trained model ready for evaluation or sampling (in eval mode).

    Unpacks as the 5-tuple of the contract: ``cfg, model, process, step, data_meta = load_run(...)``.
    """

    cfg: RunConfig
    model: nn.Module
    process: Any  # dlm.process.Process
    step: int
    data_meta: dict[str, Any]  # the data directory's meta.json as it was when training started
    path: Path  # the checkpoint directory
    ema: bool  # the EMA weights were loaded

    def __iter__(self) -> Iterator[Any]:
        return iter((self.cfg, self.model, self.process, self.step, self.data_meta))


def load_run(
    run_dir: str | Path, which: str | int = "last", ema: bool = True, device: str | torch.device = "cpu"
) -> LoadedRun:
    """Model and process of a run's checkpoint (``"last"``, ``"best"`` or a step).

    ``ema=True`` loads ema.safetensors when the run kept an EMA, else the trained weights.
    """
    from dlm.data.specials import SpecialIds
    from dlm.model import build_model
    from dlm.process import get_process

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    step, path = find_checkpoint(run_dir, which)
    data_meta = read_run_info(run_dir)["data_meta"]
    specials = SpecialIds.from_dict(data_meta["tokenizer"]["specials"])
    process = get_process(cfg.process, specials)
    model = build_model(cfg.model)
    use_ema = ema and (path / "ema.safetensors").exists()
    weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
    load_model_state(model, read_weights(weights), str(weights))
    model.to(device).eval()
    return LoadedRun(cfg, model, process, step, data_meta, path, use_ema)
