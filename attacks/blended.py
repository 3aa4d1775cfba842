"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", arXiv 1712.05526, 2017). Dirty-label blend trigger.

``x' = (1 - α)·x + α·t`` with a fixed pattern image ``t``. Default α = 0.2 at train and test time,
as BackdoorBench; DBD used α = 0.1 (``alpha: 0.1``). The papers blend a Hello-Kitty photo, which
cannot be downloaded here: the pattern is generated locally from ``pattern_seed``, either uniform
noise (``pattern: noise``, default) or a smooth random colour field (``pattern: smooth``,
bilinearly upsampled from a 4×4 grid), so every run of the same config sees the same trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import ATTACKS, Attack, blend, check_batch
from bench.errors import ConfigError


@dataclass(frozen=True)
class BlendedParams:
    alpha: float = 0.2
    test_alpha: float | None = None  # None: same as alpha
    pattern: str = "noise"
    pattern_seed: int = 0


def make_pattern(kind: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A fixed uint8 ``[C, H, W]`` pattern, identical for a given (kind, shape, seed)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    if kind == "noise":
        return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
    if kind == "smooth":
        grid = torch.rand((1, c, 4, 4), generator=g)
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0]
        return (up * 255).round().to(torch.uint8)
    raise ConfigError(f"unknown blended pattern '{kind}'; known: noise, smooth")


@ATTACKS.register("blended", BlendedParams)
class Blended(Attack):
    def __init__(self, params: BlendedParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        for a in (params.alpha, params.test_alpha):
            if a is not None and not 0.0 < a <= 1.0:
                raise ConfigError(f"blended alpha must be in (0, 1], got {a}")
        self.pattern = make_pattern(params.pattern, shape, params.pattern_seed)
        self.alpha = params.alpha

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        return blend(x, self.pattern.to(x.device), self.alpha)

    def for_test(self) -> Blended:
        if self.params.test_alpha is None or self.params.test_alpha == self.alpha:
            return self
        twin = Blended.__new__(Blended)
        twin.__dict__.update(self.__dict__, alpha=self.params.test_alpha)
        return twin
