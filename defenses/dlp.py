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
- ``filter.mode: dominant_class`` (default): the backdoor has one target, so the filter looks for
  the class whose samples split most cleanly into a near-zero-entropy cluster and the rest —
  Otsu's two-cluster split of log10 entropy within each given-label class; the most separable
  class, if its separability reaches ``min_separability``, contributes its low cluster (at most
  ``ratio``·N samples, lowest entropy first). Otherwise the late filter (below) decides, then
  the disowned filter, and if neither finds a class, there are no suspects and unlearning is
  skipped.
  Why: on Fashion-MNIST whole clean classes (trousers, bags) are predicted with lower entropy than
  poisoned samples, so a global lowest-entropy cut picks clean samples (``mode: global`` keeps
  it: the lowest ``ratio``·N overall).
- ``filter.from_epoch: 2``: the entropy is averaged (in log space) over the supervised epochs
  from the second, not read after the last one only, to choose the class; its suspects are the
  samples in the low cluster of the average or of the last epoch's entropy. Why: one checkpoint
  is noisy — at BadNets seed 1 the target class's separability after the last epoch (0.728) was
  no higher than a clean class's in a run without attack (0.733), while the average over epochs
  2–8 gave 0.786 against at most 0.747 for any clean class (seeds 0–2 of BadNets and Blended,
  seeds 0–1 without attack, the ``dlp_fashion_mnist`` preset). The union of the two low clusters
  kept precision ≥ 0.99 and raised recall (Blended seed 2: 0.89 average only, 0.93 last only,
  0.94 both).
- ``filter.expand: true``: the entropy cut's recall is bounded (0.83–0.94 on BadNets/Blended),
  because some poisoned samples' entropy overlaps the clean ones', and the ones it misses come
  back: at Blended seeds 1 and 2, 19 and 32 of them were in MixMatch's first labelled set and ASR
  ended at 0.111 and 0.121. In the supervised model's feature space (``model.features``, before
  unlearning) they still side with the samples the cut caught — the backdoor's shared feature
  that activation clustering (Chen et al., 2018) separates — so every other sample of the
  flagged class that is nearer (cosine) to the suspects' mean direction than to the rest of the
  class's is flagged too. Measured on those runs' supervised models: 62 of 62 missed at Blended
  seed 2 with 2 clean samples, 77 of 79 at seed 1 with 1, BadNets seed 0 115 of 167 with 4;
  k-nearest-neighbour votes (k 5–50) found 29–71% of the missed samples.
- ``filter.late: true``: a backdoor can also be learned *late*, as WaNet's warp is: after 8
  supervised epochs its poisoned samples are no lower in entropy than the clean ones (median
  log10 entropy −0.64 against −0.34 for clean target-class samples, no class separable at
  seeds 0–2). But early on the model sees their content, not the trigger: in its features
  (``model.features``) after epochs 1–2 a poisoned sample's k = 20 nearest neighbours carry
  its true class, so few share its given label; after the last epoch the warp has pulled it
  next to the other poisoned samples, which do. So when no class is separable in entropy,
  each sample's rise in k-NN label agreement (last epoch minus the mean of epochs 1 to
  ``late_early``) is computed, and the class with the largest share of samples rising by more
  than ``late_rise`` contributes them, if that share reaches ``late_min_share``; they are
  expanded and unlearned like the entropy cut's. Measured on the preset's supervised models
  (seed 0 unless stated, bf16 on an AMX CPU): WaNet's target class 0.231 / 0.389 / 0.423 at
  seeds 0 / 1 / 2, precision 0.99, recall 0.46–0.84 (0.71–0.92 with the expansion). It needs
  the warp learned by the last supervised epoch: with oneDNN capped at AVX512_CORE_BF16 (other
  bf16 numerics) seed 2 gives 0.405 but seed 0 only 0.056, with 32% of the poisoned samples
  predicted as the target after epoch 8 (91% at seed 2), and the late filter flags nothing
  (the disowned filter, below, does). The largest
  share of a clean class, in these runs and in BadNets, Blended, BPP, Adaptive-Blend, LF
  (seed 1) and three runs without attack: 0.092 (Input-aware's target class: 0.095 at
  precision 0.98, too weak to flag). Clean samples the model memorises one by one do not move
  together.
- ``filter.disowned: true``: where the backdoor is not learned by the last supervised epoch
  either, its poisoned samples still carry a wrong label: early on (mean over epochs 1 to
  ``late_early``) at least ``disowned_agree`` of their k nearest neighbours carry *one* other
  label, their true class. A clean class has such samples too (shirts among T-shirts), but
  fewer. So when neither filter above flags a class, the class with the largest share of
  disowned samples contributes them, if that share reaches ``disowned_min_share``. Measured on
  the preset's supervised models: WaNet's target class 0.217 / 0.168 / 0.124 at seeds 0 / 1 /
  2 on an AMX CPU, and 0.220 at seed 0 with oneDNN capped at AVX512_CORE_BF16, where the late
  filter's share is only 0.056 (the cut's precision 0.96–0.98); BPP's 0.266–0.271 at seeds
  0–2; Input-aware's 0.142 at seed 2 (0.036 at seed 0); a clean class at most 0.085 (the shirt
  class, in every run) over 18 supervised runs: WaNet at seeds 0–2 and, capped, 0 and 2;
  BadNets, Blended, BPP and SIG at seed 0; LF at seed 1; Adaptive-Blend at seeds 0–2;
  Input-aware at seeds 0 and 2; three runs without attack. The margin below is thin (WaNet
  seed 2: 0.124, which the late filter flags first).
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
from defenses.mixmatch import MixMatchCfg, mixmatch_epoch
from defenses.selection import knn_label_shares, lowest_fraction, otsu, predictive_entropy

log = logging.getLogger("bench")


@dataclass(frozen=True)
class FilterCfg:
    """Args:
    enabled: run the filter (ablation switch; off: no suspects, so no unlearning and no
        exclusion from the labelled set).
    mode: ``dominant_class`` (most separable class, see the module docstring) or ``global``.
    ratio: ``global``: the suspected fraction of N; ``dominant_class``: the cap on it.
    min_separability: ``dominant_class``: least Otsu separability (between-cluster share of the
        variance of log10 entropy) for a class to be flagged at all.
    floor: entropies are clamped to at least this before the log.
    from_epoch: the class is chosen on the geometric mean (mean of log10) of each sample's
        entropy after every supervised epoch from this one (1-based) to the last: the backdoor
        is learned fast, so its samples are confident early and throughout, where easy clean
        samples become confident later. That class's suspects are its low cluster of the mean
        or of the last epoch's entropy. None: the last epoch's entropy only.
    expand: also flag the flagged class's other samples whose supervised-model features lie
        nearer the suspects' mean direction than the rest of the class's (cosine, margin
        ``expand_margin``): the entropy cut misses poisoned samples whose entropy overlaps the
        clean ones, but they share the trigger's features with the samples it caught.
    expand_margin: a sample is added when ``cos(z, suspects) − cos(z, rest) > expand_margin``.
    late: when no class is separable in entropy, look for a backdoor learned late instead: the
        share of a class's samples whose k-nearest-neighbour label agreement in the
        supervised model's features rose by more than ``late_rise`` from the first
        ``late_early`` epochs to the last (see the module docstring). Needs more supervised
        epochs than ``late_early`` and ``mode: dominant_class``; otherwise it stays off.
    late_k: neighbours for the label agreement.
    late_early: the early agreement is the mean over supervised epochs 1 to this.
    late_rise: least rise of a sample's agreement for it to count as learned late.
    late_min_share: least share of a class's samples learned late for the class to be flagged.
    disowned: when neither the entropy nor the late filter flags a class, flag the class with
        the largest share of samples whose neighbours early in supervised training (the
        ``late_k`` nearest, mean over epochs 1 to ``late_early``) carry one other label: a
        dirty-label backdoor not yet learned by the last epoch still sits among its images'
        true classes early on. Needs what ``late`` needs.
    disowned_agree: least share of a sample's early neighbours carrying one other label for
        the sample to count as disowned.
    disowned_min_share: least share of a class's samples disowned for the class to be flagged.
    """

    enabled: bool = True
    mode: str = "dominant_class"
    ratio: float = 0.2
    min_separability: float = 0.78
    floor: float = 1e-8
    from_epoch: int | None = 2
    expand: bool = True
    expand_margin: float = 0.0
    late: bool = True
    late_k: int = 20
    late_early: int = 2
    late_rise: float = 0.5
    late_min_share: float = 0.15
    disowned: bool = True
    disowned_agree: float = 0.8
    disowned_min_share: float = 0.12


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


def entropy_filter(entropy: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: FilterCfg,
                   last: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Suspect mask ``[N]`` from per-sample entropies and the given labels, and what was found
    (``filter_class``: the flagged class or −1, ``filter_separability``). ``entropy`` chooses
    the class and orders the cap; with ``last`` (the last epoch's entropies, when ``entropy``
    averages several), a sample of that class is a candidate if it falls in the low cluster of
    either."""
    n = len(entropy)
    cap = int(cfg.ratio * n)
    if cfg.mode == "global":
        return lowest_fraction(entropy, cfg.ratio), {}
    logh = entropy.clamp_min(cfg.floor).log10()
    best, best_sep, best_cut = -1, -math.inf, 0.0
    for c in range(num_classes):
        members = logh[y == c]
        if len(members) < 2:
            continue
        cut, sep = otsu(members)
        if sep > best_sep:
            best, best_sep, best_cut = c, sep, cut
    mask = torch.zeros(n, dtype=torch.bool, device=entropy.device)
    info = {"filter_class": float(best), "filter_separability": best_sep}
    if best < 0 or best_sep < cfg.min_separability:
        info["filter_class"] = -1.0
        return mask, info
    low = logh <= best_cut
    if last is not None:
        last_logh = last.clamp_min(cfg.floor).log10()
        low |= last_logh <= otsu(last_logh[y == best])[0]
    cand = ((y == best) & low).nonzero()[:, 0]
    keep = cand[torch.argsort(entropy[cand], stable=True)[:cap]]
    mask[keep] = True
    return mask, info


def _flag_class(marked: torch.Tensor, score: torch.Tensor, y: torch.Tensor, num_classes: int,
                min_share: float, cap: int, name: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The class with the largest share of ``marked`` samples (a tie goes to the lowest class
    index) contributes its marked samples, highest ``score`` first, at most ``cap``, if that
    share reaches ``min_share``. Returns the mask and ``<name>_class`` (−1 if none) and
    ``<name>_share``."""
    share = torch.stack([marked[y == c].float().mean() if (y == c).any()
                         else score.new_zeros(()) for c in range(num_classes)])
    best = int(share.argmax())
    info = {f"{name}_class": float(best), f"{name}_share": share[best].item()}
    mask = torch.zeros_like(marked)
    if info[f"{name}_share"] < min_share:
        info[f"{name}_class"] = -1.0
        return mask, info
    cand = (marked & (y == best)).nonzero()[:, 0]
    mask[cand[torch.argsort(-score[cand], stable=True)[:cap]]] = True
    return mask, info


def late_filter(early: torch.Tensor, last: torch.Tensor, y: torch.Tensor, num_classes: int,
                cfg: FilterCfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Suspect mask ``[N]`` from each sample's label agreement early in supervised training
    and after its last epoch (``knn_label_agreement``, the own-label column of
    ``knn_label_shares``): the class with the largest share of
    samples whose agreement rose by more than ``late_rise`` contributes those samples, if that
    share reaches ``late_min_share``, at most ``ratio``·N of them, largest rise first. Returns
    the mask and ``late_class`` (−1 if none) and ``late_share``."""
    rise = last - early
    return _flag_class(rise > cfg.late_rise, rise, y, num_classes, cfg.late_min_share,
                       int(cfg.ratio * len(y)), "late")


def disowned_filter(early: torch.Tensor, y: torch.Tensor, cfg: FilterCfg
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Suspect mask ``[N]`` from each sample's neighbour label shares early in supervised
    training (``knn_label_shares``, ``[N, K]``): a sample is disowned when at least
    ``disowned_agree`` of its neighbours carry one label other than its own; the class with the
    largest share of disowned samples contributes them, if that share reaches
    ``disowned_min_share``, at most ``ratio``·N of them, most disowned first. Returns the mask
    and ``disowned_class`` (−1 if none) and ``disowned_share``."""
    other = early.scatter(1, y[:, None], -1.0).max(1).values
    return _flag_class(other >= cfg.disowned_agree, other, y, early.shape[1],
                       cfg.disowned_min_share, int(cfg.ratio * len(y)), "disowned")


def expand_suspects(feats: torch.Tensor, y: torch.Tensor, suspects: torch.Tensor,
                    margin: float = 0.0) -> torch.Tensor:
    """``suspects`` plus the samples of the suspects' label class (their most common one, should
    ``mode: global`` flag several) that are nearer, in cosine, to the suspects' mean direction
    than to the mean direction of the class's non-suspects, by more than ``margin``. Returns a
    new mask."""
    out = suspects.clone()
    if not suspects.any():
        return out
    c = int(y[suspects].mode().values)
    rest = (y == c) & ~suspects
    if not rest.any():
        return out
    z = F.normalize(feats, dim=1)
    to_sus = F.normalize(z[suspects].mean(0), dim=0)
    to_rest = F.normalize(z[rest].mean(0), dim=0)
    idx = rest.nonzero()[:, 0]
    out[idx[(z[idx] @ to_sus - z[idx] @ to_rest) > margin]] = True
    return out


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


@DEFENSES.register("dlp", DLPParams, check=_check)
def dlp(data: ImageSet, p: DLPParams, ctx: DefenseContext) -> DefenseResult:
    _check(p)
    # every inference pass of the defense (entropy, features, losses, accuracy) in batches of
    # supervised.eval_batch_size, as DBD uses its linear.eval_batch_size
    eng, extra = copy.copy(ctx.engine), {}
    eng.eval_batch_size = p.supervised.eval_batch_size
    norm = p.supervised.normalize
    model = eng.place(ctx.make_model())

    def log_entropy() -> torch.Tensor:
        h = predictive_entropy(predict(model, data.x, eng, normalize=norm))
        return h.clamp_min(p.filter.floor).log10()

    logh: list[torch.Tensor] = []  # log10 entropy after each epoch from filter.from_epoch
    feats_at: dict[int, torch.Tensor] = {}  # features after the early epochs and the last
    knn_on = ((p.filter.late or p.filter.disowned) and p.filter.enabled
              and p.filter.mode == "dominant_class" and p.supervised.epochs > p.filter.late_early)
    if (p.filter.late or p.filter.disowned) and 0 < p.supervised.epochs <= p.filter.late_early:
        log.warning("dlp filter.late/disowned are off: they need more supervised epochs (%d) "
                    "than filter.late_early (%d)", p.supervised.epochs, p.filter.late_early)

    def record(epoch: int) -> None:
        if p.filter.from_epoch is not None and epoch >= p.filter.from_epoch:
            logh.append(log_entropy())
        if knn_on and (epoch <= p.filter.late_early or epoch == p.supervised.epochs):
            feats_at[epoch] = predict(model, data.x, eng, normalize=norm, features=True)

    with ctx.stage("supervised"):
        if p.supervised.epochs > 0:
            hist = fit(model, data.x, data.y, p.supervised, eng, ctx.gen("supervised"),
                       hflip=data.hflip, desc="dlp supervised", on_epoch=record)
            extra["supervised_acc"] = hist[-1]["acc"]

    with ctx.stage("filter"):
        logh = logh or [log_entropy()]  # the last epoch's (or the untrained model's) only
        entropy = 10 ** torch.stack(logh).mean(0)
        extra["filter_epochs"] = float(len(logh))
        suspects, info = entropy_filter(entropy, data.y, data.num_classes, p.filter,
                                        last=10 ** logh[-1] if len(logh) > 1 else None)
        by_late = by_disowned = None
        if knn_on and info["filter_class"] < 0:  # no fast-learned class: a late-learned one?
            shares = {e: knn_label_shares(f, data.y, data.num_classes, p.filter.late_k)
                      for e, f in feats_at.items()
                      if p.filter.late or e <= p.filter.late_early}  # disowned: early only
            agree = {e: s.gather(1, data.y[:, None])[:, 0] for e, s in shares.items()}
            early_epochs = range(1, p.filter.late_early + 1)
            if p.filter.late:
                early = torch.stack([agree[e] for e in early_epochs]).mean(0)
                by_late, late_info = late_filter(early, agree[p.supervised.epochs], data.y,
                                                 data.num_classes, p.filter)
                info |= late_info | {"filter_class": late_info["late_class"]}
                suspects = by_late
            if p.filter.disowned and info["filter_class"] < 0:  # or one not learned yet?
                early = torch.stack([shares[e] for e in early_epochs]).mean(0)
                by_disowned, own_info = disowned_filter(early, data.y, p.filter)
                info |= own_info | {"filter_class": own_info["disowned_class"]}
                suspects = by_disowned
        if not p.filter.enabled:  # computed for the log, but nothing is flagged
            suspects = torch.zeros_like(suspects)
            info["filter_class"] = -1.0
        cut = suspects
        by_entropy = cut if by_late is None and by_disowned is None else torch.zeros_like(cut)
        if p.filter.expand and suspects.any():
            feats = feats_at.get(p.supervised.epochs)  # the k-NN filters kept the last epoch's
            if feats is None:
                feats = predict(model, data.x, eng, normalize=norm, features=True)
            suspects = expand_suspects(feats, data.y, suspects, p.filter.expand_margin)
            extra["n_expanded"] = float((suspects & ~cut).sum())
        extra |= info | {"n_filtered": float(suspects.sum())}
        log.info("dlp filter: %d suspects (class %d, separability %.3f%s)", int(suspects.sum()),
                 int(info.get("filter_class", -1)), info.get("filter_separability", math.nan),
                 (f", learned late: share {info['late_share']:.3f}" if by_late is not None
                  else "")
                 + (f", disowned early: share {info['disowned_share']:.3f}"
                    if by_disowned is not None else ""))

    if p.unlearn.enabled and suspects.any():
        with ctx.stage("unlearn"):
            extra |= active_unlearn(model, data, suspects, p.unlearn, eng, ctx.gen("unlearn"),
                                    norm)
        log.info("dlp unlearn: %d steps, suspects' accuracy %.3f -> %.3f",
                 int(extra["unlearn_steps"]), extra["unlearn_suspect_acc_before"],
                 extra["unlearn_suspect_acc_after"])

    out = {"entropy": by_entropy, "filter": suspects}
    if by_late is not None:
        out["late"] = by_late
    if by_disowned is not None:
        out["disowned"] = by_disowned
    mm = p.semi.mixmatch
    if p.semi.enabled and mm.epochs > 0:
        opt = torch.optim.Adam(model.parameters(), lr=p.semi.lr)
        schedule = TrainCfg(epochs=mm.epochs, schedule=p.semi.schedule)  # per-epoch lr factor
        gen = ctx.gen("semi")
        starts = [math.floor(r * mm.epochs / p.semi.rounds) for r in range(p.semi.rounds)]
        labelled, flagged = None, int(extra.get("filter_class", -1))
        fixed = ({flagged: p.semi.budget_flagged}
                 if p.semi.budget_flagged is not None and flagged >= 0 and suspects.any()
                 else None)
        for epoch in range(mm.epochs):
            if epoch in starts:
                r = starts.index(epoch)
                with ctx.stage("select"):
                    new = select_labelled(model, data, suspects, _budget(p.semi, r), eng,
                                          norm, p.semi.balanced, fixed)
                if labelled is not None:
                    extra[f"semi_turnover_r{r + 1}"] = ((new & ~labelled).sum()
                                                        / new.sum()).item()
                labelled = new
                extra[f"semi_n_labelled_r{r + 1}"] = float(new.sum())
                if p.semi.rounds > 1:
                    out[f"semi_r{r + 1}"] = ~new  # scored per round (kept_poison)
            for g in opt.param_groups:
                g["lr"] = p.semi.lr * lr_factor(schedule, epoch)
            with ctx.stage("semi"):
                stats = mixmatch_epoch(model, opt, data.x, data.y, labelled, data.num_classes,
                                       mm, eng, gen, hflip=data.hflip, epoch=epoch,
                                       normalize=norm,
                                       desc=f"dlp semi {epoch + 1}/{mm.epochs}")
            extra |= {f"semi_{k}_ep{epoch + 1}": v for k, v in stats.items()}
            log.info("dlp semi epoch %d/%d round %d lx %.4f lu %.4f lambda_u %.2f", epoch + 1,
                     mm.epochs, r + 1, stats["lx"], stats["lu"], stats["lambda_u"])
        out["semi"] = ~labelled
    return DefenseResult(model, suspects=out, extra=extra, normalize=norm, headline="filter")
