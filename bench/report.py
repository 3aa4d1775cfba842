"""Leaderboards from result rows: ``python -m bench.report [RESULTS_DIR] [--out DIR]``.

Reads the rows of ``<RESULTS_DIR>`` (``bench.rows.load_results``: the row files, and the lines of
a committed ``runs.csv`` that no row file replaces) and writes to ``--out``
(default ``<RESULTS_DIR>/report``): ``leaderboard.csv`` (mean/std/n over seeds per group, DER),
``leaderboard.md`` (attack × defense pivots; per section, the clean accuracy of every class,
``bench.per_class``), ``ba_vs_asr.png``, ``stage_cost.png`` and ``class_accuracy.png``.
Only ``ok`` rows enter the statistics; failed runs are listed in a note, and so are the lines
whose seeds were computed on different hardware or CPU thread counts. Rows of one cell whose
stored configs differ in a value other than the seed (``dataset.limit_train``, ``train.epochs``,
``amp``, …) are never averaged as seeds: each setting is its own line, listed in a note
(``bench.rows.config_settings``).

Clean runs (``attack=none``, poison rate 0) are shown in every poison-rate table of their
dataset/model, as the first attack row, so each table carries its clean reference.

The notes come from ``bench.report_notes``, the figures from ``bench.plots``.

It imports Hydra for ``ReportCallback`` only.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bench.errors import BenchError
from bench.per_class import class_accuracy, heatmap, section_md
from bench.plots import ba_vs_asr, none_first, order_lines, stage_cost
from bench.report_notes import (
    failed_note,
    mixed_compute_note,
    setting_note,
    stale_note,
    superseded_note,
)
from bench.rows import GROUP, atomic_write, latest_per_cell, load_results, main_settings

log = logging.getLogger("bench")

STATS = ["ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "wall_s", "peak_mem_mb"]
CSV_COLUMNS = GROUP + [f"{m}_{s}" for m in [*STATS, "der"] for s in ("mean", "std", "n")]
HEADER = """\
- **BA**: top-1 accuracy on the full clean test set (BA_nt, in the CSV: without the target
  class's test images, as ABL's code reports it).
- **ASR**: fraction of triggered test samples (true label ≠ target) predicted as the target.
- **RA**: accuracy w.r.t. the true labels on the same triggered samples.
- **DER**: [max(0, ΔASR) − max(0, ΔBA) + 1] / 2 against `defense=none` (higher is better).

Cells are mean±std over seeds when n > 1, in % (wall time in s); — means not applicable."""


def _der_table(ok: pd.DataFrame) -> pd.DataFrame:
    """DER mean/std/n per defended group: per seed against the ``none`` run of the same seed,
    else against the ``none`` group mean."""
    base, columns = ["dataset", "model", "attack", "poison_rate"], [*GROUP, *CSV_COLUMNS[-3:]]
    none = ok[ok.defense == "none"]
    defended = ok[(ok.defense != "none") & (ok.attack != "none")]
    if none.empty or defended.empty:
        return pd.DataFrame(columns=columns)
    from bench.metrics import der  # imports torch (seconds): only load it when DER is needed

    by_seed = none.groupby([*base, "seed"], dropna=False)[["ba", "asr"]].mean()
    by_group = none.groupby(base, dropna=False)[["ba", "asr"]].mean()
    records = []
    for key, g in defended.groupby(GROUP, dropna=False):
        ref_key = (key[0], key[1], key[2], key[4])
        if ref_key not in by_group.index:
            continue
        vals = []
        for ba, asr, seed in zip(g.ba, g.asr, g.seed, strict=True):
            ref = by_seed.loc[(*ref_key, seed)] if (*ref_key, seed) in by_seed.index \
                else by_group.loc[ref_key]
            if not any(map(math.isnan, (ref.ba, ref.asr, ba, asr))):
                vals.append(der(ref.ba, ref.asr, ba, asr))
        s = pd.Series(vals, dtype=float)
        records.append(dict(zip(GROUP, key, strict=True))
                       | {"der_mean": s.mean(), "der_std": s.std(), "der_n": len(s)})
    return pd.DataFrame(records, columns=columns)


def attack_settings(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with each attack named by its setting, so that runs of one attack with another
    label mode or target are separate leaderboard lines: ``badnets (all2all)``, ``badnets
    (target 3)``; all-to-one and clean-label runs on target 0 keep the plain name."""
    if rows.empty:
        return rows

    def name(r: pd.Series) -> str:
        if r.label_mode == "all2all":
            return f"{r.attack} (all2all)"
        if pd.notna(r.target) and float(r.target) != 0:
            return f"{r.attack} (target {int(float(r.target))})"
        return r.attack

    return rows.assign(attack=rows.apply(name, axis=1))


def setting_names(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (``latest_per_cell``'s) with every row outside its group's main setting
    (``bench.rows.main_settings``) named by its setting, so that it is a line of its own:
    ``badnets [train.epochs=4]`` for a value outside ``defense.*`` (the attack's row of every
    table, all defenses together), ``dlp [defense.params.simclr.epochs=40]`` for the defense's.
    Rows of the main setting, and of cells whose stored configs agree, keep the plain name."""
    if rows.empty or "attack_setting" not in rows:
        return rows
    main = main_settings(rows)

    def tag(names: pd.Series, col: str) -> list[str]:
        return [n if keep or not label else f"{n} [{label}]"
                for n, label, keep in zip(names, rows[col], main[col], strict=True)]

    return rows.assign(attack=tag(rows.attack, "attack_setting"),
                       defense=tag(rows.defense, "defense_setting"))


def leaderboard(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, attack, defense, poison_rate): ``<metric>_{mean,std,n}``.

    Args:
        ok: successful rows (``status == "ok"``) as returned by ``load_results``.
    """
    if ok.empty:
        return pd.DataFrame(columns=CSV_COLUMNS)
    ok = ok.assign(**{c: pd.to_numeric(ok[c], errors="coerce") for c in [*STATS, "poison_rate"]})
    board = ok.groupby(GROUP, dropna=False)[STATS].agg(["mean", "std", "count"])
    board.columns = [f"{m}_{'n' if s == 'count' else s}" for m, s in board.columns]
    board = board.reset_index().merge(_der_table(ok), on=GROUP, how="left")
    board["der_n"] = board["der_n"].fillna(0).astype(int)
    return order_lines(board[CSV_COLUMNS])


def fmt(row: pd.Series, metric: str, scale: float = 100.0) -> str:
    """``mean±std`` (std only when n > 1), scaled, one decimal; ``—`` for NaN."""
    m, s, n = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"]
    if pd.isna(m):
        return "—"
    return f"{m * scale:.1f}" + (f"±{s * scale:.1f}" if n > 1 and pd.notna(s) else "")


def md_table(sub: pd.DataFrame, cell: Callable[[pd.Series], str]) -> str:
    """Markdown attack × defense pivot of ``cell(row)``, ``none`` first on both axes."""
    defenses, cells = none_first(sub.defense), {}
    for _, r in sub.iterrows():
        cells[r.attack, r.defense] = cell(r)
    lines = ["| attack \\ defense | " + " | ".join(defenses) + " |",
             "|---" * (len(defenses) + 1) + "|"]
    for a in none_first(sub.attack):
        lines.append(f"| {a} | " + " | ".join(cells.get((a, d), "") for d in defenses) + " |")
    return "\n".join(lines)


def _sections(board: pd.DataFrame, classes: pd.DataFrame | None = None) -> list[str]:
    """Per (dataset, model, poison_rate): BA/ASR, isolation, wall-time and DER pivots, and the
    lines' clean accuracy per class (``classes``: ``bench.per_class.class_accuracy``)."""
    out = []
    for (dataset, model), dm in board.groupby(["dataset", "model"], sort=True):
        attacked = dm[dm.attack != "none"]
        for pr in sorted(set((attacked if len(attacked) else dm).poison_rate)):
            sub = dm[(dm.poison_rate == pr) | (dm.attack == "none")]
            out += [f"## {dataset} · {model} · poison rate {pr:g}", "",
                    "BA / ASR (%)", "", md_table(sub, lambda r: f"{fmt(r, 'ba')} / "
                                                                f"{fmt(r, 'asr')}"), ""]
            iso = sub[(sub.iso_precision_n > 0) | (sub.iso_recall_n > 0)]
            if len(iso):
                out += ["Isolation precision / recall (%)", "", md_table(
                    iso, lambda r: f"{fmt(r, 'iso_precision')} / {fmt(r, 'iso_recall')}"), ""]
            out += ["Wall time (s)", "", md_table(sub, lambda r: fmt(r, "wall_s", 1.0)), ""]
            if (sub.der_n > 0).any():
                out += ["DER (%)", "", md_table(sub[sub.der_n > 0], lambda r: fmt(r, "der")), ""]
            out += section_md(classes, dataset, model, pr)
    return out


def markdown(board: pd.DataFrame, failed: pd.DataFrame, results_dir: Path, n_ok: int,
             superseded: pd.DataFrame | None = None, mixed: list[str] | None = None,
             stale: list[str] | None = None, split: list[str] | None = None,
             classes: pd.DataFrame | None = None) -> str:
    """The whole ``leaderboard.md``; ``mixed``, ``stale`` and ``split`` are
    ``mixed_compute_note``'s, ``stale_note``'s and ``setting_note``'s lines, ``classes``
    ``class_accuracy``'s table."""
    lines = [f"# Leaderboard — {results_dir}", "",
             f"{n_ok + len(failed)} runs: {n_ok} ok, {len(failed)} failed.", "", HEADER, ""]
    if not n_ok:
        lines += [f"**no successful runs in {results_dir}**", ""]
    return "\n".join(lines + failed_note(failed) + superseded_note(superseded) + (split or [])
                     + (mixed or [])
                     + (stale or []) + _sections(board, classes)).rstrip() + "\n"


def build(results_dir: str | Path, out_dir: str | Path | None = None
          ) -> tuple[dict[str, Path], list[str]]:
    """Write every report file; returns ``({file name: path}, notes)``."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise BenchError(f"no results dir '{results_dir}'; pass the results_dir of your runs "
                         "(default: runs)")
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_results(results_dir)
    ok, failed = rows[rows.status == "ok"], rows[rows.status != "ok"]
    ok, superseded = latest_per_cell(ok)
    named = attack_settings(ok)
    split = setting_note(named)
    named = setting_names(named)
    board, mixed, classes = leaderboard(named), mixed_compute_note(named), class_accuracy(named)
    stale = stale_note(ok, results_dir)
    notes = [f"no successful runs in {results_dir}"] if ok.empty else []
    notes += [f"{len(failed)} failed run(s), listed in leaderboard.md"] if len(failed) else []
    notes += ([f"{len(superseded)} superseded row(s) left out, listed in leaderboard.md"]
              if len(superseded) else [])
    notes += [split[0].split(" (")[0] + ", listed in leaderboard.md"] if split else []
    notes += [mixed[0].rstrip(":") + ", listed in leaderboard.md"] if mixed else []
    notes += [stale[0].split(";")[0].rstrip(".:") + ", listed in leaderboard.md"] if stale else []
    paths = {"leaderboard.csv": out / "leaderboard.csv", "leaderboard.md": out / "leaderboard.md"}
    atomic_write(paths["leaderboard.csv"], board.to_csv(index=False))
    atomic_write(paths["leaderboard.md"],
                 markdown(board, failed, results_dir, len(ok), superseded, mixed, stale, split,
                          classes))
    if not ok.empty:
        paths["ba_vs_asr.png"] = ba_vs_asr(board, out / "ba_vs_asr.png")
        paths["stage_cost.png"] = stage_cost(ok, out / "stage_cost.png")
    if (fig := heatmap(classes, out / "class_accuracy.png")) is not None:
        paths["class_accuracy.png"] = fig  # rows that record per-class accuracies
    return paths, notes


def report(results_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Build the report of ``results_dir`` into ``out_dir`` (default ``<results_dir>/report``).

    Returns ``{file name: path}`` (no figures when no run succeeded); notes are logged as
    warnings. Raises ``BenchError`` when ``results_dir`` does not exist.
    """
    paths, notes = build(results_dir, out_dir)
    for note in notes:
        log.warning(note)
    return paths


class ReportCallback(Callback):
    """Hydra callback that writes the report when a multirun ends. Enable it with::

        hydra:
          callbacks:
            report:
              _target_: bench.report.ReportCallback

    A report failure is logged as a warning and never fails the sweep.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            paths = report(config.results_dir)
            log.info("report: %s", ", ".join(str(p) for p in paths.values()))
        except Exception as e:  # noqa: BLE001 — the rows are safe; the report can be rerun
            log.warning("report failed (%s: %s); rerun: python -m bench.report %s",
                        type(e).__name__, e, config.get("results_dir", "runs"))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("results_dir", nargs="?", default="runs", help="folder with rows/ (runs)")
    p.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/report)")
    args = p.parse_args(argv)
    try:
        paths, notes = build(args.results_dir, args.out)
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print("\n".join([*notes, *(f"wrote {path}" for path in paths.values())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
