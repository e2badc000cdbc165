"""Named random streams derived from one seed, for every layer (the trainer, evaluation): a pure function, so
the layers that only read run directories need not import the trainer to use it."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["derive_seed"]


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for a named stream ("process", rank ...) derived from the run's one seed."""
    digest = hashlib.sha256(repr((int(seed), *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
