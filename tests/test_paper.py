"""The paper checker: claims on reduced rows against reference numbers, verdicts, markdown."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench import paper, paper_claims
from bench.config import hash_of
from bench.paper import main, reduced_jobs, run_check
from bench.paper_claims import EXPERIMENTS, KNOWN_GAPS, Experiment
from bench.rows import collect, load_results, write_row

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


def _config(attack: str, defense: str, seed: int = 0, **changed) -> dict:
    """A toy stored config: what the toy reduced jobs compose, with ``changed`` keys."""
    return {"dataset": {"name": "fashion_mnist", "limit_train": None}, "attack": {"name": attack},
            "defense": {"name": defense}, "seed": seed, "amp": False} | changed


def _job(attack: str, defense: str, seed: int = 0, **changed) -> dict:
    """The ``config`` and ``config_hash`` of a row of that config."""
    config = _config(attack, defense, seed, **changed)
    return {"config": config, "config_hash": hash_of(config)}


def toy_jobs(name: str) -> dict:
    """The toy experiments' reduced jobs (``reduced_jobs``): every attack × defense at seed 0."""
    return {(a, d, 0): _config(a, d) for a in ("badnets", "blended") for d in ("none", "dbd")}


def _rows(folder: Path, cells: dict) -> None:
    for (attack, defense, seed), (ba, asr) in cells.items():
        write_row(folder, {"run_id": f"{attack}-{defense}-s{seed}", "dataset": "fashion_mnist",
                           "model": "cnn_small", "attack": attack, "defense": defense,
                           "poison_rate": 0.1, "seed": seed, "ba": ba, "asr": asr,
                           "status": "ok", "error": None,
                           "timestamp": "2026-01-01T00:00:00+00:00"}
                  | _job(attack, defense, seed))
    write_row(folder, {"run_id": "badnets-dbd-s9", "attack": "badnets", "defense": "dbd",
                       "seed": 9, "ba": 0.0, "asr": 1.0, "status": "failed", "error": "boom"})


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setattr(paper, "EXPERIMENTS", {"toy": EXP})
    monkeypatch.setattr(paper_claims, "KNOWN_GAPS", {})
    monkeypatch.setattr(paper, "reduced_jobs", toy_jobs)
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
    monkeypatch.setattr(paper_claims, "KNOWN_GAPS", {
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
    write_row(results / "fashion_mnist", {  # the job rerun: its row file replaces its line
        "run_id": "blended-dbd-s0", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "blended", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "ba": 0.86,
        "asr": 0.01, "status": "ok", "timestamp": "2026-02-01T00:00:00+00:00"}
        | _job("blended", "dbd"))
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "blended", "dbd"].value == pytest.approx(0.01)
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)


def test_newest_failed_run_is_missing_not_its_older_ok_row(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    write_row(results / "fashion_mnist", {  # a forced rerun of the job that failed
        "run_id": "badnets-dbd-s0-failed", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "status": "failed",
        "error": "boom", "timestamp": "2026-02-01T00:00:00+00:00"} | _job("badnets", "dbd"))
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
                           "timestamp": "2026-01-01T00:00:00+00:00"} | _job("badnets", defense))
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


def test_rows_of_another_config_are_listed_not_checked(setup: tuple[Path, Path]) -> None:
    """A newer row of a checked cell and seed whose config is not the composed reduced job (bf16,
    a training subset) neither replaces the job's row nor joins it: it is named, with its keys."""
    results, ref = setup
    write_row(results / "fashion_mnist", {
        "run_id": "badnets-dbd-s0-quick", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "ba": 0.60,
        "asr": 0.50, "status": "ok", "error": None, "timestamp": "2026-12-06T00:00:00+00:00"}
        | _job("badnets", "dbd", amp=True, dataset={"name": "fashion_mnist", "limit_train": 3000}))
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    assert v["removes", "badnets", "dbd"].value == pytest.approx(0.02)
    assert v["keeps_ba", "badnets", "dbd"].value == pytest.approx(0.07)
    md = (results / "paper" / "toy.md").read_text()
    assert "| badnets | dbd | 92.0 / 1.0 |  | 83.0 / 2.0 |  |" in md
    assert ("Not checked: 1 `ok` row of these cells ran another config than `python -m bench "
            "experiment=toy_reduced` composes (the keys that differ): `badnets-dbd-s0-quick` "
            "(amp, dataset.limit_train).") in md


def test_paper_cells_and_gap_pair_one_source(setup: tuple[Path, Path]) -> None:
    """Reference rows of one cell from several sources are not averaged: each attack shows the
    source that publishes both its no-defense and defended rows, and the paper's BA gap pairs
    them; the other sources' rows are named."""
    results, ref = setup
    (ref / "toy.csv").write_text(
        "source,dataset,model,attack,defense,poison_rate,ba,asr,ra,citation\n"
        "board,cifar10,resnet18,badnets,dbd,0.1,0.86,0.03,,Toy board\n"
        "demo,cifar10,resnet18,badnets,none,0.1,0.83,1.0,,Toy demo\n"
        "demo,cifar10,resnet18,badnets,dbd,0.1,0.82,0.005,,Toy demo\n"
        "log,cifar10,resnet18,badnets,dbd,0.1,0.92,0.002,,Toy log\n")
    v = _by(run_check(results / "paper", results / "fashion_mnist", results / "paper", ref))
    # the demo's own gap, 0.83 - 0.82, not 0.83 minus the three sources' mean (0.8667)
    assert v["keeps_ba", "badnets", "dbd"].threshold == "BA drop ≤ 0.060"
    md = (results / "paper" / "toy.md").read_text()
    assert "| badnets | none | 83.0 / 100.0 |" in md
    assert "| badnets | dbd | 82.0 / 0.5 |" in md
    assert "Paper column, one source per attack: `demo` (badnets)." in md
    assert ("Published by other sources for these cells, not shown or used: `board` badnets/dbd "
            "86.0 / 3.0; `log` badnets/dbd 92.0 / 0.2.") in md


def test_committed_reduced_rows_are_the_composed_jobs() -> None:
    """``reduced_jobs`` composes what ``python -m bench experiment=<name>_reduced`` runs: every
    committed reduced row is one of those jobs, and every job of a checked cell has its row."""
    rows = load_results(Path(__file__).resolve().parents[1] / "results" / "paper_reduced")
    hashes = {}
    for name in EXPERIMENTS:
        hashes |= {hash_of(c): key for key, c in reduced_jobs(name).items()}
    assert set(rows.config_hash) == set(hashes)
    for r in rows.itertuples():
        assert hashes[r.config_hash] == (r.attack, r.defense, r.seed)


def test_abl_known_gaps_describe_the_committed_reduced_rows() -> None:
    """The reduced variants pin amp=false, so the ABL notes describe fp32 rows, with the
    isolation precision those rows record."""
    root = Path(__file__).resolve().parents[1]
    assert "amp: false" in (root / "conf/experiment/abl_cifar10_reduced.yaml").read_text()
    rows = load_results(root / "results" / "paper_reduced").set_index(["attack", "defense"])
    for attack in ("badnets", "blended"):
        r = rows.loc[attack, "abl"]
        for claim in ("removes", "keeps_ba"):
            note = KNOWN_GAPS["abl_cifar10", claim, attack, "abl"]
            assert f"precision {r.iso_precision:.2f}" in note and "amp=false" in note
            assert f"ASR {r.asr:.3f}" in note and f"BA_nt {r.ba_nt:.3f}" in note
            assert "amp=auto" not in note and "holds in bf16" not in note


def test_main_table_shows_its_main_setting_only(setup: tuple[Path, Path]) -> None:
    """The main table's column averages the rows of a cell's main setting; a row of another
    stored config is left out and counted, not averaged in as one more seed."""
    results, ref = setup
    _rows(results / "main", {("badnets", "dbd", 0): (0.75, 0.30),
                             ("badnets", "dbd", 1): (0.73, 0.50)})
    write_row(results / "main", {
        "run_id": "badnets-dbd-s2-quick", "dataset": "fashion_mnist", "model": "cnn_small",
        "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 2, "ba": 0.10,
        "asr": 0.90, "status": "ok", "error": None, "timestamp": "2026-01-01T00:00:00+00:00"}
        | _job("badnets", "dbd", 2, dataset={"name": "fashion_mnist", "limit_train": 3000}))
    run_check(results / "paper", results / "fashion_mnist", results / "paper", ref,
              main_dir=results / "main")
    md = (results / "paper" / "toy.md").read_text()
    assert "| badnets | dbd | 92.0 / 1.0 |  | 83.0 / 2.0 | 74.0 / 40.0 (n = 2) |" in md
    assert "Left out: 1 row of the main table under another setting" in md


def test_page_shows_the_reduced_rows_by_class(setup: tuple[Path, Path]) -> None:
    results, ref = setup
    run_check(results / "paper", results / "fashion_mnist", results / "paper", ref)
    assert "by class" not in (results / "paper" / "toy.md").read_text()  # no row records it
    row = {"run_id": "badnets-dbd-s0", "dataset": "fashion_mnist", "model": "cnn_small",
           "attack": "badnets", "defense": "dbd", "poison_rate": 0.1, "seed": 0, "target": 0,
           "ba": 0.83, "asr": 0.02, "status": "ok", "error": None,
           "timestamp": "2026-01-01T00:00:00+00:00",
           "extra": {"clean_acc_class": [0.9, 1.0, 0.8, 0.9, 0.0, 1.0, 0.0, 0.9, 1.0, 0.95]}}
    write_row(results / "fashion_mnist", row | _job("badnets", "dbd"))
    run_check(results / "paper", results / "fashion_mnist", results / "paper", ref)
    md = (results / "paper" / "toy.md").read_text()
    assert "## Reduced rows by class" in md
    assert ("| badnets | dbd | 1 | **90.0** | 100.0 | 80.0 | 90.0 | 0.0 | 100.0 | 0.0 | 90.0 | "
            "100.0 | 95.0 |") in md


def test_known_gap_with_missing_rows_is_missing_and_fails(
        setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A documented known gap excuses a claim that does not hold, never one with no rows: with
    every claim a known gap and no rows, each is missing and the check exits 1."""
    results, ref = setup
    monkeypatch.setattr(paper_claims, "KNOWN_GAPS", {
        ("toy", claim, a, d): "documented"
        for a in EXP.attacks
        for claim, d in [("attack_works", "none"), ("removes", "dbd"), ("keeps_ba", "dbd")]})
    empty = tmp_path / "empty"
    v = run_check(empty, empty, empty, ref)
    assert len(v) == 6 and {x.status for x in v} == {"missing"} and all(x.fails for x in v)
    assert main(["check", "--reduced", str(empty), "--main", str(empty), "--full", str(empty),
                 "--reference", str(ref)]) == 1
    assert "0/6 claims hold or are known gaps; 6 failing or missing" in capsys.readouterr().out


def test_claim_thresholds_at_and_beyond_the_bar() -> None:
    """Each claim holds at its bar and fails just beyond it; a paper whose defense raises BA (a
    negative gap) allows the margin, not less."""
    exp = Experiment("Toy", "toy", "toy", ("at", "beyond", "raises"), ("dbd",))
    cells = {("at", "none"): (0.90, 0.90), ("at", "dbd"): (0.85, 0.05),  # drop 0.05 = margin
             ("beyond", "none"): (0.90, 0.89), ("beyond", "dbd"): (0.849, 0.051),
             ("raises", "none"): (0.90, 1.0), ("raises", "dbd"): (0.87, 0.0)}  # drop 0.03
    reduced = pd.DataFrame([{"attack": a, "defense": d, "ba": ba, "asr": asr}
                            for (a, d), (ba, asr) in cells.items()])
    ref = pd.DataFrame([{"attack": "raises", "defense": "none", "ba": 0.90, "asr": 1.0},
                        {"attack": "raises", "defense": "dbd", "ba": 0.95, "asr": 0.0}])
    assert paper_claims.paper_gap(ref, "raises", "dbd") == pytest.approx(-0.05)
    v = {(x.claim, x.attack): (x.status, x.threshold)
         for x in paper_claims.check("toy", exp, reduced, ref)}
    assert v == {
        ("attack_works", "at"): ("pass", "ASR ≥ 0.90"),
        ("removes", "at"): ("pass", "ASR ≤ 0.05"),
        ("keeps_ba", "at"): ("pass", "BA drop ≤ 0.050"),
        ("attack_works", "beyond"): ("FAIL", "ASR ≥ 0.90"),
        ("removes", "beyond"): ("FAIL", "ASR ≤ 0.05"),
        ("keeps_ba", "beyond"): ("FAIL", "BA drop ≤ 0.050"),
        ("attack_works", "raises"): ("pass", "ASR ≥ 0.90"),
        ("removes", "raises"): ("pass", "ASR ≤ 0.05"),
        ("keeps_ba", "raises"): ("pass", "BA drop ≤ 0.050"),
    }
