"""Reading a run directory: the interface between training and everything after it.

Layout (the trainer, :mod:`dlm.train.checkpoint`, writes it; evaluation and reports read it through this
module only, so they never import the trainer)::

    RUN/config.json                  the resolved RunConfig (``read_run_config``)
    RUN/run.json                     provenance: dlm version, git commit, start time, the data's meta.json
                                     (``read_run_info``)
    RUN/metrics.jsonl                training and validation lines (``read_metrics``; see dlm.train.logging)
    RUN/.lock                        exists while a dlm process trains the run (flock; removed at the end)
    RUN/checkpoints/step-0000100/    model.safetensors, ema.safetensors (when train.ema > 0), state.pt,
                                     state.json (``list_checkpoints``, ``find_checkpoint``, ``read_info``,
                                     ``read_weights``, ``read_state``)
    RUN/eval/{kind}-*.json           evaluation results (``dlm.eval.results.find_results``)

``load_run`` turns a checkpoint into a model and process ready for evaluation or sampling, the process as it
was trained at that checkpoint (a searched clipped window included, ``trained_window``).

``load_run`` also reads a directory written by ``dlm export`` (:mod:`dlm.export`; recognised by the ``format``
``"dlm-export"`` of its config.json, ``read_export_config``): one checkpoint's weights in model.safetensors (the
backbone's names under ``EXPORT_PREFIX``), config.json holding the RunConfig, step, EMA flag and trained window,
data_meta.json and the tokenizer files, so ``dlm eval DIR`` / ``dlm sample DIR`` give the run's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dlm.config import RunConfig
from dlm.errors import DlmError

__all__ = [
    "CKPT_DIR",
    "CONFIG_FILE",
    "EXPORT_FORMAT",
    "EXPORT_PREFIX",
    "LOCK_FILE",
    "METRICS_FILE",
    "RUN_FILE",
    "LoadedRun",
    "build_export_model",
    "checkpointed_window",
    "export_run_config",
    "find_checkpoint",
    "list_checkpoints",
    "load_run",
    "match_state",
    "read_export_config",
    "read_info",
    "read_jsonl",
    "read_metrics",
    "read_run_config",
    "read_run_info",
    "read_state",
    "read_weights",
    "step_dir_name",
    "tied_aliases",
    "trained_window",
]

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"  # held (flock) by the training process for the whole run, see dlm.io.exclusive_lock
CKPT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
EXPORT_FORMAT = "dlm-export"  # config.json "format" of a `dlm export` directory
EXPORT_PREFIX = "model."  # prefix of the backbone's tensor names in an export's model.safetensors
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_DATA_META = "data_meta.json"


# ----------------------------------------------------------------------------- run files


def read_run_config(run_dir: Path) -> RunConfig:
    """config.json as a RunConfig; DlmError when the directory is not a run directory or the file is corrupt."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DlmError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DlmError(f"corrupt {path}: {e}") from None
    if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
        raise DlmError(
            f"{run_dir} is an exported model (dlm export), not a run directory: it can be evaluated and sampled "
            "(dlm eval / dlm sample), not trained or exported again"
        )
    return RunConfig.from_dict(data)


def read_export_config(directory: str | Path) -> dict[str, Any] | None:
    """config.json of a ``dlm export`` directory (``format`` == ``EXPORT_FORMAT``); None for any other
    directory (a run directory, a missing or unreadable config.json)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json (provenance and the data's meta.json)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise DlmError(f"{run_dir} is not a complete run directory (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DlmError(f"corrupt {path}: {e}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file (a torn last line, left by a killed process, is dropped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of RUN/metrics.jsonl in order (training lines, and validation lines with ``split``)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


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
    """state.json of a checkpoint directory (step, tokens, elapsed, val_nll, ...)."""
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


def read_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """state.pt of a checkpoint directory, loaded with weights_only=True (``mmap``: its tensors are mapped, not
    read, for a caller that needs a small entry beside the optimizer state)."""
    f = path / "state.pt"
    if not f.is_file():
        raise DlmError(f"checkpoint file missing: {f}")
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        why = (str(e).splitlines() or [f"{type(e).__name__} (empty or cut short)"])[0]
        raise DlmError(f"checkpoint file {f} is truncated or corrupt: {why}") from None


# ----------------------------------------------------------------------------- weights into a model


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameter names -> the first name of the same tensor (a checkpoint holds it once)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def match_state(model: nn.Module, sd: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict with the tied names filled in (from whichever of the two it holds: a checkpoint
    keeps the first name, safetensors' ``save_model`` in an export may keep the other), checked against
    ``model``: any missing, extra or mis-shaped tensor raises DlmError naming ``origin``."""
    sd = dict(sd)
    for alias, name in tied_aliases(model).items():
        if name in sd:
            sd[alias] = sd[name]
        elif alias in sd:
            sd[name] = sd[alias]
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
    return sd


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
    # where ``process.clip_window`` came from: "config", "search at step N" (``trained_window``); None for a
    # family without a clipped training window
    clip_window_source: str | None = None
    # where the tokenizer files are when not in the data directory (an exported directory holds its own)
    tokenizer_dir: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.cfg, self.model, self.process, self.step, self.data_meta))


def load_run(
    run_dir: str | Path, which: str | int = "last", ema: bool = True, device: str | torch.device = "cpu"
) -> LoadedRun:
    """Model and process of a run's checkpoint (``"last"``, ``"best"`` or a step).

    ``ema=True`` loads ema.safetensors when the run kept an EMA, else the trained weights. A family with a
    clipped training window (``process.clip_window``: BD3-LM) carries the window it trained with at that
    checkpoint: the searched one (``trained_window``) with ``process.clip_search``, else the configured one.

    ``run_dir`` may be a ``dlm export`` directory (``read_export_config``): its one checkpoint is loaded as it was
    exported (``which``: last, best or its step; ``ema=False`` is refused when it holds the EMA weights only).
    """
    from dlm.data.specials import SpecialIds
    from dlm.model import build_model
    from dlm.process import get_process

    run_dir = Path(run_dir)
    if (export := read_export_config(run_dir)) is not None:
        return _load_export(run_dir, export, which, ema, device)
    cfg = read_run_config(run_dir)
    step, path = find_checkpoint(run_dir, which)
    data_meta = read_run_info(run_dir)["data_meta"]
    specials = SpecialIds.from_dict(data_meta["tokenizer"]["specials"])
    process = get_process(cfg.process, specials)
    window_source = None
    if getattr(process, "clip_window", None) is not None:
        window_source = "config"
        if (searched := trained_window(run_dir, cfg, step, path)) is not None:
            process.clip_window, window_source = searched
    model = build_model(cfg.model)
    use_ema = ema and (path / "ema.safetensors").exists()
    weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
    model.load_state_dict(match_state(model, read_weights(weights), str(weights)), strict=True)
    model.to(device).eval()
    return LoadedRun(cfg, model, process, step, data_meta, path, use_ema, window_source)


def build_export_model(run_cfg: RunConfig) -> nn.Module:
    """The backbone of an exported checkpoint, randomly initialised before its weights are loaded: the run's
    model config with ``hf_path`` dropped (a gpt2-hf run's weights come from the export, not that directory)."""
    from dlm.model import build_model

    return build_model(dataclasses.replace(run_cfg.model, hf_path=None))


def export_run_config(export: dict[str, Any], origin: str | Path) -> RunConfig:
    """The RunConfig held by an export's config.json (``export``, read from ``origin``)."""
    try:
        return RunConfig.from_dict(export["run_config"])
    except (KeyError, TypeError) as e:
        raise DlmError(f"corrupt {origin}: no valid run_config ({e})") from None


def _load_export(
    directory: Path, export: dict[str, Any], which: str | int, ema: bool, device: str | torch.device
) -> LoadedRun:
    """``load_run`` of a ``dlm export`` directory (its config.json already read as ``export``)."""
    from dlm.data.specials import SpecialIds
    from dlm.process import get_process

    cfg = export_run_config(export, directory / CONFIG_FILE)
    try:
        step, use_ema = int(export["checkpoint"]["step"]), bool(export["checkpoint"]["ema"])
    except (KeyError, TypeError, ValueError) as e:
        raise DlmError(f"corrupt {directory / CONFIG_FILE}: no valid checkpoint entry ({e})") from None
    if which not in ("last", "best") and str(which) != str(step):
        raise DlmError(f"{directory} is an export of step {step} only: --checkpoint must be last, best or {step}")
    if use_ema and not ema:
        raise DlmError(
            f"{directory} holds the EMA weights only; export the run again with --no-ema for the trained weights"
        )
    meta_path = directory / EXPORT_DATA_META
    try:
        data_meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DlmError(f"exported directory {directory} is incomplete: cannot read {EXPORT_DATA_META} ({e})") from None
    process = get_process(cfg.process, SpecialIds.from_dict(data_meta["tokenizer"]["specials"]))
    window_source = None
    if export.get("clip_window") is not None:
        beta, omega = export["clip_window"]
        process.clip_window, window_source = (float(beta), float(omega)), export.get("clip_window_source")
    model = build_export_model(cfg)
    weights = directory / EXPORT_WEIGHTS
    sd = read_weights(weights)
    if any(not k.startswith(EXPORT_PREFIX) for k in sd):
        raise DlmError(f"{weights} is not a dlm export: its tensor names do not start with {EXPORT_PREFIX!r}")
    sd = {k.removeprefix(EXPORT_PREFIX): v for k, v in sd.items()}
    model.load_state_dict(match_state(model, sd, str(weights)), strict=True)
    model.to(device).eval()
    return LoadedRun(cfg, model, process, step, data_meta, directory, use_ema, window_source, tokenizer_dir=directory)


def checkpointed_window(state: dict[str, Any]) -> tuple[float, float] | None:
    """The clipped window a searching run checkpointed in state.pt (``clip_window``), or None."""
    if "clip_window" not in state:
        return None
    return float(state["clip_window"][0]), float(state["clip_window"][1])


def trained_window(run_dir: Path, cfg: RunConfig, step: int, path: Path) -> tuple[tuple[float, float], str] | None:
    """The clipped window (beta, omega) a run trained with at checkpoint ``path`` (step ``step``) when the
    data-driven search (``process.clip_search``) had picked it, and "search at step N" (N: the last search at or
    before ``step`` in metrics.jsonl, "search" when none is recorded there); None without a search or before
    the first one (the configured window holds). The window itself is the one the trainer checkpointed
    (state.pt's ``clip_window``, written with every checkpoint of a searching run)."""
    if not cfg.process.clip_search:
        return None
    window = checkpointed_window(read_state(path, mmap=True))
    if window is None:
        return None
    searches = [r for r in read_metrics(run_dir) if r.get("split") == "clip_search" and r.get("step", step + 1) <= step]
    if searches:
        return window, f"search at step {int(searches[-1]['step'])}"
    if window == (float(cfg.process.clip_beta), float(cfg.process.clip_omega)):
        return None
    return window, "search"
