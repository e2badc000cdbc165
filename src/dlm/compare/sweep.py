"""The sampler sweep of ``dlm compare``: per arm, every sampler entry x step count x temperature (issue 16).

An arm's ``samplers`` list holds entries, each a sampler name (``"ddpm"``) or a mapping of a name, an optional
label and sampler options (``SamplerOptions`` fields other than the swept ones), e.g.
``{name: remdm, remask_eta: 0.02, label: remdm-0.02}``. The label names the entry in results rows, file names
and figures (default: the name, then ``-key=value`` per option); an entry without options is stored as its bare
name, so a spec that lists names only is unchanged (same ``spec_hash``, same sample files).

:func:`sweep_settings` expands an arm into :class:`SampleSetting`s: each entry (default: the family's default
sampler) at every step count (the arm's, else ``evaluation.samples.steps``) when it takes steps, else once (a
sampler that accepts steps but ignores them, ``SamplerSpec.steps_ignored``: once, at the first step count), each at
every temperature of ``evaluation.samples.temperatures`` (empty: ``[evaluation.samples.temperature]``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dlm.errors import DlmError

__all__ = ["SampleSetting", "SamplerEntry", "entry_parts", "normalize_entries", "sweep_settings", "temperatures"]

#: One entry of ``Arm.samplers``: a sampler name, or {name, label?, **options}.
SamplerEntry = str | dict[str, Any]

#: Options the sweep itself sets (or the samples stage owns): an entry may not fix them.
SWEPT_OPTIONS = ("steps", "temperature", "return_trajectory")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


@dataclass(frozen=True)
class SampleSetting:
    """One point of the sweep: the row label, the family's sampler name (None: its default), steps (None: a
    sampler without steps), temperature, and the entry's further options (sorted (key, value) pairs)."""

    label: str | None
    sampler: str | None
    steps: int | None
    temperature: float
    options: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def plain(self) -> bool:
        """No further options: the settings of the speed stage (which times plain samplers only)."""
        return not self.options


def _label(name: str, options: dict[str, Any]) -> str:
    return name + "".join(f"-{k}={v}" for k, v in sorted(options.items()))


def normalize_entries(value: Any, path: str) -> tuple[SamplerEntry, ...]:
    """``Arm.samplers`` from YAML or a command line (``ddpm,remdm``) in one canonical form: names as strings,
    mappings as ``{"name", "label", **options sorted}``; a mapping without options and label becomes its name.
    One-line ``DlmError`` naming ``path`` for a malformed entry."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]()")) if v]
    if value is None:
        value = []
    if not isinstance(value, list | tuple):
        raise DlmError(f"{path}: expected a list of sampler names or {{name: ..., option: value}} mappings")
    out: list[SamplerEntry] = []
    for i, entry in enumerate(value):
        where = f"{path}.{i}"
        if isinstance(entry, str) and entry.strip():
            out.append(entry.strip())
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise DlmError(f"{where}: expected a sampler name or a mapping with a 'name', got {entry!r}")
        options = {str(k): v for k, v in entry.items() if k not in ("name", "label")}
        for k, v in options.items():
            if v is not None and not isinstance(v, bool | int | float | str):
                raise DlmError(f"{where}.{k}: a sampler option must be a number, a string, true/false or null")
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not _LABEL.fullmatch(label)):
            raise DlmError(f"{where}.label: {label!r} must be letters, digits, '.', '_', '-', '=' or '+'")
        name = entry["name"].strip()
        if not options and label in (None, name):
            out.append(name)
        else:
            out.append({"name": name, "label": label or _label(name, options), **dict(sorted(options.items()))})
    return tuple(out)


def entry_parts(entry: SamplerEntry) -> tuple[str, str, dict[str, Any]]:
    """(label, sampler name, options) of a normalised entry."""
    if isinstance(entry, str):
        return entry, entry, {}
    options = {k: v for k, v in entry.items() if k not in ("name", "label")}
    return str(entry.get("label") or _label(entry["name"], options)), entry["name"], options


def temperatures(samples: Any) -> tuple[float, ...]:
    """The swept temperatures of ``evaluation.samples``: ``temperatures``, else ``(temperature,)``."""
    return tuple(samples.temperatures) or (float(samples.temperature),)


def sweep_settings(
    process: Any, entries: Sequence[SamplerEntry], steps: Sequence[int], temps: Sequence[float]
) -> list[SampleSetting]:
    """The sweep of one arm (module docstring): entries (empty: the family's default sampler) x steps (for a
    sampler that takes them) x temperatures, in that order."""
    specs = process.sampler_specs()
    out: list[SampleSetting] = []
    for entry in entries or (process.resolve_sampler(None),):
        label, name, options = entry_parts(entry)
        opts = tuple(sorted(options.items()))
        spec = specs[name]  # a sampler that ignores steps runs once, at the first step count
        for s in (steps[:1] if spec.steps_ignored else steps) if spec.takes_steps else (None,):
            out += [SampleSetting(label, name, s, float(t), opts) for t in temps]
    return out


def check_entries(process: Any, entries: Sequence[SamplerEntry], where: str, family: str) -> None:
    """Every entry names a sampler of the family, its options are ones that sampler accepts and not swept ones, a
    sampler that reuses p_theta across steps has a time-independent model, and no two entries share a label;
    one-line ``DlmError`` naming ``where`` otherwise."""
    labels: set[str] = set()
    for entry in entries:
        label, name, options = entry_parts(entry)
        if name not in process.samplers:
            raise DlmError(
                f"{where}: unknown sampler {name!r} for family {family!r} (available: {', '.join(process.samplers)})"
            )
        if fixed := sorted(set(options) & set(SWEPT_OPTIONS)):
            raise DlmError(f"{where}: {', '.join(fixed)} set by the sweep (steps, temperatures), not per sampler")
        try:
            process.sampler_specs()[name].options(options, name, family)
        except DlmError as e:
            raise DlmError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise DlmError(f"{where}: bad options for sampler {name!r}: {e}") from None
        if process.sampler_specs()[name].time_independent and getattr(process, "time_conditioned", False):
            raise DlmError(f"{where}: {name} needs a time-independent model (process.time_cond false in the arm's "
                           "overrides)")  # fmt: skip
        if label in labels:
            raise DlmError(f"{where}: two entries labelled {label!r}; give each a distinct label")
        labels.add(label)
