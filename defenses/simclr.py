"""SimCLR (Chen et al., ICML 2020) self-supervised training of a classifier's backbone, as DBD's
stage 1 runs it (SCLBD/DBD ``simclr.py``, ``utils/trainer/simclr.py``, ``model/loss.py``).

Shared stage machinery (not a registered defense). Two views per image from
``bench.simclr_augment``, a projection head on ``model.features``, NT-Xent-style loss, SGD with a
per-epoch cosine schedule whose length (``schedule_epochs``) may exceed the epochs actually run.
Both views go through the network as one batch of 2B (BatchNorm sees both).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import ConfigError, DivergedError
from bench.simclr_augment import SimCLRAugCfg, simclr_augment
from bench.train import Engine, batches

log = logging.getLogger("bench")


@dataclass(frozen=True)
class SimCLRCfg:
    """Args (defaults: DBD's SimCLR config for CIFAR-10 ResNet-18):
    epochs: epochs actually run (DBD's fine-tuning loads the epoch-100 checkpoint).
    schedule_epochs: ``T_max`` of the cosine schedule (DBD: 1000 = ``num_epochs`` configured).
    batch_size: images per batch (2× views per step); incomplete last batches are dropped.
    lr, momentum, weight_decay: SGD over backbone + projection head.
    temperature: τ of the contrastive loss.
    loss: ``official`` (anchor = view 1 only) or ``symmetric`` (NT-Xent, both directions).
    proj_dim: output size of the projection head.
    augment: the strong augmentation.
    """

    epochs: int = 100
    schedule_epochs: int = 1000
    batch_size: int = 512
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 0.5
    loss: str = "official"
    proj_dim: int = 128
    augment: SimCLRAugCfg = field(default_factory=SimCLRAugCfg)


class ProjectionHead(nn.Module):
    """``Linear(d→d) → BatchNorm1d → ReLU → Linear(d→proj_dim)`` then L2 normalisation."""

    def __init__(self, dim: int, proj_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, proj_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` features → float32 unit vectors ``[B, proj_dim]``."""
        return F.normalize(self.net(feats).float(), dim=1)


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                symmetric: bool = False) -> torch.Tensor:
    """Contrastive loss of unit vectors ``z1, z2`` ``[N, D]`` (row i of both = views of image i).

    Official DBD (``symmetric=False``): anchors are the first views only; for anchor i the
    positive is ``z2[i]`` and the denominator sums over all 2N−1 other views (positive included):
    ``L = −1/N Σ_i log softmax_{k≠(i,1)}(⟨z1_i, z_k⟩/τ)[(i,2)]``.
    ``symmetric=True``: the standard NT-Xent, the same term averaged over all 2N anchors.
    """
    n = len(z1)
    z = torch.cat([z1, z2])
    anchors = z if symmetric else z1
    sim = anchors @ z.T / temperature  # [A, 2N]
    rows = torch.arange(len(anchors), device=z.device)
    sim = sim.masked_fill(F.one_hot(rows, 2 * n).bool(), float("-inf"))  # drop self-similarity
    target = (rows + n) % (2 * n)
    return F.cross_entropy(sim, target)


def train_simclr(model: nn.Module, x: torch.Tensor, cfg: SimCLRCfg, eng: Engine,
                 gen: torch.Generator, *, hflip: bool, normalize: bool = True,
                 desc: str = "simclr") -> list[float]:
    """Self-supervised training of ``model.features`` on uint8 images ``x`` ``[N, C, H, W]``
    (labels unused). Returns the mean loss of every epoch; the head is discarded."""
    if cfg.loss not in ("official", "symmetric"):
        raise ConfigError(f"simclr loss must be official or symmetric, got '{cfg.loss}'")
    head = eng.place(ProjectionHead(model.feature_dim, cfg.proj_dim))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    size = min(cfg.batch_size, len(x))
    history = []
    for epoch in range(cfg.epochs):
        # CosineAnnealingLR(T_max=schedule_epochs) stepped once per epoch
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.schedule_epochs, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        head.train()
        total, steps = torch.zeros((), device=eng.device), 0
        for idx in eng.bar(batches(len(x), size, gen, drop_last=True),
                           desc=f"{desc} {epoch + 1}/{cfg.epochs}"):
            views = torch.cat([simclr_augment(x[idx], cfg.augment, gen, hflip) for _ in range(2)])
            if normalize:
                views = (views - eng.mean) / eng.std
            if eng.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            with eng.autocast():
                z = head(model.features(views))
            loss = simclr_loss(*z.chunk(2), cfg.temperature, cfg.loss == "symmetric")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        mean = total.item() / max(steps, 1)
        if not math.isfinite(mean):
            raise DivergedError(f"{desc}: loss became {mean} in epoch {epoch + 1}; "
                                f"lower simclr.lr (now {cfg.lr:g})")
        history.append(mean)
        log.info("%s epoch %d/%d loss %.4f lr %.4g", desc, epoch + 1, cfg.epochs, mean, lr)
    return history
