"""What every benchmark script shares: device synchronisation, the machine description and the JSON write."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from dlm.io import write_json_atomic


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_avg() -> list[float] | None:
    """1/5/15-minute load averages (other jobs on the machine disturb timings), None where unavailable."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device, **extra: Any) -> dict[str, Any]:
    """The machine a result was measured on: platform, CPU count, threads, torch version, device (+ extra)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        **extra,
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write the result JSON atomically (temp file + rename) and say where."""
    write_json_atomic(path, result)
    print(f"wrote {path}")
