"""Metric definitions (one place, unit-tested). All metrics are fractions in [0, 1].

- BA: top-1 accuracy on the full clean test set.
- BA_nt: top-1 accuracy on the clean test images outside the attack's target class (all-to-one
  and clean-label attacks); the "clean accuracy" of ABL's code, whose test loader skips the
  target class. Nothing is excluded for all-to-all or without attack (BA_nt = BA).
- ASR: fraction of the triggered test set predicted as the attack target (all-to-one: only
  samples whose true label ≠ target, as BackdoorBench and the ABL/DBD repos do).
- RA: accuracy w.r.t. the true labels on the same triggered samples.
- Isolation precision/recall: of the samples a defense flags, against ``kind == 1`` (poisoned).
  Cover samples (``kind == 2``) count as not poisoned.
- DER: [max(0, ΔASR) − max(0, ΔBA) + 1] / 2 against the undefended run.
"""

from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y``; NaN for an empty set."""
    if len(y) == 0:
        return math.nan
    return (pred.cpu() == y.cpu()).sum().item() / len(y)


def class_accuracies(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy of each class ``0..num_classes-1`` (NaN for a class without test images)."""
    pred, y = pred.cpu(), y.cpu()
    return [accuracy(pred[y == c], y[y == c]) for c in range(num_classes)]


def non_target_accuracy(pred: torch.Tensor, y: torch.Tensor, target: int | None) -> float:
    """BA_nt: accuracy on the samples whose label is not ``target`` (all of them when None)."""
    if target is None:
        return accuracy(pred, y)
    keep = y.cpu() != target
    return accuracy(pred.cpu()[keep], y.cpu()[keep])


def attack_success_rate(pred: torch.Tensor, target: torch.Tensor) -> float:
    return accuracy(pred, target)


def robust_accuracy(pred: torch.Tensor, y_true: torch.Tensor) -> float:
    return accuracy(pred, y_true)


def isolation_quality(suspect: torch.Tensor, kind: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of a boolean suspect mask against ``kind == 1``.

    Precision is NaN when nothing is flagged; recall is NaN when nothing is poisoned.
    """
    suspect = suspect.cpu().bool()
    poisoned = kind.cpu() == 1
    tp = (suspect & poisoned).sum().item()
    n_flag, n_pois = suspect.sum().item(), poisoned.sum().item()
    precision = tp / n_flag if n_flag else math.nan
    recall = tp / n_pois if n_pois else math.nan
    return precision, recall


def kept_poison_fraction(suspect: torch.Tensor, kind: torch.Tensor) -> float:
    """Share of poisoned samples (``kind == 1``) among those *not* flagged: the poison a defense
    keeps training on as clean (DBD's labelled set, ABL's retained set). NaN when all are
    flagged."""
    kept = ~suspect.cpu().bool()
    n_kept = kept.sum().item()
    return (kept & (kind.cpu() == 1)).sum().item() / n_kept if n_kept else math.nan


def der(ba_none: float, asr_none: float, ba_def: float, asr_def: float) -> float:
    """Defense effectiveness rate (BackdoorBench's corrected "simplied" variant)."""
    return (max(0.0, asr_none - asr_def) - max(0.0, ba_none - ba_def) + 1) / 2
