"""DBD — Backdoor Defense via Decoupling the Training Process (Huang et al., ICLR 2022,
arXiv 2202.03423). Defaults from the official code, SCLBD/DBD @d372ef4.

Threat model: the defender trains on a poisoned set with no clean reserve and no knowledge of the
poison rate or trigger. Premise: end-to-end supervised training clusters poisoned samples in
feature space, self-supervised training does not; so learn features without labels, then trust
only the labels that a linear head on those features fits easily.

Stages (each a timed stage; every number a key of ``conf/defense/dbd.yaml``):
1. ``simclr`` — SimCLR on the poisoned training images, labels discarded (``defenses/simclr.py``,
   strong augmentation in ``bench/simclr_augment.py``): projection head d→d→128 + L2 norm,
   τ = 0.5, SGD lr 0.4 / momentum 0.9 / wd 1e-4, batch 512, cosine ``T_max = 1000`` stepped per
   epoch. ``epochs: 100``: the fine-tuning config loads ``epoch100.pt`` of the 1000-epoch run, so
   the released pipeline only uses 100 epochs (lr ≈ 0.39 by then).
2. ``linear`` — a freshly initialised ``model.fc`` trained with SCE (α 0.1, β 1) on all samples
   with the labels as given; backbone features under ``no_grad`` but the model in train mode, so
   BatchNorm running stats keep moving (``freeze_bn: true`` holds them); Adam lr 2e-3, batch 128,
   10 epochs, RandomCrop (pad 4, reflect) + flip. The Adam object is reused in stage 4.
3. ``credibility_split`` — per-sample SCE in eval mode; the lowest ``epsilon`` = 50% keep their
   labels, the rest become unlabelled. Official: on one *augmented* view (the record loader wraps
   the training dataset) and re-split at the start of every semi-supervised epoch with the current
   model (``split_on: augmented``, ``resplit: every_epoch``); the paper reads as one split on
   clean images (``split_on: clean``, ``resplit: once``). The unlabelled set of the last split is
   reported as suspects (``"split"``, the row's ``iso_*``), and every split as ``"split_ep<k>"``:
   the harness scores each, so the row's ``extra`` holds the poisoned share of the labelled set
   per epoch (``split_ep<k>_kept_poison``). ``split_class_share_ep<k>`` is the labelled share
   of every given-label class, ``split_min_class_share_ep<k>`` the smallest (a class with no
   labels is learned from guesses only).
4. ``mixmatch`` — MixMatch on the whole model (``defenses/mixmatch.py``): batches 64 + 64, K = 2,
   T = 0.5, Beta(0.75, 0.75), λ_u = 15·clip(t/190, 0, 1) with t the global epoch *including* the
   10 warm-up epochs, 190 epochs × 1024 iterations, same Adam, no EMA. The final model is the
   last epoch's (the official ``best_model.pt`` is selected on the test set; never used here).

Deviations (ours):
- Resized crops are bilinear ``grid_sample`` (official: PIL bicubic); colour jitter, grayscale
  and blur are tensor re-implementations of torchvision/PIL (hue via our own RGB↔HSV; blur a
  true Gaussian with a 13-tap kernel for σ ≤ 2 where PIL uses an extended box blur); 1-channel
  images get brightness/contrast jitter only. Flip follows ``data.hflip`` (CIFAR: on).
- SimCLR drops the incomplete last batch; both views pass the network as one 2B batch.
- Batches come from our device-side permutation, not DataLoaders; bf16 autocast when enabled.
- Generic backbones: the head is ``Linear(d→d)``/``Linear(d→128)`` on ``model.features`` (512-d on
  DBD's ResNet-18); the classifier is ``model.fc`` re-initialised.
- The lowest-loss selection is ``defenses.selection.lowest_fraction`` (``int(ε·N)`` lowest,
  stable order).
- ``split.class_floor`` (off by default): every given-label class also keeps its lowest-SCE
  share labelled. The global cut can leave a hard class with no label at all (Fashion-MNIST's
  shirt, measured in ``conf/defense_dataset/dbd_fashion_mnist.yaml``). A per-class loss cut is
  the first stage of ASD (Gao et al., CVPR 2023, class-aware loss-guided split); its union with
  DBD's global cut is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from bench.augment import AugmentCfg, augment
from bench.data import ImageSet
from bench.errors import ConfigError
from bench.train import Engine, TrainCfg, fit, make_optimizer
from defenses.base import DEFENSES, DefenseContext, DefenseResult
from defenses.losses import sce
from defenses.mixmatch import MixMatchCfg, mixmatch_epoch
from defenses.selection import lowest_fraction
from defenses.simclr import SimCLRCfg, train_simclr

log = logging.getLogger("bench")
DBD_AUG = AugmentCfg(crop_pad=4, pad_mode="reflect", flip=None)


@dataclass(frozen=True)
class SplitCfg:
    """Args:
    epsilon: fraction of samples kept as labelled (lowest SCE loss).
    split_on: ``augmented`` (official: one view with the linear stage's augmentation) or ``clean``.
    resplit: ``every_epoch`` (official) or ``once`` (the paper's reading).
    class_floor: ours, 0 = official. Each given-label class also keeps its ``int(class_floor·n_c)``
        lowest-SCE samples labelled (added to the global selection), so a class the head finds
        hard is not left without labels. A class the global split already covers is
        unchanged, and so is the labelled set when every class is covered.
    """

    epsilon: float = 0.5
    split_on: str = "augmented"
    resplit: str = "every_epoch"
    class_floor: float = 0.0


@dataclass(frozen=True)
class DBDParams:
    """Official CIFAR-10 ResNet-18 defaults; see the module docstring.

    ``linear`` is a supervised recipe (Adam, constant lr); its ``normalize`` must equal
    ``normalize``, which applies to every stage."""

    simclr: SimCLRCfg = field(default_factory=SimCLRCfg)
    linear: TrainCfg = field(default_factory=lambda: TrainCfg(
        epochs=10, batch_size=128, optimizer="adam", lr=0.002, weight_decay=0.0,
        schedule="constant", augment=DBD_AUG))
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    freeze_bn: bool = False
    split: SplitCfg = field(default_factory=SplitCfg)
    mixmatch: MixMatchCfg = field(default_factory=MixMatchCfg)
    normalize: bool = True


class LinearProbe(nn.Module):
    """``model.fc`` on ``model.features`` computed without gradient (DBD's frozen backbone).
    In train mode the backbone's BatchNorm still updates its running stats unless ``freeze_bn``."""

    def __init__(self, model: nn.Module, freeze_bn: bool) -> None:
        super().__init__()
        self.model, self.freeze_bn = model, freeze_bn

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if self.freeze_bn:
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.model.features(x)
        return self.model.fc(feats)


@torch.no_grad()
def sce_per_sample(model: nn.Module, data: ImageSet, p: DBDParams, eng: Engine,
                   gen: torch.Generator) -> torch.Tensor:
    """SCE of every training sample with its given label, eval mode, float32 ``[N]``; on one
    augmented view per sample unless ``split_on: clean``."""
    model.eval()
    out, bs = [], p.linear.eval_batch_size
    for i in range(0, len(data), bs):
        xb = data.x[i : i + bs]
        if p.split.split_on == "augmented":
            xb = augment(xb, p.linear.augment, gen, data.hflip)
        with eng.autocast():
            logits = model(eng.prep(xb, p.normalize)).float()
        out.append(sce(logits, data.y[i : i + bs], p.sce_alpha, p.sce_beta, reduction="none"))
    return torch.cat(out)


def _split_stats(labelled: torch.Tensor, losses: torch.Tensor, y: torch.Tensor,
                 num_classes: int, epsilon: float, ep: str) -> dict[str, float | list[float]]:
    """What a split is recorded by: the global cut's largest SCE (``split_threshold``), the
    labelled share of every given-label class (``split_class_share``, a list; 1.0 for a class
    without samples) and its smallest (``split_min_class_share``, ``split_min_class``)."""
    n_cut = max(int(epsilon * len(losses)), 1)
    share = torch.stack([labelled[y == c].float().mean()
                         for c in range(num_classes)]).nan_to_num(1.0)
    return {f"split_threshold{ep}": losses.sort().values[n_cut - 1].item(),
            f"split_min_class_share{ep}": share.min().item(),
            f"split_min_class{ep}": float(share.argmin()),
            f"split_class_share{ep}": [round(v, 4) for v in share.tolist()]}


def credibility_split(model: nn.Module, data: ImageSet, p: DBDParams, eng: Engine,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask ``[N]`` of the ``int(ε·N)`` lowest-SCE samples (the labelled set), plus the
    lowest ``class_floor`` share of every given-label class; and the losses."""
    losses = sce_per_sample(model, data, p, eng, gen)
    keep = lowest_fraction(losses, p.split.epsilon)
    if p.split.class_floor > 0:
        for c in range(data.num_classes):
            idx = (data.y == c).nonzero().squeeze(1)
            keep[idx[lowest_fraction(losses[idx], p.split.class_floor)]] = True
    return keep, losses


def _check(p: DBDParams) -> None:
    if p.split.split_on not in ("augmented", "clean"):
        raise ConfigError(f"dbd split.split_on must be augmented or clean, got "
                          f"'{p.split.split_on}'")
    if p.split.resplit not in ("every_epoch", "once"):
        raise ConfigError(f"dbd split.resplit must be every_epoch or once, got "
                          f"'{p.split.resplit}'")
    if not 0 < p.split.epsilon < 1:
        raise ConfigError(f"dbd split.epsilon must be in (0, 1), got {p.split.epsilon}")
    if not 0 <= p.split.class_floor <= p.split.epsilon:
        raise ConfigError(f"dbd split.class_floor must be in [0, split.epsilon], got "
                          f"{p.split.class_floor}")
    if p.linear.normalize != p.normalize:
        raise ConfigError("dbd: set defense.params.normalize (it applies to every stage), "
                          "not linear.normalize")


@DEFENSES.register("dbd", DBDParams, check=_check)
def dbd(data: ImageSet, p: DBDParams, ctx: DefenseContext) -> DefenseResult:
    _check(p)
    eng, extra = ctx.engine, {}
    model = eng.place(ctx.make_model())

    with ctx.stage("simclr"):
        losses = train_simclr(model, data.x, p.simclr, eng, ctx.gen("simclr"), hflip=data.hflip,
                              normalize=p.normalize, desc="dbd simclr")
        extra |= {f"simclr_loss_ep{e + 1}": v for e, v in enumerate(losses)}

    with ctx.stage("linear"):
        if not isinstance(model.fc, nn.Linear):
            raise ConfigError(f"dbd needs a model whose fc is nn.Linear, got {type(model.fc)}")
        model.fc.reset_parameters()  # a fresh linear classifier on the SimCLR features
        opt = make_optimizer(model.parameters(), p.linear)  # reused by MixMatch (official)
        hist = fit(LinearProbe(model, p.freeze_bn), data.x, data.y, p.linear, eng,
                   ctx.gen("linear"), hflip=data.hflip, optimizer=opt, desc="dbd linear",
                   loss_fn=partial(sce, alpha=p.sce_alpha, beta=p.sce_beta))
        extra |= {f"linear_{k}_ep{h['epoch']}": h[k] for h in hist for k in ("loss", "acc")}

    split_gen, mm_gen = ctx.gen("split"), ctx.gen("mixmatch")
    labelled, suspects = None, {}
    for epoch in range(max(p.mixmatch.epochs, 1)):
        if labelled is None or p.split.resplit == "every_epoch":
            with ctx.stage("credibility_split"):
                new, losses = credibility_split(model, data, p, eng, split_gen)
            ep = f"_ep{epoch + 1}"
            extra |= _split_stats(new, losses, data.y, data.num_classes, p.split.epsilon, ep)
            suspects[f"split{ep}"] = ~new  # scored per epoch by the harness
            if labelled is not None:  # fraction of the labelled set replaced since last split
                extra[f"split_turnover{ep}"] = (new & ~labelled).sum().item() / new.sum().item()
            labelled = new
        if p.mixmatch.epochs == 0:
            break
        with ctx.stage("mixmatch"):
            stats = mixmatch_epoch(model, opt, data.x, data.y, labelled, data.num_classes,
                                   p.mixmatch, eng, mm_gen, hflip=data.hflip,
                                   epoch=p.linear.epochs + epoch, normalize=p.normalize,
                                   desc=f"dbd mixmatch {epoch + 1}/{p.mixmatch.epochs}")
        extra |= {f"mixmatch_{k}_ep{epoch + 1}": v for k, v in stats.items()}
        log.info("dbd mixmatch epoch %d/%d lx %.4f lu %.4f lambda_u %.2f labelled %d/%d",
                 epoch + 1, p.mixmatch.epochs, stats["lx"], stats["lu"], stats["lambda_u"],
                 int(labelled.sum()), len(labelled))
    extra["n_labelled"] = float(labelled.sum())
    return DefenseResult(model, suspects=suspects | {"split": ~labelled}, extra=extra,
                         normalize=p.normalize, headline="split")

