"""What every benchmark script shares: device synchronisation, a timed matmul, the machine description and the
JSON write."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from dlm.eval.speed import machine_info as speed_machine_info
from dlm.io import write_json_atomic


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, inner: int = 1) -> float:
    """Seconds per ``a @ b`` over one block of ``inner`` products, bracketed by device synchronisation (the
    matmul peak's timing: 2 n^3 FLOP per n x n x n product)."""
    sync(a.device)
    t0 = time.perf_counter()
    for _ in range(inner):
        a @ b
    sync(a.device)
    return (time.perf_counter() - t0) / inner


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
