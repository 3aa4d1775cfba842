"""MixMatch (Berthelot et al., NeurIPS 2019) as DBD's stage 3 runs it (SCLBD/DBD
``utils/trainer/semi.py``, ``MixMatchLoss`` in ``model/loss.py``; interleaving as in
YU1ut/MixMatch-pytorch). Shared stage machinery, not a registered defense.

Small pure pieces (``sharpen``, ``mixup``, ``interleave``, ``lambda_u_at``, ``mixmatch_losses``)
plus ``mixmatch_epoch``, which runs one epoch of ``iters_per_epoch`` iterations on a labelled /
unlabelled split of a uint8 training set. Label guessing runs with the model in train mode under
``no_grad`` (as the reference code: BN uses batch statistics there too). No EMA model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.augment import AugmentCfg, augment
from bench.errors import ConfigError, DivergedError
from bench.train import Engine, batches

log = logging.getLogger("bench")


@dataclass(frozen=True)
class MixMatchCfg:
    """Args (defaults: DBD's ``config/defense/mixmatch_finetune/*/cifar10_resnet18``):
    epochs: semi-supervised epochs.
    iters_per_epoch: iterations per epoch (``train_iteration``).
    batch_size: labelled and unlabelled batch size (each).
    views: K augmented views of each unlabelled image for label guessing.
    temperature: sharpening temperature T.
    alpha: MixUp Beta(α, α) parameter.
    lambda_u, rampup_length: weight of the unlabelled loss, 15·clip(t/190, 0, 1).
    augment: per-view augmentation (DBD: RandomCrop 32 pad 4 reflect + flip).
    """

    epochs: int = 190
    iters_per_epoch: int = 1024
    batch_size: int = 64
    views: int = 2
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 15.0
    rampup_length: float = 190.0
    augment: AugmentCfg = field(
        default_factory=lambda: AugmentCfg(crop_pad=4, pad_mode="reflect", flip=None))


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T)`` renormalised over the last dim (rows of ``[B, K]`` probabilities)."""
    q = p.pow(1.0 / temperature)
    return q / q.sum(-1, keepdim=True)


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float, gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each row of ``x`` ``[N, ...]`` and soft targets ``y`` ``[N, K]`` with a random other
    row (one permutation drawn from ``gen``), weight ``λ' = max(λ, 1−λ)`` on the row itself.
    Returns ``(x_mix, y_mix, λ')``."""
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm], lam


def _offsets(batch: int, n: int) -> list[int]:
    sizes = [batch // n] * n
    for i in range(batch - sum(sizes)):  # the remainder goes to the last pieces
        sizes[-1 - i] += 1
    return [0, *np.cumsum(sizes).tolist()]


def interleave(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Swap pieces between ``n`` equal-sized chunks (chunk 0 labelled, the rest unlabelled):
    every chunk is cut into ``n`` pieces and piece ``i`` of chunk 0 trades places with piece
    ``i`` of chunk ``i`` (i ≥ 1). Each forward pass (and its BatchNorm statistics) then sees both
    labelled and unlabelled rows. A swap undone is a swap: ``interleave`` is its own inverse."""
    n, b = len(chunks), len(chunks[0])
    if any(len(c) != b for c in chunks):
        raise ValueError(f"interleave needs equal chunks, got {[len(c) for c in chunks]}")
    o = _offsets(b, n)
    pieces = [[c[o[j] : o[j + 1]] for j in range(n)] for c in chunks]
    for i in range(1, n):
        pieces[0][i], pieces[i][i] = pieces[i][i], pieces[0][i]
    return [torch.cat(p) for p in pieces]


uninterleave = interleave  # the inverse, named for readability at call sites


def lambda_u_at(t: float, lambda_u: float, rampup_length: float) -> float:
    """Unlabelled-loss weight at (fractional, global) epoch ``t``: ``λ_u·clip(t/L, 0, 1)``."""
    if rampup_length <= 0:
        return lambda_u
    return lambda_u * float(np.clip(t / rampup_length, 0.0, 1.0))


def mixmatch_losses(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor,
                    targets_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_x``: soft-target cross-entropy averaged over rows; ``L_u``: mean over all entries of
    ``(softmax(logits_u) − targets_u)²``."""
    lx = -(targets_x * F.log_softmax(logits_x, 1)).sum(1).mean()
    lu = (logits_u.softmax(1) - targets_u).pow(2).mean()
    return lx, lu


def mixmatch_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                  ubs: list[torch.Tensor], cfg: MixMatchCfg, lam: float, gen: torch.Generator,
                  eng: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """One MixMatch loss evaluation. ``xb`` ``[B, C, H, W]`` prepared labelled images, ``yb``
    ``[B, K]`` their (one-hot) targets, ``ubs`` the K prepared views of B unlabelled images."""
    with torch.no_grad(), eng.autocast():
        guess = torch.stack([model(u).float().softmax(1) for u in ubs]).mean(0)
    q = sharpen(guess, cfg.temperature)
    b = len(xb)
    mixed_x, mixed_y, _ = mixup(torch.cat([xb, *ubs]), torch.cat([yb, *[q] * len(ubs)]), lam,
                                gen)
    if eng.channels_last:
        mixed_x = mixed_x.contiguous(memory_format=torch.channels_last)
    with eng.autocast():
        logits = [model(c).float() for c in interleave(list(mixed_x.split(b)))]
    logits = uninterleave(logits)
    return mixmatch_losses(logits[0], mixed_y[:b], torch.cat(logits[1:]), mixed_y[b:])


def _cycle(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:  # drop_last loaders, restarted whenever one runs out
        yield from batches(n, size, gen, drop_last=True)


def mixmatch_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, labelled: torch.Tensor, num_classes: int, cfg: MixMatchCfg,
                   eng: Engine, gen: torch.Generator, *, hflip: bool, epoch: float,
                   normalize: bool = True, desc: str = "mixmatch") -> dict[str, float]:
    """One epoch of MixMatch on uint8 ``x`` ``[N, C, H, W]``: rows where ``labelled`` (bool
    ``[N]``) keep their labels ``y``, the others are unlabelled. ``epoch`` is the global epoch
    index of this epoch for the λ_u ramp. Returns the epoch means of ``lx``, ``lu``, ``loss`` and
    the final ``lambda_u``."""
    lab, unl = labelled.nonzero()[:, 0], (~labelled).nonzero()[:, 0]
    if min(len(lab), len(unl)) < cfg.batch_size:
        raise ConfigError(f"mixmatch needs ≥ batch_size={cfg.batch_size} labelled and unlabelled "
                          f"samples, got {len(lab)} / {len(unl)}; lower mixmatch.batch_size")
    lab_it, unl_it = _cycle(len(lab), cfg.batch_size, gen), _cycle(len(unl), cfg.batch_size, gen)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen,
                                                  device=gen.device)))
    model.train()
    sums = torch.zeros(2, device=eng.device)
    wu = 0.0
    for it in eng.bar(range(cfg.iters_per_epoch), desc=desc):
        li, ui = lab[next(lab_it)], unl[next(unl_it)]
        xb = eng.prep(augment(x[li], cfg.augment, gen, hflip), normalize)
        yb = F.one_hot(y[li], num_classes).float()
        ubs = [eng.prep(augment(x[ui], cfg.augment, gen, hflip), normalize)
               for _ in range(cfg.views)]
        lx, lu = mixmatch_step(model, xb, yb, ubs, cfg, float(rng.beta(cfg.alpha, cfg.alpha)),
                               gen, eng)
        wu = lambda_u_at(epoch + it / cfg.iters_per_epoch, cfg.lambda_u, cfg.rampup_length)
        loss = lx + wu * lu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([lx.detach(), lu.detach()])
    lx_m, lu_m = (sums / max(cfg.iters_per_epoch, 1)).tolist()
    if not (math.isfinite(lx_m) and math.isfinite(lu_m)):
        raise DivergedError(f"{desc}: loss became non-finite (lx {lx_m}, lu {lu_m}) in epoch "
                            f"{epoch + 1:.0f}; lower linear.lr (the shared Adam's lr)")
    return {"lx": lx_m, "lu": lu_m, "lambda_u": wu}
