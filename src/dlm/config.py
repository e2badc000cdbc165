"""Typed run configuration: one dataclass per stage, YAML presets, dotted command-line overrides.

A run is ``RunConfig(data, model, process, train, eval)``. Sources, later ones winning:
dataclass defaults < a preset (``src/dlm/presets/NAME.yaml``) or a YAML file < overrides such as
``["--model.n_layer", "4", "--train.lr=3e-4"]``. Every value is parsed with its field's type; an unknown
key, a value of the wrong type or an impossible size raises ``DlmError`` naming the key. The
``name: text`` lines of each class docstring are the command-line help (``field_help``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dlm.errors import DlmError
from dlm.model.config import ModelConfig
from dlm.process.base import ProcessConfig

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ProcessConfig",
    "RunConfig",
    "TrainConfig",
    "available_presets",
    "config_hash",
    "describe_config",
    "field_help",
    "load_config",
]


@dataclass
class DataConfig:
    """Prepared token shards (the output of ``dlm prepare``).

    dir:         path to a prepared data directory (meta.json + shards); set by the CLI or --data.dir.
    train_split: split the model is trained on.
    val_split:   split used for validation during training.
    """

    dir: str = ""
    train_split: str = "train"
    val_split: str = "validation"


@dataclass
class TrainConfig:
    """The training loop.

    seed:           the one seed: torch, numpy, python random, the data order and the process noise.
    device:         "auto" (CUDA when available), "cpu" or "cuda".
    dist:           "none", "ddp" (torchrun, gloo on CPU / nccl on CUDA) or "fsdp" (FSDP2, CUDA only).
    precision:      "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16" (autocast; also on CPU,
                    where it measured 20x slower than fp32 on the 2-core dev machine, docs/LOG.md).
                    fp16 is not offered.
    compile:        torch.compile the model.
    compile_loss:   torch.compile the family's training loss together with the model's forward (one compiled
                    region: the noise, the forward and the head's cross-entropy; ``compile`` is then implied).
    batch_size:     sequences per micro-batch per rank.
    grad_accum:     micro-batches per optimizer step (ignored when global_batch is set).
    global_batch:   sequences per optimizer step over all ranks; 0 = batch_size * grad_accum * world size,
                    else grad_accum = global_batch / (batch_size * world size), which must divide exactly.
    max_steps:      optimizer steps (the LR schedule's length); 0 = derived from max_tokens.
    max_tokens:     token budget (positions processed); 0 = none. With both set the earlier stop wins.
    time_limit_min: stop (with a checkpoint) after this many minutes of wall time; null = no limit.
    lr:             peak learning rate.
    min_lr_ratio:   final learning rate as a fraction of lr (cosine and linear schedules).
    warmup_steps:   linear warm-up steps from 0 to lr.
    schedule:       after warm-up: "cosine", "linear" or "constant".
    weight_decay:   AdamW decoupled weight decay, applied to matrices only (not norms, biases).
    betas:          AdamW betas.
    eps:            AdamW epsilon.
    grad_clip:      clip the global gradient norm to this; 0 = no clipping (the norm is still logged).
    ema:            decay of an exponential moving average of the weights; 0 = off.
    eval_with_ema:  validate with the EMA weights when ema > 0.
    val_every:      validate every this many steps (and at the end); 0 = only at checkpoints and the end.
    val_batches:    number of (fixed) validation batches of batch_size sequences.
    ckpt_every:     write a checkpoint every this many steps (and at the end); 0 = only at the end.
    keep_last:      checkpoints kept besides the best one (lowest validation NLL).
    log_every:      write a metrics line / progress line every this many steps.
    max_nonfinite:  steps with a NaN/Inf loss or gradient are skipped; stop after more than this many.
    tensorboard:    also log to RUN/tensorboard (only if tensorboard is installed).
    wandb:          also log to Weights & Biases in offline mode under RUN/wandb (only if installed).
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist: Literal["none", "ddp", "fsdp"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    compile_loss: bool = False
    batch_size: int = 16
    grad_accum: int = 1
    global_batch: int = 0
    max_steps: int = 1000
    max_tokens: int = 0
    time_limit_min: float | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema: float = 0.0
    eval_with_ema: bool = True
    val_every: int = 250
    val_batches: int = 16
    ckpt_every: int = 250
    keep_last: int = 2
    log_every: int = 10
    max_nonfinite: int = 10
    tensorboard: bool = False
    wandb: bool = False


@dataclass
class EvalConfig:
    """Defaults for ``dlm eval`` on a finished run.

    split:       split to evaluate.
    batch_size:  sequences per batch; 0 = train.batch_size.
    max_batches: evaluate at most this many batches; 0 = the whole split.
    seed:        seed of the evaluation noise (diffusion bounds).
    """

    split: str = "test"
    batch_size: int = 0
    max_batches: int = 0
    seed: int = 0


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "process": ProcessConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

# Keys that may change between a run and its resumption without changing the computation (the data
# may move: the trainer compares the data's inputs_hash instead of its path).
OPERATIONAL_KEYS = (
    frozenset({"data.dir"})
    | frozenset(
        f"train.{k}"
        for k in (
            "time_limit_min",
            "val_every",
            "val_batches",
            "ckpt_every",
            "keep_last",
            "log_every",
            "max_nonfinite",
            "tensorboard",
            "wandb",
            "eval_with_ema",
            "compile",
            "compile_loss",
            "device",
        )
    )
    | frozenset(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig))
)

# Keys added to the configuration after run directories existed: hashed only when they differ from their default,
# so the hash of every earlier run (which could only have had the default) stays valid. A new key goes here.
HASHED_WHEN_SET = frozenset(
    {"process.block_size", "process.clip_beta", "process.clip_omega", "process.clip_search", "model.vocab_multiple"}
)

# Keys a resumed run may raise (or lower) to extend a finished run: they change the LR schedule's length,
# which the trainer states when it resumes (the cosine decay is recomputed over the new total).
EXTENDABLE_KEYS = frozenset({"train.max_steps", "train.max_tokens"})


@dataclass
class RunConfig:
    """Everything that defines a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON/YAML-able nested dict (tuples become lists); ``from_dict`` inverts it."""
        return {
            name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in dataclasses.fields(cls)}
            for name, cls in SECTIONS.items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; missing keys keep their defaults, unknown or mistyped ones raise."""
        cfg = cls()
        _merge(cfg, d, origin="config")
        return cfg

    def validate(self) -> RunConfig:
        """Raise ``DlmError`` naming the first impossible value; returns self."""
        for section in SECTIONS:  # NaN and infinity pass every "> 0" test below: refuse them first
            for key, value in vars(getattr(self, section)).items():
                values = value if isinstance(value, tuple | list) else (value,)
                if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                    raise DlmError(f"{section}.{key} must be a finite number, got {value!r}")
        # vocab_size 0 and context 0 mean "fill from the data" and are resolved by the trainer.
        m = self.model
        for key in ("vocab_size", "context"):
            value = getattr(m, key)
            _require(f"model.{key}", value, isinstance(value, int) and value >= 0, "must be >= 0 (0 = from the data)")
        dataclasses.replace(m, vocab_size=m.vocab_size or 1, context=m.context or 1).validate()
        import dlm.process  # registers every process

        if self.process.name not in dlm.process.available_processes():
            known = ", ".join(dlm.process.available_processes())
            raise DlmError(f"process.name: unknown process {self.process.name!r} (available: {known})")
        dlm.process.process_class(self.process.name).check_config(self.process)  # the family's own options
        t = self.train
        for key in ("batch_size", "grad_accum", "val_batches", "keep_last", "log_every"):
            _require(f"train.{key}", getattr(t, key), getattr(t, key) >= 1, "must be >= 1")
        for key in ("global_batch", "max_steps", "max_tokens", "warmup_steps", "val_every", "ckpt_every"):
            _require(f"train.{key}", getattr(t, key), getattr(t, key) >= 0, "must be >= 0")
        _require("train.max_nonfinite", t.max_nonfinite, t.max_nonfinite >= 0, "must be >= 0")
        if t.max_steps == 0 and t.max_tokens == 0:
            raise DlmError("train.max_steps: set max_steps or max_tokens (both are 0)")
        if t.time_limit_min is not None:
            _require("train.time_limit_min", t.time_limit_min, t.time_limit_min > 0, "must be > 0 or null")
        _require("train.lr", t.lr, t.lr > 0, "must be > 0")
        _require("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]")
        _require("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0")
        _require("train.betas", t.betas, all(0 <= b < 1 for b in t.betas), "must lie in [0, 1)")
        _require("train.eps", t.eps, t.eps > 0, "must be > 0")
        _require("train.grad_clip", t.grad_clip, t.grad_clip >= 0, "must be >= 0 (0 = off)")
        _require("train.ema", t.ema, 0 <= t.ema < 1, "must be in [0, 1) (0 = off)")
        e = self.eval
        _require("eval.batch_size", e.batch_size, e.batch_size >= 0, "must be >= 0")
        _require("eval.max_batches", e.max_batches, e.max_batches >= 0, "must be >= 0")
        return self


def _require(key: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise DlmError(f"{key} {what}, got {value!r}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- typed parsing

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a command-line string) as an instance of the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if is_none and type(None) in args:
            return None
        for member in (a for a in args if a is not type(None)):
            with contextlib.suppress(DlmError):
                return _coerce(value, member, key)
        raise DlmError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise DlmError(f"{key}: expected one of {'|'.join(map(str, args))}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]()")) if v]
        if not isinstance(value, list | tuple):
            raise DlmError(f"{key}: expected a list like 0.9,0.95, got {value!r}")
        elem = list(args)
        if len(elem) == 2 and elem[1] is Ellipsis:
            elem = [elem[0]] * len(value)
        if len(elem) != len(value):
            raise DlmError(f"{key}: expected {len(elem)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, elem))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise DlmError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)  # "1e6"
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise DlmError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise DlmError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DlmError(f"{key}: expected str, got {value!r}")
    raise AssertionError(f"config field {key} has an unsupported type {tp!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    """Set ``section.field`` from a raw value, parsed with the field's type."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise DlmError(f"unknown config section {section!r} in {key!r}{_suggest(section, list(SECTIONS))}")
    if not name:
        raise DlmError(f"config key {key!r} must be section.field, e.g. model.n_layer")
    obj = getattr(cfg, section)
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise DlmError(f"unknown config key {key!r}{_suggest(name, names)}")
    setattr(obj, name, _coerce(value, hints[name], key))


def _merge(cfg: RunConfig, d: Any, origin: str) -> None:
    if not isinstance(d, dict):
        raise DlmError(f"{origin}: expected a mapping of sections (data, model, process, train, eval)")
    for section, values in d.items():
        if section not in SECTIONS:
            raise DlmError(f"unknown config section {section!r} in {origin}{_suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise DlmError(f"{section}: expected a mapping of keys in {origin}, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)


def parse_overrides(args: list[str]) -> list[tuple[str, str | None]]:
    """``["--a.b", "1", "--c.d=2", "--flag"]`` -> ``[("a.b", "1"), ("c.d", "2"), ("flag", None)]``."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") and "=" not in arg:
            raise DlmError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, value = key.split("=", 1)
            out.append((key, value))
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((key, args[i + 1]))
            i += 2
        else:
            out.append((key, None))  # a bare flag: true for a bool field
            i += 1
    return out


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply dotted overrides in order (see ``parse_overrides``); returns ``cfg``, changed in place."""
    for key, value in parse_overrides(list(overrides)):
        if value is None:
            section, _, name = key.partition(".")
            hints = _hints(SECTIONS[section]) if section in SECTIONS else {}
            if hints.get(name) is not bool and section in SECTIONS and name in hints:
                raise DlmError(f"{key}: missing value")
            value = "true"
        _set(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------- presets and files


def _presets_dir() -> Any:
    return resources.files("dlm") / "presets"


def available_presets() -> list[str]:
    """Names of the bundled presets (``src/dlm/presets/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DlmError(f"{origin} is not valid YAML: {str(e).splitlines()[0]}") from None
    return {} if d is None else d


def load_config(preset_or_yaml: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then a preset name or a YAML file, then dotted overrides; validated.

    ``preset_or_yaml`` is a bundled preset (``"tiny-cpu"``), a path to a YAML file with the sections
    data/model/process/train/eval, or None for the defaults.
    """
    cfg = RunConfig()
    if preset_or_yaml is not None:
        spec = str(preset_or_yaml)
        path = Path(spec)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists() or "/" in spec:
            if not path.is_file():
                raise DlmError(f"config file not found: {spec}")
            _merge(cfg, _read_yaml(path.read_text(), spec), origin=spec)
        else:
            if spec not in available_presets():
                raise DlmError(f"unknown preset {spec!r} (available: {', '.join(available_presets())})")
            text = (_presets_dir() / f"{spec}.yaml").read_text()
            _merge(cfg, _read_yaml(text, f"preset {spec}"), origin=f"preset {spec}")
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


# ----------------------------------------------------------------------------- help and identity


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``name: text`` lines of a config class docstring, else from a trailing
    ``# comment`` on the field's line in the source."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s*(\w+):\s+(.*)", line)
        if m and m.group(1) in names:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    if names - set(out):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m and m.group(1) in names and m.group(1) not in out:
                out[m.group(1)] = m.group(2).strip()
    return out


def _type_label(tp: Any) -> str:
    """A field's type as the help shows it: ``int``, ``float | None``, ``auto|cpu|cuda`` for a Literal."""
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return _type_name(tp)


def describe_config(sections: dict[str, type] | None = None) -> list[tuple[str, str, Any, str]]:
    """``(section.key, type, default, help)`` for every field of ``sections`` (default: the run config's
    sections): the help of every command that takes dotted overrides (``dlm train --help``). A field
    without a ``name: text`` docstring line gets the help ``""`` (a test refuses that)."""
    out = []
    for section, cls in (SECTIONS if sections is None else sections).items():
        hints, helps, defaults = _hints(cls), field_help(cls), cls()
        for f in dataclasses.fields(cls):
            default = _plain(getattr(defaults, f.name))
            out.append((f"{section}.{f.name}", _type_label(hints[f.name]), default, helps.get(f.name, "")))
    return out


def _canonical(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the process fields its family does not read at their defaults."""
    import dlm.process  # registers every process

    return dataclasses.replace(cfg, process=dlm.process.base.canonical_config(cfg.process))


def config_hash(cfg: RunConfig, exclude: frozenset[str] = OPERATIONAL_KEYS) -> str:
    """sha256 of the configuration minus ``exclude``d keys (those that do not change the computation); process
    fields the family does not read count as their defaults (``dlm.process.base.canonical_config``); keys of
    ``HASHED_WHEN_SET`` count only when they differ from their default (earlier runs keep their hash)."""
    defaults = RunConfig().to_dict()
    flat = {
        f"{s}.{k}": v
        for s, values in _canonical(cfg).to_dict().items()
        for k, v in values.items()
        if f"{s}.{k}" not in exclude and not (f"{s}.{k}" in HASHED_WHEN_SET and v == defaults[s][k])
    }
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def config_diff(a: RunConfig, b: RunConfig, exclude: frozenset[str] = OPERATIONAL_KEYS) -> list[str]:
    """``["train.lr: 0.001 -> 0.0003", ...]`` for the keys (outside ``exclude``) where a and b differ (process
    fields the family does not read count as their defaults, as in ``config_hash``)."""
    da, db = _canonical(a).to_dict(), _canonical(b).to_dict()
    return [
        f"{s}.{k}: {da[s][k]!r} -> {db[s][k]!r}"
        for s in da
        for k in da[s]
        if f"{s}.{k}" not in exclude and da[s][k] != db[s][k]
    ]
