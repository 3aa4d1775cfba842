"""The papers' tables and their claims, which ``python -m bench.paper check`` asserts.

``EXPERIMENTS`` holds one ``Experiment`` per paper table (``conf/experiment/<name>.yaml``).
``check`` judges on an experiment's reduced rows, per attack and per defense it claims for:
- ``attack_works``: without defense the attack succeeds, ASR ≥ ``MIN_ATTACK_ASR``.
- ``removes``: the defense brings ASR ≤ ``MAX_DEFENDED_ASR``.
- ``keeps_ba``: BA(none) − BA(defense) ≤ max(0, the paper's own gap) + ``BA_MARGIN``; the
  paper's gap pairs the no-defense and the defended row of one source (``paper_rows``: the
  source that publishes both for the attack; 0 where none published a no-defense BA). BA is the
  experiment's ``ba_metric``: ABL's code leaves the target class out of its clean accuracy, so
  its table compares ``ba_nt``.

A claim that does not hold at CPU scale today is a documented known gap (``KNOWN_GAPS``, with
the measured reason), reported as such in the markdown, never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

MIN_ATTACK_ASR = 0.90
MAX_DEFENDED_ASR = 0.05
# Runs on the 10k subset at CPU scale move BA by one to two points between seeds or thread
# counts (main table, DLP on BadNets: 0.875 / 0.871 / 0.8665 at seeds 0/1/2, without defense
# 0.8955 / 0.8875 / 0.8905), so the BA claim allows the paper's own gap plus 5 points, DBD's own
# bar at CPU scale.
BA_MARGIN = 0.05


@dataclass(frozen=True)
class Experiment:
    """One paper table.

    Args:
        title: heading of the markdown.
        source: reference CSV stem (``results/reference/<source>.csv``).
        setting: the paper's setting, in words.
        attacks: attacks of the reduced variant whose claims are checked.
        defenses: the defenses the paper claims for (``none`` is implied).
        poison_rate: the reference rows' poison rate to compare with (None: any).
        ba_metric: our column compared with the paper's clean accuracy: ``ba`` (the whole
           clean test set) or ``ba_nt`` (without the target class, where the paper's code
           measures it so). Both the side-by-side cells and the ``keeps_ba`` claim use it.
    """

    title: str
    source: str
    setting: str
    attacks: tuple[str, ...]
    defenses: tuple[str, ...]
    poison_rate: float | None = None
    ba_metric: str = "ba"


EXPERIMENTS: dict[str, Experiment] = {
    "dbd_cifar10": Experiment(
        "DBD (Huang et al., ICLR 2022)", "dbd",
        "CIFAR-10, ResNet-18, official DBD code defaults",
        ("badnets", "wanet"), ("dbd",)),
    "abl_cifar10": Experiment(
        "ABL (Li et al., NeurIPS 2021)", "abl",
        "CIFAR-10, WRN-16-1, 10% of all samples, target 0",
        ("badnets", "blended"), ("abl",), ba_metric="ba_nt"),
    "backdoorbench_cifar10": Experiment(
        "BackdoorBench leaderboard slice (DLP's claims checked here)", "backdoorbench",
        "CIFAR-10, PreAct-ResNet18, BackdoorBench's victim recipe",
        ("badnets", "blended", "wanet"), ("dlp",), poison_rate=0.1),
}

# Claims that do not hold at CPU scale today, with the measured reason (see the issue notes and
# README). A known gap that holds again is reported as such, so the entry can be dropped.
_DBD_BA = ("the SCE linear head (5 epochs) fits the SimCLR features to about 66% (68% after the "
           "main table's 40 SimCLR epochs; a logistic regression with clean labels reaches 0.86 "
           "on those features), and the lowest-SCE half it labels holds no shirt (class 6): "
           "split_min_class_share_ep<k> = 0 for shirt at every epoch of the main table, and at "
           "scale=ci for epochs 1-4, after which the row records coat (class 4) as the empty "
           "class (one class is recorded; rows now record each class's share, "
           "split_class_share_ep<k>: rerunning the BadNets row, its first split labels trouser "
           "0.92, sandal 0.67, pullover 0.25, coat 0.18, shirt 0.00, and coat 0.00 from the "
           "fifth); MixMatch learns such a class from guesses only "
           "(shirt and coat accuracy 0.00 in the scale=ci BadNets and WaNet rows); with 5,000 "
           "random clean samples as the labelled set instead, the main table's MixMatch stage "
           "reaches 0.873; training the head longer or splitting per class lets the Blended "
           "samples into the labelled set (ASR 1.0)")
# The reduced ABL rows train in fp32 (the _reduced variants pin amp=false) and otherwise run the
# main table's ABL config, whose seed-0 rows (results/fashion_mnist) trained in bf16.
_ABL_FP32 = ("in the reduced rows, fp32 (the `_reduced` variants pin amp=false), isolation misses "
             "on both attacks, so the unlearning ascends on clean samples and erases trouser "
             "(accuracy 0.00 in both rows) while the backdoor stays (seed 0): BadNets isolates "
             "13 poisoned among its 100 samples (precision 0.13, recall 0.013), ASR 0.993, BA_nt "
             "0.550 against 0.894 without defense; Blended 3 (precision 0.03, recall 0.003), "
             "ASR 0.962, BA_nt 0.438 against 0.891. The main table runs the same ABL config in "
             "bf16 (amp=true, an AVX512-BF16 CPU); its seed-0 rows isolate BadNets with "
             "precision 1.00 (recall 0.10), where the official 4 unlearning epochs lower ASR only "
             "to 0.737 and cost the target class first (T-shirt accuracy 0.89 -> 0.41, BA_nt "
             "0.862 against 0.896), and Blended with precision 0.00 (trouser 0.00, BA_nt 0.516, "
             "ASR 0.999)")
KNOWN_GAPS: dict[tuple[str, str, str, str], str] = {
    ("dbd_cifar10", "keeps_ba", "badnets", "dbd"): _DBD_BA,
    ("dbd_cifar10", "keeps_ba", "wanet", "dbd"): _DBD_BA,
    ("abl_cifar10", "removes", "badnets", "abl"): _ABL_FP32,
    ("abl_cifar10", "removes", "blended", "abl"): _ABL_FP32,
    ("abl_cifar10", "keeps_ba", "blended", "abl"): _ABL_FP32,
    ("abl_cifar10", "keeps_ba", "badnets", "abl"): (
        "misses in the reduced row, fp32 (the `_reduced` variants pin amp=false): the isolated "
        "1% holds 13 poisoned samples (precision 0.13), and the unlearning erases trouser "
        "(accuracy 0.00; BA_nt 0.550 against 0.894, ASR 0.993, seed 0); the main table's seed-0 "
        "row, the same ABL config in bf16 (amp=true, an AVX512-BF16 CPU), isolates with "
        "precision 1.00 and stays within the bar (BA_nt 0.862 against 0.896, drop 0.034; ASR "
        "0.737): where isolation misses, ABL pays for it in BA"),
}


@dataclass(frozen=True)
class Verdict:
    """One claim of one experiment on one attack and defense (``check``)."""

    experiment: str
    claim: str
    attack: str
    defense: str
    value: float
    threshold: str
    status: str          # pass | FAIL | missing | known gap | holds (known gap)
    note: str = ""

    @property
    def fails(self) -> bool:
        return self.status in ("FAIL", "missing")


def cell_rows(rows: pd.DataFrame, attack: str, defense: str) -> pd.DataFrame:
    """The rows of one attack and defense."""
    return rows[(rows.attack == attack) & (rows.defense == defense)]


def cell_mean(rows: pd.DataFrame, attack: str, defense: str, metric: str) -> float:
    """The mean of ``metric`` over the rows of one attack and defense; NaN where none has it."""
    vals = pd.to_numeric(cell_rows(rows, attack, defense)[metric], errors="coerce").dropna()
    return float(vals.mean()) if len(vals) else math.nan


def paper_rows(ref: pd.DataFrame, attack: str, defenses: tuple[str, ...]) -> pd.DataFrame:
    """The reference rows of ``attack`` from one source (the ``source`` column): the one that
    publishes the most of its ``none`` and ``defenses`` rows, the first in the file on a tie.
    Sources differ in setup (ABL's README leaderboard, its unlearning-only demo, its log with
    augmentation), so a cell or a BA gap never mixes two of them."""
    rows = ref[ref.attack == attack]
    if "source" not in rows or rows.empty:
        return rows
    order = list(dict.fromkeys(rows.source))
    wanted = {"none", *defenses}
    best = max(order, key=lambda src: (
        rows[(rows.source == src) & rows.defense.isin(wanted)].defense.nunique(),
        -order.index(src)))
    return rows[rows.source == best]


def paper_gap(ref: pd.DataFrame, attack: str, defense: str) -> float:
    """BA(none) − BA(defense) as published for ``attack`` in ``ref``, one source's rows
    (``paper_rows``); NaN where either is missing."""
    return cell_mean(ref, attack, "none", "ba") - cell_mean(ref, attack, defense, "ba")


def _verdict(name: str, claim: str, attack: str, defense: str, value: float, ok: bool,
             threshold: str) -> Verdict:
    gap = KNOWN_GAPS.get((name, claim, attack, defense))
    if math.isnan(value):
        status = "missing"
    elif gap is not None:
        status = "holds (known gap)" if ok else "known gap"
    else:
        status = "pass" if ok else "FAIL"
    return Verdict(name, claim, attack, defense, value, threshold, status, gap or "")


def check(name: str, exp: Experiment, reduced: pd.DataFrame, ref: pd.DataFrame
          ) -> list[Verdict]:
    """Every claim of ``exp`` on the ``ok`` rows ``reduced``."""
    out = []
    for a in exp.attacks:
        asr = cell_mean(reduced, a, "none", "asr")
        out.append(_verdict(name, "attack_works", a, "none", asr, asr >= MIN_ATTACK_ASR,
                            f"ASR ≥ {MIN_ATTACK_ASR:.2f}"))
        for d in exp.defenses:
            asr = cell_mean(reduced, a, d, "asr")
            out.append(_verdict(name, "removes", a, d, asr, asr <= MAX_DEFENDED_ASR,
                                f"ASR ≤ {MAX_DEFENDED_ASR:.2f}"))
            drop = (cell_mean(reduced, a, "none", exp.ba_metric)
                    - cell_mean(reduced, a, d, exp.ba_metric))
            gap = paper_gap(paper_rows(ref, a, exp.defenses), a, d)
            allowed = max(0.0, 0.0 if math.isnan(gap) else gap) + BA_MARGIN
            out.append(_verdict(name, "keeps_ba", a, d, drop, drop <= allowed + 1e-12,
                                f"BA drop ≤ {allowed:.3f}"))
    return out
