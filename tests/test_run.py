"""End-to-end runs on the synthetic set: rows, determinism, failures as rows."""

import json
import math

import pandas as pd
import pytest
import torch

import bench.run
from bench.data import ImageSet
from bench.errors import ConfigError
from bench.poison import TriggeredTest
from bench.rows import COLUMNS, collect
from bench.run import (
    evaluate,
    excluded_target,
    hardware,
    prepare,
    resolve_amp,
    run,
    run_and_record,
    run_id,
)
from tests.conftest import cpu_engine


def test_run_learns_backdoor_and_row_has_schema(tiny_cfg):
    row = run(tiny_cfg("train.epochs=5", "dataset.synthetic.n_train=2000"))
    assert row["status"] == "ok"
    assert row["ba"] > 0.8 and row["asr"] > 0.8
    assert row["ra"] <= 1 - row["asr"]  # same triggered images: fooled and correct are disjoint
    assert row["n_poisoned"] == round(0.1 * 2000)
    assert set(COLUMNS) <= set(row)
    assert "train" in row["stage_s"] and row["wall_s"] > 0
    assert row["hardware"].split()[0] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("attack", ["badnets", "sig"])
def test_row_reports_ba_without_the_target_class_and_per_class_accuracy(tiny_cfg, attack):
    """BA_nt leaves the target's test images out, for an all-to-one (badnets) and a clean-label
    (sig) attack alike; all-to-all excludes nothing."""
    cfg = tiny_cfg("train.epochs=2", f"attack={attack}")
    row, test = run(cfg), prepare(cfg)[1]
    acc = row["extra"]["clean_acc_class"]
    n = torch.bincount(test.y, minlength=len(acc)).tolist()
    t = row["target"]
    assert row["ba"] == pytest.approx(sum(a * k for a, k in zip(acc, n, strict=True)) / sum(n))
    others = [(a, k) for c, (a, k) in enumerate(zip(acc, n, strict=True)) if c != t]
    assert row["ba_nt"] == pytest.approx(sum(a * k for a, k in others) / sum(k for _, k in others))
    if attack == "badnets":
        a2a = run(tiny_cfg("train.epochs=2", "attack.label_mode=all2all"))
        assert a2a["ba_nt"] == a2a["ba"]


@pytest.mark.parametrize(("overrides", "left_out"), [
    (["attack=badnets"], 0), (["attack=badnets", "attack.target=2"], 2),
    (["attack=badnets", "attack.label_mode=all2all"], None),
    (["attack=sig"], 0), (["attack=sig", "attack.target=3"], 3), (["attack=lc"], 0),
    (["attack=none"], None)],
    ids=["badnets", "badnets-target2", "all2all", "sig", "sig-target3", "lc", "none"])
def test_ba_nt_leaves_out_the_target_of_all2one_and_clean_label_attacks(tiny_cfg, overrides,
                                                                       left_out):
    assert excluded_target(tiny_cfg(*overrides)) == left_out


class FirstPixelClass(torch.nn.Module):
    """Stub model: predicts the class written in each image's first pixel (inputs in [0, 1])."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return torch.nn.functional.one_hot(cls, self.num_classes).float()


def test_evaluate_scores_each_metric_on_its_own_labels():
    """A stub model whose predictions are written into the images: BA, BA_nt and per-class
    accuracy on the clean labels, ASR on the attack's labels, RA on the triggered images' true
    labels (hand-computed)."""
    def images(pred: list[int]) -> torch.Tensor:
        x = torch.zeros((len(pred), 1, 4, 4), dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.tensor(pred, dtype=torch.uint8)
        return x

    test = ImageSet(x=images([0, 1, 1, 2, 3, 0]), y=torch.tensor([0, 0, 1, 2, 2, 3]),
                    num_classes=4, mean=(0.5,), std=(0.25,), hflip=False, name="toy")
    # target 0; three of the five triggered images fooled, two classified correctly, none both
    triggered = TriggeredTest(x=images([0, 0, 3, 1, 0]), y=torch.zeros(5, dtype=torch.long),
                              y_true=torch.tensor([1, 2, 3, 1, 2]))
    eng = cpu_engine()
    out = evaluate(FirstPixelClass(4), test, triggered, eng, normalize=False, target=0)
    assert out["ba"] == pytest.approx(3 / 6)
    assert out["ba_nt"] == pytest.approx(2 / 4)  # the two class-0 images left out
    assert out["clean_acc_class"] == [0.5, 1.0, 0.5, 0.0]
    assert out["asr"] == pytest.approx(3 / 5) and out["ra"] == pytest.approx(2 / 5)
    clean = evaluate(FirstPixelClass(4), test, None, eng, normalize=False)
    assert clean["ba_nt"] == clean["ba"] and math.isnan(clean["asr"]) and math.isnan(clean["ra"])


def test_run_evaluates_on_the_first_limit_test_samples(tiny_cfg, monkeypatch):
    """dataset.limit_test: the run scores exactly the first N test images (and the triggered
    copies of those outside the target class), not the whole test split."""
    seen = []

    def spy(model, test, triggered, *a, **k):
        seen.append((test.y.clone(), triggered.y_true.clone()))
        return evaluate(model, test, triggered, *a, **k)

    monkeypatch.setattr(bench.run, "evaluate", spy)
    full = prepare(tiny_cfg())[1]
    run(tiny_cfg("train.epochs=1", "dataset.limit_test=50"))
    ((y, y_true),) = seen
    assert len(full) == 200 and len(y) == 50 and torch.equal(y, full.y[:50])
    assert torch.equal(y_true, y[y != 0])  # badnets all-to-one, target 0


def test_hardware_names_the_isa_and_a_onednn_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = hardware(torch.device("cpu"))
    assert plain.split()[0] == torch.backends.cpu.get_cpu_capability() and "(" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware(torch.device("cpu")) == f"{plain} (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"


@pytest.mark.parametrize(("flags", "want"), [
    (["fpu", "avx2"], False),                       # AVX2 laptop: oneDNN emulates bf16
    (["avx2", "avx512f", "avx512_bf16"], True),      # AVX512-BF16
    (["avx2", "amx_bf16", "amx_tile"], True),        # AMX
    (["fp", "asimd", "bf16"], True),                 # Arm BF16 extension
    ([], False)])                                    # no /proc/cpuinfo
def test_amp_auto_is_bf16_only_on_native_bf16(tiny_cfg, monkeypatch, flags, want):
    """amp=auto (the default) trains in bf16 where the CPU has native bf16 and in fp32 elsewhere;
    the config hash is the resolved one, so on a bf16 CPU it equals amp=true's."""
    monkeypatch.setattr(bench.run, "cpu_flags", lambda: flags)
    auto = tiny_cfg("amp=auto", "device=cpu")
    assert resolve_amp(auto).amp is want
    assert run_id(resolve_amp(auto)) == run_id(tiny_cfg(f"amp={str(want).lower()}", "device=cpu"))
    assert resolve_amp(tiny_cfg("amp=true")).amp is True  # explicit values are kept
    assert resolve_amp(tiny_cfg("amp=false")).amp is False
    assert "bf16" not in hardware(torch.device("cpu")) or want


def test_amp_auto_row_is_recorded_under_the_resolved_config(tiny_cfg, monkeypatch):
    monkeypatch.setattr(bench.run, "cpu_flags", lambda: ["avx2"])
    row = run_and_record(tiny_cfg("amp=auto", "train.epochs=1"))
    fp32 = tiny_cfg("amp=false", "train.epochs=1")
    assert row["status"] == "ok" and row["run_id"] == run_id(fp32)


def test_amp_must_be_a_bool_or_auto(tiny_cfg):
    with pytest.raises(ConfigError, match="amp must be true, false or auto"):
        tiny_cfg("amp=bf16")


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


def test_failed_rerun_never_replaces_the_ok_row(tiny_cfg, monkeypatch):
    """force=true that crashes is recorded beside the ok row it reran, as ``<run_id>-failed``;
    the ok row stays in its file and in runs.csv, also when only runs.csv holds it (a clone)."""
    from bench.rows import load_results, row_path

    cfg = tiny_cfg("train.epochs=1")
    ok = run_and_record(cfg)
    collect(cfg.results_dir)

    def crash(c):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("bench.run.run", crash)
    forced = tiny_cfg("train.epochs=1", "force=true")
    failed = run_and_record(forced)
    assert failed["status"] == "failed" and failed["run_id"] == ok["run_id"] + "-failed"
    df = pd.read_csv(collect(cfg.results_dir)).set_index("run_id")
    assert df.status.to_dict() == {ok["run_id"]: "ok", failed["run_id"]: "failed"}
    assert df.ba[ok["run_id"]] == ok["ba"]

    row_path(cfg.results_dir, ok["run_id"]).unlink()  # a clone: the ok row is a runs.csv line
    row_path(cfg.results_dir, failed["run_id"]).unlink()
    run_and_record(forced)
    rows = load_results(cfg.results_dir).set_index("run_id")
    assert rows.status.to_dict() == {ok["run_id"]: "ok", failed["run_id"]: "failed"}

    fresh = tiny_cfg("train.epochs=1", "seed=5")  # no ok row anywhere: the failure takes the id
    assert run_and_record(fresh)["run_id"] == run_id(fresh)


def test_unreadable_row_file_is_skipped(tmp_path, caplog):
    """Bad JSON and bad UTF-8 alike: the row is skipped with a warning, collect goes on."""
    from bench.rows import write_row

    write_row(tmp_path, {"run_id": "r0", "seed": 0, "ba": 0.5, "status": "ok"})
    (tmp_path / "rows" / "bad_json.json").write_text("{not json")
    (tmp_path / "rows" / "bad_utf8.json").write_bytes(b"\xff\xfe\x00garbage")
    df = pd.read_csv(collect(tmp_path))
    assert df.run_id.tolist() == ["r0"]
    assert "bad_utf8.json" in caplog.text and "bad_json.json" in caplog.text


def test_a_second_unreadable_runs_csv_keeps_the_first_copy(tmp_path):
    from bench.rows import write_row

    write_row(tmp_path, {"run_id": "r0", "seed": 0, "ba": 0.5, "status": "ok"})
    for i, junk in enumerate((b"\x00first\n", b"\x00second\n")):
        (tmp_path / "runs.csv").write_bytes(junk)
        assert pd.read_csv(collect(tmp_path)).run_id.tolist() == ["r0"], i
    assert (tmp_path / "runs.csv.unreadable").read_bytes() == b"\x00first\n"
    assert (tmp_path / "runs.csv.unreadable.1").read_bytes() == b"\x00second\n"


def test_eval_batch_size_sets_the_inference_batches(tiny_cfg, monkeypatch):
    """``train.eval_batch_size`` reaches every inference pass (it was once a dead key)."""
    import bench.run as R

    seen = []
    real = R.predict

    def spy(model, x, eng, *a, **k):
        seen.append(eng.eval_batch_size)
        return real(model, x, eng, *a, **k)

    monkeypatch.setattr(R, "predict", spy)
    row = run(tiny_cfg("train.epochs=1", "train.eval_batch_size=7"))
    assert seen and set(seen) == {7}
    assert row["ba"] == run(tiny_cfg("train.epochs=1"))["ba"]  # same model, other batching


def test_deterministic_cuda_only_touches_cuda(monkeypatch):
    from bench.run import deterministic_cuda

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    deterministic_cuda(torch.device("cpu"))
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda on, warn_only=False: calls.append((on, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic_cuda(torch.device("cuda"))
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert calls == [(True, True)] and __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"]
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def test_training_on_an_empty_set_is_a_config_error():
    from bench.errors import ConfigError
    from bench.models import create_model
    from bench.train import TrainCfg, fit

    eng = cpu_engine()
    model = create_model("cnn_small", 4, 1)
    empty = torch.zeros((0, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ConfigError, match="unlearn: no samples to train on"):
        fit(model, empty, torch.zeros(0, dtype=torch.long), TrainCfg(epochs=1), eng,
            torch.Generator(), hflip=False, desc="unlearn")


def test_unknown_device_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^unknown device 'gpu0'; use auto, cpu, cuda"):
        bench.run.resolve_device("gpu0")


def test_git_sha_marks_a_modified_checkout(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "c")
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "f.py"))
    sha = bench.run.git_sha()
    assert len(sha) >= 7 and "+" not in sha
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert bench.run.git_sha() == sha
    (tmp_path / "f.py").write_text("a = 2\n")
    assert bench.run.git_sha() == sha + "+dirty"
