"""Where and how the computation runs: device, autocast dtype, seeds, RNG state, DDP / FSDP2.

Launch one process per device with ``torchrun``; ``setup_runtime`` reads RANK / WORLD_SIZE / LOCAL_RANK
from the environment and joins the process group (gloo on CPU, nccl on CUDA). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dlm.config import TrainConfig
from dlm.errors import DlmError
from dlm.seeds import derive_seed as derive_seed  # re-exported: the trainer imports it from here

# Dense bf16 tensor-core peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
# MFU is reported against these; on CPU (and unknown GPUs) the peak is unknown and MFU is null.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


@dataclass
class Runtime:
    """The process's place in the job and its numeric settings."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dist: str = "none"  # "none" | "ddp" | "fsdp"
    amp_dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    owns_group: bool = False  # this runtime initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when configured, else a no-op."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over ranks ("sum", "mean" or "max"); identity in a single process."""
        if self.distributed:
            if op == "mean":
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.world_size)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0 (others get an empty list)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out or []

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """Backward inside reduces gradients over ranks (enabled) or only accumulates them locally."""
        if enabled or not self.distributed:
            yield
        elif self.dist == "ddp":
            with model.no_sync():
                yield
        else:  # FSDP2
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise DlmError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DlmError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Device, autocast dtype and (under torchrun) the process group, from ``cfg`` and the environment."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size > 1 and cfg.dist == "none":
        raise DlmError(f"launched with WORLD_SIZE={world_size} but train.dist is 'none'; set --train.dist ddp")
    if cfg.dist == "ddp" and "WORLD_SIZE" not in os.environ:  # torchrun sets WORLD_SIZE / RANK for every rank
        raise DlmError(
            "train.dist 'ddp' needs one process per device: launch with torchrun --nproc-per-node N -m dlm train ... "
            "(or use --train.dist none for one process)"
        )
    device = resolve_device(cfg.device, local_rank)
    if cfg.dist == "fsdp" and device.type != "cuda":
        raise DlmError("train.dist 'fsdp' needs CUDA devices; use --train.dist ddp on CPU")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DlmError("train.precision bf16 is not supported by this GPU; use --train.precision fp32")
    amp = torch.bfloat16 if precision == "bf16" else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    owns = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    elif cfg.dist == "fsdp" and not dist.is_initialized():  # one GPU: FSDP2 still needs a (1-rank) group
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    mode = cfg.dist if (world_size > 1 or cfg.dist == "fsdp") else "none"
    return Runtime(device, rank, world_size, local_rank, mode, amp, owns)


def shutdown_runtime(rt: Runtime) -> None:
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and primitive containers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_prim, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _prim(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def wrap_model(model: nn.Module, rt: Runtime, compile: bool = False) -> nn.Module:
    """The module the training step calls: compiled and/or DDP- or FSDP2-wrapped ``model``.

    ``model`` itself stays the plain module whose state dict is saved (FSDP2 shards it in place).
    """
    if rt.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
    fwd: nn.Module = torch.compile(model) if compile else model
    if rt.dist == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    return fwd


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (CPU, unknown GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (validation) without consuming the global torch RNG streams."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
