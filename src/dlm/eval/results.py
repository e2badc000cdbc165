"""Result files of a run directory: one file per distinct setting, reused or recomputed, never mixed.

An evaluation result is ``RUN/eval/{kind}-{readable}-{hash}.json``: ``readable`` names the split or sampler and
the checkpoint step for a person reading a listing, ``hash`` is :func:`settings_hash` of the ``settings`` object
written inside the file (every setting that changes the number: checkpoint step, EMA, seed, batch size, batches
evaluated, the process's options, the data's fingerprints, the device type, the protocol version). A rerun with
the same settings finds the same file (:func:`reusable`); other settings give another file, so a quick
``--max-batches 1`` run never replaces a whole-split one. :func:`find_results` lists them for later readers.

Checks done before any work, so a refused command leaves the run directory as it was: :func:`check_device`
and :func:`check_writable` (the output directory exists or can be made, and a file can be created in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dlm.errors import DlmError

__all__ = ["check_device", "check_writable", "find_results", "result_path", "reusable", "reuse", "settings_hash"]

EVAL_DIR = "eval"


def settings_hash(settings: dict[str, Any]) -> str:
    """First 10 hex digits of sha256 of the canonical JSON of ``settings`` (sorted keys, no spaces)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:10]


def result_path(run_dir: str | Path, kind: str, readable: str, settings: dict[str, Any]) -> Path:
    """``RUN/eval/{kind}-{readable}-{settings_hash}.json``."""
    return Path(run_dir) / EVAL_DIR / f"{kind}-{readable}-{settings_hash(settings)}.json"


def reusable(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` when it exists, is readable JSON and was made with exactly ``settings``; else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("settings") == settings else None


def reuse(path: Path, settings: dict[str, Any], *, force: bool, log: Any = None) -> dict[str, Any] | None:
    """The one reuse rule of every result file: unless ``force``, the record at ``path`` made with exactly
    ``settings`` (``log`` is told "reused PATH: ..."); None when it must be computed."""
    old = None if force else reusable(path, settings)
    if old is not None and log is not None:
        log(f"reused {path}: a result with the same settings (--force recomputes it)")
    return old


def find_results(run_dir: str | Path, kind: str, **match: Any) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``{kind}-*.json`` result of a run (``kind``: ``likelihood`` or ``generation``) as (path, record),
    oldest first; ``match`` keeps those whose ``settings`` hold each given key with the given value, e.g.
    ``find_results(run, "likelihood", split="test", max_batches=None)``. Unreadable files are skipped."""
    out = []
    for path in sorted((Path(run_dir) / EVAL_DIR).glob(f"{kind}-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        settings = record.get("settings") if isinstance(record, dict) else None
        if match and not (isinstance(settings, dict) and all(settings.get(k, object()) == v for k, v in match.items())):
            continue
        if isinstance(record, dict):
            out.append((path, record))
    return sorted(out, key=lambda pr: (str(pr[1].get("created", "")), str(pr[0])))


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device; DlmError for an unknown name or CUDA where none is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DlmError(f"unknown device {device!r} (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DlmError(f"--device {device} but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DlmError(f"device {device!r} is not supported (use cpu or cuda)")
    return dev


def check_writable(directory: Path) -> None:
    """Make ``directory`` (and its parents) if needed and create and delete a file in it, before any work.

    DlmError naming the directory when that fails (a read-only directory, a file where the directory should
    be, a read-only or full file system). A directory this call created is removed again when the test fails.
    """
    directory = Path(directory)
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        for p in missing:  # deepest first: leave the tree as it was
            with contextlib.suppress(OSError):
                p.rmdir()
        reason = "it is not a directory" if directory.exists() and not directory.is_dir() else (e.strerror or e)
        raise DlmError(f"cannot write results into {directory}: {reason}") from None
