"""DLP — "DLP: towards active defense against backdoor attacks with decoupled learning process"
(Ying & Wu, Cybersecurity 2023, doi 10.1186/s42400-023-00141-4; arXiv 2406.13098).

Threat model: the defender trains on a poisoned set with no clean reserve and no knowledge of the
poison rate or trigger. Premise (the paper's observation): the model learns the poisoned subset
differently from the clean one — the backdoor is learned fast and with high confidence.

What the paper establishes: three stages — (1) supervised learning on the whole poisoned set, (2)
active unlearning after an entropy-based filtering of the samples, (3) active semi-supervised
fine-tuning. No official code exists and the paper's stage details are not public; every choice
below that the paper does not pin down is ours and a key of ``conf/defense/dlp.yaml``.

Stages (each a timed stage):
1. ``supervised`` — cross-entropy training from scratch on all samples for a short schedule
   (``supervised.epochs``): the backdoor is learned, the main task only partly.
2. ``filter`` — predictive entropy ``H = −Σ p log p`` of every sample (eval mode, un-augmented),
   averaged in log space over the supervised epochs from ``filter.from_epoch`` to the last.
   Low entropy = suspected poisoned. If no class separates in entropy, ``filter.late`` looks
   for a class whose samples the model learned late instead, and if there is none either,
   ``filter.disowned`` for a class whose samples sat among one other label early on. With
   ``filter.expand`` the flagged class's samples whose features side with the suspects join
   them. Suspects are reported to the harness (``"filter"``; the entropy cut alone as
   ``"entropy"``, the late cut as ``"late"``, the disowned cut as ``"disowned"``).
3. ``unlearn`` — gradient ascent on the suspects with their given labels, jointly with descent on
   confidently clean samples, until the suspects' accuracy falls to ``stop_acc``.
4. ``semi`` — MixMatch (``defenses/mixmatch.py``, DBD's implementation) on the whole model with
   labelled = the ``budget`` share of samples whose given label the current model finds most
   credible (lowest CE), never a suspect (optionally growing linearly to ``budget_final`` by the
   last round); unlabelled = the rest. The split is re-selected with the
   current model at the start of each of ``rounds`` equal rounds ("active"). Each round's
   unlabelled set is reported as ``"semi_r<k>"`` (so the row holds ``semi_r<k>_kept_poison``,
   the poisoned share of that round's labelled set), the last one also as ``"semi"``. The
   row's headline ``iso_precision``/``iso_recall`` score the filter's suspects (``"filter"``).

Ours (not in the paper):
- The filter (``filter.mode``, ``from_epoch``, ``expand``, ``late``, ``disowned``): see
  ``defenses/dlp_filter.py``, with the measurements behind each choice.
- Unlearning objective ``CE(clean) − CE(suspects)`` per step (``descend: false``: pure ascent),
  SGD, stopping as soon as the suspects' accuracy on their given labels is ≤ ``stop_acc``
  (checked after every step) or after ``max_epochs``. The clean batch comes from the
  ``clean_ratio`` lowest-loss non-suspects outside the suspects' label classes (the remaining
  poisoned samples of the target class would otherwise be relearned).
- Semi-supervised method MixMatch with DBD's settings; a fresh Adam; λ_u ramps over the semi
  epochs; the selection criterion is the CE of the given label.
- Ablations (``conf/ablation/dlp_*.yaml``): ``supervised.epochs: 0`` filters with the untrained
  model, ``filter.enabled: false`` flags nothing (so nothing is unlearned or excluded),
  ``unlearn.enabled: false`` skips stage 3, ``semi.enabled: false`` returns the unlearned model,
  ``semi.rounds: 1`` is a one-off (non-active) split, ``filter.expand: false`` keeps the cut
  alone, ``filter.late: false`` with ``filter.disowned: false`` the entropy filter alone,
  ``filter.disowned: false`` the entropy and late filters.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.augment import AugmentCfg
from bench.data import ImageSet
from bench.errors import ConfigError
from bench.train import Engine, TrainCfg, batches, fit, lr_factor, per_sample_loss, predict
from defenses.base import DEFENSES, DefenseContext, DefenseResult
from defenses.dlp_filter import FilterCfg, entropy_filter, expand_suspects, knn_filters
from defenses.mixmatch import MixMatchCfg, mixmatch_epoch
from defenses.selection import predictive_entropy

log = logging.getLogger("bench")


@dataclass(frozen=True)
class UnlearnCfg:
    """Args:
    enabled: run the stage (ablation switch).
    lr, momentum, weight_decay, batch_size: SGD on batches of suspects (and clean samples).
    max_epochs: passes over the suspects at most.
    stop_acc: stop once the suspects' accuracy on their given labels is at most this.
    descend: also descend on a batch of confident clean samples each step.
    clean_ratio: confident clean = this fraction of the non-suspects, lowest loss first, outside
        the suspects' label classes.
    """

    enabled: bool = True
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    max_epochs: int = 5
    stop_acc: float = 0.1
    descend: bool = True
    clean_ratio: float = 0.5


@dataclass(frozen=True)
class SemiCfg:
    """Args:
    enabled: run the stage (ablation switch).
    rounds: equal rounds of ``mixmatch.epochs``; the split is re-selected before each.
    budget: labelled share of the non-suspects (lowest CE of the given label) in round 1.
    budget_final: the share in the last round, linear in between (None: ``budget`` throughout):
        as the model improves, more of its labels are trusted.
    balanced: apply ``budget`` within each given-label class rather than globally.
    budget_flagged: with ``balanced``, the labelled share of the class the filter flagged, kept
        fixed over the rounds (None: the same as every class). Its non-suspects hold the
        poisoned samples the filter missed, and the lowest-CE ranking reaches them first as the
        budget grows.
    lr: Adam learning rate (DBD's 2e-3).
    schedule: ``cosine`` (per epoch, over all semi epochs, to 0) or ``constant`` (DBD).
    mixmatch: MixMatch settings; ``epochs`` counts all rounds, ``rampup_length`` is in these
        epochs.
    """

    enabled: bool = True
    rounds: int = 4
    budget: float = 0.5
    budget_final: float | None = 0.9
    balanced: bool = True
    budget_flagged: float | None = 0.5
    lr: float = 0.002
    schedule: str = "cosine"
    mixmatch: MixMatchCfg = field(default_factory=lambda: MixMatchCfg(
        epochs=40, iters_per_epoch=1024, rampup_length=40,
        augment=AugmentCfg(crop_pad=4, pad_mode="reflect", flip=None)))


@dataclass(frozen=True)
class DLPParams:
    """Every value is ours (no official code); see the module docstring."""

    supervised: TrainCfg = field(default_factory=lambda: TrainCfg(
        epochs=10, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="cosine", augment=AugmentCfg(crop_pad=4, flip=None)))
    filter: FilterCfg = field(default_factory=FilterCfg)
    unlearn: UnlearnCfg = field(default_factory=UnlearnCfg)
    semi: SemiCfg = field(default_factory=SemiCfg)


def _check(p: DLPParams) -> None:
    if p.filter.mode not in ("dominant_class", "global"):
        raise ConfigError(f"dlp filter.mode must be dominant_class or global, got "
                          f"'{p.filter.mode}'")
    if not 0 < p.filter.ratio < 1:
        raise ConfigError(f"dlp filter.ratio must be in (0, 1), got {p.filter.ratio}")
    for b in (p.semi.budget, p.semi.budget_final, p.semi.budget_flagged):
        if b is not None and not 0 < b < 1:
            raise ConfigError(f"dlp semi.budget, budget_final and budget_flagged must be in "
                              f"(0, 1), got {b}")
    if p.semi.rounds < 1 or p.semi.rounds > max(p.semi.mixmatch.epochs, 1):
        raise ConfigError(f"dlp semi.rounds must be in [1, semi.mixmatch.epochs], got "
                          f"{p.semi.rounds}")
    if p.semi.schedule not in ("cosine", "constant"):
        raise ConfigError(f"dlp semi.schedule must be cosine or constant, got "
                          f"'{p.semi.schedule}'")
    if p.filter.from_epoch is not None and p.filter.from_epoch < 1:
        raise ConfigError(f"dlp filter.from_epoch must be >= 1 (a supervised epoch) or null, got "
                          f"{p.filter.from_epoch}")
    if not -2 < p.filter.expand_margin < 2:
        raise ConfigError(f"dlp filter.expand_margin must be in (-2, 2) (a cosine difference), "
                          f"got {p.filter.expand_margin}")
    f = p.filter
    if (f.late_k < 1 or f.late_early < 1 or not 0 < f.late_rise < 1
            or not 0 < f.late_min_share < 1):
        raise ConfigError(f"dlp filter.late_k and late_early must be >= 1, late_rise and "
                          f"late_min_share in (0, 1), got {f.late_k}, {f.late_early}, "
                          f"{f.late_rise}, {f.late_min_share}")
    if not 0 < f.disowned_agree <= 1 or not 0 < f.disowned_min_share < 1:
        raise ConfigError(f"dlp filter.disowned_agree must be in (0, 1] and disowned_min_share "
                          f"in (0, 1), got {f.disowned_agree}, {f.disowned_min_share}")
    if not 0 < p.unlearn.clean_ratio <= 1:
        raise ConfigError(f"dlp unlearn.clean_ratio must be in (0, 1], got "
                          f"{p.unlearn.clean_ratio}")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eng: Engine, norm: bool
              ) -> float:
    return (predict(model, x, eng, normalize=norm).argmax(1) == y).float().mean().item()


def _cycle(idx: torch.Tensor, size: int, gen: torch.Generator):
    while True:  # shuffled batches of ``idx``, restarted whenever they run out
        for b in batches(len(idx), size, gen):
            yield idx[b]


def active_unlearn(model: nn.Module, data: ImageSet, suspects: torch.Tensor, cfg: UnlearnCfg,
                   eng: Engine, gen: torch.Generator, norm: bool) -> dict[str, float]:
    """Ascend on the suspects (given labels), descend on confident clean samples, until the
    suspects' accuracy is ≤ ``stop_acc``. Returns steps taken and the accuracy before/after."""
    sx, sy = data.x[suspects], data.y[suspects]
    acc0 = acc = _accuracy(model, sx, sy, eng, norm)
    losses = per_sample_loss(model, data.x, data.y, eng, normalize=norm)
    pool = ~suspects & ~torch.isin(data.y, sy.unique())
    pool_idx = pool.nonzero()[:, 0]
    clean_idx = pool_idx[torch.argsort(losses[pool_idx], stable=True)
                         [: max(int(cfg.clean_ratio * len(pool_idx)), 1)]]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps = 0
    clean_batches = _cycle(clean_idx, cfg.batch_size, gen)
    for _ in range(cfg.max_epochs):
        if acc <= cfg.stop_acc:
            break
        for idx in batches(len(sx), cfg.batch_size, gen):
            model.train()
            with eng.autocast():
                loss = -F.cross_entropy(model(eng.prep(sx[idx], norm)).float(), sy[idx])
                if cfg.descend and len(clean_idx):
                    jdx = next(clean_batches)
                    loss = loss + F.cross_entropy(
                        model(eng.prep(data.x[jdx], norm)).float(), data.y[jdx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            acc = _accuracy(model, sx, sy, eng, norm)
            if acc <= cfg.stop_acc:
                break
    return {"unlearn_steps": float(steps), "unlearn_suspect_acc_before": acc0,
            "unlearn_suspect_acc_after": acc}


def select_labelled(model: nn.Module, data: ImageSet, exclude: torch.Tensor, budget: float,
                    eng: Engine, norm: bool, balanced: bool = True,
                    class_budget: dict[int, float] | None = None) -> torch.Tensor:
    """Bool mask ``[N]``: the ``budget`` share of the samples outside ``exclude`` with the lowest
    CE of their given label under ``model`` (eval, un-augmented). ``balanced``: that share of
    every given-label class (a global cut keeps the easy classes and starves the hard ones);
    ``class_budget`` overrides the share of single classes."""
    losses = per_sample_loss(model, data.x, data.y, eng, normalize=norm)
    losses[exclude] = math.inf
    mask = torch.zeros_like(exclude)
    class_budget = class_budget or {}
    groups = ([(data.y == c, class_budget.get(c, budget)) for c in range(data.num_classes)]
              if balanced else [(torch.ones_like(exclude), budget)])
    for g, share in groups:
        idx = (g & ~exclude).nonzero()[:, 0]
        n = int(share * len(idx))
        mask[idx[torch.argsort(losses[idx], stable=True)[:n]]] = True
    return mask


def _budget(cfg: SemiCfg, r: int) -> float:
    """Labelled share in round ``r`` (0-based)."""
    if cfg.budget_final is None or cfg.rounds == 1:
        return cfg.budget
    return cfg.budget + (cfg.budget_final - cfg.budget) * r / (cfg.rounds - 1)


@dataclass
class SupervisedTrace:
    """What the filter reads of supervised training: ``logh``, the log10 entropy of every sample
    after each epoch from ``filter.from_epoch``; ``feats``, the features after the epochs up to
    ``filter.late_early`` and after the last, kept only when a k-NN filter (``knn_on``) may run."""

    logh: list[torch.Tensor] = field(default_factory=list)
    feats: dict[int, torch.Tensor] = field(default_factory=dict)
    knn_on: bool = False


def _log_entropy(model: nn.Module, data: ImageSet, eng: Engine, norm: bool, floor: float
                 ) -> torch.Tensor:
    return predictive_entropy(predict(model, data.x, eng, normalize=norm)).clamp_min(floor).log10()


def supervised_stage(model: nn.Module, data: ImageSet, p: DLPParams, eng: Engine,
                     gen: torch.Generator, norm: bool) -> tuple[SupervisedTrace, dict[str, float]]:
    """Stage 1: cross-entropy training on every sample, recording what the filter needs after
    each epoch. Returns that record and ``supervised_acc`` (none with 0 epochs)."""
    f, epochs = p.filter, p.supervised.epochs
    trace = SupervisedTrace(knn_on=(f.late or f.disowned) and f.enabled
                            and f.mode == "dominant_class" and epochs > f.late_early)
    if (f.late or f.disowned) and 0 < epochs <= f.late_early:
        log.warning("dlp filter.late/disowned are off: they need more supervised epochs (%d) "
                    "than filter.late_early (%d)", epochs, f.late_early)

    def record(epoch: int) -> None:
        if f.from_epoch is not None and epoch >= f.from_epoch:
            trace.logh.append(_log_entropy(model, data, eng, norm, f.floor))
        if trace.knn_on and (epoch <= f.late_early or epoch == epochs):
            trace.feats[epoch] = predict(model, data.x, eng, normalize=norm, features=True)

    if epochs == 0:
        return trace, {}
    hist = fit(model, data.x, data.y, p.supervised, eng, gen, hflip=data.hflip,
               desc="dlp supervised", on_epoch=record)
    return trace, {"supervised_acc": hist[-1]["acc"]}


def filter_stage(model: nn.Module, data: ImageSet, p: DLPParams, trace: SupervisedTrace,
                 eng: Engine, norm: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Stage 2: the entropy filter, else the k-NN filters, then the expansion. Returns the
    suspect masks (``entropy``, ``filter``, and ``late``/``disowned`` where those ran) and what
    was found."""
    f, extra = p.filter, {}
    logh = trace.logh or [_log_entropy(model, data, eng, norm, f.floor)]  # last or untrained
    entropy = 10 ** torch.stack(logh).mean(0)
    extra["filter_epochs"] = float(len(logh))
    suspects, info = entropy_filter(entropy, data.y, data.num_classes, f,
                                    last=10 ** logh[-1] if len(logh) > 1 else None)
    cuts = {}
    if trace.knn_on and info["filter_class"] < 0:  # no fast-learned class: a late-learned one?
        cuts, knn_info = knn_filters(trace.feats, data.y, data.num_classes, f,
                                     p.supervised.epochs)
        info |= knn_info
        suspects = cuts.get("disowned", cuts.get("late"))
    if not f.enabled:  # computed for the log, but nothing is flagged
        suspects = torch.zeros_like(suspects)
        info["filter_class"] = -1.0
    cut = suspects
    if f.expand and suspects.any():
        feats = trace.feats.get(p.supervised.epochs)  # the k-NN filters kept the last epoch's
        if feats is None:
            feats = predict(model, data.x, eng, normalize=norm, features=True)
        suspects = expand_suspects(feats, data.y, suspects, f.expand_margin)
        extra["n_expanded"] = float((suspects & ~cut).sum())
    extra |= info | {"n_filtered": float(suspects.sum())}
    log.info("dlp filter: %d suspects (class %d, separability %.3f%s)", int(suspects.sum()),
             int(info.get("filter_class", -1)), info.get("filter_separability", math.nan),
             (f", learned late: share {info['late_share']:.3f}" if "late" in cuts else "")
             + (f", disowned early: share {info['disowned_share']:.3f}" if "disowned" in cuts
                else ""))
    masks = {"entropy": torch.zeros_like(cut) if cuts else cut, "filter": suspects} | cuts
    return masks, extra


def semi_stage(model: nn.Module, data: ImageSet, suspects: torch.Tensor, flagged: int,
               cfg: SemiCfg, eng: Engine, ctx: DefenseContext, norm: bool
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Stage 4: MixMatch in ``cfg.rounds`` rounds, the labelled set re-selected before each
    (``flagged``: the filter's class, −1 if none). Returns the unlabelled set of each round
    (``semi_r<k>`` with several rounds) and of the last (``semi``), and the per-epoch stats."""
    mm, masks, extra = cfg.mixmatch, {}, {}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = TrainCfg(epochs=mm.epochs, schedule=cfg.schedule)  # per-epoch lr factor
    gen = ctx.gen("semi")
    starts = [math.floor(r * mm.epochs / cfg.rounds) for r in range(cfg.rounds)]
    labelled = None
    fixed = ({flagged: cfg.budget_flagged}
             if cfg.budget_flagged is not None and flagged >= 0 and suspects.any() else None)
    for epoch in range(mm.epochs):
        if epoch in starts:
            r = starts.index(epoch)
            with ctx.stage("select"):
                new = select_labelled(model, data, suspects, _budget(cfg, r), eng, norm,
                                      cfg.balanced, fixed)
            if labelled is not None:
                extra[f"semi_turnover_r{r + 1}"] = ((new & ~labelled).sum() / new.sum()).item()
            labelled = new
            extra[f"semi_n_labelled_r{r + 1}"] = float(new.sum())
            if cfg.rounds > 1:
                masks[f"semi_r{r + 1}"] = ~new  # scored per round (kept_poison)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(schedule, epoch)
        with ctx.stage("semi"):
            stats = mixmatch_epoch(model, opt, data.x, data.y, labelled, data.num_classes, mm,
                                   eng, gen, hflip=data.hflip, epoch=epoch, normalize=norm,
                                   desc=f"dlp semi {epoch + 1}/{mm.epochs}")
        extra |= {f"semi_{k}_ep{epoch + 1}": v for k, v in stats.items()}
        log.info("dlp semi epoch %d/%d round %d lx %.4f lu %.4f lambda_u %.2f", epoch + 1,
                 mm.epochs, r + 1, stats["lx"], stats["lu"], stats["lambda_u"])
    masks["semi"] = ~labelled
    return masks, extra


@DEFENSES.register("dlp", DLPParams, check=_check)
def dlp(data: ImageSet, p: DLPParams, ctx: DefenseContext) -> DefenseResult:
    _check(p)
    # every inference pass of the defense (entropy, features, losses, accuracy) in batches of
    # supervised.eval_batch_size, as DBD uses its linear.eval_batch_size
    eng = copy.copy(ctx.engine)
    eng.eval_batch_size = p.supervised.eval_batch_size
    norm = p.supervised.normalize
    model = eng.place(ctx.make_model())

    with ctx.stage("supervised"):
        trace, extra = supervised_stage(model, data, p, eng, ctx.gen("supervised"), norm)
    with ctx.stage("filter"):
        out, found = filter_stage(model, data, p, trace, eng, norm)
    extra |= found
    suspects = out["filter"]
    if p.unlearn.enabled and suspects.any():
        with ctx.stage("unlearn"):
            extra |= active_unlearn(model, data, suspects, p.unlearn, eng, ctx.gen("unlearn"),
                                    norm)
        log.info("dlp unlearn: %d steps, suspects' accuracy %.3f -> %.3f",
                 int(extra["unlearn_steps"]), extra["unlearn_suspect_acc_before"],
                 extra["unlearn_suspect_acc_after"])
    if p.semi.enabled and p.semi.mixmatch.epochs > 0:
        masks, stats = semi_stage(model, data, suspects, int(extra.get("filter_class", -1)),
                                  p.semi, eng, ctx, norm)
        out |= masks
        extra |= stats
    return DefenseResult(model, suspects=out, extra=extra, normalize=norm, headline="filter")
