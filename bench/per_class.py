"""Clean accuracy per class, from each row's ``extra.clean_acc_class``: where a defense's BA goes.

A BA drop says how much a defense costs, not where: DBD's credibility split can leave a hard
class out of the labelled set, ABL's unlearning can erase the target class or the class its
isolated clean samples come from. ``class_accuracy`` averages each leaderboard line's per-class
accuracies over its rows (seeds); ``bench.report`` writes them as a table per section of
``leaderboard.md`` (``class_accuracy_md``) and as ``class_accuracy.png`` (``heatmap``).
Rows from before the per-class column, or without it, are left out: ``n`` counts the rows
averaged, ``of`` the line's rows, shown as ``1/3`` (and in the figure) where they differ.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from bench.data import CLASS_NAMES
from bench.plots import new_figure, order_lines, save_png
from bench.rows import GROUP, parse_json_object

MAX_CLASSES = 20  # wider tables and figures stop being readable: left out, with a note


def _accuracies(extra: Any) -> list[float] | None:
    """``clean_acc_class`` of an ``extra`` cell (dict or JSON), or None."""
    acc = (parse_json_object(extra) or {}).get("clean_acc_class")
    try:
        return ([math.nan if a is None else float(a) for a in acc]
                if isinstance(acc, list) and acc else None)
    except (TypeError, ValueError):  # a value that is no number: edited by hand
        return None


def _target(g: pd.DataFrame) -> int | None:
    """The line's single all-to-one (or clean-label) target; None for all-to-all or none."""
    if g.attack.iloc[0] == "none" or (g.get("label_mode", pd.Series(dtype=object))
                                        == "all2all").any():
        return None
    t = pd.to_numeric(g.get("target", pd.Series(dtype=float)), errors="coerce").dropna()
    return int(t.iloc[0]) if len(t) and t.nunique() == 1 else None


def class_accuracy(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per leaderboard line with per-class data: ``GROUP``, ``target``, ``n`` (rows
    averaged), ``of`` (the line's rows) and ``acc``, the mean accuracy of each class (NaN where
    no row has the class)."""
    cols = [*GROUP, "target", "n", "of", "acc"]
    if ok.empty or "extra" not in ok:
        return pd.DataFrame(columns=cols)
    acc = ok.extra.map(_accuracies)
    rows = ok.assign(_acc=acc, poison_rate=pd.to_numeric(ok.poison_rate, errors="coerce"))
    of = rows.groupby(GROUP, dropna=False, sort=False).size()
    out = []
    for key, g in rows[acc.notna()].groupby(GROUP, dropna=False, sort=False):
        width = max(map(len, g._acc))
        stack = np.array([a + [math.nan] * (width - len(a)) for a in g._acc], dtype=float)
        with warnings.catch_warnings():  # a class no row has: NaN, without "empty slice"
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = [float(v) for v in np.nanmean(stack, 0)]
        out.append(dict(zip(GROUP, key, strict=True)) | {"target": _target(g), "n": len(g),
                                                          "of": int(of[key]), "acc": mean})
    return order_lines(pd.DataFrame(out, columns=cols))


def class_names(dataset: str, k: int) -> list[str]:
    """The dataset's class names when known and ``k`` matches, else ``0..k-1``."""
    names = CLASS_NAMES.get(dataset)
    return list(names) if names is not None and len(names) == k else [str(c) for c in range(k)]


def _n(r: Any) -> str:
    """``n``, or ``n/of`` where some of the line's rows have no per-class data."""
    return f"{r.n}" if r.n == r.of else f"{r.n}/{r.of}"


def class_accuracy_md(table: pd.DataFrame) -> list[str]:
    """Markdown lines: attack, defense, n, then each class's accuracy (%); the target class's
    cell in bold. Empty without rows; a one-line note instead of a table above ``MAX_CLASSES``."""
    if table.empty:
        return []
    k = max(map(len, table.acc))
    if k > MAX_CLASSES:
        return [f"Clean accuracy per class: {k} classes, left out (more than {MAX_CLASSES}).", ""]
    names = class_names(table.dataset.iloc[0], k)
    lines = ["Clean accuracy per class (%, **target class**)", "",
             "| attack | defense | n | " + " | ".join(names) + " |", "|---" * (k + 3) + "|"]
    for r in table.itertuples():
        cells = ["—" if c >= len(r.acc) or math.isnan(r.acc[c]) else f"{100 * r.acc[c]:.1f}"
                 for c in range(k)]
        if r.target is not None and not pd.isna(r.target) and int(r.target) < k:
            cells[int(r.target)] = f"**{cells[int(r.target)]}**"
        lines.append(f"| {r.attack} | {r.defense} | {_n(r)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def section_md(table: pd.DataFrame | None, dataset: str, model: str, rate: float) -> list[str]:
    """``class_accuracy_md`` of one leaderboard section: its dataset, model and poison rate, and
    its clean line (``attack=none``), as the section's tables show it."""
    if table is None or table.empty:
        return []
    return class_accuracy_md(table[(table.dataset == dataset) & (table.model == model)
                                   & ((table.poison_rate == rate) | (table.attack == "none"))])


def heatmap(table: pd.DataFrame, path: Path) -> Path | None:
    """One heatmap per (dataset, model) with at most ``MAX_CLASSES`` classes: a line per
    leaderboard line (``attack / defense``, the poison rate too when the panel has several, and
    ``n/of`` rows where not all have per-class data), a column per class, the accuracy in % in
    each cell, the target class's cell outlined. Writes nothing and returns None when no
    panel qualifies (no per-class data, or only wider datasets: the Markdown says so)."""
    panels = [(key, g) for key, g in table.groupby(["dataset", "model"], sort=True)
              if max(map(len, g.acc)) <= MAX_CLASSES]
    if not panels:
        return None
    heights = [max(1.5, 0.32 * len(g) + 1.2) for _, g in panels]
    fig = new_figure(9.0, sum(heights) + 0.3)
    fig.set_layout_engine("constrained")  # panels, tick labels and the colour bar apart
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, ((dataset, model), g) in zip(axes, panels, strict=True):
        k = max(map(len, g.acc))
        grid = np.array([a + [math.nan] * (k - len(a)) for a in g.acc], dtype=float)
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        several = g.poison_rate.nunique() > 1
        ax.set_yticks(range(len(g)), [f"{r.attack} / {r.defense}"
                                      + (f" @ {r.poison_rate:g}" if several else "")
                                      + ("" if r.n == r.of else f" (n {_n(r)})")
                                      for r in g.itertuples()], fontsize=8)
        ax.set_xticks(range(k), class_names(dataset, k), rotation=40, ha="right", fontsize=8)
        for i, r in enumerate(g.itertuples()):
            for c in range(k):
                if not math.isnan(grid[i, c]):
                    ax.text(c, i, f"{100 * grid[i, c]:.0f}", ha="center", va="center",
                            fontsize=7)
            if r.target is not None and not pd.isna(r.target) and int(r.target) < k:
                ax.add_patch(Rectangle((int(r.target) - 0.5, i - 0.5), 1, 1, fill=False,
                                       edgecolor="black", lw=1.5))
        ax.set_title(f"Clean accuracy per class (%) — {dataset} · {model}; outlined: target",
                     fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.6, label="accuracy")
    return save_png(fig, path)

