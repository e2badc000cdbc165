"""dlm: discrete diffusion language models and their autoregressive baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from dlm.rundir import LoadedRun

__version__ = "0.1.0.dev0"


def from_pretrained(directory: str | Path, device: str = "cpu") -> LoadedRun:
    """A `dlm export` directory (or a run directory) loaded for evaluation or sampling (`dlm.rundir.load_run`;
    torch is imported only when this is called)."""
    from dlm.rundir import load_run

    return load_run(directory, device=device)
