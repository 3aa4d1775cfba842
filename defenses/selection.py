"""Sample selection shared by the defenses (ABL's isolation, DBD's credibility split, DLP's
entropy, late-learning and disowned-label filters)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lowest_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask ``[N]`` of the ``int(ratio * N)`` lowest-scoring samples (stable order, so
    ties keep index order and the choice is deterministic)."""
    n = int(len(scores) * ratio)
    mask = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    mask[torch.argsort(scores, stable=True)[:n]] = True
    return mask


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = −Σ_c p_c log p_c`` of ``softmax(logits)`` per row of ``[N, K]``, in nats, float32
    (0 for a one-hot prediction, ``log K`` for a uniform one)."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def otsu(values: torch.Tensor) -> tuple[float, float]:
    """Best two-cluster split of 1-D ``values`` (Otsu's criterion: maximal between-cluster
    variance). Returns ``(threshold, separability)``: the low cluster is ``values <= threshold``;
    separability is the between-cluster share of the total variance, in [0, 1] (1: two point
    masses; the share for a uniform distribution is 0.75, for a Gaussian ≈ 0.64)."""
    v = values.double().flatten().sort().values
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return (v[-1].item() if n else float("nan")), 0.0
    k = torch.arange(1, n, dtype=v.dtype, device=v.device)
    cs = v.cumsum(0)[:-1]
    m0, m1 = cs / k, (v.sum() - cs) / (n - k)
    between = k * (n - k) * (m0 - m1) ** 2 / n**2
    between[v[:-1] == v[1:]] = -1  # a cut must fall between distinct values
    i = int(between.argmax())
    return v[i].item(), (between[i] / v.var(unbiased=False)).item()


def _knn(feats: torch.Tensor, k: int, chunk: int):
    """Yield ``(start, neighbours)`` per ``chunk`` rows: the indices ``[rows, k]`` of each row's
    ``k`` nearest other rows of ``feats`` ``[N, D]`` by cosine similarity (itself excluded)."""
    z = F.normalize(feats.float(), dim=1)
    for i in range(0, len(z), chunk):
        sim = z[i:i + chunk] @ z.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + i] = -math.inf
        yield i, sim.topk(k, dim=1).indices


def knn_label_agreement(feats: torch.Tensor, y: torch.Tensor, k: int = 20,
                        chunk: int = 2048) -> torch.Tensor:
    """Per sample, the share of its ``k`` nearest neighbours (cosine similarity of ``feats``
    ``[N, D]``, the sample itself excluded) whose label ``y`` equals its own: float32 ``[N]``
    in [0, 1]. Computed ``chunk`` rows at a time, so memory is ``chunk × N``."""
    n = len(feats)
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(n, device=feats.device)
    out = torch.empty(n, device=feats.device)
    for i, nb in _knn(feats, k, chunk):
        out[i:i + len(nb)] = (y[nb] == y[i:i + len(nb), None]).float().mean(1)
    return out


def knn_label_shares(feats: torch.Tensor, y: torch.Tensor, num_classes: int, k: int = 20,
                     chunk: int = 2048) -> torch.Tensor:
    """Per sample, the share of its ``k`` nearest neighbours (as ``knn_label_agreement``)
    carrying each label in ``[0, num_classes)``: float32 ``[N, num_classes]``, rows summing to
    1; the own-label column is ``knn_label_agreement``."""
    n = len(feats)
    k = min(k, n - 1)
    if k < 1:
        return F.one_hot(y.long(), num_classes).float().to(feats.device)
    out = torch.zeros(n, num_classes, device=feats.device)
    for i, nb in _knn(feats, k, chunk):
        out[i:i + len(nb)] = F.one_hot(y[nb].long(), num_classes).float().mean(1)
    return out
