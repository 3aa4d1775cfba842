"""ABL — Anti-Backdoor Learning (Li et al., NeurIPS 2021, arXiv 2110.11571).

Threat model: the defender trains on a poisoned set with no clean reserve and no knowledge of
the poison rate. Premise: backdoor samples are learned much faster than clean ones.

Stages (each a timed stage, every number a config key in ``conf/defense/abl.yaml``):
1. ``isolation_train`` — train from scratch while keeping the loss near γ (local gradient
   ascent), so fast-learned (poisoned) samples end with the lowest loss.
2. ``isolate`` — per-sample CE on the un-augmented training set, model in eval mode; the lowest
   ``isolation_ratio`` fraction is the isolated set (reported to the harness as suspects).
3. ``finetune`` — continue training the isolation model on the remaining samples.
4. ``unlearn`` — gradient ascent (−CE) on the isolated set.

Where we follow the official code (bboylyg/ABL @3fd736c) rather than the paper:
- the ascent form defaults to ``flooding`` (``|ℓ̄−γ|+γ`` on the batch mean, the config default);
  the paper's per-sample ``sign(ℓ−γ)·ℓ`` is ``ascent: lga``;
- isolation training runs 10 epochs (``tuning_epochs``; the paper says T_te = 20), SGD-Nesterov
  lr 0.1, momentum 0.9, wd 1e-4, constant lr, no augmentation, no shuffling; inputs are never
  normalised anywhere in ABL (``normalize: false``);
- stage B of the paper (descend on the rest and ascend on the isolated set jointly) is two
  sequential phases in the code: fine-tune 60 epochs (lr 0.1 → 0.01 at epoch 40, crop + flip +
  Cutout) then 4 epochs of pure ascent at lr 5e-4 (``unlearning_epochs: 5`` with epoch 0 only
  evaluating). ``unlearn_mode: joint`` makes the ascent phase the paper's joint objective; the
  fine-tuning still runs before it, so the paper's stage B alone (T − T_te = 80 epochs) is
  ``finetune.epochs: 0`` with ``unlearn.epochs: 80``.
- ABL's ``Cutout(length=3)`` zeroes ``[c−1, c+1)``, a 2×2 hole: ``cutout: 2`` here.
- ABL's test loader skips target-class images, so its published clean accuracy is the row's
  ``ba_nt``; the ABL paper table compares that column.
Deviations: batches are drawn by our engine (device-side permutation); ``shuffle: false``
reproduces the official in-order isolation loader. Unlearning starts a fresh SGD optimizer,
where ``backdoor_unlearning.py`` keeps the fine-tuning one and so its momentum buffer (on
BadNets seed 0 carrying the momentum over moved BA / ASR by at most 0.003).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from bench.augment import AugmentCfg, augment
from bench.data import ImageSet
from bench.errors import ConfigError, DivergedError
from bench.train import TrainCfg, batches, fit, lr_factor, make_optimizer, per_sample_loss
from defenses.base import DEFENSES, DefenseContext, DefenseResult
from defenses.losses import flooding, lga, negative_ce
from defenses.selection import lowest_fraction

NO_AUG = AugmentCfg(crop_pad=0, flip=False, cutout=0)


def _sgd(**kw) -> TrainCfg:
    base = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4,
                batch_size=128, normalize=False, augment=NO_AUG, schedule="constant")
    return TrainCfg(**(base | kw))


@dataclass(frozen=True)
class ABLParams:
    """Official defaults (bboylyg/ABL config.py); see the module docstring."""

    isolation: TrainCfg = field(default_factory=lambda: _sgd(epochs=10, lr=0.1))
    shuffle: bool = False
    ascent: str = "flooding"
    gamma: float = 0.5
    isolation_ratio: float = 0.01
    finetune: TrainCfg = field(default_factory=lambda: _sgd(
        epochs=60, lr=0.1, schedule="multistep", milestones=(40,), gamma=0.1,
        augment=AugmentCfg(crop_pad=4, flip=None, cutout=2)))
    unlearn: TrainCfg = field(default_factory=lambda: _sgd(epochs=4, lr=5e-4))
    unlearn_mode: str = "ascent"


def unlearn_joint(model, rest: ImageSet, iso: ImageSet, cfg: TrainCfg, ctx: DefenseContext,
                  gen: torch.Generator, hflip: bool) -> None:
    """The paper's stage B: each step descends on a batch of the rest and ascends on a batch
    of the isolated set (cycled), with ``cfg``'s optimiser, schedule and augmentation."""
    eng = ctx.engine
    opt = make_optimizer(model.parameters(), cfg)
    steps = math.ceil(len(rest) / cfg.batch_size)

    def prep(s: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        return eng.prep(augment(s.x[idx], cfg.augment, gen, hflip), cfg.normalize)

    for epoch in range(cfg.epochs):
        model.train()
        iso_batches = iter(())
        for i, idx in enumerate(batches(len(rest), cfg.batch_size, gen)):
            jdx = next(iso_batches, None)
            if jdx is None:
                iso_batches = batches(len(iso), cfg.batch_size, gen)
                jdx = next(iso_batches)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg, epoch + i / steps)
            with eng.autocast():
                loss = (F.cross_entropy(model(prep(rest, idx)).float(), rest.y[idx])
                        - F.cross_entropy(model(prep(iso, jdx)).float(), iso.y[jdx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise DivergedError(f"abl joint unlearning: loss became {loss.item()} in epoch "
                                f"{epoch + 1}; lower unlearn.lr (now {cfg.lr:g})")


def _check(p: ABLParams) -> None:
    if p.ascent not in ("flooding", "lga"):
        raise ConfigError(f"abl ascent must be flooding or lga, got '{p.ascent}'")
    if p.unlearn_mode not in ("ascent", "joint"):
        raise ConfigError(f"abl unlearn_mode must be ascent or joint, got '{p.unlearn_mode}'")
    if not 0 < p.isolation_ratio < 1:
        raise ConfigError(f"abl isolation_ratio must be in (0, 1), got {p.isolation_ratio}")
    if not p.gamma > 0:
        raise ConfigError(f"abl gamma must be > 0 (the loss the ascent holds), got {p.gamma}")
    if not p.isolation.normalize == p.finetune.normalize == p.unlearn.normalize:
        raise ConfigError("abl isolation, finetune and unlearn must share normalize (one model "
                          "trains through all three stages)")
    default = TrainCfg.eval_batch_size
    for stage in ("finetune", "unlearn"):
        if getattr(p, stage).eval_batch_size != default:
            raise ConfigError(f"abl {stage}.eval_batch_size is not used (ABL's one inference "
                              f"pass is the isolation's: set isolation.eval_batch_size, or "
                              f"train.eval_batch_size for the evaluation); remove it")


@DEFENSES.register("abl", ABLParams, check=_check)
def abl(data: ImageSet, p: ABLParams, ctx: DefenseContext) -> DefenseResult:
    _check(p)
    if int(len(data) * p.isolation_ratio) < 1:
        raise ConfigError(f"abl isolation_ratio {p.isolation_ratio} isolates no sample of "
                          f"{len(data)}; raise it to at least {1 / len(data):.2g}")
    eng, norm = ctx.engine, p.isolation.normalize
    model = eng.place(ctx.make_model())
    ascent = partial(flooding if p.ascent == "flooding" else lga, gamma=p.gamma)

    with ctx.stage("isolation_train"):
        fit(model, data.x, data.y, p.isolation, eng, ctx.gen("isolation"), hflip=data.hflip,
            loss_fn=ascent, desc="abl isolation", shuffle=p.shuffle)
    with ctx.stage("isolate"):
        losses = per_sample_loss(model, data.x, data.y, eng,
                                 batch_size=p.isolation.eval_batch_size, normalize=norm)
        suspect = lowest_fraction(losses, p.isolation_ratio)
    rest, iso = data.subset(~suspect), data.subset(suspect)
    with ctx.stage("finetune"):
        fit(model, rest.x, rest.y, p.finetune, eng, ctx.gen("finetune"), hflip=data.hflip,
            desc="abl finetune")
    with ctx.stage("unlearn"):
        if p.unlearn_mode == "ascent":
            fit(model, iso.x, iso.y, p.unlearn, eng, ctx.gen("unlearn"), hflip=data.hflip,
                loss_fn=negative_ce, desc="abl unlearn")
        else:
            unlearn_joint(model, rest, iso, p.unlearn, ctx, ctx.gen("unlearn"), data.hflip)
    return DefenseResult(model, suspects={"isolation": suspect}, normalize=p.finetune.normalize)
