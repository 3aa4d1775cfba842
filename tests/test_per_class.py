"""Clean accuracy per class in the report: means over a line's rows, the Markdown table (target
in bold, class names), the heatmap, and the report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.patches import Rectangle

from bench.per_class import (
    MAX_CLASSES,
    class_accuracy,
    class_accuracy_md,
    heatmap,
    section_md,
)
from bench.report import report
from bench.rows import write_row

NAN = math.nan


def row(attack: str, defense: str, seed: int, acc: list[float] | None, dataset: str = "toy",
        **kw) -> dict:
    extra = {"clean_acc_class": acc} if acc is not None else {}
    return {"run_id": f"{dataset}-cnn-{attack}-{defense}-s{seed}", "dataset": dataset,
            "model": "cnn", "attack": attack, "defense": defense,
            "poison_rate": 0.0 if attack == "none" else 0.1, "target": None if attack == "none"
            else 1, "label_mode": "all2one", "seed": seed, "status": "ok", "ba": 0.5,
            "asr": NAN if attack == "none" else 0.5, "extra": json.dumps(extra)} | kw


def test_means_over_each_lines_rows_with_per_class_data() -> None:
    rows = pd.DataFrame([
        row("badnets", "abl", 0, [1.0, 0.0, 0.5]),
        row("badnets", "abl", 1, [0.5, 0.5, NAN]),  # a class without test images: NaN
        row("badnets", "abl", 2, None),  # an older row without the column: left out
        row("badnets", "none", 0, [0.9, 0.8, 0.7]),
        row("none", "none", 0, [0.2, 0.4, 0.6]),
        row("wanet", "abl", 0, [0.1, 0.2, 0.3], label_mode="all2all"),
    ])
    t = class_accuracy(rows).set_index(["attack", "defense"])
    assert t.loc[("badnets", "abl"), "n"] == 2 and t.loc[("badnets", "abl"), "of"] == 3
    assert "| badnets | abl | 2/3 |" in "\n".join(class_accuracy_md(class_accuracy(rows)))
    assert t.loc[("badnets", "abl"), "acc"] == [0.75, 0.25, 0.5]
    assert t.loc[("badnets", "none"), "target"] == 1
    assert pd.isna(t.loc[("none", "none"), "target"])  # no attack, no target
    assert pd.isna(t.loc[("wanet", "abl"), "target"])  # all-to-all: every class is a target
    # none first, on both axes: the clean line, then each attack's none before its defenses
    assert list(class_accuracy(rows).attack)[:1] == ["none"]
    assert list(class_accuracy(rows)[lambda d: d.attack == "badnets"].defense) == ["none", "abl"]
    assert class_accuracy(rows[rows.seed == 2].iloc[:1]).empty
    # no label_mode column (a frame not from load_results): targets still read
    assert class_accuracy(rows.drop(columns="label_mode")).target.notna().sum() == 3


def test_unreadable_values_leave_the_row_out_not_the_report() -> None:
    rows = pd.DataFrame([row("badnets", "abl", 0, None, extra='{"clean_acc_class": [0.5, null]}'),
                         row("badnets", "abl", 1, None, extra='{"clean_acc_class": [0.5, "x"]}'),
                         row("badnets", "abl", 2, None, extra="{not json")])
    t = class_accuracy(rows)
    assert len(t) == 1 and t.n[0] == 1 and t.of[0] == 3  # null is NaN; "x" and bad JSON: out
    assert t.acc[0][0] == 0.5 and math.isnan(t.acc[0][1])


def test_each_section_shows_its_poison_rate_and_the_clean_line() -> None:
    rows = pd.DataFrame([row("none", "none", 0, [0.9, 0.9]),
                         row("sig", "none", 0, [0.8, 0.7], poison_rate=0.05),
                         row("badnets", "none", 0, [0.6, 0.5])])
    t = class_accuracy(rows)
    low, high = ("\n".join(section_md(t, "toy", "cnn", r)) for r in (0.05, 0.1))
    assert "| none | none |" in low and "| sig | none |" in low and "badnets" not in low
    assert "| none | none |" in high and "| badnets | none |" in high and "sig" not in high
    assert section_md(t, "other", "cnn", 0.1) == [] and section_md(None, "toy", "cnn", 0.1) == []


def test_markdown_names_the_classes_and_bolds_the_target() -> None:
    fm = [0.1 * c for c in range(10)]
    t = class_accuracy(pd.DataFrame([row("badnets", "dbd", 0, fm, dataset="fashion_mnist")]))
    lines = class_accuracy_md(t)
    assert "| attack | defense | n | T-shirt/top | Trouser |" in lines[2]
    assert lines[4] == ("| badnets | dbd | 1 | 0.0 | **10.0** | 20.0 | 30.0 | 40.0 | 50.0 | "
                        "60.0 | 70.0 | 80.0 | 90.0 |")
    toy = class_accuracy(pd.DataFrame([row("badnets", "dbd", 0, [1.0, NAN])]))
    assert class_accuracy_md(toy)[2] == "| attack | defense | n | 0 | 1 |"  # unknown: indices
    assert class_accuracy_md(toy)[4] == "| badnets | dbd | 1 | 100.0 | **—** |"
    wide = class_accuracy(pd.DataFrame([row("badnets", "dbd", 0, [0.5] * (MAX_CLASSES + 1))]))
    assert class_accuracy_md(wide)[0].startswith(f"Clean accuracy per class: {MAX_CLASSES + 1}")
    assert heatmap(wide, Path("unused.png")) is None  # nothing drawable: no figure
    assert class_accuracy_md(class_accuracy(pd.DataFrame())) == []


def test_heatmap_lines_classes_and_target_outlines(tmp_path: Path, monkeypatch) -> None:
    figs = []
    monkeypatch.setattr("bench.per_class.save_png", lambda fig, path: figs.append(fig) or path)
    t = class_accuracy(pd.DataFrame([row("none", "none", 0, [0.9, 0.8]),
                                     row("badnets", "none", 0, [0.9, 0.7]),
                                     row("badnets", "abl", 0, [0.2, 0.1]),
                                     row("badnets", "abl", 1, None)]))
    heatmap(t, tmp_path / "c.png")
    ax = figs[0].axes[0]
    assert [x.get_text() for x in ax.get_yticklabels()] == [
        "none / none @ 0", "badnets / none @ 0.1", "badnets / abl @ 0.1 (n 1/2)"]
    assert [x.get_text() for x in ax.get_xticklabels()] == ["0", "1"]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [(b.get_x(), b.get_y()) for b in boxes] == [(0.5, 0.5), (0.5, 1.5)]  # class 1
    assert ax.images[0].get_array()[2, 0] == 0.2
    assert sorted(x.get_text() for x in ax.texts)[:2] == ["10", "20"]  # cells in %


def test_report_writes_the_table_and_the_figure(tmp_path: Path) -> None:
    res = tmp_path / "res"
    for seed in (0, 1):
        write_row(res, row("badnets", "none", seed, [0.9, 0.8 + 0.1 * seed]))
        write_row(res, row("badnets", "abl", seed, [0.5, 0.1]))
    paths = report(res)
    assert paths["class_accuracy.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["leaderboard.md"].read_text()
    # the leaderboard's line names: a target other than 0 is part of the attack's
    assert "| badnets (target 1) | none | 2 | 90.0 | **85.0** |" in md
    assert "| badnets (target 1) | abl | 2 | 50.0 | **10.0** |" in md
