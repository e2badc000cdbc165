"""Capture and replay of a fixed-shape forward: the diffusion samplers' denoiser as one CUDA graph launch per call.

The grid samplers and first-hitting (``dlm.process.absorbing``) call their denoiser ``denoise(z_BL, t_B)`` with the
same shapes, dtypes and device at every step (z int64 [B, L], t float64 [B]), and the network's forward reads
nothing back to the host. Such a call can be recorded once and replayed: ``DenoiserGraph`` copies each call's
inputs into static buffers and, on CUDA, replays a ``torch.cuda.CUDAGraph`` of

    out = denoise(z_static, t_static)

captured at the second call; the first call is the warm-up forward on a side stream that the PyTorch CUDA-graph
notes prescribe, and its output is that call's result, so capturing costs no extra forward and a single call
captures nothing. Every later call is one graph launch instead of one launch per kernel, and the values equal the
eager forward's (the same kernels on the same inputs).

The returned tensor is a static buffer: the next call overwrites it. A caller must consume what it needs
(``index_select`` the rows it reads, which copies) before it calls again. Off CUDA (or with ``capture=False``)
the call runs eagerly on the same static buffers and copies the result into a static output buffer too, so the
CPU path has the same aliasing as the replayed one and the CPU tests catch a caller that keeps an output across
calls.

Only a *pure* denoiser may be captured: a replay runs the recorded kernels only, never the Python around them,
so a denoiser that counts its calls, records entropies or updates a KV cache in Python (BD3-LM's
``BlockDenoiser``) would silently stop doing so. A denoiser declares that it is pure with ``capturable``; the
samplers capture such denoisers by default on CUDA (``dlm.process.absorbing.capture_denoiser``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dlm.errors import DlmError

Forward = Callable[[Tensor, Tensor], Tensor]

DENOISER_WARMUP = 1  # eager forwards on a side stream before capture (lazy initialisation, cuBLAS workspaces);
# the last one's output is the first call's result. A no-grad forward has no lazily created state after one call.


def capturable(denoise: Forward) -> Forward:
    """Mark ``denoise`` as pure (no Python-side effects, no host reads, fixed shapes for fixed input shapes), so
    the samplers may replay it as a CUDA graph; returns ``denoise`` itself."""
    denoise.capturable = True  # type: ignore[attr-defined]
    return denoise


def is_capturable(denoise: Forward) -> bool:
    """Whether ``denoise`` was marked by ``capturable``."""
    return bool(getattr(denoise, "capturable", False))


class DenoiserGraph:
    """``denoise`` behind static input and output buffers, replayed as a CUDA graph on CUDA (module docstring).

    denoise: the forward, called as denoise(z_BL, t_B).
    z_BL, t_B: example inputs; every call must pass tensors of their shapes, dtypes and device.
    capture: warm up at the first call, record a CUDA graph at the second and replay it from then on (default:
             when z_BL is on CUDA);
             False runs ``denoise`` eagerly on the static buffers. The graph runs under ``torch.no_grad``.

    ``__call__`` returns the static output buffer: valid until the next call.
    """

    def __init__(self, denoise: Forward, z_BL: Tensor, t_B: Tensor, capture: bool | None = None) -> None:
        self.denoise = denoise
        self.z_BL, self.t_B = torch.empty_like(z_BL), torch.empty_like(t_B)
        self.capture = z_BL.device.type == "cuda" if capture is None else capture
        if self.capture and z_BL.device.type != "cuda":
            raise DlmError("CUDA graph capture needs a CUDA device; use capture=False")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, z_BL: Tensor, t_B: Tensor) -> Tensor:
        for name, new, static in (("z", z_BL, self.z_BL), ("t", t_B, self.t_B)):
            if new.shape != static.shape or new.dtype != static.dtype or new.device != static.device:
                raise DlmError(
                    f"a captured denoiser needs fixed inputs: {name} was {static.dtype} {tuple(static.shape)} on "
                    f"{static.device}, now {new.dtype} {tuple(new.shape)} on {new.device}"
                )
        self.z_BL.copy_(z_BL)
        self.t_B.copy_(t_B)
        self.calls += 1
        if not self.capture:
            out = self.denoise(self.z_BL, self.t_B)
            if self.out is None or self.out.shape != out.shape or self.out.dtype != out.dtype:
                self.out = torch.empty_like(out)
            return self.out.copy_(out)
        if self.calls == 1:
            return self._warm_up()
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out

    @torch.no_grad()
    def _warm_up(self) -> Tensor:
        """The first call: eager forward(s) on a side stream; the last one's output is returned."""
        device = self.z_BL.device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(DENOISER_WARMUP):
                first = self.denoise(self.z_BL, self.t_B)
        current.wait_stream(side)
        first.record_stream(current)  # allocated on the side stream, read on the current one
        return first

    @torch.no_grad()
    def _capture(self) -> None:
        """The second call records the graph (recording runs nothing: the caller replays it at once)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.denoise(self.z_BL, self.t_B)
        self.graph = graph
