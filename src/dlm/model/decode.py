"""Static-shape decoding: one token per row per step against the preallocated KV cache, capturable once.

``Transformer.decode_step`` feeds token x_p at the position p held in a device tensor ``pos_1`` ([1] int64) and
returns the next-token logits. Its shapes never change from step to step and it reads nothing back to the host:

    k_p, v_p written at index p of every layer's cache      (index_copy_ along the key axis, ``StepWrite``)
    attention of q_p over all T = max_len cached keys with   valid_j = (j <= p)   (computed on the device)
    rotary angles  p * base^(-2i / Dh)                      (from the same device tensor)

Keys j > p get weight exp(-inf) = 0, so the result equals the growing-slice cached forward (softmax over the
keys j <= p) up to float rounding (attention reduces over max_len keys instead of p + 1: 1 ulp apart on CPU,
as the cached and uncached forwards are), and the AR sampler draws identical ids (tests/test_decode.py).

``Decoder`` holds the position and the step's input and output buffers: on CUDA it captures the step once as a
``torch.cuda.CUDAGraph`` and replays it (one launch per token instead of one per kernel); on CPU, or with
``capture=False``, it runs the step eagerly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from dlm.errors import DlmError
from dlm.model.cache import KVCache

CAPTURE_WARMUP = 2  # eager steps on a side stream before capture (lazy initialisation, cuBLAS workspaces)


class StepDecoder(Protocol):
    """What ``Decoder`` needs from a backbone."""

    def decode_step(self, tok_B1: Tensor, pos_1: Tensor, cache: KVCache) -> Tensor: ...


class StepWrite:
    """One decode step's view of a ``KVCache``: ``update`` writes the new key/value at the device position pos_1
    and returns every layer's full cache [B, H, max_len, Dh] (the caller masks keys after pos_1)."""

    def __init__(self, cache: KVCache, pos_1: Tensor) -> None:
        self.cache, self.pos_1 = cache, pos_1

    def update(self, layer: int, k_BH1D: Tensor, v_BH1D: Tensor, commit: bool = True) -> tuple[Tensor, Tensor]:
        assert commit and k_BH1D.shape[2] == 1, "a decode step commits exactly one token"
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(2, self.pos_1, k_BH1D.to(k_cache.dtype))
        v_cache.index_copy_(2, self.pos_1, v_BH1D.to(v_cache.dtype))
        return k_cache.to(k_BH1D.dtype), v_cache.to(v_BH1D.dtype)


def key_valid_mask(max_len: int, pos_1: Tensor) -> Tensor:
    """Bool [1, 1, 1, max_len]: key j may be attended to by the query at position p iff j <= p."""
    keys_T = torch.arange(max_len, device=pos_1.device)
    return (keys_T <= pos_1)[None, None, None, :]


class Decoder:
    """Feeds one token per row per ``step`` at position ``cache.length`` and returns the next-token logits [B, V].

    model:   a backbone with ``decode_step`` (the dlm Transformer).
    cache:   its ``KVCache``, usually just filled by a prefill forward; ``step`` writes at cache.length and advances
             it by one (host bookkeeping only; the position the step reads lives in the device tensor ``pos_1``).
    capture: record the step as a CUDA graph and replay it (default: when the cache is on a CUDA device).
             Warm-up and capture write throw-away keys at index cache.length, which the first step overwrites.

    The returned logits of a captured decoder live in a static buffer: read them before the next ``step``.
    """

    def __init__(self, model: StepDecoder, cache: KVCache, capture: bool | None = None) -> None:
        if cache.has_key_mask:
            raise DlmError("the static decoder cannot attend over a cache that holds padded keys (key_mask_BL)")
        device = cache.k[0].device
        self.model, self.cache = model, cache
        self.pos_1 = torch.full((1,), cache.length, dtype=torch.int64, device=device)
        self.tok_B1 = torch.zeros(cache.batch_size, 1, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_BV: Tensor | None = None
        capture = device.type == "cuda" if capture is None else capture
        if capture:
            if device.type != "cuda":
                raise DlmError("CUDA graph capture needs a CUDA device; use capture=False")
            if cache.length >= cache.max_len:
                raise DlmError(f"KV cache is full ({cache.length} tokens): nothing left to decode")
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        side = torch.cuda.Stream(self.pos_1.device)
        side.wait_stream(torch.cuda.current_stream(self.pos_1.device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self.model.decode_step(self.tok_B1, self.pos_1, self.cache)
        torch.cuda.current_stream(self.pos_1.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self.model.decode_step(self.tok_B1, self.pos_1, self.cache)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def step(self, tok_B: Tensor) -> Tensor:
        """Float32 logits [B, V] of the token after ``tok_B`` (int64 [B]), which takes position cache.length."""
        self.cache.check(tok_B.shape[0], 1)
        self.tok_B1.copy_(tok_B.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            assert self.logits_BV is not None
            logits_BV = self.logits_BV
        else:
            logits_BV = self.model.decode_step(self.tok_B1, self.pos_1, self.cache)
        self.pos_1.add_(1)
        self.cache.advance(1)
        return logits_BV
