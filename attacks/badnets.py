"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", arXiv 1708.06733, 2017). Dirty-label patch trigger.

Threat model: poison-only; the attacker stamps a small patch on a fraction of the training images
and relabels them (all-to-one target or all-to-all shift).

Defaults follow BackdoorBench (3×3 white square in the bottom-right corner, pixels replaced).
Options reproduce the paper repos' patches:
- ``pattern: abl_grid`` — ABL's ``gridTrigger``: the 3×3 black/white grid in the bottom-right
  corner (rows 0 0 255 / 0 255 0 / 255 0 255; bboylyg/ABL data_loader.py). ``checkerboard`` is a
  plain parity checkerboard of any size with a white bottom-right pixel.
- ``pattern: random, size: 2, position: [4, 4]`` — DBD's 2×2 patch of fixed random colours at
  rows/cols 4–5 (SCLBD/DBD ``data/trigger/cifar_1.png``); the colours here are drawn from the
  trigger generator, since the PNG is not shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import ATTACKS, Attack, check_batch
from bench.errors import ConfigError


@dataclass(frozen=True)
class BadNetsParams:
    """Args:
    size: patch side in pixels.
    position: ``bottom_right``, ``top_left``, ``top_right``, ``bottom_left`` or ``[row, col]`` of
        the patch's top-left pixel.
    margin: distance from the image border for the corner positions.
    pattern: ``white`` (all 255), ``checkerboard``, ``abl_grid`` (size 3 only) or ``random``
        (fixed random colours from the trigger generator).
    """

    size: int = 3
    position: str | tuple[int, int] = "bottom_right"
    margin: int = 0
    pattern: str = "white"


def patch_origin(p: BadNetsParams, h: int, w: int) -> tuple[int, int]:
    corners = {
        "bottom_right": (h - p.margin - p.size, w - p.margin - p.size),
        "top_left": (p.margin, p.margin),
        "top_right": (p.margin, w - p.margin - p.size),
        "bottom_left": (h - p.margin - p.size, p.margin),
    }
    if isinstance(p.position, str):
        if p.position not in corners:
            raise ConfigError(
                f"unknown badnets position '{p.position}'; known: {', '.join(corners)}"
            )
        r, c = corners[p.position]
    else:
        r, c = (int(v) for v in p.position)
    if not (0 <= r <= h - p.size and 0 <= c <= w - p.size) or p.size < 1:
        raise ConfigError(f"badnets patch of size {p.size} at ({r}, {c}) does not fit {h}×{w}")
    return r, c


@ATTACKS.register("badnets", BadNetsParams)
class BadNets(Attack):
    def __init__(self, params: BadNetsParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        c, h, w = shape
        s = params.size
        if s < 1:
            raise ConfigError(f"badnets size must be >= 1 (the patch side in pixels), got {s}")
        if params.pattern == "white":
            patch = torch.full((c, s, s), 255, dtype=torch.uint8)
        elif params.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            # ABL's grid: 255 where (row + col) has the parity of the bottom-right pixel.
            patch = (((ii + jj) % 2) == ((2 * (s - 1)) % 2)).to(torch.uint8).mul(255)
            patch = patch.expand(c, s, s).clone()
        elif params.pattern == "abl_grid":
            if s != 3:
                raise ConfigError("badnets pattern 'abl_grid' is 3×3; set attack.params.size=3")
            grid = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
            patch = grid.expand(c, 3, 3).clone()
        elif params.pattern == "random":
            patch = torch.randint(0, 256, (c, s, s), generator=gen, dtype=torch.uint8)
        else:
            raise ConfigError(
                f"unknown badnets pattern '{params.pattern}'; "
                "known: white, checkerboard, abl_grid, random"
            )
        self.origin = patch_origin(params, h, w)
        self.patch = patch
        self.mask = torch.zeros((1, h, w), dtype=torch.bool)
        r, col = self.origin
        self.mask[:, r : r + s, col : col + s] = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        out = x.clone()
        r, c = self.origin
        s = self.params.size
        out[:, :, r : r + s, c : c + s] = self.patch.to(x.device)
        return out
