"""Figures of the report: the BA-vs-ASR scatter and the per-stage cost bars (``bench.report``
writes them as ``ba_vs_asr.png`` and ``stage_cost.png``), their fixed defense colours, and the
``none``-first name order they share with the Markdown tables."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bench.rows import atomic_write, parse_json_object

DEFENSE_COLORS = {"none": "#444444", "abl": "#1f77b4", "dbd": "#2ca02c", "dlp": "#d62728"}
FALLBACK_COLORS = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def none_first(names: Any) -> list[str]:
    """Sorted unique names with ``none`` first."""
    return sorted(set(names), key=lambda s: (s != "none", str(s)))


def order_lines(df: pd.DataFrame) -> pd.DataFrame:
    """Leaderboard lines sorted by dataset, model, poison rate, then attack and defense with
    ``none`` first (as ``none_first``); a fresh index."""
    def key(s: pd.Series) -> pd.Series:
        if s.name in ("attack", "defense"):
            return s.map(lambda v: ("0" if v == "none" else "1") + str(v))
        return s

    keys = ["dataset", "model", "poison_rate", "attack", "defense"]
    return df.sort_values(keys, key=key, kind="stable").reset_index(drop=True)


def defense_colors(defenses: list[str]) -> dict[str, str]:
    """Fixed colours for none/abl/dbd/dlp; other defenses take the fallback cycle in order."""
    others = [d for d in sorted(defenses) if d not in DEFENSE_COLORS]
    fallback = {d: FALLBACK_COLORS[i % len(FALLBACK_COLORS)] for i, d in enumerate(others)}
    return {d: DEFENSE_COLORS.get(d) or fallback[d] for d in defenses}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend switch
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` (dpi 120) and replace ``path`` atomically (``bench.rows.atomic_write``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    return path


def ba_vs_asr(board: pd.DataFrame, path: Path) -> Path:
    """Scatter of group-mean BA (y) vs ASR (x) with std bars; colour = defense, marker = attack;
    hollow markers for ``defense=none``. Clean groups (no ASR) are left out."""
    pts = board.dropna(subset=["ba_mean", "asr_mean"])
    colors, attacks = defense_colors(none_first(pts.defense)), sorted(set(pts.attack))
    markers = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)}
    fig = new_figure(7.5, 5.5)
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
    d = parse_json_object(v) or {}
    return {k: float(s) for k, s in d.items()}


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
    fig = new_figure(8.0, max(2.5, 0.45 * len(groups) + 1.5))
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
