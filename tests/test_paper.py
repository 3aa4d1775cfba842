"""The paper checker: claims on reduced rows against reference numbers, verdicts, markdown."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import paper
from bench.paper import EXPERIMENTS, Experiment, main, run_check
from bench.rows import collect, write_row

EXP = Experiment("Toy paper", "toy", "toy setting", ("badnets", "blended"), ("dbd",))
REFERENCE = """source,dataset,model,attack,defense,poison_rate,ba,asr,ra,citation
toy,cifar10,resnet18,badnets,none,0.05,0.95,1.0,,Toy README
toy,cifar10,resnet18,badnets,dbd,0.05,0.92,0.01,,Toy README
toy,cifar10,resnet18,blended,dbd,0.05,0.92,0.01,,Toy README
"""
# (attack, defense, seed) -> (ba, asr)
REDUCED = {
    ("badnets", "none", 0): (0.90, 1.00),
    ("badnets", "none", 1): (0.88, 0.98),
    ("badnets", "dbd", 0): (0.83, 0.02),   # drop 0.07 <= paper gap 0.03 + margin 0.05
    ("badnets", "dbd", 1): (0.81, 0.04),   # seed 1: neither checked nor shown
    ("blended", "none", 0): (0.90, 0.80),  # the attack fails
    ("blended", "dbd", 0): (0.80, 0.10),   # drop 0.10 > margin 0.05 (no paper none BA)
}


def _rows(folder: Path, cells: dict) -> None:
    for (attack, defense, seed), (ba, asr) in cells.items():
        write_row(folder, {"run_id": f"{attack}-{defense}-s{seed}", "dataset": "fashion_mnist",
                           "model": "cnn_small", "attack": attack, "defense": defense,
                           "poison_rate": 0.1, "seed": seed, "ba": ba, "asr": asr,
                           "status": "ok", "error": None,
                           "timestamp": "2026-01-01T00:00:00+00:00"})
    write_row(folder, {"run_id": "badnets-dbd-s9", "attack": "badnets", "defense": "dbd",
                       "seed": 9, "ba": 0.0, "asr": 1.0, "status": "failed", "error": "boom"})


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setattr(paper, "EXPERIMENTS", {"toy": EXP})
    monkeypatch.setattr(paper, "KNOWN_GAPS", {})
    ref = tmp_path / "reference"
    ref.mkdir()
    (ref / "toy.csv").write_text(REFERENCE)
    _rows(tmp_path / "fashion_mnist", REDUCED)
    return tmp_path, ref


def _by(verdicts: list) -> dict:
    return {(v.claim, v.attack, v.defense): v for v in verdicts}


def test_claims_verdicts(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["attack_works", "badnets", "none"].status == "pass"
    assert v["attack_works", "badnets", "none"].value == pytest.approx(1.0)  # seed 0 only
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)  # failed row ignored
    assert v["removes", "badnets", "dbd"].status == "pass"
    assert v["keeps_ba", "badnets", "dbd"].value == pytest.approx(0.07)  # 0.90 - 0.83
    assert v["keeps_ba", "badnets", "dbd"].threshold == "BA drop ≤ 0.080"
    assert v["keeps_ba", "badnets", "dbd"].status == "pass"
    assert v["attack_works", "blended", "none"].status == "FAIL"
    assert v["removes", "blended", "dbd"].status == "FAIL"
    assert v["keeps_ba", "blended", "dbd"].threshold == "BA drop ≤ 0.050"
    assert v["keeps_ba", "blended", "dbd"].status == "FAIL"


def test_known_gap_is_reported_not_failed(setup: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    results, ref = setup
    monkeypatch.setattr(paper, "KNOWN_GAPS", {
        ("toy", "removes", "blended", "dbd"): "the split misses it",
        ("toy", "removes", "badnets", "dbd"): "was failing"})
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "blended", "dbd"].status == "known gap"
    assert not v["removes", "blended", "dbd"].fails
    assert v["removes", "badnets", "dbd"].status == "holds (known gap)"
    md = (results / "paper" / "toy.md").read_text()
    assert "- removes blended/dbd: the split misses it" in md


def test_missing_rows_fail(setup: tuple[Path, Path], tmp_path: Path) -> None:
    results, ref = setup
    empty = tmp_path / "empty"
    v = run_check(empty, empty, empty, ref)
    assert {x.status for x in v} == {"missing"} and all(x.fails for x in v)


def test_committed_runs_csv_is_read_without_rows(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    before = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    collect(results / "fashion_mnist")
    shutil.rmtree(results / "fashion_mnist" / "rows")  # a fresh clone: runs.csv only
    after = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert {k: v.value for k, v in after.items()} == {k: v.value for k, v in before.items()}


def test_new_rows_merge_with_the_committed_runs_csv(setup: tuple[Path, Path]) -> None:
    """In a fresh clone a rerun cell comes from its new row file, every other from runs.csv."""
    results, ref = setup
    collect(results / "fashion_mnist")
    shutil.rmtree(results / "fashion_mnist" / "rows")
    write_row(results / "fashion_mnist", {
        "run_id": "blended-dbd-s0-newhash", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "blended", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "ba": 0.86,
        "asr": 0.01, "status": "ok", "timestamp": "2026-02-01T00:00:00+00:00"})
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "blended", "dbd"].value == pytest.approx(0.01)
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)


def test_newest_failed_run_is_missing_not_its_older_ok_row(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    write_row(results / "fashion_mnist", {
        "run_id": "badnets-dbd-s0-newhash", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "status": "failed",
        "error": "boom", "timestamp": "2026-02-01T00:00:00+00:00"})
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "badnets", "dbd"].status == "missing"
    assert v["removes", "badnets", "dbd"].fails


def test_markdown_side_by_side(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    _rows(results / "paper" / "toy", {("badnets", "dbd", 0): (0.93, 0.005)})  # a full-scale row
    # the main table's rows, shown beside (mean over its seeds), are never checked
    _rows(results / "main", {("badnets", "dbd", 0): (0.75, 0.30),
                             ("badnets", "dbd", 1): (0.73, 0.50),
                             ("blended", "dbd", 0): (0.70, 0.9)})
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref,
                      main_dir=results / "main"))
    md = (results / "paper" / "toy.md").read_text()
    assert "| badnets | dbd | 92.0 / 1.0 | 93.0 / 0.5 | 83.0 / 2.0 | 74.0 / 40.0 (n = 2) |" in md
    assert "| blended | dbd | 92.0 / 1.0 |  | 80.0 / 10.0 | 70.0 / 90.0 (n = 1) |" in md
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)  # seed 0 of the reduced
    assert "| keeps_ba | blended | dbd | 0.100 | BA drop ≤ 0.050 | FAIL |" in md
    assert "Sources: Toy README" in md


def test_ba_metric_compares_the_papers_own_clean_accuracy(setup: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An experiment whose paper leaves the target class out of its clean accuracy (ABL's code)
    checks and shows ``ba_nt``; a row without that column is missing, not read as BA."""
    results, ref = setup
    nt = Experiment("Toy paper", "toy", "toy setting", ("badnets",), ("dbd",), ba_metric="ba_nt")
    monkeypatch.setattr(paper, "EXPERIMENTS", {"toy": nt})
    folder = results / "nt"
    for (defense, ba, ba_nt) in (("none", 0.90, 0.91), ("dbd", 0.80, 0.90)):
        write_row(folder, {"run_id": f"badnets-{defense}", "attack": "badnets",
                           "defense": defense, "poison_rate": 0.1, "seed": 0, "ba": ba,
                           "ba_nt": ba_nt, "asr": 0.01, "status": "ok", "error": None,
                           "timestamp": "2026-01-01T00:00:00+00:00"})
    v = _by(run_check(results / "paper", folder, results / "paper", ref))
    assert v["keeps_ba", "badnets", "dbd"].value == pytest.approx(0.01)  # not 0.10 of ``ba``
    assert v["keeps_ba", "badnets", "dbd"].status == "pass"
    md = (results / "paper" / "toy.md").read_text()
    assert "| badnets | dbd | 92.0 / 1.0 |  | 90.0 / 1.0 |  |" in md
    assert "without the target class" in md
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["keeps_ba", "badnets", "dbd"].status == "missing"  # those rows have no ba_nt


def test_main_exit_codes(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    results, ref = setup
    assert main(["check", "--reduced", str(results / "fashion_mnist"), "--full",
                 str(results / "paper"), "--reference", str(ref)]) == 1
    assert "failing or missing" in capsys.readouterr().out
    assert main(["check", "nope", "--reference", str(ref)]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["check", "--full", str(results), "--reference", str(ref / "x")]) == 2


def test_experiments_have_reduced_configs_and_references() -> None:
    root = Path(__file__).resolve().parents[1]
    for name, exp in EXPERIMENTS.items():
        assert (root / "conf" / "experiment" / f"{name}.yaml").is_file(), name
        assert (root / "conf" / "experiment" / f"{name}_reduced.yaml").is_file(), name
        assert (root / "results" / "reference" / f"{exp.source}.csv").is_file(), name


def test_superseded_rows_do_not_count(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    write_row(results / "fashion_mnist", {
        "run_id": "badnets-dbd-s0-oldhash", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "ba": 0.1,
        "asr": 0.9, "status": "ok", "error": None, "timestamp": "2000-01-01T00:00:00+00:00"})
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)
