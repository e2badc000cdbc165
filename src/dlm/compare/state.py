"""The comparison directory: which spec it holds, who works in it, and how far each (arm, seed) run got.

Layout::

    DIR/.lock                  held (flock) by the one ``dlm compare`` working in DIR (dlm.io.exclusive_lock)
    DIR/spec.yaml              the spec (``dump_spec``), written atomically
    DIR/compare.json           {"spec_hash", "created", "dlm_version"} (+ "previous_spec_hashes" after --force)
    DIR/data/                  the prepared corpus, when the spec prepares one
    DIR/runs/{arm}-seed{seed}/ one run directory per (arm, seed) (dlm.rundir layout)

``open_compare_dir`` refuses, with one line and nothing in DIR changed: a DIR holding another spec (naming the
fields that differ) unless ``force``, a non-empty DIR that is not a comparison, and a DIR in use by another process.

Status of a run (``CompareDir.state``): ``missing`` = no config.json; ``finished`` = its last checkpoint reached
the budget; ``partial`` otherwise (resume it). The last checkpoint's state.json (step, tokens, stopped) decides:

    steps budget:   step >= train.max_steps
    tokens budget:  tokens >= train.max_tokens   (the trainer stops at ceil(max_tokens / tokens_per_step) steps,
                                                  the first step whose token count reaches max_tokens)
    minutes budget: stopped == "time_limit" (the wall time was spent), or step >= train.max_steps (the base
                    config's length, reached within the time)

A checkpoint written by SIGINT/SIGTERM ("stopped": "signal") is below its total, hence partial.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import dlm
from dlm.compare.spec import CompareSpec, arm_run_config, dump_spec, spec_hash
from dlm.config import RunConfig
from dlm.errors import DlmError
from dlm.io import exclusive_lock, write_json_atomic, write_text_atomic
from dlm.rundir import CONFIG_FILE, list_checkpoints, read_info

__all__ = [
    "COMPARE_FILE",
    "SPEC_FILE",
    "CompareDir",
    "RunState",
    "Status",
    "open_compare_dir",
    "run_state",
    "spec_differences",
]

SPEC_FILE = "spec.yaml"
COMPARE_FILE = "compare.json"
LOCK_FILE = ".lock"
RUNS_DIR = "runs"
DATA_DIR = "data"

Status = Literal["missing", "partial", "finished"]


@dataclass
class RunState:
    """How far one (arm, seed) run got; unpacks as ``arm, seed, status``.

    step:   the last checkpoint's step (0 when none).
    tokens: the last checkpoint's token count (0 when none).
    """

    arm: str
    seed: int
    status: Status
    step: int = 0
    tokens: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.arm, self.seed, self.status))

    def line(self) -> str:
        """The runner's progress line, e.g. ``arm mdlm seed 1: resume from step 40``."""
        what = {
            "missing": "train from scratch",
            "partial": f"resume from step {self.step}",
            "finished": f"finished (step {self.step})",
        }[self.status]
        return f"arm {self.arm} seed {self.seed}: {what}"


def run_state(run_dir: Path, cfg: RunConfig, arm: str = "", seed: int = 0) -> RunState:
    """The status of ``run_dir`` against the budget in ``cfg.train`` (module docstring)."""
    if not (run_dir / CONFIG_FILE).is_file():
        return RunState(arm, seed, "missing")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return RunState(arm, seed, "partial")
    step, path = ckpts[-1]
    info = read_info(path)
    tokens = int(info.get("tokens") or 0)
    t = cfg.train
    done = (
        (t.max_steps > 0 and step >= t.max_steps)
        or (t.max_tokens > 0 and tokens >= t.max_tokens)
        or (t.time_limit_min is not None and info.get("stopped") == "time_limit")
    )
    return RunState(arm, seed, "finished" if done else "partial", step, tokens)


def spec_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two ``CompareSpec.to_dict()``s: nested mappings are
    followed (``budget.steps``), lists (arms, seeds) are compared whole."""
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


@dataclass
class CompareDir:
    """An open comparison directory (hold it with ``with open_compare_dir(...) as cdir``).

    root:                 DIR.
    spec:                 the spec it holds now.
    created:              DIR was new (or empty) and has just been set up.
    previous_spec_hashes: hashes of the specs ``--force`` replaced, oldest first.
    """

    root: Path
    spec: CompareSpec
    created: bool = False
    previous_spec_hashes: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        """DIR/data: where a corpus the spec prepares goes."""
        return self.root / DATA_DIR

    def run_dir(self, arm: str, seed: int) -> Path:
        """DIR/runs/{arm}-seed{seed}."""
        self.spec.arm(arm)  # refuses an unknown arm
        return self.root / RUNS_DIR / f"{arm}-seed{seed}"

    def state(self, arm: str, seed: int) -> RunState:
        """How far the (arm, seed) run got (module docstring)."""
        cfg = arm_run_config(self.spec, self.spec.arm(arm), seed)
        return run_state(self.run_dir(arm, seed), cfg, arm, seed)

    def status(self, arm: str, seed: int) -> Status:
        """``missing``, ``partial`` or ``finished``."""
        return self.state(arm, seed).status

    def plan(self) -> list[RunState]:
        """Every (arm, seed) in spec order (arms outer, seeds inner) with its state."""
        return [self.state(a.name, s) for a in self.spec.arms for s in self.spec.seeds]


def _is_fresh(out: Path) -> bool:
    """DIR holds nothing but what a set-up cut short leaves (spec.yaml, a lock file, temporary files)."""
    return all(
        p.name in (SPEC_FILE, LOCK_FILE) or (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir()
    )


def _check_is_comparison(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DlmError(f"{out} is not a directory")
    if out.is_dir() and not (out / COMPARE_FILE).is_file() and not _is_fresh(out):
        raise DlmError(f"{out} is not empty and holds no comparison ({COMPARE_FILE}); use another --out")


def _read_compare_json(out: Path) -> dict[str, Any]:
    path = out / COMPARE_FILE
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DlmError(f"corrupt {path}: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("spec_hash"), str):
        raise DlmError(f"corrupt {path}: no spec_hash")
    return info


def _stored_spec(out: Path) -> dict[str, Any] | None:
    try:
        d = yaml.safe_load((out / SPEC_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return d if isinstance(d, dict) else None


def _same_spec(stored: dict[str, Any], spec: CompareSpec) -> bool:
    """The stored spec.yaml, read with today's defaults for the fields it lacks, equals ``spec``."""
    from dlm.compare.spec import spec_from_dict

    try:
        return spec_from_dict(stored).to_dict() == spec.to_dict()
    except DlmError:  # hand-edited or from a newer dlm
        return False


def _write(out: Path, spec: CompareSpec, previous: list[str]) -> None:
    """spec.yaml, then compare.json (its presence says the set-up is complete), each atomically."""
    write_text_atomic(out / SPEC_FILE, dump_spec(spec))
    info: dict[str, Any] = {
        "spec_hash": spec_hash(spec),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "dlm_version": dlm.__version__,
    }
    if previous:
        info["previous_spec_hashes"] = previous
    write_json_atomic(out / COMPARE_FILE, info)


def _set_up(out: Path, spec: CompareSpec, force: bool) -> CompareDir:
    _check_is_comparison(out)
    if not (out / COMPARE_FILE).is_file():
        _write(out, spec, [])
        return CompareDir(out, spec, created=True)
    info = _read_compare_json(out)
    old_hash, new_hash = info["spec_hash"], spec_hash(spec)
    previous = [str(h) for h in info.get("previous_spec_hashes", [])]
    if old_hash == new_hash:
        return CompareDir(out, spec, previous_spec_hashes=previous)
    stored = _stored_spec(out)
    if stored is not None and _same_spec(stored, spec):
        # written by an older dlm whose spec lacked fields that now exist: at their defaults it is the same spec
        _write(out, spec, previous)
        return CompareDir(out, spec, previous_spec_hashes=previous)
    if not force:
        fields = spec_differences(stored, spec.to_dict()) if stored is not None else []
        names = ", ".join(fields) or f"unknown: {SPEC_FILE} unreadable or hand-edited"
        raise DlmError(
            f"{out} holds another comparison spec (fields that differ: {names}); use --force or another --out"
        )
    previous.append(old_hash)
    _write(out, spec, previous)
    return CompareDir(out, spec, previous_spec_hashes=previous)


@contextlib.contextmanager
def open_compare_dir(out: str | Path, spec: CompareSpec, *, force: bool = False) -> Iterator[CompareDir]:
    """Hold DIR's lock for the block and make sure DIR holds ``spec`` (module docstring).

    A new or empty DIR gets spec.yaml and compare.json; an existing comparison with the same ``spec_hash`` is
    reopened; another spec is refused naming the fields that differ, unless ``force`` (then spec.yaml and
    compare.json are rewritten, the old hash appended to ``previous_spec_hashes``; run directories are kept).
    """
    out = Path(out)
    _check_is_comparison(out)  # before creating anything (the lock file) in a foreign directory
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlmError(f"cannot create the comparison directory {out}: {e.strerror or e}") from None
    with exclusive_lock(out / LOCK_FILE, out):
        yield _set_up(out, spec, force)
