"""Separate random streams per purpose, all derived from the run seed.

The poisoned set depends only on (dataset, attack, seed): index selection and trigger resources
use their own streams, so changing the model, the defense or the data order never changes it.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose``, stable across Python versions and platforms."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded for ``purpose``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))
