"""Paper tables: ``python -m bench.paper check [EXPERIMENT ...]``.

Each experiment of ``conf/experiment/`` has a full-scale config (the paper's setting, for GPUs)
and a ``_reduced`` variant (Fashion-MNIST, CPU-scale model, the CPU presets shortened by
``scale=ci``) that CI runs afresh on every change. The reduced variants share their rows: they
write to ``results/paper_reduced``, so a row is computed once and serves every paper. ``check``
reads, per experiment:

- the published numbers, ``results/reference/<source>.csv``;
- our full-scale rows, ``results/paper/<experiment>`` (empty until run on a GPU);
- our reduced rows, ``results/paper_reduced`` (``--reduced``);

asserts the paper's qualitative claims (``bench.paper_claims``) on the reduced rows, and writes
``results/paper/<experiment>.md``: paper, full-scale and reduced numbers side by side, then every
claim with its measured value, threshold and verdict. Exit status 1 when a claim fails or its rows
are missing, unless the claim is a documented known gap at CPU scale (``KNOWN_GAPS``: reported
as such in the markdown, never hidden).

The claims are checked on the newest ``ok`` row of each job of ``<experiment>_reduced`` as this
version composes it (``reduced_jobs``: a row counts only when its config hash is the job's), at
``REDUCED_RATE`` and ``REDUCED_SEEDS`` (the reduced variants' seed; other seeds of the reduced
folder are ignored; rows of the same cells under another config are listed in the markdown,
never checked; the main table's rows, ``--main``, of each cell's main setting are shown beside,
never checked).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import config_diff, hash_of, hashed_config
from bench.errors import BenchError
from bench.paper_claims import (
    EXPERIMENTS,
    Experiment,
    Verdict,
    cell_mean,
    cell_rows,
    check,
    paper_rows,
)
from bench.per_class import class_accuracy, class_accuracy_md
from bench.rows import atomic_write, latest_per_cell, load_results, main_settings, parse_json_object

REDUCED_RATE = 0.1  # the reduced claims are checked at 10% poisoning
REDUCED_SEEDS = (0,)  # the reduced variants' seed, the only one checked


def _at_rate(rows: pd.DataFrame, rate: float) -> pd.DataFrame:
    return rows[pd.to_numeric(rows.poison_rate, errors="coerce").sub(rate).abs() < 1e-9]


def _ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The newest of ``rows`` (row files, else the committed ``runs.csv`` lines) per cell, setting
    and seed, if it is ``ok``. A cell whose newest run failed counts as missing, not as its older
    ``ok`` row."""
    newest = latest_per_cell(rows)[0]
    return newest[newest.status == "ok"]


def _main_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rows of their cell's main setting, the others)``: a cell's rows of another stored
    config are another line of the leaderboard, not more seeds of this one."""
    keep = main_settings(rows).all(axis=1) if len(rows) else pd.Series(True, index=rows.index)
    return rows[keep], rows[~keep]


def reduced_jobs(name: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """``(attack, defense, seed) -> hashed config`` of every job of ``<name>_reduced`` as this
    version composes it: the rows ``python -m bench experiment=<name>_reduced`` computes."""
    from hydra import compose, initialize_config_module

    from bench.cli import job_config, sweep_jobs  # expanded and composed as the CLI does it

    base, jobs = [f"experiment={name}_reduced"], {}
    with initialize_config_module(config_module="conf", version_base="1.3"):
        for job in sweep_jobs(compose("config", base, return_hydra_config=True), base):
            cfg = job_config("config", job)
            jobs[cfg.attack.name if cfg.attack else "none", cfg.defense.label, cfg.seed] = (
                hashed_config(cfg))
    return jobs


def _job_hashes(config: dict[str, Any]) -> set[str]:
    """The hashes a row of this job can carry: ``amp=auto`` rows hash what it resolved to."""
    amps = (True, False) if config.get("amp") == "auto" else (config.get("amp"),)
    return {hash_of(config | {"amp": a}) for a in amps}


def _other_configs(rows: pd.DataFrame, jobs: dict[tuple[str, str, int], dict[str, Any]]
                   ) -> list[str]:
    """``run_id (keys that differ from the job)`` per row of ``rows`` (not the job's config)."""
    out = []
    for r in rows.itertuples():
        job = jobs.get((r.attack, r.defense, int(r.seed)))
        stored = parse_json_object(r.config)
        keys = (", ".join(config_diff(job, stored)) if stored is not None and job
                else "config not stored")
        out.append(f"`{r.run_id}` ({keys})")
    return out


def load_reference(ref_dir: Path, exp: Experiment) -> pd.DataFrame:
    path = ref_dir / f"{exp.source}.csv"
    if not path.is_file():
        raise BenchError(f"missing reference table {path}; restore it from git")
    ref = pd.read_csv(path)
    return ref if exp.poison_rate is None else _at_rate(ref, exp.poison_rate)


def _pct(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:.1f}"


def _cell(rows: pd.DataFrame, attack: str, defense: str, ba_col: str = "ba") -> str:
    ba, asr = cell_mean(rows, attack, defense, ba_col), cell_mean(rows, attack, defense, "asr")
    return "" if math.isnan(ba) and math.isnan(asr) else f"{_pct(ba)} / {_pct(asr)}"


def _seeds_cell(rows: pd.DataFrame, attack: str, defense: str, ba_col: str = "ba") -> str:
    n = len(cell_rows(rows, attack, defense))
    return f"{_cell(rows, attack, defense, ba_col)} (n = {n})" if n else ""


def _attacks(exp: Experiment, ref: pd.DataFrame, full: pd.DataFrame) -> list[str]:
    """The attacks of an experiment's page: its own, then the paper's and the full-scale rows'."""
    return list(dict.fromkeys([*exp.attacks, *ref.attack.dropna(), *full.attack.dropna()]))


def _sources_lines(ref: pd.DataFrame, attacks: list[str], defenses: list[str],
                   exp: Experiment) -> list[str]:
    """Which source the paper column shows per attack, and the rows of these cells that other
    sources publish (shown nowhere else)."""
    if "source" not in ref or ref.empty:
        return []
    used: dict[str, list[str]] = {}
    others = []
    for a in attacks:
        shown = paper_rows(ref, a, exp.defenses)
        if shown.empty:
            continue
        used.setdefault(str(shown.source.iloc[0]), []).append(a)
        rest = ref[(ref.attack == a) & ref.defense.isin(defenses) & ~ref.index.isin(shown.index)]
        others += [f"`{r.source}` {a}/{r.defense} {_pct(r.ba)} / {_pct(r.asr)}"
                   for r in rest.itertuples()]
    lines = ["", "Paper column, one source per attack: " + "; ".join(
        f"`{src}` ({', '.join(a)})" for src, a in used.items()) + "."] if used else []
    if others:
        lines += ["", "Published by other sources for these cells, not shown or used: "
                  + "; ".join(others) + "."]
    return lines


def markdown(name: str, exp: Experiment, ref: pd.DataFrame, full: pd.DataFrame,
             reduced: pd.DataFrame, verdicts: list[Verdict], main_table: pd.DataFrame,
             notes: list[str] | None = None) -> str:
    """The page of one experiment; ``notes`` are paragraphs printed after the table (rows left
    out)."""
    attacks, defenses = _attacks(exp, ref, full), ["none", *exp.defenses]
    lines = [f"# {exp.title}", "",
             f"Paper setting: {exp.setting}. Full scale: `python -m bench experiment={name}`; "
             f"reduced (Fashion-MNIST, CPU scale): `python -m bench experiment={name}_reduced`; "
             f"this page: `python -m bench.paper check`.", "",
             "BA / ASR (%)" + (
                 ", BA without the target class's test images, as the paper's code measures it "
                 "(`ba_nt`)" if exp.ba_metric == "ba_nt" else "")
             + ". Paper: `results/reference/" + exp.source + ".csv`, each attack's rows from "
             "one source (its `source` column), the one that publishes the most of the attack's "
             "no-defense and defended rows (the first in the file on a tie), so that a cell and "
             "the paper's BA gap in `keeps_ba` never mix two sources' setups; full scale: empty "
             "until run; reduced: seed " + ", ".join(map(str, REDUCED_SEEDS)) + " of the "
             "`_reduced` variant (`scale=ci`, what CI computes and the claims are checked on); "
             "main table: the same cells at the longer CPU presets, mean over its n seeds (shown, "
             "not checked).", "",
             "| attack | defense | paper | ours, full scale | ours, reduced | ours, main table, "
             "all seeds |", "|---|---|---|---|---|---|"]
    for a in attacks:
        for d in defenses:
            ours = exp.ba_metric
            cells = [_cell(paper_rows(ref, a, exp.defenses), a, d), _cell(full, a, d, ours),
                     _cell(reduced, a, d, ours), _seeds_cell(main_table, a, d, ours)]
            if any(cells):
                lines.append(f"| {a} | {d} | " + " | ".join(cells) + " |")
    lines += _sources_lines(ref, attacks, defenses, exp)
    lines += [line for note in notes or [] for line in ("", note)]
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
    per_class = class_accuracy_md(class_accuracy(reduced))
    if per_class:  # where the BA of the reduced rows goes
        lines += ["", "## Reduced rows by class", "", *per_class]
    return "\n".join(lines).rstrip("\n") + "\n"


def _reduced_rows(rows: pd.DataFrame, name: str, exp: Experiment,
                  jobs: dict[tuple[str, str, int], dict[str, Any]]
                  ) -> tuple[pd.DataFrame, list[str]]:
    """``(the newest ok rows of the jobs, notes)``: of ``rows`` (a reduced folder), those of
    ``exp``'s cells at ``REDUCED_RATE`` and ``REDUCED_SEEDS`` whose config hash is their job's;
    the notes list the ``ok`` rows of those cells under another config, which are never checked."""
    rows = _at_rate(rows, REDUCED_RATE)
    rows = rows[pd.to_numeric(rows.seed, errors="coerce").isin(REDUCED_SEEDS)
                & rows.attack.isin(exp.attacks) & rows.defense.isin(["none", *exp.defenses])]
    hashes = set().union(*map(_job_hashes, jobs.values()))
    mine = rows.config_hash.astype(str).isin(hashes)
    others = rows[~mine & (rows.status == "ok")]
    notes = [] if others.empty else [
        f"Not checked: {len(others)} `ok` row{'s' if len(others) != 1 else ''} of these cells "
        f"ran another config than `python -m bench experiment={name}_reduced` composes (the "
        "keys that differ): " + "; ".join(_other_configs(others, jobs)) + "."]
    return _ok_rows(rows[mine]), notes


def run_check(full_root: Path, reduced_dir: Path, out: Path, ref_dir: Path,
              names: list[str] | None = None, main_dir: Path | None = None,
              jobs: Callable[[str], dict[tuple[str, str, int], dict[str, Any]]] | None = None
              ) -> list[Verdict]:
    """Check ``names`` (default: all experiments) on the rows in ``reduced_dir`` of the jobs
    ``jobs(name)`` composes (default ``reduced_jobs``), with full-scale rows from
    ``<full_root>/<name>`` and, shown beside, the main table's rows in ``main_dir``; write
    ``<out>/<name>.md``; return the verdicts."""
    verdicts, jobs = [], jobs or reduced_jobs
    rows = load_results(reduced_dir)  # read once, shared by all
    main_table, main_other = _main_rows(_at_rate(_ok_rows(load_results(main_dir)), REDUCED_RATE)
                                        if main_dir else rows.iloc[:0])
    for name in names or list(EXPERIMENTS):
        if name not in EXPERIMENTS:
            raise BenchError(f"unknown experiment '{name}'; one of {', '.join(EXPERIMENTS)}")
        exp = EXPERIMENTS[name]
        ref = load_reference(ref_dir, exp)
        full, full_other = _main_rows(_ok_rows(load_results(full_root / name)))
        reduced, notes = _reduced_rows(rows, name, exp, jobs(name))
        cells = {(a, d) for a in _attacks(exp, ref, full) for d in ["none", *exp.defenses]}
        for other, where in ((full_other, "the full-scale folder"), (main_other, "the main table")):
            n = sum((a, d) in cells for a, d in zip(other.attack, other.defense, strict=True))
            notes += [f"Left out: {n} row{'s' if n != 1 else ''} of {where} under another "
                      "setting than most rows of their cell (`python -m bench.report` shows "
                      "them as lines of their own)."] if n else []
        vs = check(name, exp, reduced, ref)
        atomic_write(out / f"{name}.md",
                     markdown(name, exp, ref, full, reduced, vs, main_table, notes))
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
