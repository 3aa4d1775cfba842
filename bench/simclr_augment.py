"""SimCLR's strong augmentation as batched tensor ops with per-sample randomness.

The torchvision pipeline DBD uses (``RandomResizedCrop → RandomHorizontalFlip → RandomApply(
ColorJitter, p=0.8) → RandomGrayscale(p=0.2) → RandomApply(GaussianBlur, p=0.5)``) runs one PIL
image at a time. Here every image of a batch draws its own crop box, flip, jitter factors and
order, grayscale coin and blur sigma, and the whole batch goes through a handful of tensor ops:

- resized crop + flip: one affine ``theta`` per image, ``F.affine_grid`` + ``F.grid_sample``
  (bilinear; torchvision/DBD use bicubic);
- colour jitter: brightness/contrast/saturation/hue in a random order per image (as torchvision's
  ``ColorJitter``), each factor per image; 1-channel images get brightness and contrast only
  (saturation and hue are no-ops on PIL ``L`` images); hue goes through our own RGB↔HSV;
- grayscale: ITU-R 601 luma, RGB only;
- blur: separable Gaussian with a per-image sigma as a grouped convolution (one fixed kernel of
  ``2·⌈3·σ_max⌉+1`` taps, replicate padding); PIL's ``GaussianBlur(radius=σ)`` is an extended
  box-blur approximation of the same Gaussian.

Input uint8 ``[B, C, H, W]``; output float32 in [0, 1], same shape and device (not normalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SimCLRAugCfg:
    """Args (defaults: DBD's ``config/defense/simclr/*/cifar10_resnet18/example.yaml``):
    scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
    flip: horizontal flip with p=0.5; ``None`` = where the dataset allows it (``data.hflip``).
    jitter_p: probability of applying colour jitter.
    brightness, contrast, saturation, hue: ColorJitter strengths.
    grayscale_p: probability of converting to grayscale (RGB only).
    blur_p, blur_sigma: probability and sigma range of the Gaussian blur.
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool | None = None
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device).to(device)


def _uniform(gen, n, lo, hi, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(gen, n, device=device)


def crop_boxes(b: int, h: int, w: int, scale, ratio, gen: torch.Generator,
               device: torch.device, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes ``[B, 4]`` (top, left, height, width) in pixels, float.

    As torchvision: up to ``attempts`` draws of (area, log-ratio) per image, the first that fits
    wins; if none fits, the whole image clamped to the ratio range, centred."""
    area = _uniform(gen, b * attempts, scale[0], scale[1], device).view(b, attempts) * h * w
    logr = _uniform(gen, b * attempts, math.log(ratio[0]), math.log(ratio[1]), device)
    r = logr.view(b, attempts).exp()
    cw, ch = (area * r).sqrt().round(), (area / r).sqrt().round()
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = ok.float().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h
    fw, fh = float(w), float(h)
    if in_ratio < ratio[0]:
        fh = float(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw = float(round(h * ratio[1]))
    found = ok.any(1)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.where(found, (_rand(gen, b, device=device) * (h - ch + 1)).floor(), (h - ch) // 2)
    left = torch.where(found, (_rand(gen, b, device=device) * (w - cw + 1)).floor(),
                       (w - cw) // 2)
    return torch.stack([top, left, ch, cw], 1)


def resized_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image of float ``x`` to its box, resize back to ``H×W`` (bilinear) and mirror
    where ``flip`` (bool ``[B]``) — one ``grid_sample`` call."""
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cw / w * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = 2 * (left + cw / 2) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = 2 * (top + ch / 2) / h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB ``x`` (identity for one channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6
    i = h6.floor()
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = torch.zeros_like(x)
    for k, rgb in table.items():
        out = torch.where((i == k)[:, None], torch.stack(rgb, 1), out)
    return out


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _shift_hue(z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(z)
    hsv = torch.stack([(hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, cfg: SimCLRAugCfg, apply: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """torchvision ``ColorJitter`` semantics per image: random op order, factors drawn per image;
    images where ``apply`` is False are returned unchanged."""
    b, c = x.shape[:2]
    dev = x.device

    def factor(s):
        return _uniform(gen, b, max(0.0, 1 - s), 1 + s, dev)

    factors = [factor(cfg.brightness), factor(cfg.contrast)]
    ops = [lambda z, f: _blend(z, torch.zeros_like(z), f),
           lambda z, f: _blend(z, gray(z).mean((1, 2, 3), keepdim=True).expand_as(z), f)]
    if c == 3:
        factors += [factor(cfg.saturation), _uniform(gen, b, -cfg.hue, cfg.hue, dev)]
        ops += [lambda z, f: _blend(z, gray(z).expand_as(z), f), _shift_hue]
    order = _rand(gen, b, 4, device=dev).argsort(1)  # per-image permutation of the 4 ops
    x = x.clone()
    for pos in range(4):
        for k, op in enumerate(ops):  # each op on the images that take it at this position
            idx = (apply & (order[:, pos] == k)).nonzero()[:, 0]
            if len(idx):
                x[idx] = op(x[idx], factors[k][idx])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur, sigma per image (``[B]``, 0 = no blur), replicate padding."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * sigma_max))
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-6).view(-1, 1)
    k = torch.exp(-(d[None] ** 2) / (2 * s**2))
    k = k / k.sum(1, keepdim=True)  # sigma→0 gives a delta kernel
    k = k.repeat_interleave(c, 0)  # [B·C, taps]
    z = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    z = F.conv2d(z, k.view(b * c, 1, -1, 1), groups=b * c)
    z = F.conv2d(z, k.view(b * c, 1, 1, -1), groups=b * c)
    return z.view(b, c, h, w)


def simclr_augment(x: torch.Tensor, cfg: SimCLRAugCfg, gen: torch.Generator,
                   hflip: bool) -> torch.Tensor:
    """One random view per image: uint8 ``[B, C, H, W]`` → float32 ``[B, C, H, W]`` in [0, 1]."""
    b, c, h, w = x.shape
    dev = x.device
    z = x.float().div_(255)
    boxes = crop_boxes(b, h, w, cfg.scale, cfg.ratio, gen, dev)
    do_flip = cfg.flip if cfg.flip is not None else hflip
    flip = (_rand(gen, b, device=dev) < 0.5) & do_flip
    z = resized_crop_flip(z, boxes, flip)
    z = color_jitter(z, cfg, _rand(gen, b, device=dev) < cfg.jitter_p, gen)
    if c == 3:
        g = _rand(gen, b, device=dev) < cfg.grayscale_p
        z = torch.where(g.view(-1, 1, 1, 1), gray(z).expand_as(z), z)
    blur = _rand(gen, b, device=dev) < cfg.blur_p
    sigma = _uniform(gen, b, cfg.blur_sigma[0], cfg.blur_sigma[1], dev) * blur
    if blur.any():
        z = gaussian_blur(z, sigma, cfg.blur_sigma[1])
    return z.clamp_(0, 1)
