"""Sample selection shared by the defenses (ABL's isolation, DBD's credibility split, DLP)."""

from __future__ import annotations

import torch


def lowest_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask ``[N]`` of the ``int(ratio * N)`` lowest-scoring samples (stable order, so
    ties keep index order and the choice is deterministic)."""
    n = int(len(scores) * ratio)
    mask = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    mask[torch.argsort(scores, stable=True)[:n]] = True
    return mask
