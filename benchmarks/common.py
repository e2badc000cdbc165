"""What every benchmark script shares: device synchronisation, the machine description and the JSON write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dlm.eval.speed import machine_info as speed_machine_info
from dlm.io import write_json_atomic


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_avg() -> list[float] | None:
    """1/5/15-minute load averages (other jobs on the machine disturb timings), None where unavailable."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device, **extra: Any) -> dict[str, Any]:
    """The machine a result was measured on (``dlm.eval.speed.machine_info``), plus ``extra``."""
    return {**speed_machine_info(device), **extra}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write the result JSON atomically (temp file + rename) and say where."""
    write_json_atomic(path, result)
    print(f"wrote {path}")
