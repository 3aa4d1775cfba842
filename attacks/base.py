"""What every attack shares: the registry and the interface the harness calls.

An attack is a pure function on uint8 image batches. It is built once per run from its params,
the image shape and an explicit generator (for random trigger resources such as a blend pattern),
then ``apply(x)`` maps a uint8 ``[B, C, H, W]`` batch to a triggered uint8 batch of the same shape.
Index selection, label rewriting and bookkeeping belong to the harness (``bench/poison.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")


class Attack:
    """Base class. Subclasses set the class attributes and implement ``apply``.

    Attributes:
        label_modes: label modes the attack supports (first is the default).
        clean_label: True when the attack only triggers target-class samples and keeps labels.
    cover_ratio: number of cover samples per poisoned sample. The harness draws
        ``round(cover_ratio * n_poisoned)`` further samples, passes them through ``cover`` and
        keeps their labels; they are bookkept as ``kind = 2``, never as poisoned.
    """

    label_modes: ClassVar[tuple[str, ...]] = ("all2one", "all2all")
    clean_label: ClassVar[bool] = False
    cover_ratio: float = 0.0  # cover samples per poisoned sample (WaNet's noise mode)

    def __init__(self, params, shape: tuple[int, int, int], gen: torch.Generator) -> None:
        self.params = params
        self.shape = shape  # (C, H, W)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a uint8 batch ``[B, C, H, W]``; returns a new uint8 tensor, same shape."""
        raise NotImplementedError

    def prepare(self, train, idx: torch.Tensor, ctx) -> None:
        """Learn what the trigger needs from the clean training set (``bench.data.ImageSet``)
        before ``apply`` is called; ``idx`` are the indices about to be poisoned and ``ctx`` a
        ``bench.poison.PrepareContext``. Most attacks need nothing."""

    def cover(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Transform cover samples (labels unchanged); only for attacks with ``cover_ratio``."""
        raise NotImplementedError

    def for_test(self) -> Attack:
        """The attack as applied to the test set (differs only where the paper says so)."""
        return self


def check_batch(x: torch.Tensor, shape: tuple[int, int, int]) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"expected uint8 [B, {shape}], got {x.dtype} {tuple(x.shape)}")


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``round((1 - alpha) * x + alpha * pattern)`` in float, back to uint8 (saturating)."""
    out = (1 - alpha) * x.float() + alpha * pattern.float()
    return out.round_().clamp_(0, 255).to(torch.uint8)
