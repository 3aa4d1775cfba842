"""Losses shared by the defenses: ABL's local gradient ascent (two forms), symmetric CE (DBD).

Shapes: ``logits`` float ``[B, K]``, ``y`` int64 ``[B]``; every loss returns a scalar.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flooding(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's official default (``gradient_ascent_type='Flooding'``): ``|ℓ̄ − γ| + γ`` on the
    batch-mean CE ℓ̄. Its gradient is ``sign(ℓ̄ − γ)·∇ℓ̄``: descent above γ, ascent below."""
    loss = F.cross_entropy(logits, y)
    return (loss - gamma).abs() + gamma


def lga(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """The ABL paper's local gradient ascent, per sample: ``mean_i sign(ℓ_i − γ)·ℓ_i``.
    Samples already below γ are pushed back up individually."""
    loss = F.cross_entropy(logits, y, reduction="none")
    return (torch.sign(loss - gamma) * loss).mean()


def negative_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on CE (ABL's unlearning objective)."""
    return -F.cross_entropy(logits, y)


def sce(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
        reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al., ICCV 2019) as in DBD: ``α·CE + β·RCE`` with
    RCE = −Σ_k p_k log q_k, q the one-hot label clipped to [1e-4, 1] and p clipped to [1e-7, 1],
    i.e. RCE = −log(1e-4)·Σ_{k≠y} p_k."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p = logits.softmax(1).clamp(1e-7, 1.0)
    one_hot = F.one_hot(y, logits.shape[1]).to(p.dtype)
    rce = -(p * one_hot.clamp(1e-4, 1.0).log()).sum(1)
    out = alpha * ce + beta * rce
    return out.mean() if reduction == "mean" else out


RCE_SCALE = -math.log(1e-4)
