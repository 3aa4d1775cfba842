"""Batched augmentation with per-sample randomness, on uint8 tensors on the run's device.

``torchvision.transforms.v2`` draws one set of random parameters per call, i.e. per batch; the
methods we reproduce draw them per image. Here each image gets its own crop offset, flip and
cutout position, in a handful of tensor ops (the approach of KellerJordan/cifar10-airbench).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentCfg:
    """Args:
    crop_pad: random-crop padding in pixels (0 disables cropping).
    pad_mode: ``zeros`` (torchvision RandomCrop default) or ``reflect`` (DBD).
    flip: horizontal flip with p=0.5; ``None`` means "where the dataset allows it".
    cutout: side of a square cutout hole in pixels (0 disables), centre uniform in the image and
        clipped at the border as in DeVries & Taylor's Cutout (ABL uses length 3).
    """

    crop_pad: int = 0
    pad_mode: str = "zeros"
    flip: bool | None = None
    cutout: int = 0


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, mode: str = "zeros"):
    """Pad by ``pad`` and crop back to the input size at an independent offset per image."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    if mode == "zeros":
        padded = F.pad(x, (pad, pad, pad, pad))
    else:  # reflect padding needs a float tensor
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode=mode).to(x.dtype)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    mask = torch.rand(len(x), generator=gen, device=gen.device).to(x.device) < p
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a ``size``×``size`` square (clipped at the border) at a random centre per image."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (b,), generator=gen, device=gen.device).to(x.device)
    half = size // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - half)[:, None]) & (ys < (cy - half + size)[:, None])
    in_x = (xs >= (cx - half)[:, None]) & (xs < (cx - half + size)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None], 0)


def augment(x: torch.Tensor, cfg: AugmentCfg, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Apply crop → flip → cutout to a batch ``[B, C, H, W]`` (any dtype), per-sample random."""
    x = random_crop(x, cfg.crop_pad, gen, cfg.pad_mode)
    if cfg.flip if cfg.flip is not None else hflip:
        x = random_flip(x, gen)
    return cutout(x, cfg.cutout, gen)
