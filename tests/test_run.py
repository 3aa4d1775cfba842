"""End-to-end runs on the synthetic set: rows, determinism, failures as rows."""

import json
import math

import pandas as pd

from bench.rows import COLUMNS, collect
from bench.run import run, run_and_record


def test_run_learns_backdoor_and_row_has_schema(tiny_cfg):
    row = run(tiny_cfg("train.epochs=5", "dataset.synthetic.n_train=2000"))
    assert row["status"] == "ok"
    assert row["ba"] > 0.8 and row["asr"] > 0.8
    assert row["n_poisoned"] == round(0.1 * 2000)
    assert set(COLUMNS) <= set(row)
    assert "train" in row["stage_s"] and row["wall_s"] > 0


def test_same_seed_identical_metrics_on_cpu(tiny_cfg):
    a, b = run(tiny_cfg()), run(tiny_cfg())
    for k in ("ba", "asr", "ra", "n_poisoned"):
        assert a[k] == b[k]


def test_clean_run_reports_empty_asr(tiny_cfg):
    row = run(tiny_cfg("attack=none"))
    assert math.isnan(row["asr"]) and math.isnan(row["ra"]) and row["n_poisoned"] == 0


def test_failure_is_a_row_and_resume_skips_ok(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("train.lr=1e30", "train.epochs=1")
    row = run_and_record(cfg)
    assert row["status"] == "failed" and "loss became" in row["error"]
    ok = run_and_record(tiny_cfg("train.epochs=1"))
    assert ok["status"] == "ok"
    monkeypatch.setattr("bench.run.run", lambda c: (_ for _ in ()).throw(AssertionError()))
    again = run_and_record(tiny_cfg("train.epochs=1"))  # skipped: not run a second time
    assert again["run_id"] == ok["run_id"]
    csv = collect(cfg.results_dir)
    df = pd.read_csv(csv)
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert sorted(df.status) == ["failed", "ok"]
    assert json.loads(df[df.status == "ok"].stage_s.iloc[0])["train"] > 0


def test_collect_is_idempotent(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1")
    run_and_record(cfg)
    first = collect(cfg.results_dir).read_text()
    assert collect(cfg.results_dir).read_text() == first
