"""Report: leaderboard numbers (means, stds, n, DER by hand), Markdown cells, figures, CLI."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.legend import Legend
from omegaconf import OmegaConf

from bench.plots import DEFENSE_COLORS, FALLBACK_COLORS, ba_vs_asr, defense_colors
from bench.report import ReportCallback, leaderboard, main, report
from bench.rows import COLUMNS, collect, write_row

NAN = math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (attack, defense, seed) -> (ba, asr, iso_precision, iso_recall)
CELLS = {
    ("badnets", "none", 0): (0.90, 0.95, NAN, NAN),
    ("badnets", "none", 1): (0.92, 0.97, NAN, NAN),
    ("badnets", "abl", 0): (0.88, 0.02, 0.8, 0.7),
    ("badnets", "abl", 1): (0.86, 0.04, 0.9, 0.5),
    ("none", "none", 0): (0.93, NAN, NAN, NAN),
    ("none", "none", 1): (0.95, NAN, NAN, NAN),
    ("none", "abl", 0): (0.91, NAN, 0.0, NAN),
    ("none", "abl", 1): (0.89, NAN, 0.0, NAN),
}
STAGES = {"none": {"poison": 0.1, "train": 2.0, "evaluate": 0.05},
          "abl": {"poison": 0.1, "isolate": 1.0, "unlearn": 0.5, "train": 3.0, "evaluate": 0.05}}


def make_row(attack: str, defense: str, seed: int, **kw) -> dict:
    return {"run_id": f"toy-cnn-{attack}-{defense}-s{seed}", "dataset": "toy", "model": "cnn",
            "attack": attack, "defense": defense, "poison_rate": 0.1 if attack != "none" else 0.0,
            "seed": seed, "status": "ok", "error": None} | kw


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = tmp_path_factory.mktemp("res")
    for (attack, defense, seed), (ba, asr, prec, rec) in CELLS.items():
        write_row(res, make_row(attack, defense, seed, ba=ba, asr=asr, ra=1 - ba,
                                iso_precision=prec, iso_recall=rec, wall_s=10.0 + seed,
                                peak_mem_mb=100.0, stage_s=STAGES[defense]))
    write_row(res, make_row("badnets", "abl", 2, status="failed", error="RuntimeError: boom",
                            wall_s=1.0))
    return res


@pytest.fixture(scope="module")
def built(results: Path) -> dict[str, Path]:
    return report(results)  # built once: rendering figures is the slow part


def test_leaderboard_csv_numbers(built: dict[str, Path]) -> None:
    board = pd.read_csv(built["leaderboard.csv"])
    assert list(zip(board.attack, board.defense, strict=True)) == [
        ("none", "none"), ("none", "abl"), ("badnets", "none"), ("badnets", "abl")]
    abl = board.set_index(["attack", "defense"]).loc["badnets", "abl"]
    assert abl.ba_mean == pytest.approx(0.87) and abl.asr_mean == pytest.approx(0.03)
    assert abl.ba_std == pytest.approx(0.02 / math.sqrt(2))  # sample std of (0.88, 0.86)
    assert abl.ba_n == 2  # the failed seed-2 row is not counted
    assert abl.iso_recall_mean == pytest.approx(0.6) and abl.wall_s_mean == pytest.approx(10.5)
    # DER per seed vs the none run of the same seed: seed 0 (0.93 - 0.02 + 1) / 2 = 0.955,
    # seed 1 (0.93 - 0.06 + 1) / 2 = 0.935
    assert abl.der_mean == pytest.approx(0.945) and abl.der_n == 2
    assert abl.der_std == pytest.approx(0.02 / math.sqrt(2))
    clean = board[(board.attack == "none") | (board.defense == "none")]
    assert clean.der_mean.isna().all() and (clean.der_n == 0).all()
    assert (board[board.attack == "none"].asr_n == 0).all()


def test_der_falls_back_to_none_group_mean() -> None:
    rows = [make_row("badnets", "none", s, ba=ba, asr=asr) for s, ba, asr in
            [(0, 0.90, 0.90), (1, 0.94, 1.00)]]
    rows.append(make_row("badnets", "abl", 7, ba=0.90, asr=0.10))  # no none run with seed 7
    board = leaderboard(pd.DataFrame(rows, columns=COLUMNS))
    abl = board[board.defense == "abl"].iloc[0]
    # vs the none-group mean (BA 0.92, ASR 0.95): (0.85 - 0.02 + 1) / 2
    assert abl.der_mean == pytest.approx(0.915) and abl.der_n == 1 and math.isnan(abl.der_std)
    assert math.isnan(abl.ba_std) and abl.ba_n == 1


def test_leaderboard_ra_and_ba_nt_are_their_rows_means() -> None:
    """RA and BA_nt are mean/std/n over seeds of the rows' own RA and BA_nt, as BA and ASR are
    (not ASR's or BA's numbers under another name)."""
    rows = [make_row("badnets", "abl", s, ba=ba, ba_nt=ba_nt, asr=asr, ra=ra)
            for s, ba, ba_nt, asr, ra in [(0, 0.90, 0.86, 0.10, 0.70), (1, 0.80, 0.74, 0.30, 0.50)]]
    abl = leaderboard(pd.DataFrame(rows, columns=COLUMNS)).iloc[0]
    assert abl.ra_mean == pytest.approx(0.60) and abl.ra_std == pytest.approx(0.2 / math.sqrt(2))
    assert abl.ba_nt_mean == pytest.approx(0.80)
    assert abl.ba_nt_std == pytest.approx(0.12 / math.sqrt(2))
    assert abl.ra_n == abl.ba_nt_n == 2


def test_scatter_has_one_legend_with_both_sections(tmp_path: Path, monkeypatch) -> None:
    figs = []
    monkeypatch.setattr("bench.plots.save_png", lambda fig, path: figs.append(fig) or path)
    defenses = ["none", "abl", "dbd", "dlp", *(f"dlp.v{i}" for i in range(8))]
    attacks = [f"attack{i}" for i in range(10)]
    rows = [make_row(a, d, 0, ba=0.8, asr=0.5) for a in attacks for d in defenses]
    ba_vs_asr(leaderboard(pd.DataFrame(rows, columns=COLUMNS)), tmp_path / "x.png")
    (fig,) = figs
    # two long legends placed apart used to overlap; one legend cannot
    (legend,) = [a for a in fig.axes[0].get_children() if isinstance(a, Legend)]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["defense", *defenses, " ", "attack", *attacks]
    bold = [t.get_text() for t in legend.get_texts() if t.get_fontweight() == "bold"]
    assert bold == ["defense", "attack"]


def test_fixed_defense_colours() -> None:
    colors = defense_colors(["zeta", "dlp", "alpha", "none"])
    assert colors["none"] == DEFENSE_COLORS["none"] and colors["dlp"] == DEFENSE_COLORS["dlp"]
    assert colors["alpha"] == FALLBACK_COLORS[0] and colors["zeta"] == FALLBACK_COLORS[1]


def test_leaderboard_md_cells_and_failed_note(built: dict[str, Path]) -> None:
    md = built["leaderboard.md"].read_text()
    assert "9 runs: 8 ok, 1 failed." in md
    assert "1 failed run:" in md and "- toy-cnn-badnets-abl-s2 — RuntimeError: boom" in md
    assert "## toy · cnn · poison rate 0.1" in md
    assert "| attack \\ defense | none | abl |" in md
    assert "| none | 94.0±1.4 / — | 90.0±1.4 / — |" in md
    assert "| badnets | 91.0±1.4 / 96.0±1.4 | 87.0±1.4 / 3.0±1.4 |" in md
    assert "| badnets | 85.0±7.1 / 60.0±14.1 |" in md  # isolation: only abl reports suspects
    assert "| badnets | 10.5±0.7 | 10.5±0.7 |" in md  # wall time (s)
    assert "| badnets | 94.5±1.4 |" in md  # DER (%)
    assert md.index("| none |") < md.index("| badnets |")


def test_figures_are_pngs(built: dict[str, Path]) -> None:
    for name in ("ba_vs_asr.png", "stage_cost.png"):
        data = built[name].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_empty_results_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows").mkdir()
    assert main([str(tmp_path)]) == 0
    assert f"no successful runs in {tmp_path}" in capsys.readouterr().out
    out = tmp_path / "report"
    assert f"no successful runs in {tmp_path}" in (out / "leaderboard.md").read_text()
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.empty and {"ba_mean", "ba_std", "ba_n", "der_mean"} <= set(board.columns)


def test_all_failed_lists_failures(tmp_path: Path) -> None:
    write_row(tmp_path, make_row("badnets", "abl", 0, status="failed", error="OOM\ntrace"))
    md = report(tmp_path)["leaderboard.md"].read_text()
    assert "no successful runs" in md and "- toy-cnn-badnets-abl-s0 — OOM" in md


def test_missing_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert "no results dir" in capsys.readouterr().err


def test_callback_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_row(tmp_path, make_row("badnets", "abl", 0, status="failed", error="boom"))
    ReportCallback().on_multirun_end(OmegaConf.create({"results_dir": str(tmp_path)}))
    assert (tmp_path / "report" / "leaderboard.md").exists()
    with caplog.at_level(logging.WARNING, logger="bench"):
        ReportCallback().on_multirun_end(OmegaConf.create({"results_dir": "/nonexistent/x"}))
    assert "report failed" in caplog.text


def test_cli_subprocess(tmp_path: Path) -> None:
    # one undefended group: no DER, so the CLI never imports torch and the test stays fast
    write_row(tmp_path, make_row("badnets", "none", 0, ba=0.9, asr=0.95, stage_s=STAGES["none"]))
    write_row(tmp_path, make_row("badnets", "abl", 0, status="failed", error="boom"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "1 failed run(s)" in proc.stdout and f"wrote {out / 'ba_vs_asr.png'}" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"leaderboard.csv", "leaderboard.md",
                                               "ba_vs_asr.png", "stage_cost.png"}
    assert "| badnets | 90.0 / 95.0 |" in (out / "leaderboard.md").read_text()


def test_superseded_config_is_not_another_seed(tmp_path: Path) -> None:
    """A row of an older config of the same cell and seed (its config hash changed) is left out
    and listed, not averaged in as a second seed."""
    old = make_row("badnets", "abl", 0, ba=0.50, asr=0.90, timestamp="2026-01-01T00:00:00+00:00")
    new = make_row("badnets", "abl", 0, ba=0.80, asr=0.10, timestamp="2026-01-02T00:00:00+00:00")
    write_row(tmp_path, old | {"run_id": "toy-cnn-badnets-abl-s0-oldhash"})
    write_row(tmp_path, new | {"run_id": "toy-cnn-badnets-abl-s0-newhash"})
    built = report(tmp_path)
    board = pd.read_csv(built["leaderboard.csv"])
    assert board.ba_n.tolist() == [1] and board.ba_mean.tolist() == [0.80]
    md = built["leaderboard.md"].read_text()
    assert "1 superseded row left out" in md and "- toy-cnn-badnets-abl-s0-oldhash" in md


def test_label_modes_and_targets_are_separate_lines_not_superseded(tmp_path: Path) -> None:
    """A sweep over attack.label_mode or attack.target: each setting is its own leaderboard
    line (and its own DER reference), none supersedes another."""
    for i, (mode, target, defense, ba, asr) in enumerate([
            ("all2one", 0, "none", 0.90, 0.99), ("all2one", 0, "abl", 0.85, 0.03),
            ("all2all", 0, "none", 0.88, 0.90), ("all2all", 0, "abl", 0.80, 0.10),
            ("all2one", 3, "none", 0.89, 0.98)]):
        write_row(tmp_path, make_row("badnets", defense, 0, ba=ba, asr=asr, target=target,
                                     label_mode=mode, timestamp=f"2026-01-0{i + 1}T00:00:00")
                  | {"run_id": f"toy-cnn-badnets-{defense}-s0-{mode}-{target}"})
    built = report(tmp_path)
    board = pd.read_csv(built["leaderboard.csv"]).set_index(["attack", "defense"])
    assert board.ba_mean.to_dict() == {
        ("badnets", "none"): 0.90, ("badnets", "abl"): 0.85,
        ("badnets (all2all)", "none"): 0.88, ("badnets (all2all)", "abl"): 0.80,
        ("badnets (target 3)", "none"): 0.89}
    assert board.der_mean[("badnets (all2all)", "abl")] == pytest.approx((0.8 - 0.08 + 1) / 2)
    assert "superseded" not in built["leaderboard.md"].read_text()


def test_lines_mixing_hardware_or_threads_are_listed(tmp_path: Path) -> None:
    """bf16 numerics depend on the CPU's ISA and thread count: a line whose seeds ran on different
    ones is listed with where each seed ran; a uniform line, a CUDA line whose thread counts
    differ, and the fixture's rows (no hardware recorded) are not."""
    def row(defense: str, seed: int, hardware: str, threads: int | None, device: str = "cpu"):
        return make_row("badnets", defense, seed, ba=0.9, asr=0.1, hardware=hardware,
                        threads=threads, device=device)

    for r in [row("none", 0, "AVX512 avx512_bf16", 2), row("none", 1, "AVX512 avx512_bf16", 1),
              row("none", 2, "AVX512 avx512_bf16", 1),
              row("abl", 0, "AVX512 avx512_bf16 amx_bf16", 1), row("abl", 1, "", 1),
              row("abl", 2, "AVX512 avx512_bf16", 1),
              row("sig", 0, "AVX2", 1), row("sig", 1, "", None),  # unrecorded: no difference
              row("dlp", 0, "AVX2", 1), row("dlp", 1, "AVX2", 1),
              row("dbd", 0, "NVIDIA H200", 1, "cuda"), row("dbd", 1, "NVIDIA H200", 8, "cuda")]:
        write_row(tmp_path, r)
    md = report(tmp_path)["leaderboard.md"].read_text()
    assert "2 lines mix rows computed on different hardware or CPU thread counts" in md
    assert ("- toy · cnn · badnets / none @ 0.1: AVX512 avx512_bf16, 1 thread (seeds 1, 2); "
            "AVX512 avx512_bf16, 2 threads (seed 0)") in md
    assert ("- toy · cnn · badnets / abl @ 0.1: AVX512 avx512_bf16 amx_bf16, 1 thread (seed 0); "
            "AVX512 avx512_bf16, 1 thread (seed 2); unrecorded hardware, 1 thread (seed 1)") in md
    assert "badnets / dlp" not in md and "badnets / dbd" not in md and "badnets / sig" not in md


def test_uniform_lines_have_no_mixed_note(built: dict[str, Path]) -> None:
    assert "mix rows computed" not in built["leaderboard.md"].read_text()


def test_fresh_clone_reports_the_committed_runs_csv(tmp_path: Path) -> None:
    """Row files are not committed: the report of a clone reads runs.csv, plus any new rows."""
    for seed, ba in ((0, 0.80), (1, 0.70)):
        write_row(tmp_path, make_row("badnets", "none", seed, ba=ba, asr=1.0))
    collect(tmp_path)
    for f in (tmp_path / "rows").iterdir():
        f.unlink()
    write_row(tmp_path, make_row("badnets", "none", 2, ba=0.90, asr=1.0))
    board = pd.read_csv(report(tmp_path)["leaderboard.csv"])
    assert board.ba_n.tolist() == [3] and board.ba_mean.tolist() == pytest.approx([0.80])


def _config(seed: int, defense: str = "none", **changed) -> dict:
    """A stored config (``bench.config.hashed_config``'s shape, cut down) with ``changed``."""
    cfg = {"dataset": {"name": "toy", "limit_train": None}, "attack": {"name": "badnets"},
           "defense": {"name": defense, "params": {"epochs": 20} if defense != "none" else {}},
           "train": {"epochs": 15}, "seed": seed, "amp": True}
    for key, value in changed.items():  # "train__epochs" -> cfg["train"]["epochs"]
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_rows_of_another_config_are_separate_lines_not_seeds(tmp_path: Path) -> None:
    """Rows of one cell whose stored configs differ in a value other than the seed are never
    averaged as seeds, nor does the newer supersede the older: the setting most rows ran keeps
    the plain name, the other is a line named by the differing values (a value outside
    ``defense.*`` names the attack's row, with its own DER reference), and a note lists both.
    A key only some rows store (added between versions) splits nothing; a row without a stored
    config cannot be placed in a split cell and is a line of its own."""
    quick = {"dataset__limit_train": 3000, "train__epochs": 4}
    rows = [("none", 0, 0.90, 0.95, {}), ("none", 1, 0.92, 0.97, {}),
            ("none", 1, 0.30, 0.10, quick),  # newer, same seed: not a superseding rerun
            ("abl", 0, 0.88, 0.02, {}), ("abl", 1, 0.86, 0.04, {"defense__variant": None}),
            ("abl", 2, 0.84, 0.06, None),  # predates stored configs
            ("abl", 0, 0.20, 0.50, quick)]
    for i, (defense, seed, ba, asr, changed) in enumerate(rows):
        row = make_row("badnets", defense, seed, ba=ba, asr=asr,
                       timestamp=f"2026-01-0{i + 1}T00:00:00+00:00")
        if changed is not None:
            row["config"] = _config(seed, defense, **changed)
        write_row(tmp_path, row | {"run_id": f"{row['run_id']}-{i}"})
    built = report(tmp_path)
    board = pd.read_csv(built["leaderboard.csv"]).set_index(["attack", "defense"])
    named = "badnets [dataset.limit_train=3000, train.epochs=4]"
    assert board.ba_mean.to_dict() == pytest.approx({
        ("badnets", "none"): 0.91, ("badnets", "abl"): 0.87, (named, "none"): 0.30,
        (named, "abl"): 0.20, ("badnets [config not stored]", "abl"): 0.84})
    assert board.ba_n[("badnets", "abl")] == 2 and board.ba_n[(named, "none")] == 1
    # DER against the none line of the same setting: the main one per seed, (0.93 - 0.02 + 1) / 2
    # and (0.93 - 0.06 + 1) / 2; the quick one (BA 0.30, ASR 0.10): (0 - 0.10 + 1) / 2
    assert board.der_mean[("badnets", "abl")] == pytest.approx(0.945)
    assert board.der_mean[(named, "abl")] == pytest.approx(0.45)
    md = built["leaderboard.md"].read_text()
    assert "superseded" not in md
    assert "1 cell split by stored config" in md
    assert ("- toy · cnn · badnets @ 0.1: `badnets` ran dataset.limit_train=null, "
            "train.epochs=15 (4 rows); `badnets [config not stored]` (abl: seed 2); "
            f"`{named}` (abl: seed 0; none: seed 1)") in md
    assert f"| {named} | 30.0 / 10.0 | 20.0 / 50.0 |" in md


def test_defense_settings_split_their_column_and_a_tie_names_both(tmp_path: Path) -> None:
    """Values under ``defense.*`` split the defense, not the attack; with as many rows of each
    setting, neither is the main one and both lines are named."""
    for seed, epochs, ba in ((0, 20, 0.80), (1, 40, 0.70)):
        write_row(tmp_path, make_row("badnets", "dbd", seed, ba=ba, asr=0.1,
                                     config=_config(seed, "dbd", defense__params__epochs=epochs)))
    write_row(tmp_path, make_row("badnets", "none", 0, ba=0.9, asr=0.9, config=_config(0)))
    built = report(tmp_path)
    board = pd.read_csv(built["leaderboard.csv"]).set_index(["attack", "defense"])
    assert board.ba_mean.to_dict() == {
        ("badnets", "none"): 0.9, ("badnets", "dbd [defense.params.epochs=20]"): 0.8,
        ("badnets", "dbd [defense.params.epochs=40]"): 0.7}
    assert ("- toy · cnn · badnets / dbd @ 0.1: `dbd [defense.params.epochs=20]` (seed 0); "
            "`dbd [defense.params.epochs=40]` (seed 1)") in built["leaderboard.md"].read_text()
