"""Leaderboards from result rows: ``python -m bench.report [RESULTS_DIR] [--out DIR]``.

Reads the rows of ``<RESULTS_DIR>`` (``bench.rows.load_results``: the row files, and the lines of
a committed ``runs.csv`` that no row file replaces) and writes to ``--out``
(default ``<RESULTS_DIR>/report``): ``leaderboard.csv`` (mean/std/n over seeds per group, DER),
``leaderboard.md`` (attack × defense pivots), ``ba_vs_asr.png`` and ``stage_cost.png``.
Only ``ok`` rows enter the statistics; failed runs are listed in a note, and so are the lines
whose seeds were computed on different hardware or CPU thread counts. Rows of one cell whose
stored configs differ in a value other than the seed (``dataset.limit_train``, ``train.epochs``,
``amp``, …) are never averaged as seeds: each setting is its own line, listed in a note
(``bench.rows.config_settings``).

Clean runs (``attack=none``, poison rate 0) are shown in every poison-rate table of their
dataset/model, as the first attack row, so each table carries its clean reference.

Besides ``bench/cli.py`` this is the only module that imports Hydra, for ``ReportCallback``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from omegaconf import DictConfig

from bench.errors import BenchError
from bench.rerun import classify
from bench.rows import NOT_STORED, atomic_write, latest_per_cell, load_results, main_settings

log = logging.getLogger("bench")

GROUP = ["dataset", "model", "attack", "defense", "poison_rate"]
STATS = ["ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "wall_s", "peak_mem_mb"]
CSV_COLUMNS = GROUP + [f"{m}_{s}" for m in [*STATS, "der"] for s in ("mean", "std", "n")]
DEFENSE_COLORS = {"none": "#444444", "abl": "#1f77b4", "dbd": "#2ca02c", "dlp": "#d62728"}
FALLBACK_COLORS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
HEADER = """\
- **BA**: top-1 accuracy on the full clean test set (BA_nt, in the CSV: without the target
  class's test images, as ABL's code reports it).
- **ASR**: fraction of triggered test samples (true label ≠ target) predicted as the target.
- **RA**: accuracy w.r.t. the true labels on the same triggered samples.
- **DER**: [max(0, ΔASR) − max(0, ΔBA) + 1] / 2 against `defense=none` (higher is better).

Cells are mean±std over seeds when n > 1, in % (wall time in s); — means not applicable."""


def none_first(names: Any) -> list[str]:
    """Sorted unique names with ``none`` first."""
    return sorted(set(names), key=lambda s: (s != "none", str(s)))


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by dataset, model, poison rate, then attack and defense with ``none`` first."""
    def key(s: pd.Series) -> pd.Series:
        if s.name in ("attack", "defense"):
            return s.map(lambda v: ("0" if v == "none" else "1") + str(v))
        return s

    keys = ["dataset", "model", "poison_rate", "attack", "defense"]
    return df.sort_values(keys, key=key, kind="stable").reset_index(drop=True)


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


def _seeds(rows: pd.DataFrame, by_defense: bool) -> str:
    """``seeds 0, 2`` or, per defense, ``none: seed 1; abl: seeds 0, 1``."""
    def seeds(g: pd.DataFrame) -> str:
        s = sorted(pd.to_numeric(g.seed, errors="coerce").dropna().astype(int))
        return f"seed{'s' if len(s) != 1 else ''} {', '.join(map(str, s))}"

    if not by_defense:
        return seeds(rows)
    return "; ".join(f"{d}: {seeds(g)}" for d, g in rows.groupby("defense", sort=True))


def setting_note(rows: pd.DataFrame) -> list[str]:
    """One bullet per cell whose rows ran stored configs that differ in a value other than the
    seed (``bench.rows.config_settings``): the main setting's values and row count under the
    plain name, then every other setting's line and its rows. ``rows`` has the leaderboard's
    attack names (``attack_settings``), not yet ``setting_names``."""
    if rows.empty or "attack_setting" not in rows:
        return []
    main, bullets = main_settings(rows), []
    levels = ((["dataset", "model", "attack", "poison_rate"], "attack_setting", "attack"),
              (GROUP, "defense_setting", "defense"))
    for by, col, name in levels:
        for key, g in rows[rows[col] != ""].groupby(by, dropna=False, sort=True):
            where = " · ".join(map(str, key[:3])) + (f" / {key[3]}" if name == "defense" else "")
            parts = []
            for label, h in g.groupby(col, sort=True):
                line = h[name].iloc[0]
                if main.loc[h.index, col].all():
                    n = len(h)
                    parts.insert(0, f"`{line}` ran {label} ({n} row{'s' if n != 1 else ''})")
                else:
                    parts.append(f"`{line} [{label}]` ({_seeds(h, name == 'attack')})")
            bullets.append(f"- {where} @ {float(key[-1]):g}: " + "; ".join(parts))
    if not bullets:
        return []
    n = len(bullets)
    return [f"{n} cell{'s' if n != 1 else ''} split by stored config (their rows differ in a "
            "config value other than the seed, so each setting is a line of its own, named by "
            "those values unless most of the cell's rows ran it; a key that only some rows "
            f"store splits nothing, and `{NOT_STORED}` marks rows that predate stored "
            "configs):", "", *bullets, ""]


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
    return _order(board[CSV_COLUMNS])


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


def _sections(board: pd.DataFrame) -> list[str]:
    """Per (dataset, model, poison_rate): BA/ASR, isolation, wall-time and DER pivots."""
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
    return out


def failed_note(failed: pd.DataFrame) -> list[str]:
    """``N failed runs:`` followed by one ``run_id — error`` bullet per failed row."""
    if failed.empty:
        return []
    lines = [f"{len(failed)} failed run{'s' if len(failed) != 1 else ''}:", ""]
    for rid, err in zip(failed.run_id, failed.error, strict=True):
        msg = str(err).strip().splitlines()[0][:200] if isinstance(err, str) and err else "?"
        lines.append(f"- {rid} — {msg.replace('|', '/')}")
    return [*lines, ""]


def superseded_note(superseded: pd.DataFrame | None) -> list[str]:
    """One bullet per ok row left out because a newer config of its cell, setting and seed
    exists (``bench.rows.latest_per_cell``)."""
    if superseded is None or superseded.empty:
        return []
    lines = [f"{len(superseded)} superseded row{'s' if len(superseded) != 1 else ''} left out "
             "(a newer config of the same cell, setting and seed exists; rerun or delete "
             "them):", ""]
    lines += [f"- {rid}" for rid in superseded.run_id]
    return [*lines, ""]


def _compact_keys(keys: list[str]) -> str:
    """``+a.b.x, +a.b.y`` → ``+a.b.{x, y}``."""
    parents: dict[str, list[str]] = {}
    for k in keys:
        sign, path = (k[0], k[1:]) if k[0] in "+-" else ("", k)
        head, _, leaf = path.rpartition(".")
        parents.setdefault(f"{sign}{head}", []).append(leaf)
    return ", ".join(f"{h}.{{{', '.join(v)}}}" if len(v) > 1 else f"{h}.{v[0]}".lstrip(".")
                     for h, v in parents.items())


def stale_note(ok: pd.DataFrame, results_dir: Path) -> list[str]:
    """Rows of the tables whose stored config this version builds differently (keys added,
    dropped or changed since they ran), grouped by those keys; rows whose stored config cannot
    be trusted; and the count of rows that predate stored configs (``bench.rerun.classify``).
    Such a row measured a config a rerun would not repeat exactly."""
    groups: dict[str, dict[str, list[int]]] = {}
    bare = 0
    for _, row in ok.iterrows():
        st = classify(row)
        if st.kind == "bare":
            bare += 1
            continue
        if st.kind == "ok":
            continue
        key = (_compact_keys(list(st.keys)) if st.kind == "stale" else
               "not buildable by this version" if st.kind == "unbuildable" else
               "stored config edited or unreadable")
        groups.setdefault(key, {}).setdefault(f"{row.attack}/{row.defense}", []).append(
            int(row.seed))
    lines = []
    if groups:
        n = sum(len(seeds) for cells in groups.values() for seeds in cells.values())
        lines += [f"{n} row{'s' if n != 1 else ''} ran under a config this version builds "
                  "differently (+ a key added since, - dropped, else changed); `python -m "
                  f"bench.rerun --check --results {results_dir}` names each row's commit:", ""]
        for key, cells in groups.items():
            lines.append(f"- {key}: " + ", ".join(
                f"{c} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))})"
                for c, v in sorted(cells.items())))
        lines += [""]
    if bare:
        lines += [f"{bare} row{'s' if bare != 1 else ''} predate{'s' if bare == 1 else ''} "
                  "stored configs: only the config hash in the run id records what ran.", ""]
    return lines


def _where(ok: pd.DataFrame) -> pd.DataFrame:
    """Per row: ``hw`` (the recorded hardware, else missing), ``threads`` (the recorded thread count
    on a CPU, else NaN) and ``text``, where the row was computed in words."""
    def col(name: str) -> pd.Series:
        return ok[name] if name in ok else pd.Series(None, index=ok.index, dtype=object)

    hw = col("hardware").map(lambda v: v.strip() if isinstance(v, str) and v.strip() else None)
    on_cpu = col("device").astype(str).isin(["cpu", "nan", "None", ""])
    threads = pd.to_numeric(col("threads"), errors="coerce").where(on_cpu)

    def text(h: Any, t: float, cpu: bool) -> str:
        out = h if isinstance(h, str) else "unrecorded hardware"
        if cpu:
            out += (", default threads" if pd.isna(t)
                    else f", {int(t)} thread{'s' if int(t) != 1 else ''}")
        return out

    return pd.DataFrame({"hw": hw, "threads": threads, "text": list(map(
        text, hw, threads, on_cpu))}, index=ok.index)


def mixed_compute_note(ok: pd.DataFrame) -> list[str]:
    """One bullet per leaderboard line whose rows were computed on more than one hardware or CPU
    thread count: bf16 numerics (and so BA/ASR) differ between them, so its mean mixes two
    numerics. A row that did not record its hardware (older rows) or thread count differs from
    none. ``ok`` has the leaderboard's attack names (``attack_settings``)."""
    if ok.empty:
        return []
    where = _where(ok)
    bullets = []
    for key, g in where.groupby([ok[c] for c in GROUP], dropna=False, sort=True):
        if g.hw.nunique() < 2 and g.threads.nunique() < 2:
            continue
        parts = []
        for text, h in g.groupby("text", sort=True):
            seeds = sorted(pd.to_numeric(ok.seed[h.index], errors="coerce").dropna().astype(int))
            parts.append(f"{text} (seed{'s' if len(seeds) != 1 else ''} "
                         f"{', '.join(map(str, seeds))})")
        dataset, model, attack, defense, rate = key
        bullets.append(f"- {dataset} · {model} · {attack} / {defense} @ {float(rate):g}: "
                       + "; ".join(parts))
    if not bullets:
        return []
    n = len(bullets)
    return [f"{n} line{'s' if n != 1 else ''} mix{'es' if n == 1 else ''} rows computed on "
            "different hardware or CPU thread counts (bf16 results differ between them):", "",
            *bullets, ""]


def markdown(board: pd.DataFrame, failed: pd.DataFrame, results_dir: Path, n_ok: int,
             superseded: pd.DataFrame | None = None, mixed: list[str] | None = None,
             stale: list[str] | None = None, split: list[str] | None = None) -> str:
    """The whole ``leaderboard.md``; ``mixed``, ``stale`` and ``split`` are
    ``mixed_compute_note``'s, ``stale_note``'s and ``setting_note``'s lines."""
    lines = [f"# Leaderboard — {results_dir}", "",
             f"{n_ok + len(failed)} runs: {n_ok} ok, {len(failed)} failed.", "", HEADER, ""]
    if not n_ok:
        lines += [f"**no successful runs in {results_dir}**", ""]
    return "\n".join(lines + failed_note(failed) + superseded_note(superseded) + (split or [])
                     + (mixed or [])
                     + (stale or []) + _sections(board)).rstrip() + "\n"


def defense_colors(defenses: list[str]) -> dict[str, str]:
    """Fixed colours for none/abl/dbd/dlp; other defenses take the fallback cycle in order."""
    others = [d for d in sorted(defenses) if d not in DEFENSE_COLORS]
    fallback = {d: FALLBACK_COLORS[i % len(FALLBACK_COLORS)] for i, d in enumerate(others)}
    return {d: DEFENSE_COLORS.get(d) or fallback[d] for d in defenses}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend switch
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` (dpi 120) and replace ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def ba_vs_asr(board: pd.DataFrame, path: Path) -> Path:
    """Scatter of group-mean BA (y) vs ASR (x) with std bars; colour = defense, marker = attack;
    hollow markers for ``defense=none``. Clean groups (no ASR) are left out."""
    pts = board.dropna(subset=["ba_mean", "asr_mean"])
    colors, attacks = defense_colors(none_first(pts.defense)), sorted(set(pts.attack))
    markers = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)}
    fig = _new_figure(7.5, 5.5)
    ax = fig.add_subplot()
    for _, r in pts.iterrows():
        c = colors[r.defense]
        ax.errorbar(r.asr_mean, r.ba_mean, xerr=0 if pd.isna(r.asr_std) else r.asr_std,
                    yerr=0 if pd.isna(r.ba_std) else r.ba_std,
                    fmt=markers[r.attack], color=c, mec=c, ms=9, mew=1.5, capsize=3, lw=1,
                    mfc="none" if r.defense == "none" else c)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="ASR (lower is better)",
           ylabel="BA (higher is better)", title="BA vs ASR, group mean ± std over seeds")
    ax.grid(alpha=0.3)
    def_handles = [Line2D([], [], ls="", marker="s", ms=9, color=c, label=d,
                          mfc="none" if d == "none" else c) for d, c in colors.items()]
    att_handles = [Line2D([], [], ls="", marker=m, ms=9, color="0.35", label=a)
                   for a, m in markers.items()]
    if def_handles:
        # one legend with two headed sections: two legends placed apart overlap once they grow
        def head(text: str) -> Line2D:
            return Line2D([], [], ls="", marker="", label=text)

        handles = [head("defense"), *def_handles, head(" "), head("attack"), *att_handles]
        legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        for i in (0, len(def_handles) + 2):
            legend.get_texts()[i].set_fontweight("bold")
    else:
        ax.text(0.5, 0.5, "no attacked runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_png(fig, path)


def _stages(v: Any) -> dict[str, float]:
    """``{stage: seconds}`` from a ``stage_s`` cell (JSON string or dict; else empty)."""
    try:
        d = json.loads(v) if isinstance(v, str) else v
    except json.JSONDecodeError:
        return {}
    return {k: float(s) for k, s in d.items()} if isinstance(d, dict) else {}


def stage_cost(ok: pd.DataFrame, path: Path) -> Path:
    """Stacked horizontal bars of mean seconds per stage, one bar per (attack, defense)."""
    stages = pd.DataFrame(list(ok.stage_s.map(_stages)), index=ok.index).fillna(0.0)
    # load_results stores stage_s with sorted keys, so the run's order is lost: poison first,
    # evaluate last, the defense's stages alphabetically in between
    rank = {"poison": "0", "evaluate": "2"}
    stages = stages[sorted(stages.columns, key=lambda c: rank.get(c, "1") + c)]
    groups = stages.groupby([ok.attack, ok.defense]).mean() if len(stages.columns) else stages
    order = [(a, d) for a in none_first(ok.attack) for d in none_first(ok.defense)]
    groups = groups.reindex([k for k in order if k in groups.index])
    fig = _new_figure(8.0, max(2.5, 0.45 * len(groups) + 1.5))
    ax = fig.add_subplot()
    labels, left = [f"{a} / {d}" for a, d in groups.index], [0.0] * len(groups)
    for i, stage in enumerate(groups.columns):
        ax.barh(labels, groups[stage], left=left, label=stage, color=f"C{i % 10}")
        left = [x + y for x, y in zip(left, groups[stage], strict=True)]
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.set(xlabel="seconds (mean over runs)", ylabel="attack / defense",
           title="Cost per stage")
    if len(groups.columns):
        ax.legend(title="stage", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.text(0.5, 0.5, "no stage timings", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_png(fig, path)


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
    board, mixed = leaderboard(named), mixed_compute_note(named)
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
                 markdown(board, failed, results_dir, len(ok), superseded, mixed, stale, split))
    if not ok.empty:
        paths["ba_vs_asr.png"] = ba_vs_asr(board, out / "ba_vs_asr.png")
        paths["stage_cost.png"] = stage_cost(ok, out / "stage_cost.png")
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
