"""Sweeps under stress: launchers, kill + resume, concurrent jobs, a diverging job, trackers."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest

from bench.config import config_hash
from bench.errors import BenchError
from bench.logger import LoggerCfg, make_logger
from bench.report import report
from bench.rows import COLUMNS
from bench.run import run_and_record
from tests.conftest import TINY, compose_cfg

FAST = [*TINY, "train.epochs=1", "defense=none", "threads=1"]


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *FAST, *args]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(bench_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=600)


def runs_csv(res: Path) -> pd.DataFrame:
    df = pd.read_csv(res / "runs.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert df.run_id.is_unique
    return df


def has_plugin(name: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{name}") is not None


# --- launchers -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("launcher, plugin", [("local_parallel", "hydra_joblib_launcher"),
                                              ("submitit_local", "hydra_submitit_launcher")])
def test_launcher_two_jobs_two_rows(tmp_path, launcher, plugin):
    if not has_plugin(plugin):
        pytest.skip(f"{plugin} not installed")
    res = tmp_path / "res"
    out = bench(f"hydra/launcher={launcher}", f"results_dir={res}", "attack=badnets,blended",
                "-m", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = runs_csv(res)
    assert sorted(df.attack) == ["badnets", "blended"] and (df.status == "ok").all()


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm", "ray"])
def test_launcher_configs_compose(tmp_path, launcher):
    """Every launcher file composes (plugins that are not installed are skipped)."""
    plugin = {"local_parallel": "hydra_joblib_launcher", "slurm": "hydra_submitit_launcher",
              "ray": "hydra_ray_launcher"}[launcher]
    if launcher != "ray" and not has_plugin(plugin):
        pytest.skip(f"{plugin} not installed")
    out = subprocess.run([sys.executable, "-m", "bench", f"hydra/launcher={launcher}", "--cfg",
                          "hydra", "-p", "hydra.launcher"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"_target_: hydra_plugins.{plugin}." in out.stdout
    if launcher != "local_parallel":
        assert "gpus" in out.stdout  # one GPU per job on clusters


# --- kill and resume -----------------------------------------------------------------------

@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicates(tmp_path):
    res = tmp_path / "res"
    args = [f"results_dir={res}", "seed=0,1,2", "attack=badnets,blended", "-m"]
    proc = subprocess.Popen(bench_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    rows = res / "rows"
    try:
        deadline = time.monotonic() + 300
        while len(list(rows.glob("*.json"))) < 2:
            assert proc.poll() is None, "sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no rows after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in rows.glob("*.json")}
    assert 2 <= len(done) < 6
    out = bench(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = runs_csv(res)
    assert len(df) == 6 and (df.status == "ok").all()
    assert sorted(zip(df.attack, df.seed, strict=True)) == sorted(
        (a, s) for a in ("badnets", "blended") for s in (0, 1, 2))
    # rows finished before the kill were skipped, not rerun
    assert all((rows / n).stat().st_mtime_ns == t for n, t in done.items())
    assert len(list(rows.glob("*.json"))) == 6


# --- concurrent jobs -----------------------------------------------------------------------

@pytest.mark.slow
def test_two_concurrent_jobs_share_results_dir(tmp_path):
    res = tmp_path / "res"
    procs = [subprocess.Popen(bench_cmd(f"results_dir={res}", f"seed={s}"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    df = runs_csv(res)
    assert sorted(df.seed) == [0, 1] and (df.status == "ok").all()
    assert len(list((res / "hydra").iterdir())) == 2  # each run its own hydra dir


# each job: wait until all are ready, write its row, collect; once per round, a fresh folder
# per round. Only ``bench.rows`` is imported, so the jobs start in well under a second.
_COLLECT_JOB = """
import sys, time
from pathlib import Path
from bench.rows import collect, write_row
root, job, n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for r in range(rounds):
    ready = root / "ready" / str(r)
    ready.mkdir(parents=True, exist_ok=True)
    (ready / str(job)).touch()
    while len(list(ready.iterdir())) < n:  # a barrier: every job writes and collects at once
        time.sleep(0.001)
    write_row(root / str(r), {"run_id": f"job{job}", "seed": job, "ba": job / 8, "status": "ok"})
    collect(root / str(r))
"""


def test_parallel_jobs_collect_every_row_once(tmp_path):
    """Jobs that write their row and collect at the same moment (the joblib launcher) leave a
    runs.csv with every row exactly once: a job that read the rows before another wrote its own
    must not replace runs.csv after that job did (the lock in ``collect``)."""
    import bench.rows

    n, rounds = 8, 6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(bench.rows.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECT_JOB, str(tmp_path), str(j), str(n),
                               str(rounds)], env=env, stderr=subprocess.PIPE, text=True)
             for j in range(n)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    lost = {}
    for r in range(rounds):
        res = tmp_path / str(r)
        df = runs_csv(res)
        if sorted(df.run_id) != [f"job{j}" for j in range(n)]:
            lost[r] = sorted({f"job{j}" for j in range(n)} - set(df.run_id))
            continue
        assert df.set_index("run_id").ba.to_dict() == {f"job{j}": j / 8 for j in range(n)}
        assert {p.name for p in res.iterdir()} - {"runs.csv.lock"} == {"rows", "runs.csv"}
        assert len(list((res / "rows").iterdir())) == n
    assert not lost, f"rows missing from runs.csv (round: run ids): {lost}"
    assert not list(tmp_path.rglob("*.tmp"))  # no temp file of atomic_write is left


# --- a diverging job -----------------------------------------------------------------------

@pytest.mark.slow
def test_nan_job_is_a_failed_row_sweep_goes_on(tmp_path):
    res = tmp_path / "res"
    out = bench(f"results_dir={res}", "attack=badnets", "train.lr=0.05,1e30", "-m",
                cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    df = runs_csv(res)
    assert len(df) == 2
    failed, ok = df[df.status == "failed"], df[df.status == "ok"]
    assert len(failed) == 1 and len(ok) == 1
    err = failed.error.iloc[0]
    assert err.startswith("DivergedError:") and "lower the learning rate" in err
    md = report(res)["leaderboard.md"].read_text()
    assert "1 failed run:" in md and "DivergedError" in md


# --- logger --------------------------------------------------------------------------------

def test_logger_is_not_in_the_hash():
    base = compose_cfg(["dataset=synthetic"])
    wb = compose_cfg(["dataset=synthetic", "logger=wandb"])
    assert base.logger.name == "none" and wb.logger.name == "wandb"
    assert wb.logger.mode == "offline" and wb.logger.dir == "runs/wandb"
    assert config_hash(base) == config_hash(wb)


def test_missing_wandb_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(BenchError, match="pip install wandb"):
        make_logger(LoggerCfg(name="wandb"), "runs")


def test_unknown_logger_cli_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "logger=nope"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "unknown logger 'nope'; known: none, wandb" in out.stderr


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.summary, self.exit_code = kwargs, [], {}, None

    def log(self, d):
        self.logged.append(d)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_wandb_logger_sees_config_epochs_stages_and_row(tiny_cfg, monkeypatch, caplog):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    caplog.set_level("INFO", logger="bench")  # epochs come from fit's INFO records
    cfg = tiny_cfg("logger=wandb", "train.epochs=1")
    row = run_and_record(cfg)
    assert row["status"] == "ok" and len(runs) == 1
    run = runs[0]
    assert run.init["mode"] == "offline" and run.init["name"] == row["run_id"]
    assert run.init["dir"] == f"{cfg.results_dir}/wandb"
    assert run.init["config"]["attack"]["name"] == "badnets"
    keys = set().union(*run.logged)
    assert {"train/loss", "train/acc", "train/lr", "train/epoch"} <= keys
    assert {"stage_s/poison", "stage_s/train", "stage_s/evaluate"} <= keys
    assert run.summary["ba"] == row["ba"] and run.summary["status"] == "ok"
    assert run.exit_code == 0


def test_broken_tracker_never_fails_the_run(tiny_cfg, monkeypatch):
    def boom(**kw):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=boom))
    row = run_and_record(tiny_cfg("logger=wandb", "train.epochs=1"))
    assert row["status"] == "ok"


@pytest.mark.slow
def test_wandb_offline_cli(tmp_path):
    pytest.importorskip("wandb")
    res = tmp_path / "res"
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    out = subprocess.run(bench_cmd(f"results_dir={res}", "logger=wandb"), capture_output=True,
                         text=True, cwd=tmp_path, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert runs_csv(res).status.tolist() == ["ok"]
    assert list((res / "wandb" / "wandb").glob("offline-run-*"))
