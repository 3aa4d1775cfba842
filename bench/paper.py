"""Paper tables: ``python -m bench.paper check [EXPERIMENT ...]``.

Each experiment of ``conf/experiment/`` has a full-scale config (the paper's setting, for GPUs)
and a ``_reduced`` variant (Fashion-MNIST, CPU-scale model, the CPU presets shortened by
``scale=ci``) that CI runs afresh on every change. The reduced variants share their rows: they
write to ``results/paper_reduced``, so a row is computed once and serves every paper. ``check``
reads, per experiment:

- the published numbers, ``results/reference/<source>.csv``;
- our full-scale rows, ``results/paper/<experiment>`` (empty until run on a GPU);
- our reduced rows, ``results/paper_reduced`` (``--reduced``);

asserts the paper's qualitative claims on the reduced rows (``check``), and writes
``results/paper/<experiment>.md``: paper, full-scale and reduced numbers side by side, then every
claim with its measured value, threshold and verdict. Exit status 1 when a claim fails or its rows
are missing, unless the claim is a documented known gap at CPU scale (``KNOWN_GAPS``: reported
as such in the markdown, never hidden).

Claims, on the newest ``ok`` row of each cell at ``REDUCED_RATE`` and ``REDUCED_SEEDS`` (the
reduced variants' seed; other seeds of the reduced folder are ignored, and the main table's rows,
``--main``, are shown beside, never checked):
- ``attack_works``: without defense the attack succeeds, ASR ≥ ``MIN_ATTACK_ASR``.
- ``removes``: the defense brings ASR ≤ ``MAX_DEFENDED_ASR``.
- ``keeps_ba``: BA(none) − BA(defense) ≤ max(0, the paper's own gap) + ``BA_MARGIN``; the
  paper's gap comes from its reference rows for the same attack (0 where it published no
  no-defense BA). BA is the experiment's ``ba_metric``: ABL's code leaves the target class out
  of its clean accuracy, so its table compares ``ba_nt``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.rows import atomic_write, latest_per_cell, load_results

MIN_ATTACK_ASR = 0.90
MAX_DEFENDED_ASR = 0.05
# Runs on the 10k subset at CPU scale move BA by one to two points between seeds or thread
# counts (main table, DLP on BadNets: 0.875 / 0.871 / 0.8665 at seeds 0/1/2, without defense
# 0.8955 / 0.8875 / 0.8905), so the BA claim allows the paper's own gap plus 5 points, DBD's own
# bar at CPU scale.
BA_MARGIN = 0.05
REDUCED_RATE = 0.1  # the reduced claims are checked at 10% poisoning
REDUCED_SEEDS = (0,)  # the reduced variants' seed, the only one checked


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
           "class (one class is recorded); MixMatch learns such a class from guesses only "
           "(shirt and coat accuracy 0.00 in the scale=ci BadNets and WaNet rows); with 5,000 "
           "random clean samples as the labelled set instead, the main table's MixMatch stage "
           "reaches 0.873; training the head longer or splitting per class lets the Blended "
           "samples into the labelled set (ASR 1.0)")
_ABL_ISO = ("isolation picks BadNets with precision 1.0 (recall 0.1) but its lowest 1% on Blended "
            "swings between precision 0.0 and 0.9 from epoch to epoch (easy clean samples reach "
            "a loss below 1e-6 too), and unlearning an isolated set of clean trousers erases "
            "that class (trouser accuracy 0.00 at Blended seed 0, BA_nt 0.516); on BadNets the "
            "gradient ascent on the isolated 1% lowers ASR slowly and costs the target class "
            "first (T-shirt accuracy 0.89 -> 0.41 at seed 0 after the official 4 epochs, ASR "
            "0.737; BA 0.765 at ASR 0.049 after 18 epochs, against 0.881 before)")
KNOWN_GAPS: dict[tuple[str, str, str, str], str] = {
    ("dbd_cifar10", "keeps_ba", "badnets", "dbd"): _DBD_BA,
    ("dbd_cifar10", "keeps_ba", "wanet", "dbd"): _DBD_BA,
    ("abl_cifar10", "removes", "badnets", "abl"): _ABL_ISO,
    ("abl_cifar10", "removes", "blended", "abl"): _ABL_ISO,
    ("abl_cifar10", "keeps_ba", "blended", "abl"): _ABL_ISO,
    ("abl_cifar10", "keeps_ba", "badnets", "abl"): (
        "holds in bf16 on a CPU with AVX512-BF16 (BA_nt drop 0.034, isolation precision 1.00), "
        "not in fp32 on a CPU without native bf16, where amp=auto trains in fp32: there the "
        "isolated 1% holds 13 poisoned samples (precision 0.13), the unlearning erases trouser "
        "(accuracy 0.00; BA_nt 0.550 against 0.894, ASR 0.993, seed 0): where isolation "
        "misses, ABL pays for it in BA"),
}


@dataclass(frozen=True)
class Verdict:
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


def _cell_rows(rows: pd.DataFrame, attack: str, defense: str) -> pd.DataFrame:
    return rows[(rows.attack == attack) & (rows.defense == defense)]


def _at_rate(rows: pd.DataFrame, rate: float) -> pd.DataFrame:
    return rows[pd.to_numeric(rows.poison_rate, errors="coerce").sub(rate).abs() < 1e-9]


def _mean(rows: pd.DataFrame, attack: str, defense: str, metric: str) -> float:
    vals = pd.to_numeric(_cell_rows(rows, attack, defense)[metric], errors="coerce").dropna()
    return float(vals.mean()) if len(vals) else math.nan


def _ok_rows(results_dir: Path) -> pd.DataFrame:
    """The newest row of each cell (row files, else the committed ``runs.csv`` line) if it is
    ``ok``. A cell whose newest run failed counts as missing, not as its older ``ok`` row."""
    newest = latest_per_cell(load_results(results_dir))[0]
    return newest[newest.status == "ok"]


def load_reference(ref_dir: Path, exp: Experiment) -> pd.DataFrame:
    path = ref_dir / f"{exp.source}.csv"
    if not path.is_file():
        raise BenchError(f"missing reference table {path}; restore it from git")
    ref = pd.read_csv(path)
    return ref if exp.poison_rate is None else _at_rate(ref, exp.poison_rate)


def paper_gap(ref: pd.DataFrame, attack: str, defense: str) -> float:
    """BA(none) − BA(defense) as published for ``attack`` (NaN where either is missing)."""
    return _mean(ref, attack, "none", "ba") - _mean(ref, attack, defense, "ba")


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
        asr = _mean(reduced, a, "none", "asr")
        out.append(_verdict(name, "attack_works", a, "none", asr, asr >= MIN_ATTACK_ASR,
                            f"ASR ≥ {MIN_ATTACK_ASR:.2f}"))
        for d in exp.defenses:
            asr = _mean(reduced, a, d, "asr")
            out.append(_verdict(name, "removes", a, d, asr, asr <= MAX_DEFENDED_ASR,
                                f"ASR ≤ {MAX_DEFENDED_ASR:.2f}"))
            drop = (_mean(reduced, a, "none", exp.ba_metric)
                    - _mean(reduced, a, d, exp.ba_metric))
            gap = paper_gap(ref, a, d)
            allowed = max(0.0, 0.0 if math.isnan(gap) else gap) + BA_MARGIN
            out.append(_verdict(name, "keeps_ba", a, d, drop, drop <= allowed + 1e-12,
                                f"BA drop ≤ {allowed:.3f}"))
    return out


def _pct(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:.1f}"


def _cell(rows: pd.DataFrame, attack: str, defense: str, ba_col: str = "ba") -> str:
    ba, asr = _mean(rows, attack, defense, ba_col), _mean(rows, attack, defense, "asr")
    return "" if math.isnan(ba) and math.isnan(asr) else f"{_pct(ba)} / {_pct(asr)}"


def _seeds_cell(rows: pd.DataFrame, attack: str, defense: str, ba_col: str = "ba") -> str:
    n = len(_cell_rows(rows, attack, defense))
    return f"{_cell(rows, attack, defense, ba_col)} (n = {n})" if n else ""


def markdown(name: str, exp: Experiment, ref: pd.DataFrame, full: pd.DataFrame,
             reduced: pd.DataFrame, verdicts: list[Verdict], main_table: pd.DataFrame) -> str:
    attacks = list(dict.fromkeys([*exp.attacks, *ref.attack.dropna(), *full.attack.dropna()]))
    defenses = ["none", *exp.defenses]
    lines = [f"# {exp.title}", "",
             f"Paper setting: {exp.setting}. Full scale: `python -m bench experiment={name}`; "
             f"reduced (Fashion-MNIST, CPU scale): `python -m bench experiment={name}_reduced`; "
             f"this page: `python -m bench.paper check`.", "",
             "BA / ASR (%)" + (
                 ", BA without the target class's test images, as the paper's code measures it "
                 "(`ba_nt`)" if exp.ba_metric == "ba_nt" else "")
             + ". Paper: `results/reference/" + exp.source + ".csv`; full scale: empty "
             "until run; reduced: seed " + ", ".join(map(str, REDUCED_SEEDS)) + " of the "
             "`_reduced` variant (`scale=ci`, what CI computes and the claims are checked on); "
             "main table: the same cells at the longer CPU presets, mean over its n seeds (shown, "
             "not checked).", "",
             "| attack | defense | paper | ours, full scale | ours, reduced | ours, main table, "
             "all seeds |", "|---|---|---|---|---|---|"]
    for a in attacks:
        for d in defenses:
            ours = exp.ba_metric
            cells = [_cell(ref, a, d), _cell(full, a, d, ours), _cell(reduced, a, d, ours),
                     _seeds_cell(main_table, a, d, ours)]
            if any(cells):
                lines.append(f"| {a} | {d} | " + " | ".join(cells) + " |")
    cites = sorted(set(ref.get("citation", pd.Series(dtype=str)).dropna()))
    if cites:
        lines += ["", "Sources: " + "; ".join(cites)]
    lines += ["", "## Claims on the reduced run", "",
              "| claim | attack | defense | measured | threshold | verdict |",
              "|---|---|---|---|---|---|"]
    for v in verdicts:
        val = "" if math.isnan(v.value) else f"{v.value:.3f}"
        lines.append(f"| {v.claim} | {v.attack} | {v.defense} | {val} | {v.threshold} | "
                     f"{v.status} |")
    gaps = [v for v in verdicts if v.note]
    if gaps:
        lines += ["", "Known gaps at CPU scale:", ""]
        lines += [f"- {v.claim} {v.attack}/{v.defense}: {v.note}" for v in gaps]
    return "\n".join(lines) + "\n"


def run_check(full_root: Path, reduced_dir: Path, out: Path, ref_dir: Path,
              names: list[str] | None = None, main_dir: Path | None = None) -> list[Verdict]:
    """Check ``names`` (default: all experiments) on the rows in ``reduced_dir``, with full-scale
    rows from ``<full_root>/<name>`` and, shown beside, the main table's rows in ``main_dir``;
    write ``<out>/<name>.md``; return the verdicts."""
    verdicts = []
    reduced = _at_rate(_ok_rows(reduced_dir), REDUCED_RATE)  # read once, shared by all
    reduced = reduced[pd.to_numeric(reduced.seed, errors="coerce").isin(REDUCED_SEEDS)]
    main_table = _at_rate(_ok_rows(main_dir), REDUCED_RATE) if main_dir else reduced.iloc[:0]
    for name in names or list(EXPERIMENTS):
        if name not in EXPERIMENTS:
            raise BenchError(f"unknown experiment '{name}'; one of {', '.join(EXPERIMENTS)}")
        exp = EXPERIMENTS[name]
        ref = load_reference(ref_dir, exp)
        full = _ok_rows(full_root / name)
        vs = check(name, exp, reduced, ref)
        atomic_write(out / f"{name}.md",
                     markdown(name, exp, ref, full, reduced, vs, main_table))
        verdicts += vs
    return verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.paper", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check the reduced runs against the papers' claims")
    c.add_argument("experiments", nargs="*", help=f"default: all of {', '.join(EXPERIMENTS)}")
    c.add_argument("--reduced", default="results/paper_reduced",
                   help="results dir of the reduced runs (default results/paper_reduced)")
    c.add_argument("--main", default="results/fashion_mnist",
                   help="main-table results dir shown beside (default results/fashion_mnist)")
    c.add_argument("--full", default="results/paper",
                   help="folder holding <experiment>/ full-scale results (default results/paper)")
    c.add_argument("--out", default=None, help="markdown folder (default: --full)")
    c.add_argument("--reference", default="results/reference")
    args = ap.parse_args(argv)
    try:
        full = Path(args.full)
        verdicts = run_check(full, Path(args.reduced), Path(args.out) if args.out else full,
                             Path(args.reference), args.experiments or None, Path(args.main))
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for v in verdicts:
        val = "—" if math.isnan(v.value) else f"{v.value:.3f}"
        print(f"{v.status:>18}  {v.experiment} {v.claim} {v.attack}/{v.defense}: {val} "
              f"({v.threshold})")
    bad = [v for v in verdicts if v.fails]
    print(f"{len(verdicts) - len(bad)}/{len(verdicts)} claims hold or are known gaps"
          + (f"; {len(bad)} failing or missing" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
