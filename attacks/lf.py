"""Low-frequency trigger (Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective", ICCV 2021, arXiv 2104.03413). Dirty-label, additive smooth trigger.

Threat model: poison-only, all-to-one. The trigger is a universal additive perturbation δ
``[C, H, W]`` that contains only low spatial frequencies, so it has none of the high-frequency
artifacts the paper shows most triggers carry (and that a frequency detector catches):
``x' = clip(x + 255 δ, 0, 255)``, rounded to uint8, on a fraction of the training set relabelled
to the target and on every non-target test image.

Trigger generation (the paper's smooth-trigger recipe, §5): a universal adversarial perturbation
against a clean surrogate, low-pass filtered after every update. Here: Adam on δ minimising the
surrogate's cross-entropy towards ``target`` on batches of clean non-target training images
(``target: null``: maximising it on their true labels, an untargeted UAP), and after every step
the projection
  1. low-pass: zero every rFFT-2D coefficient whose normalised radius
     ``sqrt((f_y / f_N)² + (f_x / f_N)²)`` exceeds ``cutoff`` (f_N the Nyquist frequency),
  2. budget: scale δ down so that ‖δ‖∞ ≤ eps (scaling keeps it band-limited; clipping would not).

Defaults: eps 0.1 ([0, 1] units, ≈ 25/255), cutoff 0.25, 100 Adam steps of lr 0.01 on batches of
128, poison rate 0.1 (BackdoorBench's LF rate; BackdoorBench loads a pre-computed ``.npy``,
``specs/field.md`` 1.4). ``target`` follows ``attack.target`` through the YAML interpolation
``${..target}`` (set it yourself when building the params in Python).

Deliberate deviations: a gradient (Adam) UAP instead of the paper's DeepFool-based UAP
iterations, an ideal radial FFT mask instead of the paper's low-pass window, and an L∞ budget by
rescaling; the surrogate is a clean ``cnn_small`` trained in-process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attacks.base import ATTACKS, Attack, check_batch
from bench.errors import ConfigError
from bench.seeding import generator
from bench.surrogate import cached_tensor, fingerprint, surrogate


@dataclass(frozen=True)
class LFParams:
    """Args:
    eps: L∞ bound of δ in [0, 1] pixel units.
    cutoff: kept frequency radius as a fraction of the Nyquist frequency, in (0, 1].
    target: class δ steers the surrogate to (None: untargeted UAP); the YAML ties it to
        ``attack.target``.
    steps, lr, batch: Adam iterations, learning rate ([0, 1] units) and clean images per step.
    surrogate_epochs, surrogate_model, surrogate_width: the clean surrogate (width: cnn_small
        only; None = the model's default).
    """

    eps: float = 0.1
    cutoff: float = 0.25
    target: int | None = 0
    steps: int = 100
    lr: float = 0.01
    batch: int = 128
    surrogate_epochs: int = 5
    surrogate_model: str = "cnn_small"
    surrogate_width: float | None = None


def lowpass_mask(h: int, w: int, cutoff: float) -> torch.Tensor:
    """bool ``[H, W // 2 + 1]``: rFFT-2D coefficients within ``cutoff`` × Nyquist radius."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64) / 0.5
    fx = torch.fft.rfftfreq(w, dtype=torch.float64) / 0.5
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff


def lowpass(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep only the masked frequencies of the real signal ``d`` [..., H, W]."""
    spec = torch.fft.rfft2(d) * mask.to(d.device)
    return torch.fft.irfft2(spec, s=d.shape[-2:])


def project(d: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Low-pass, then rescale to ‖d‖∞ ≤ eps (stays band-limited)."""
    d = lowpass(d, mask)
    peak = d.abs().max()
    return d * (eps / peak) if peak > eps else d


def universal_perturbation(model, x: torch.Tensor, y: torch.Tensor, p: LFParams,
                           mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Adam UAP over random batches of uint8 ``x`` [N, C, H, W] (labels ``y``) on the model's
    device; returns float32 δ [C, H, W] with ‖δ‖∞ ≤ eps and no energy outside ``mask``."""
    delta = torch.zeros(x.shape[1:], device=x.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr)
    for _ in range(p.steps):
        b = torch.randint(len(x), (min(p.batch, len(x)),), generator=gen).to(x.device)
        logits = model((x[b].float() / 255 + delta).clamp(0, 1))
        if p.target is None:  # untargeted: push away from the true labels
            loss = -F.cross_entropy(logits, y[b])
        else:
            loss = F.cross_entropy(logits, torch.full_like(y[b], p.target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.copy_(project(delta, mask, p.eps))
    return project(delta.detach(), mask, p.eps).float()


@ATTACKS.register("lf", LFParams)
class LowFrequency(Attack):
    def __init__(self, params: LFParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        if not 0 < params.eps <= 1 or not 0 < params.cutoff <= 1:
            raise ConfigError(f"lf needs 0 < eps <= 1 and 0 < cutoff <= 1; got eps "
                              f"{params.eps}, cutoff {params.cutoff}")
        if params.steps < 0 or params.lr <= 0 or params.batch < 1:
            raise ConfigError("lf needs steps >= 0, lr > 0 and batch >= 1")
        _, h, w = shape
        self.mask = lowpass_mask(h, w, params.cutoff)
        self.delta: torch.Tensor | None = None  # float32 [C, H, W] in [-eps, eps] once prepared

    def prepare(self, train, idx: torch.Tensor, ctx) -> None:
        """Train (or load) the surrogate and compute the smooth universal perturbation (cached)."""
        p = self.params
        if p.target is not None and not 0 <= p.target < train.num_classes:
            raise ConfigError(f"lf target must be in [0, {train.num_classes - 1}], got {p.target}")
        key = ["lf", fingerprint(train), asdict(p), ctx.seed, ctx.amp,
               torch.device(ctx.device).type]

        def build() -> torch.Tensor:
            model = surrogate(train, ctx, model=p.surrogate_model, width=p.surrogate_width,
                              epochs=p.surrogate_epochs, purpose="clean")
            dev = torch.device(ctx.device)
            keep = train.y != p.target if p.target is not None else slice(None)
            return universal_perturbation(model, train.x[keep].to(dev), train.y[keep].to(dev),
                                          p, self.mask, generator(ctx.seed, "lf/batches"))

        self.delta = cached_tensor(key, build, ctx, name="lf_delta", shape=self.shape,
                                   dtype=torch.float32)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        if self.delta is None:
            raise RuntimeError("lf: call prepare(train, idx, ctx) before apply "
                               "(bench.poison.poison does)")
        out = x.float() + 255 * self.delta.to(x.device)
        return out.round_().clamp_(0, 255).to(torch.uint8)
