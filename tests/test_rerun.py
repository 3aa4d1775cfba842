"""Rows store the config their hash covers; bench.rerun rebuilds and reruns it, or says why not."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.rerun
from bench.config import config_diff, config_hash, from_dict, hash_of, hashed_config
from bench.rerun import check, compare, main
from bench.rows import _EXACT_FLOATS, _TEXT, collect, load_results
from bench.run import run_and_record

REPO = Path(__file__).resolve().parents[1]


def read_runs(path) -> pd.DataFrame:
    """A ``runs.csv`` as the project reads it: identifiers stay text (a commit like 1270331 is
    all digits), floats exact."""
    return pd.read_csv(path, dtype=dict.fromkeys(_TEXT, str), **_EXACT_FLOATS)


def test_row_stores_the_config_its_hash_covers(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1")
    row = run_and_record(cfg)
    assert row["config"] == hashed_config(cfg) and hash_of(row["config"]) == row["config_hash"]
    assert "results_dir" not in row["config"] and "threads" not in row["config"]
    line = read_runs(collect(cfg.results_dir)).iloc[0]
    stored = json.loads(line.config)
    assert hash_of(stored) == line.config_hash
    assert config_hash(from_dict(stored)) == line.config_hash  # rebuilds to the same config


def test_rerun_repeats_a_run_from_its_row(tiny_cfg, tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg("train.epochs=2", "threads=1")
    row = run_and_record(cfg)
    collect(cfg.results_dir)
    out = tmp_path / "again"
    torch.set_num_threads(2)  # the rerun must take the row's thread count, not the process's
    try:
        assert main([row["run_id"], "--results", cfg.results_dir, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(1)
    text = capsys.readouterr().out
    assert text.rstrip().endswith("identical")
    new = load_results(out)
    assert list(new.run_id) == [row["run_id"]] and new.ba.iloc[0] == row["ba"]
    assert new.asr.iloc[0] == row["asr"] and new.threads.iloc[0] == 1
    # a rerun that differs says so, metric by metric
    real = bench.rerun.run_and_record
    monkeypatch.setattr(bench.rerun, "run_and_record", lambda c: real(c) | {"ba": 0.0})
    assert main([row["run_id"], "--results", cfg.results_dir, "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "differs" in text.splitlines()[-1] and "  differs" in text.splitlines()[2]
    # it never writes into the folder of the row it reruns
    assert main([row["run_id"], "--results", cfg.results_dir, "--out", cfg.results_dir]) == 2
    assert "would replace" in capsys.readouterr().err


def _stale_csv(tiny_cfg, tmp_path) -> tuple[Path, str]:
    """A results folder whose one row was computed before ``defense.variant`` existed: its
    stored config lacks the key, and its hash and run id are those of that older config."""
    cfg = tiny_cfg("train.epochs=1")
    row = run_and_record(cfg)
    collect(cfg.results_dir)
    df = read_runs(Path(cfg.results_dir) / "runs.csv")
    old = json.loads(df.config[0])
    del old["defense"]["variant"]
    h = hash_of(old)
    df.loc[0, ["config", "config_hash", "run_id", "git_sha"]] = [
        json.dumps(old), h, row["run_id"].rsplit("-", 1)[0] + f"-{h}", "abc1234"]
    folder = tmp_path / "old"
    folder.mkdir()
    df.to_csv(folder / "runs.csv", index=False)
    return folder, df.run_id[0]


def test_check_and_rerun_name_the_keys_a_row_lacks(tiny_cfg, tmp_path, capsys):
    folder, rid = _stale_csv(tiny_cfg, tmp_path)
    lines = check(load_results(folder))
    assert lines[0].startswith("1 rows: 0 rebuild to their config hash, 1 do not")
    assert lines[1] == f"- {rid} (git abc1234): +defense.variant"
    assert main([rid, "--results", str(folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "+defense.variant" in err and "check out git abc1234" in err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_rerun_refuses_rows_it_cannot_trust(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.epochs=1")
    rid = run_and_record(cfg)["run_id"]
    collect(cfg.results_dir)
    csv = Path(cfg.results_dir) / "runs.csv"
    (Path(cfg.results_dir) / "rows" / f"{rid}.json").unlink()  # only the csv line is left
    df = read_runs(csv)
    for edit, message in [(lambda d: d.assign(config=None), "predates stored configs"),
                          (lambda d: d.assign(config=d.config.str.replace(
                              '"epochs": 1', '"epochs": 3')), "edited by hand"),
                          (lambda d: d.assign(config="{not json"), "not valid JSON")]:
        edit(df).to_csv(csv, index=False)
        assert main([rid, "--results", cfg.results_dir, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["nope", "--results", cfg.results_dir]) == 2
    assert "no row nope" in capsys.readouterr().err
    assert main(["--check", "--results", str(tmp_path / "empty")]) == 2


def test_config_diff():
    old = {"a": 1, "b": {"c": 2, "d": 3}}
    assert config_diff(old, {"a": 1, "b": {"c": 2, "d": 3}}) == []
    assert config_diff(old, {"a": 2, "b": {"c": 2, "e": 3}}) == ["+b.e", "-b.d", "a"]


@pytest.mark.parametrize("folder", ["fashion_mnist", "paper_reduced", "fashion_mnist_avx512_bf16"])
def test_committed_rows_store_the_config_they_ran(folder):
    """Every committed row's stored config hashes to its config hash (two rows predate stored
    configs and were not recovered); every reduced row rebuilds with this version, so the rows
    CI computes and the committed ones shown beside them share their configs."""
    df = read_runs(REPO / "results" / folder / "runs.csv")
    stored = df[df.config.notna()]
    assert len(df) - len(stored) <= 2
    assert all(hash_of(json.loads(c)) == h for c, h in zip(stored.config, stored.config_hash,
                                                           strict=True))
    if folder == "paper_reduced":
        assert check(df)[0].startswith(f"{len(df)} rows: {len(df)} rebuild")


def test_leaderboard_lists_rows_this_version_builds_differently(tiny_cfg, tmp_path):
    from bench.report import build

    folder, _ = _stale_csv(tiny_cfg, tmp_path)
    _, notes = build(folder)
    md = (folder / "report" / "leaderboard.md").read_text()
    assert "1 row ran under a config this version builds differently" in md
    assert "- +defense.variant: badnets/none (seed 0)" in md
    assert any(n.startswith("1 row ran under") for n in notes)
    df = read_runs(folder / "runs.csv")
    df.assign(config=None).to_csv(folder / "runs.csv", index=False)
    build(folder)
    md = (folder / "report" / "leaderboard.md").read_text()
    assert "1 row predates stored configs" in md and "builds differently" not in md


def test_check_lists_rows_it_cannot_build_or_read(tiny_cfg, tmp_path, capsys):
    from bench.report_notes import stale_note

    folder, rid = _stale_csv(tiny_cfg, tmp_path)
    df = read_runs(folder / "runs.csv")
    gone = json.loads(df.config[0]) | {"retired_key": 1}  # a key this version does not know
    h = hash_of(gone)
    df.loc[0, ["config", "config_hash", "run_id"]] = [json.dumps(gone), h, rid[:-12] + h]
    two = pd.concat([df, df.assign(run_id="x", config="[1, 2]")], ignore_index=True)
    two.to_csv(folder / "runs.csv", index=False)
    lines = check(load_results(folder))
    assert lines[0].startswith("2 rows: 0 rebuild to their config hash, 2 do not")
    assert "no longer builds" in lines[1] and "retired_key" in lines[1]
    assert "not a JSON object" in lines[2]
    note = "\n".join(stale_note(load_results(folder), folder))
    assert "- not buildable by this version: badnets/none (seed 0)" in note
    assert "- stored config edited or unreadable: badnets/none (seed 0)" in note


def test_identifiers_that_look_like_numbers_stay_text(tmp_path):
    pd.DataFrame({"run_id": ["1"], "config_hash": ["80928e890337"], "git_sha": ["1234567"],
                  "status": ["ok"]}).to_csv(tmp_path / "runs.csv", index=False)
    row = load_results(tmp_path).iloc[0]
    assert (row.run_id, row.config_hash, row.git_sha) == ("1", "80928e890337", "1234567")


def test_compare_a_metric_nan_on_one_side_differs():
    """A metric recorded as a number and NaN in the rerun (or the reverse) differs; NaN on both
    sides (a metric neither run has, like ASR without attack) is the same."""
    nan = float("nan")
    recorded = {"ba": 0.9, "asr": nan, "ra": nan, "iso_precision": None}
    lines, same = compare(recorded, {"ba": nan, "asr": nan, "ra": nan, "iso_precision": nan})
    assert not same and lines[1].split() == ["ba", "0.9", "-", "differs"]
    assert "differs" not in "".join(lines[2:])
    lines, same = compare(recorded, {"ba": 0.9, "asr": 0.5, "ra": nan})
    assert not same and lines[3].split() == ["asr", "-", "0.5", "differs"]
    assert compare(recorded, {"ba": 0.9, "asr": nan}) == (compare(recorded, recorded)[0], True)
