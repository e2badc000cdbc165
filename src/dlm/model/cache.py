"""Key/value cache for incremental decoding (AR token by token, block diffusion block by block)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from dlm.errors import DlmError


def cache_length(max_len: int | None, context: int) -> int:
    """The token capacity of a new cache: ``max_len`` (default: the model context), checked to lie in
    [1, context]."""
    max_len = context if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len <= context:
        raise DlmError(f"cache max_len must be in [1, model.context={context}], got {max_len!r}")
    return max_len


class KVStore(Protocol):
    """What attention asks of a cache: store a layer's new keys/values, return the keys/values to attend over.

    ``KVCache`` (growing slices, python-int length) and ``dlm.model.decode.StepWrite`` (one token written at a
    device-held position, all max_len keys returned) both satisfy it.
    """

    def update(self, layer: int, k_BHLD: Tensor, v_BHLD: Tensor, commit: bool) -> tuple[Tensor, Tensor]: ...


class CacheState:
    """Bookkeeping shared by every cache: how many tokens are committed, and which of them are real keys.

    key_mask_BT: [B, max_len] bool, True = real token. Subclasses hold the keys/values themselves and
    override ``_forget`` to drop stored tokens at index >= length.
    """

    def __init__(self, batch_size: int, max_len: int, device: torch.device | str | None = None) -> None:
        self.key_mask_BT = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_key_mask = False  # some committed token carried a key mask (padding may be cached)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.key_mask_BT.shape[0]

    def check(self, batch_size: int, n_new: int) -> None:
        """Raise if a forward of ``n_new`` tokens for ``batch_size`` rows does not fit."""
        if batch_size != self.batch_size:
            raise DlmError(f"cache was made for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.length + n_new > self.max_len:
            raise DlmError(f"KV cache overflow: {self.length} cached + {n_new} new tokens > max_len {self.max_len}")

    def key_mask(self, key_mask_BL: Tensor | None, n_new: int, commit: bool) -> Tensor | None:
        """Key mask over cached + new keys [B, length + L], or None when every key is real."""
        if key_mask_BL is None and not self.has_key_mask:
            return None
        new = key_mask_BL
        if new is None:
            new = torch.ones(self.batch_size, n_new, dtype=torch.bool, device=self.key_mask_BT.device)
        start = self.length
        if commit and key_mask_BL is not None:
            self.key_mask_BT[:, start : start + n_new] = new
            self.has_key_mask = True
        return torch.cat([self.key_mask_BT[:, :start], new.to(self.key_mask_BT.device)], dim=1)

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def _forget(self, length: int) -> None:
        """Drop stored keys/values at index >= length (nothing to do when they are simply overwritten)."""

    def truncate(self, length: int) -> None:
        """Forget every token at index >= length (e.g. to roll back a committed block)."""
        if not 0 <= length <= self.length:
            raise DlmError(f"cannot truncate a cache of length {self.length} to {length}")
        if length < self.length:
            self._forget(length)
        self.key_mask_BT[:, length:] = True
        self.length = length

    def reset(self) -> None:
        self.truncate(0)
        self.has_key_mask = False


class KVCache(CacheState):
    """Per-layer keys (after rotary) and values of the first ``length`` tokens of each sequence.

    k[i], v[i]: [B, H, max_len, Dh] for layer i. A forward with ``commit=True`` writes its tokens at
    [length, length + L) and advances ``length``; with ``commit=False`` they are attended to but not stored.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(batch_size, max_len, device)
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]

    def update(self, layer: int, k_BHLD: Tensor, v_BHLD: Tensor, commit: bool) -> tuple[Tensor, Tensor]:
        """Keys and values of the cached tokens followed by the new ones, [B, H, length + L, Dh]."""
        start, end = self.length, self.length + k_BHLD.shape[2]
        k_cache, v_cache = self.k[layer], self.v[layer]
        if commit:
            k_cache[:, :, start:end] = k_BHLD
            v_cache[:, :, start:end] = v_BHLD
            return k_cache[:, :, :end].to(k_BHLD.dtype), v_cache[:, :, :end].to(v_BHLD.dtype)
        k_all = torch.cat([k_cache[:, :, :start].to(k_BHLD.dtype), k_BHLD], dim=2)
        v_all = torch.cat([v_cache[:, :, :start].to(v_BHLD.dtype), v_BHLD], dim=2)
        return k_all, v_all
