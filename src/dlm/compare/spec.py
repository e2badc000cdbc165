"""The comparison spec: what ``dlm compare`` trains and how it evaluates it, as typed dataclasses.

A ``CompareSpec`` names one corpus, a list of arms (a family plus dotted run-config overrides), the seeds, one
training budget shared by every arm, the model size (a run-config preset and shared overrides) and the evaluation
protocol. Sources, later ones winning: dataclass defaults < a bundled preset (``src/dlm/compare/presets/NAME.yaml``)
or a YAML file < command-line overrides. Override scheme: ``--seeds 0,1`` (a list is comma-separated),
``--budget.steps 50``, ``--evaluation.samples.steps 8,32``, ``--arms.mdlm.family sedd`` or ``--arms.0.family sedd``
(an arm by name or index; only its scalar and list fields), ``--arms.d3pm.overrides.process.T 100`` and
``--shared.train.lr 3e-4`` (a key inside a mapping of run-config overrides). Every bad value raises a one-line
``DlmError`` naming the field, before any work starts.

Every (arm, seed) resolves to a validated ``dlm.config.RunConfig`` with ``arm_run_config``; ``spec_hash`` is the
sha256 of the spec's canonical JSON, so a later ``dlm compare`` can refuse a changed spec for an existing DIR.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dlm.compare.spec_suite import ConditionalEval, DownstreamEval, ZeroShot
from dlm.compare.sweep import SamplerEntry, normalize_entries
from dlm.config import RunConfig, _coerce, _read_yaml, _suggest, load_config, parse_overrides
from dlm.errors import DlmError

__all__ = [
    "Arm",
    "Budget",
    "CompareSpec",
    "ConditionalEval",
    "Corpus",
    "DownstreamEval",
    "Evaluation",
    "JudgeSpec",
    "LikelihoodEval",
    "SampleEval",
    "SpeedEval",
    "VarianceEval",
    "ZeroShot",
    "arm_run_config",
    "available_compare_presets",
    "dump_spec",
    "judge_run_config",
    "known_families",
    "load_compare_spec",
    "source_options",
    "spec_from_dict",
    "spec_hash",
]

# Families that are a registered process plus fixed run-config settings.
# gpt2 keeps GPT-2's own 50257-row head (model.vocab_multiple 1), whatever the base preset pads the dlm backbone to.
SHORTHANDS: dict[str, dict[str, str]] = {
    "gpt2": {"process.name": "ar", "model.backbone": "gpt2-hf", "model.vocab_multiple": "1"},
    "d3pm-uniform": {"process.name": "d3pm", "process.transition": "uniform"},
    "sedd-uniform": {"process.name": "sedd", "process.transition": "uniform"},
}

# Run-config keys the spec itself sets for every arm: an arm or the shared overrides may not change them.
RESERVED_KEYS = {
    "process.name": "set by the arm's family",
    "model.backbone": "set by the arm's family (gpt2 = backbone gpt2-hf)",
    "train.seed": "set by seeds",
    "train.max_steps": "set by budget (one budget for every arm)",
    "train.max_tokens": "set by budget (one budget for every arm)",
    "train.time_limit_min": "set by budget (one budget for every arm)",
    "process.eval_t_samples": "set by evaluation.likelihood.t_samples",
    "eval.split": "set by evaluation.likelihood.split",
    "eval.max_batches": "set by evaluation.likelihood.max_batches",
    "data.dir": "set by corpus",
}


@dataclass
class Corpus:
    """The data every arm trains and is evaluated on: a prepared directory, or how to prepare one.

    data_dir:  a prepared data directory (``dlm prepare``'s output); null = prepare it from the fields below.
    source:    corpus to prepare: shakespeare, a path, hf:NAME, formal:..., text:...
    source_options: options of the source as KEY=VALUE strings (``dlm prepare --source-opt``), e.g.
               ``[n_train=20000, length=64]`` for a formal language.
    tokenizer: tokenizer to prepare with: bytes, chars, bpe:N, gpt2, bert-base-uncased.
    seq_len:   row length L of the prepared shards.
    mode:      wrap (documents concatenated and cut into rows) or pad (one document per row).
    """

    data_dir: str | None = None
    source: str = "shakespeare"
    source_options: tuple[str, ...] = ()
    tokenizer: str = "bpe:4096"
    seq_len: int = 256
    mode: Literal["wrap", "pad"] = "wrap"


@dataclass
class Arm:
    """One trained model family of the comparison.

    name:      the arm's name, unique, used for its run directories (letters, digits, ., _, -); "" = the family.
    family:    a registered process (ar, d3pm, mdlm, sedd, bd3lm), gpt2 (the gpt2-hf backbone with the AR process),
               d3pm-uniform or sedd-uniform (process.transition uniform), or bd3lm:L' (block diffusion, blocks of
               L' tokens: process.block_size L'; its default name is bd3lm-L').
    overrides: run-config overrides of this arm only, nested or dotted (``{process: {T: 100}}`` or
               ``{process.T: 100}``; kept dotted and typed); applied after the shared ones.
    samplers:  samplers evaluated for this arm; empty = the family's default sampler. Each a name or a mapping
               ``{name: remdm, label: remdm-0.02, remask_eta: 0.02}`` of a name, a label for rows and figures
               and sampler options (``dlm.compare.sweep``); validated against the family's samplers.
    steps:     sampling step counts for this arm's step samplers; empty = evaluation.samples.steps.
    """

    name: str = ""
    family: str = "ar"
    overrides: dict[str, Any] = field(default_factory=dict)
    samplers: tuple[SamplerEntry, ...] = ()
    steps: tuple[int, ...] = ()


@dataclass
class Budget:
    """The one training budget of every arm: set exactly one of the three, > 0.

    steps:   optimizer steps (train.max_steps).
    tokens:  token positions processed (train.max_tokens; the step count follows from the batch).
    minutes: wall time per run over all its sessions (train.time_limit_min; a resumed run gets what is left); the
             LR schedule keeps the base config's max_steps.
    """

    steps: int | None = None
    tokens: int | None = None
    minutes: float | None = None


@dataclass
class LikelihoodEval:
    """Likelihood on a held-out split: exact for AR, an upper bound with a standard error for diffusion.

    split:       split scored.
    t_samples:   K, Monte-Carlo draws per sequence of a diffusion bound (process.eval_t_samples).
    max_batches: score at most this many batches; 0 = the whole split.
    """

    split: str = "test"
    t_samples: int = 1
    max_batches: int = 0


@dataclass
class SampleEval:
    """Unconditional samples, each arm x sampler x step count x temperature (the sweep: ``dlm.compare.sweep``).

    n:            samples per (arm, seed, sampler, step count, temperature).
    steps:        step counts of step samplers (AR ignores them: one network call per token).
    seed:         seed of the sampling noise.
    temperature:  softmax temperature of every sampler when ``temperatures`` is empty.
    temperatures: the temperatures swept (e.g. [0.8, 0.9, 1.0]); empty = [temperature].
    batch_size:   rows sampled at once (the samples depend on it when n exceeds it: one generator runs through).
    """

    n: int = 16
    steps: tuple[int, ...] = (64, 256)
    seed: int = 0
    temperature: float = 1.0
    temperatures: tuple[float, ...] = ()
    batch_size: int = 16


@dataclass
class SpeedEval:
    """Sampling speed, measured the same way for every arm (warm-up, device synchronised, median of repeats).

    batch_sizes:     batch sizes timed at each step count (latency at 1, throughput at the largest).
    repeats:         timed repeats; the median is reported.
    protocol_tokens: the thesis protocol: generate at batch 4 until this many tokens; 0 = skip it.
    """

    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 3
    protocol_tokens: int = 100_000


@dataclass
class VarianceEval:
    """Estimator variances of every run (``dlm.eval.variance.variance_run``, the BD3-LM paper's table 1 and eq. 9):
    the likelihood estimator's variance over its draws (0 for AR: exact) and the gradient variance over batches.

    batches:   M, batches from the start of the likelihood split; 0 = skip this evaluation.
    t_samples: K, single-draw estimates per sequence of a diffusion bound (>= 2).
    """

    batches: int = 0
    t_samples: int = 4


@dataclass
class JudgeSpec:
    """The judge of evaluator judge-ar: an AR model trained once per comparison on the same corpus (DIR/judge).

    overrides:  run-config overrides of the judge, applied after the shared ones: make it larger than the arms
                (e.g. ``{model: {n_layer: 4, d_model: 256}}``).
    steps:      its training steps; 0 = the arms' budget (steps, tokens or minutes).
    seed:       its training seed.
    batch_size: rows scored per forward pass.
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    seed: int = 0
    batch_size: int = 32


@dataclass
class Evaluation:
    """The evaluation protocol, the same for every arm.

    likelihood: held-out likelihood settings.
    samples:    sampling settings.
    evaluator:  who scores samples (gen PPL): judge-ar (an AR model trained once on the same corpus), hf:DIR (a
                local causal LM directory) or true-language (a formal corpus only).
    judge:      the judge-ar model's size and training.
    speed:      speed settings.
    variance:   estimator variances (likelihood over its draws, gradient over batches); off by default.
    zero_shot:  further corpora every run is scored on (zero-shot likelihood); none by default.
    conditional: conditional generation from held-out prompts, judged by the judge-ar judge; off by default.
    downstream: multiple-choice tasks through lm-eval (the lmeval extra); off by default.
    device:     where evaluation runs: auto (CUDA when available), cpu or cuda.
    """

    likelihood: LikelihoodEval = field(default_factory=LikelihoodEval)
    samples: SampleEval = field(default_factory=SampleEval)
    evaluator: str = "judge-ar"
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    speed: SpeedEval = field(default_factory=SpeedEval)
    variance: VarianceEval = field(default_factory=VarianceEval)
    zero_shot: list[ZeroShot] = field(default_factory=list)
    conditional: ConditionalEval = field(default_factory=ConditionalEval)
    downstream: DownstreamEval = field(default_factory=DownstreamEval)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class CompareSpec:
    """A comparison: every arm x seed trained on one corpus with one budget, evaluated under one protocol.

    name:       a label for the report.
    corpus:     the data.
    base:       run-config preset or YAML file every arm starts from (model size, optimiser): tiny-cpu, ...
    shared:     run-config overrides of every arm, nested or dotted (e.g. the model size ``{model: {n_layer: 2}}``).
    arms:       the families compared.
    seeds:      training seeds; every arm runs once per seed.
    budget:     the one training budget of every arm.
    evaluation: the evaluation protocol.
    """

    name: str = "compare"
    corpus: Corpus = field(default_factory=Corpus)
    base: str = "tiny-cpu"
    shared: dict[str, Any] = field(default_factory=dict)
    arms: list[Arm] = field(default_factory=list)
    seeds: tuple[int, ...] = (0,)
    budget: Budget = field(default_factory=Budget)
    evaluation: Evaluation = field(default_factory=Evaluation)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able nested dict (tuples become lists); ``spec_from_dict`` inverts it."""
        return _plain(dataclasses.asdict(self))

    def arm(self, name: str) -> Arm:
        """The arm called ``name``."""
        for a in self.arms:
            if a.name == name:
                return a
        raise DlmError(f"arms: no arm named {name!r} (arms: {', '.join(a.name for a in self.arms)})")

    def validate(self) -> CompareSpec:
        """Raise ``DlmError`` naming the first impossible field; every arm's run config is built and validated
        (``dlm.compare.checks``)."""
        from dlm.compare.checks import validate_spec

        return validate_spec(self)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_BLOCK_FAMILY = re.compile(r"bd3lm:([1-9][0-9]*)")


def family_settings(family: str) -> dict[str, str] | None:
    """The run-config settings of an arm family: a registered process, a shorthand (``SHORTHANDS``), or
    ``bd3lm:L'`` (block diffusion with blocks of L' tokens); None for an unknown family."""
    if family in SHORTHANDS:
        return SHORTHANDS[family]
    if m := _BLOCK_FAMILY.fullmatch(family):
        return {"process.name": "bd3lm", "process.block_size": m.group(1)}
    import dlm.process  # registers every process

    return {"process.name": family} if family in dlm.process.available_processes() else None


def known_families() -> list[str]:
    """Every valid ``arm.family``: the registered processes, then the shorthands."""
    import dlm.process  # registers every process

    return [*dlm.process.available_processes(), *SHORTHANDS, "bd3lm:L'"]


def source_options(c: Corpus) -> dict[str, str]:
    """``corpus.source_options`` as the keyword arguments of ``dlm.data.sources.get_source``."""
    return {k.strip(): v for k, v in (o.split("=", 1) for o in c.source_options)}


def _flatten(d: Any, where: str) -> dict[str, Any]:
    """``{process: {T: 1}, "train.lr": 2}`` -> ``{"process.T": 1, "train.lr": 2}``."""
    if not isinstance(d, dict):
        raise DlmError(f"{where}: expected a mapping of run-config overrides, got {d!r}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flatten(value, where).items()})
        else:
            out[str(key)] = value
    return out


def _typed_overrides(d: Any, where: str) -> dict[str, Any]:
    """Run-config overrides in one canonical form: ``{process: {T: "100"}, "train.lr": "3e-4"}`` ->
    ``{"process.T": 100, "train.lr": 0.0003}``, each value parsed with its run-config field's type (so equal
    settings hash equally); unknown keys and the keys the spec itself sets (``RESERVED_KEYS``) are refused."""
    from dlm.config import SECTIONS

    out: dict[str, Any] = {}
    for key, value in _flatten(d, where).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise DlmError(
                f"{where}: unknown run-config section {section!r} in {key!r}{_suggest(section, [*SECTIONS])}"
            )
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if name not in names:
            raise DlmError(f"{where}: unknown run-config key {key!r}{_suggest(name, names)}")
        if key in RESERVED_KEYS:
            raise DlmError(f"{where}: {key} cannot be overridden ({RESERVED_KEYS[key]})")
        tp = _hints(SECTIONS[section])[name]
        out[key] = True if value is None and tp is bool else _coerce(value, tp, f"{where}.{key}")
    return out


def _run_overrides(flat: dict[str, Any]) -> list[str]:
    out = []
    for key, value in flat.items():
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        out.append(f"--{key}={'null' if value is None else value}")
    return out


def arm_run_config(spec: CompareSpec, arm: Arm, seed: int, data_dir: str | None = None) -> RunConfig:
    """The validated run config of ``arm`` at ``seed``, in this order (later wins): ``spec.base``, ``spec.shared``,
    the family's settings, the arm's overrides, then what the spec fixes for every arm (seed, budget, likelihood
    evaluation, data directory: ``data_dir``, else ``corpus.data_dir``, else "" for the caller to fill)."""
    family = family_settings(arm.family)
    if family is None:
        raise DlmError(f"arm {arm.name!r}: unknown family {arm.family!r} (known: {', '.join(known_families())})")
    b, lk = spec.budget, spec.evaluation.likelihood
    fixed: dict[str, Any] = {
        "train.seed": seed,
        "process.eval_t_samples": lk.t_samples,
        "eval.split": lk.split,
        "eval.max_batches": lk.max_batches,
        "data.dir": data_dir or spec.corpus.data_dir or "",
    }
    if b.steps is not None:
        fixed |= {"train.max_steps": b.steps, "train.max_tokens": 0, "train.time_limit_min": None}
    elif b.tokens is not None:
        fixed |= {"train.max_steps": 0, "train.max_tokens": b.tokens, "train.time_limit_min": None}
    elif b.minutes is not None:
        fixed |= {"train.time_limit_min": b.minutes}
    overrides = _run_overrides(_typed_overrides(spec.shared, "shared"))
    overrides += _run_overrides(dict(family))
    overrides += _run_overrides(_typed_overrides(arm.overrides, f"arm {arm.name!r} overrides"))
    overrides += _run_overrides(fixed)
    try:
        return load_config(spec.base, overrides)
    except DlmError as e:
        raise DlmError(f"arm {arm.name!r} (seed {seed}): {e}") from None


def judge_run_config(spec: CompareSpec, data_dir: str | None = None) -> RunConfig:
    """The run config of the judge-ar judge: an AR arm with ``evaluation.judge.overrides`` at
    ``evaluation.judge.seed``, trained for ``evaluation.judge.steps`` steps (0 = the arms' budget)."""
    j = spec.evaluation.judge
    judge = Arm(name="judge", family="ar", overrides=j.overrides)
    cfg = arm_run_config(spec, judge, j.seed, data_dir)
    if j.steps:
        cfg.train.max_steps, cfg.train.max_tokens, cfg.train.time_limit_min = j.steps, 0, None
    return cfg.validate()


# ----------------------------------------------------------------------------- building, overrides, files


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, d: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a mapping; unknown keys and wrong types raise naming the key."""
    if not isinstance(d, dict):
        raise DlmError(f"{where or 'spec'}: expected a mapping, got {d!r}")
    obj = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in d.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise DlmError(f"unknown compare spec key {path!r}{_suggest(str(key), names)}")
        setattr(obj, key, _value(_hints(cls)[key], value, path))
    return obj


def _value(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path)
    if tp == tuple[SamplerEntry, ...]:  # Arm.samplers: names or {name, label, options}
        return normalize_entries(value, path)
    origin = typing.get_origin(tp)
    if origin is list:  # list[Arm]
        if not isinstance(value, list):
            raise DlmError(f"{path}: expected a list, got {value!r}")
        (elem,) = typing.get_args(tp)
        return [_value(elem, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:  # run-config overrides
        return _typed_overrides({} if value is None else value, path)
    return _coerce(value, tp, path)


def spec_from_dict(d: dict[str, Any]) -> CompareSpec:
    """A ``CompareSpec`` from a nested dict (as YAML gives it); arms without a name take their family's name.
    Not validated (``validate``)."""
    spec = _build(CompareSpec, {} if d is None else d, "")
    for arm in spec.arms:
        arm.name = arm.name or arm.family.replace(":", "-")  # bd3lm:4 -> bd3lm-4
    for z in spec.evaluation.zero_shot:
        z.name = z.name or re.sub(r"[^A-Za-z0-9._-]+", "-", z.source or Path(z.data_dir or "").name).strip("-")
    return spec


def _set_override(spec: CompareSpec, key: str, value: str | None) -> None:
    """Set one dotted override ``key`` (see the module docstring) on ``spec``, parsed with the field's type."""
    parts = key.split(".")
    obj: Any = spec
    path: list[str] = []
    while parts:
        part = parts.pop(0)
        path.append(part)
        where = ".".join(path)
        if isinstance(obj, list):  # arms: by index or by name
            match = [a for i, a in enumerate(obj) if part in (str(i), a.name)]
            if not match:
                raise DlmError(f"{where}: no arm {part!r} (arms: {', '.join(a.name for a in obj)})")
            obj = match[0]
            continue
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise DlmError(f"unknown compare spec key {where!r}{_suggest(part, names)}")
        tp = _hints(type(obj))[part]
        current = getattr(obj, part)
        if isinstance(current, dict):
            if not parts:
                raise DlmError(f"{where}: give a key inside it, e.g. --{where}.train.lr 3e-4")
            current.update(_typed_overrides({".".join(parts): value}, where))
            return
        if dataclasses.is_dataclass(current) or isinstance(current, list):
            if not parts:
                raise DlmError(f"{where}: only its fields can be overridden, e.g. --{where}.<field> VALUE")
            obj = current
            continue
        if parts:
            raise DlmError(f"unknown compare spec key {key!r}: {where} has no fields")
        if value is None:
            if tp is not bool:
                raise DlmError(f"--{key}: missing value")
            value = "true"
        setattr(obj, part, _value(tp, value, where) if tp == tuple[SamplerEntry, ...] else _coerce(value, tp, where))
        return


def _presets_dir() -> Any:
    return resources.files("dlm") / "compare" / "presets"


def available_compare_presets() -> list[str]:
    """Names of the bundled comparison presets (``src/dlm/compare/presets/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def load_compare_spec(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CompareSpec:
    """A bundled preset name or a YAML file, then dotted overrides (module docstring); validated."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists() or "/" in text:
        if not path.is_file():
            raise DlmError(f"compare spec file not found: {text}")
        d = _read_yaml(path.read_text(), text)
    else:
        if text not in available_compare_presets():
            known = ", ".join(available_compare_presets())
            raise DlmError(f"unknown compare preset {text!r} (available: {known})")
        d = _read_yaml((_presets_dir() / f"{text}.yaml").read_text(), f"compare preset {text}")
    spec = spec_from_dict(d)
    for key, value in parse_overrides(list(overrides)):
        _set_override(spec, key, value)
    return spec.validate()


def dump_spec(spec: CompareSpec) -> str:
    """The spec as YAML; ``load_compare_spec`` of this text gives an equal spec (same ``spec_hash``)."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def spec_hash(spec: CompareSpec) -> str:
    """sha256 of the canonical JSON of ``spec.to_dict()`` (sorted keys, no whitespace)."""
    text = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
