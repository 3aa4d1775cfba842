"""The command line as a user runs it (subprocesses)."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from bench.rows import COLUMNS
from tests.conftest import TINY


def bench(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_multirun_two_jobs_two_rows(tmp_path):
    res = tmp_path / "res"
    out = bench(*TINY, "train.epochs=1", f"results_dir={res}", "attack=badnets,blended",
                "defense=none", "-m", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    df = pd.read_csv(res / "runs.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 2 and sorted(df.attack) == ["badnets", "blended"]
    assert (df.status == "ok").all() and df.ba.between(0, 1).all()
    assert out.stdout.count("BA ") == 2  # one summary line per job


@pytest.mark.parametrize("sweep", ["attack.poison_rate=0.1,1.5", "experiment=abl_cifar10_reduced"])
def test_a_sweep_with_an_impossible_job_runs_nothing(tmp_path, sweep):
    """Every job's config is built before the first runs: the bad one is named, nothing is
    written. An experiment's jobs come from its sweeper params (made impossible here by a fixed
    override)."""
    res = tmp_path / "res"
    args = sweep.split() + ([] if "poison_rate" in sweep else ["train.optimizer=rmsprop"])
    out = bench(*TINY, f"results_dir={res}", *args, "-m", cwd=tmp_path)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sweep job #"), out.stderr
    assert ("#1 (" in errors[0] and "poison_rate must be in (0, 1)" in errors[0]
            if "poison_rate" in sweep else
            "attack=badnets defense=none" in errors[0] and "optimizer 'rmsprop'" in errors[0])
    assert not (res / "runs.csv").exists() and not (res / "rows").exists()


@pytest.mark.parametrize("override, needle", [
    ("attack=wannet", "unknown attack 'wannet'; known: "),
    ("model=nope", "unknown model 'nope'; known: "),
    ("attack.poison_rate=1.5", "poison_rate must be in (0, 1)"),
    ("attack.target=7", "attack.target must be in [0, 3]"),
    ("dataset=cifar10", "set data_root"),
    ("train.nosuch=1", "unknown key train.nosuch; valid under train: epochs, batch_size"),
    ("attack.params.nope=1", "valid under attack.params (attack 'badnets'): size, position"),
])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, override, needle):
    res = tmp_path / "res"
    base = ["progress=false"] if override.startswith("dataset=") else TINY
    out = bench(*base, f"results_dir={res}", f"data_root={tmp_path / 'none'}", override,
                cwd=tmp_path)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr
    assert not (res / "runs.csv").exists() and not (res / "rows").exists()


def test_cfg_job_shows_composed_config(tmp_path):
    out = bench("attack=blended", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0
    assert "name: blended" in out.stdout and "alpha: 0.2" in out.stdout


def test_missing_launcher_plugin_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None:
        pytest.skip("the ray launcher plugin is installed here")
    out = bench("hydra/launcher=ray", f"results_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: launcher 'ray' needs its plugin; pip install -e '.[ray]'"


def test_attack_dataset_specialisation(tmp_path):
    out = bench("attack=sig", "dataset=cifar100", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "poison_rate: 0.005" in out.stdout
    out = bench("attack=bpp", "--cfg", "job", cwd=tmp_path)  # bpp_fashion_mnist.yaml
    assert out.returncode == 0 and "squeeze_num: 4" in out.stdout
    out = bench("attack=bpp", "attack.params.squeeze_num=8", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "squeeze_num: 8" in out.stdout


def test_unknown_key_checks_only_what_it_can_know():
    from bench.cli import unknown_key

    for key, argv in [("train.augment.crop_pad", []), ("model.kwargs.width", []),
                      ("defense.params.finetune.lr", ["defense=abl"]),
                      ("attack.params.alpha", ["attack=dbd/blended"]),
                      ("attack.params.anything", ["experiment=dbd_cifar10"])]:
        assert unknown_key(key, argv) is None, key
    assert "valid under train.augment: crop_pad" in unknown_key("train.augment.nope", [])
    assert unknown_key("sed", []).startswith("unknown key sed; valid: seed, amp, channels_last")
    assert unknown_key("seed", []) is None and unknown_key("experiment", []) is None
    assert unknown_key("attack.poison_rate", ["attack=none"]).startswith(
        "attack.poison_rate has no effect with attack=none; choose an attack")
    assert "choose logger=wandb" in unknown_key("logger.project", [])
    assert unknown_key("logger.project", ["logger=wandb"]) is None
    assert unknown_key("defense.params.gamma", ["defense=dbd"]).startswith(
        "unknown key defense.params.gamma; valid under defense.params (defense 'dbd'):")


def test_a_failed_run_exits_1_a_sweep_with_one_goes_on(tmp_path):
    """A single run whose loss diverges (lr 1e30) records its failed row and exits 1; in a
    multirun the failed job's row is recorded and the next job still runs: exit 0."""
    res = tmp_path / "one"
    out = bench(*TINY, "train.epochs=1", "train.lr=1e30", "defense=none", f"results_dir={res}",
                cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    df = pd.read_csv(res / "runs.csv")
    assert list(df.status) == ["failed"] and "loss became" in df.error[0]
    res = tmp_path / "sweep"
    out = bench(*TINY, "train.epochs=1", "train.lr=1e30,0.01", "defense=none",
                f"results_dir={res}", "-m", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    df = pd.read_csv(res / "runs.csv").sort_values("status")
    assert list(df.status) == ["failed", "ok"]
    assert [json.loads(c)["train"]["lr"] for c in df.config] == [1e30, 0.01]
