"""DLP's filter (stage 2 of ``defenses/dlp.py``): which samples are suspected poisoned, from
the predictive entropy and the features recorded during supervised training. The paper names an
entropy-based filtering; everything below is ours and a key of ``filter`` in
``conf/defense/dlp.yaml``:

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
  share of a clean class, in these runs and in BadNets, Blended, BPP (3 bits), Adaptive-Blend, LF
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
  0–2 at 3 bits (at the 2 bits of Fashion-MNIST's BPP default 0.076–0.102, and nothing is
  flagged); Input-aware's 0.142 at seed 2 (0.036 at seed 0); a clean class at most 0.085 (the shirt
  class, in every run) over 18 supervised runs: WaNet at seeds 0–2 and, capped, 0 and 2;
  BadNets, Blended, BPP (3 bits) and SIG at seed 0; LF at seed 1; Adaptive-Blend at seeds 0–2;
  Input-aware at seeds 0 and 2; three runs without attack. The margin below is thin (WaNet
  seed 2: 0.124, which the late filter flags first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defenses.selection import knn_label_shares, lowest_fraction, otsu


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


def knn_filters(feats: dict[int, torch.Tensor], y: torch.Tensor, num_classes: int,
                f: FilterCfg, last_epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The late filter, then (if it flags no class) the disowned one, on ``feats``: the
    features after each supervised epoch up to ``f.late_early`` and after ``last_epoch``.
    Returns the cut of each filter that ran (``late``, ``disowned``) and their info; the last
    one's class is ``filter_class``."""
    shares = {e: knn_label_shares(z, y, num_classes, f.late_k) for e, z in feats.items()
              if f.late or e <= f.late_early}  # disowned: early only
    agree = {e: s.gather(1, y[:, None])[:, 0] for e, s in shares.items()}
    early_epochs = range(1, f.late_early + 1)
    cuts, info = {}, {"filter_class": -1.0}
    if f.late:
        early = torch.stack([agree[e] for e in early_epochs]).mean(0)
        cuts["late"], late_info = late_filter(early, agree[last_epoch], y, num_classes, f)
        info |= late_info | {"filter_class": late_info["late_class"]}
    if f.disowned and info["filter_class"] < 0:  # or one not learned yet?
        early = torch.stack([shares[e] for e in early_epochs]).mean(0)
        cuts["disowned"], own_info = disowned_filter(early, y, f)
        info |= own_info | {"filter_class": own_info["disowned_class"]}
    return cuts, info
