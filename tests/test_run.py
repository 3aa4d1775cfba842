"""End-to-end runs on the synthetic set: rows, determinism, failures as rows."""

import json
import math

import pandas as pd
import pytest
import torch

from bench.rows import COLUMNS, collect
from bench.run import hardware, prepare, run, run_and_record


def test_run_learns_backdoor_and_row_has_schema(tiny_cfg):
    row = run(tiny_cfg("train.epochs=5", "dataset.synthetic.n_train=2000"))
    assert row["status"] == "ok"
    assert row["ba"] > 0.8 and row["asr"] > 0.8
    assert row["n_poisoned"] == round(0.1 * 2000)
    assert set(COLUMNS) <= set(row)
    assert "train" in row["stage_s"] and row["wall_s"] > 0
    assert row["hardware"].split()[0] == torch.backends.cpu.get_cpu_capability()


def test_row_reports_ba_without_the_target_class_and_per_class_accuracy(tiny_cfg):
    """BA_nt leaves the all-to-one target's test images out; all-to-all excludes nothing."""
    cfg = tiny_cfg("train.epochs=2")
    row, test = run(cfg), prepare(cfg)[1]
    acc = row["extra"]["clean_acc_class"]
    n = torch.bincount(test.y, minlength=len(acc)).tolist()
    t = row["target"]
    assert row["ba"] == pytest.approx(sum(a * k for a, k in zip(acc, n, strict=True)) / sum(n))
    others = [(a, k) for c, (a, k) in enumerate(zip(acc, n, strict=True)) if c != t]
    assert row["ba_nt"] == pytest.approx(sum(a * k for a, k in others) / sum(k for _, k in others))
    a2a = run(tiny_cfg("train.epochs=2", "attack.label_mode=all2all"))
    assert a2a["ba_nt"] == a2a["ba"]


def test_hardware_names_the_isa_and_a_onednn_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = hardware(torch.device("cpu"))
    assert plain.split()[0] == torch.backends.cpu.get_cpu_capability() and "(" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware(torch.device("cpu")) == f"{plain} (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"


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


def test_collect_keeps_committed_lines_a_row_file_replaces_its_own(tmp_path):
    """A fresh clone has runs.csv but no row files: new jobs add to it, never replace it."""
    from bench.rows import write_row

    def row(run_id, ba):
        return {"run_id": run_id, "dataset": "d", "model": "m", "attack": "a", "defense": "x",
                "poison_rate": 0.1, "seed": int(run_id[-1]), "ba": ba, "status": "ok",
                "stage_s": {"train": 1.25}, "extra": {"k": 0.1 + 0.2}}

    write_row(tmp_path, row("r0", 0.1 + 0.7))
    write_row(tmp_path, row("r1", 0.5))
    committed = collect(tmp_path).read_text()
    for f in (tmp_path / "rows").iterdir():
        f.unlink()  # the clone: row files are not committed
    assert collect(tmp_path).read_text() == committed  # lines read back exactly
    write_row(tmp_path, row("r1", 0.9))  # rerun of a committed job
    write_row(tmp_path, row("r2", 0.7))  # a new job
    df = pd.read_csv(collect(tmp_path)).set_index("run_id")
    assert df.ba.to_dict() == {"r0": 0.1 + 0.7, "r1": 0.9, "r2": 0.7}
    assert json.loads(df.stage_s["r0"]) == {"train": 1.25}


def test_unreadable_runs_csv_is_kept_aside_not_overwritten(tmp_path, caplog):
    from bench.rows import write_row

    (tmp_path / "runs.csv").write_bytes(b"\x00garbage\n")
    write_row(tmp_path, {"run_id": "r0", "seed": 0, "ba": 0.5, "status": "ok"})
    df = pd.read_csv(collect(tmp_path))
    assert df.run_id.tolist() == ["r0"]
    assert (tmp_path / "runs.csv.unreadable").read_bytes() == b"\x00garbage\n"
    assert "runs.csv.unreadable" in caplog.text
