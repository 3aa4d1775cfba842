"""Paper-table experiments (``conf/experiment/``): every job of each full-scale sweep carries the
official hyper-parameters of ``results/reference/official_hparams.csv``; the ``_reduced``
variants are sub-grids of them at CPU scale (``scale=ci``); the reference CSVs are well-formed
data."""

from __future__ import annotations

import copy
import csv
import itertools
import math
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from attacks import ATTACKS
from bench.cli import check_overrides, group_options
from bench.config import from_dict
from bench.data import DATASETS
from bench.models import list_models
from bench.run import run_id
from defenses import DEFENSES

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
EXPERIMENTS = ("dbd_cifar10", "abl_cifar10", "backdoorbench_cifar10")


def _compose(overrides: tuple[str, ...], hydra_cfg: bool = False):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(
            config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg
        )


@cache
def sweep_params(experiment: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of an experiment, each value split into its options."""
    params = _compose((f"experiment={experiment}",), hydra_cfg=True).hydra.sweeper.params
    return {k: [v.strip() for v in str(s).split(",")] for k, s in params.items()}


@cache
def job(experiment: str, attack: str, defense: str, *extra: str) -> dict:
    """The resolved config of one job of the sweep (as a plain dict)."""
    dcfg = _compose((f"experiment={experiment}", f"attack={attack}", f"defense={defense}", *extra))
    return OmegaConf.to_container(dcfg, resolve=True)


@cache
def job_of_plain_run(defense: str) -> dict:
    """The config of ``python -m bench defense=<defense>`` (embedded Fashion-MNIST)."""
    return OmegaConf.to_container(_compose((f"defense={defense}",)), resolve=True)


def jobs(experiment: str):
    """(attack option, defense option, config) for every attack x defense of the sweep (the
    other sweep keys, seed and poison rate, select no config-group option)."""
    p = sweep_params(experiment)
    for attack, defense in itertools.product(p["attack"], p["defense"]):
        yield attack, defense, job(experiment, attack, defense)


def lookup(cfg: dict, dotted: str):
    """``cfg["a"]["b"]`` for ``"a.b"``; ``"<missing>"`` where a key is absent."""
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return "<missing>"
        cfg = cfg[part]
    return cfg


def parse(value: str):
    """A table value as YAML: ``0.1``, ``5.0e-4``, ``[100, 150]``, ``true``, ``null``, ``sgd``."""
    return yaml.safe_load(value)


def same(want, got) -> bool:
    if isinstance(want, list) or isinstance(got, list | tuple):
        return (
            isinstance(want, list)
            and isinstance(got, list | tuple)
            and len(want) == len(got)
            and all(same(w, g) for w, g in zip(want, got, strict=True))
        )
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        return want is got
    if isinstance(want, int | float) and isinstance(got, int | float):
        return math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)
    return want == got


@cache
def official() -> tuple[dict, ...]:
    with open(REFERENCE / "official_hparams.csv", newline="") as f:
        return tuple(csv.DictReader(f))


def rows_of(experiment: str) -> list[dict]:
    return [r for r in official() if r["experiment"] == experiment]


def job_mismatches(experiment: str, attack: str, defense: str, cfg: dict) -> list[str]:
    """Keys of one job whose value differs from the official table."""
    out = []
    for r in rows_of(experiment):
        if r["attack"] in ("", attack) and r["defense"] in ("", defense):
            got = lookup(cfg, r["key"])
            if not same(parse(r["value"]), got):
                out.append(
                    f"{experiment} attack={attack} defense={defense}: {r['key']} = "
                    f"{got!r}, official {r['value']} ({r['source']})"
                )
    return out


def mismatches(experiment: str) -> list[str]:
    """Every (job, key) whose composed value differs from the official table; also rows that
    apply to no job of the sweep (a typo in the table must not pass silently)."""
    grid = list(jobs(experiment))
    out = [m for a, d, cfg in grid for m in job_mismatches(experiment, a, d, cfg)]
    out += [
        f"{experiment}: row {r['key']} (attack={r['attack']!r}, defense={r['defense']!r}) "
        "matches no job of the sweep"
        for r in rows_of(experiment)
        if not any(r["attack"] in ("", a) and r["defense"] in ("", d) for a, d, _ in grid)
    ]
    return out


# --- full-scale experiments ------------------------------------------------------------------


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_full_scale_config_equals_official_values(experiment):
    assert [r for r in official() if r["experiment"] == experiment]
    assert mismatches(experiment) == []


def test_official_table_catches_a_changed_value():
    """The comparison is not vacuous: a drifted value in a composed job is reported."""
    cfg = copy.deepcopy(job("dbd_cifar10", "dbd/badnets", "dbd"))
    assert job_mismatches("dbd_cifar10", "dbd/badnets", "dbd", cfg) == []
    cfg["defense"]["params"]["simclr"]["lr"] = 0.3
    cfg["attack"]["params"]["position"] = [4, 5]
    bad = job_mismatches("dbd_cifar10", "dbd/badnets", "dbd", cfg)
    assert len(bad) == 2 and any("simclr.lr = 0.3, official 0.4" in m for m in bad)
    none = copy.deepcopy(job("dbd_cifar10", "dbd/badnets", "none"))
    none["train"]["milestones"] = [100]
    assert len(job_mismatches("dbd_cifar10", "dbd/badnets", "none", none)) == 1


def test_official_table_covers_each_defense_stage():
    keys = {(r["experiment"], r["key"]) for r in official()}
    for exp in ("dbd_cifar10", "backdoorbench_cifar10"):
        for stage in ("simclr.lr", "linear.lr", "mixmatch.lambda_u", "split.epsilon"):
            assert (exp, f"defense.params.{stage}") in keys
    for exp in ("abl_cifar10", "backdoorbench_cifar10"):
        for stage in (
            "isolation.lr",
            "gamma",
            "isolation_ratio",
            "finetune.milestones",
            "unlearn.lr",
        ):
            assert (exp, f"defense.params.{stage}") in keys
    assert ("dbd_cifar10", "train.milestones") in keys
    assert ("backdoorbench_cifar10", "train.lr") in keys


@pytest.mark.parametrize(
    "experiment, attacks, defenses",
    [
        ("dbd_cifar10", ["badnets", "blended", "wanet", "lc"], ["none", "dbd"]),
        (
            "abl_cifar10",
            ["badnets", "trojan", "blended", "input_aware", "sig", "lc"],
            ["none", "abl"],
        ),
        (
            "backdoorbench_cifar10",
            ["badnets", "blended", "wanet", "input_aware", "sig", "lc", "lf", "bpp", "trojan"],
            ["none", "abl", "dbd", "dlp"],
        ),
    ],
)
def test_sweep_grid_and_row_names(experiment, attacks, defenses):
    """Each job is a valid typed config; attack variants (``dbd/blended``) record the plain
    attack name in the row."""
    p = sweep_params(experiment)
    assert p["defense"] == defenses and p["seed"] == ["0"]
    assert [a.rsplit("/", 1)[-1] for a in p["attack"]] == attacks
    for attack, defense, cfg in jobs(experiment):
        typed = from_dict(cfg)
        name = attack.rsplit("/", 1)[-1]
        assert typed.attack.name == name and typed.defense.name == defense
        assert f"-{name}-{defense}-s0-" in run_id(typed)
        assert cfg["results_dir"] == f"results/paper/{experiment}"
    if experiment == "backdoorbench_cifar10":
        assert p["attack.poison_rate"] == ["0.1", "0.05", "0.01"]


def test_variants_keep_what_they_do_not_override():
    cfg = job("dbd_cifar10", "dbd/blended", "dbd")
    base = OmegaConf.to_container(_compose(("attack=blended",)), resolve=True)["attack"]
    assert cfg["attack"].keys() == base.keys()

    def rest(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in ("poison_rate", "target", "params")}

    assert rest(cfg["attack"]) == rest(base)
    assert cfg["attack"]["params"] == base["params"] | {"alpha": 0.1}


def test_cfg_job_shows_official_values(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench", "experiment=dbd_cifar10", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for line in (
        "name: resnet18",
        "lr: 0.4",
        "schedule_epochs: 1000",
        "lambda_u: 15.0",
        "milestones:\n  - 100\n  - 150",
        "results_dir: results/paper/dbd_cifar10",
    ):
        assert line in out.stdout


def test_cli_accepts_variants_and_rejects_typos(capsys):
    check_overrides(["experiment=dbd_cifar10", "attack=dbd/blended,abl/sig"])
    with pytest.raises(SystemExit) as e:
        check_overrides(["attack=dbd/blendd"])
    assert e.value.code == 2
    assert "unknown attack 'dbd/blendd'; known: " in capsys.readouterr().err
    assert "dbd/blended" in group_options("attack", nested=True)
    assert "dbd/blended" not in group_options("attack")  # registry <-> YAML stays one to one
    check_overrides(["scale=ci"])
    with pytest.raises(SystemExit):
        check_overrides(["scale=cii"])
    assert "unknown scale 'cii'; known: ci, default" in capsys.readouterr().err


# --- reduced variants ------------------------------------------------------------------------


@cache
def plain_job(attack: str, defense: str, *extra: str) -> dict:
    """The config of ``python -m bench attack=<attack> defense=<defense> <extra>``."""
    return OmegaConf.to_container(
        _compose((f"attack={attack}", f"defense={defense}", *extra)), resolve=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_reduced_variant_is_the_plain_run_at_ci_scale(experiment):
    """Every reduced job is exactly the plain Fashion-MNIST run of its attack and defense with
    ``scale=ci`` in fp32 (same config, same run id), written to results/paper_reduced, so rows are
    shared between the experiments; its attacks and defenses are among the full-scale grid's."""
    reduced = f"{experiment}_reduced"
    full, small = sweep_params(experiment), sweep_params(reduced)
    assert set(small["defense"]) <= set(full["defense"]) and small["seed"] == ["0"]
    full_names = {job(experiment, a, full["defense"][0])["attack"]["name"] for a in full["attack"]}
    assert set(small["attack"]) <= full_names
    for attack, defense, cfg in jobs(reduced):
        assert cfg["results_dir"] == "results/paper_reduced"
        plain = plain_job(attack, defense, "scale=ci", "amp=false")
        assert {k: v for k, v in cfg.items() if k != "results_dir"} == {
            k: v for k, v in plain.items() if k != "results_dir"}
        assert run_id(from_dict(cfg)) == run_id(from_dict(plain))
        assert cfg["attack"]["poison_rate"] == 0.1


def _leaves(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_ci_scale_only_shortens_the_costly_stages(defense):
    """``scale=ci`` changes nothing but epoch counts and what is measured in epochs (the cosine
    length, the lambda_u ramp), each to at most its main-table value: the same algorithm, run
    shorter. ABL and no defense run as in the main table; DBD and DLP are shortened."""
    main = dict(_leaves(plain_job("badnets", defense)))
    ci = dict(_leaves(plain_job("badnets", defense, "scale=ci")))
    assert main.keys() == ci.keys()
    changed = {k for k in main if main[k] != ci[k]}
    assert bool(changed) == (defense in ("dbd", "dlp")), changed
    for k in changed:
        assert k.rsplit(".", 1)[-1] in ("epochs", "schedule_epochs", "rampup_length"), k
        assert 0 < ci[k] < main[k], k


def test_default_scale_adds_nothing():
    """The default scale is an empty config and no defense preset is named for it, so the main
    table's configs (and run ids) are what they were before the group existed."""
    assert yaml.safe_load((ROOT / "conf" / "scale" / "default.yaml").read_text()) is None
    assert not list((ROOT / "conf" / "defense_scale").glob("*_default.yaml"))


def test_every_defense_scale_file_is_used():
    """Each ``conf/defense_scale/<defense>_<dataset>_<scale>.yaml`` names a real defense, dataset
    and scale, and changes what that run composes (a misnamed file would be ignored silently)."""
    files = sorted((ROOT / "conf" / "defense_scale").glob("*.yaml"))
    assert files
    scales = group_options("scale")
    for f in files:
        matches = [(d, ds, sc) for d in DEFENSES.names() for ds in DATASETS for sc in scales
                   if f.stem == f"{d}_{ds}_{sc}"]
        assert len(matches) == 1, f.name
        d, ds, sc = matches[0]
        base = OmegaConf.to_container(_compose((f"defense={d}", f"dataset={ds}")), resolve=True)
        scaled = OmegaConf.to_container(
            _compose((f"defense={d}", f"dataset={ds}", f"scale={sc}")), resolve=True)
        assert base != scaled, f.name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_checker_claims_match_the_reduced_grid(experiment):
    from bench.paper_claims import EXPERIMENTS as CHECKED

    p = sweep_params(f"{experiment}_reduced")
    assert list(CHECKED[experiment].attacks) == p["attack"]
    assert {"none", *CHECKED[experiment].defenses} == set(p["defense"])


# --- reference numbers -----------------------------------------------------------------------

REF_COLUMNS = [
    "source",
    "dataset",
    "model",
    "attack",
    "defense",
    "poison_rate",
    "ba",
    "asr",
    "ra",
    "citation",
]


@pytest.mark.parametrize("name", ["dbd", "abl", "backdoorbench"])
def test_reference_csv_is_clean_data(name):
    with open(REFERENCE / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0])[: len(REF_COLUMNS)] == REF_COLUMNS
    keys = [tuple(r[c] for c in REF_COLUMNS[:6]) for r in rows]
    assert len(keys) == len(set(keys)), (
        "one row per (source, dataset, model, attack, defense, rate)"
    )
    for r in rows:
        assert r["attack"] in ATTACKS.names() and r["defense"] in DEFENSES.names(), r
        assert r["dataset"] in DATASETS and r["model"] in list_models(), r
        assert 0 < float(r["poison_rate"]) < 1 and r["citation"].strip(), r
        metrics = [float(r[m]) for m in ("ba", "asr", "ra") if r[m] != ""]
        assert metrics and all(0 <= v <= 1 for v in metrics), r
        assert r["ba"] != "" and r["asr"] != ""


def test_reference_numbers_spot_checks():
    def get(name, **k):
        with open(REFERENCE / f"{name}.csv", newline="") as f:
            hits = [r for r in csv.DictReader(f) if all(r[a] == str(b) for a, b in k.items())]
        assert len(hits) == 1, k
        return tuple(float(hits[0][m]) if hits[0][m] else None for m in ("ba", "asr", "ra"))

    assert get("dbd", attack="blended", defense="dbd") == (0.926, 0.0031, None)
    assert get("abl", source="abl_readme_leaderboard", defense="abl") == (0.8611, 0.0304, None)
    assert get(
        "backdoorbench",
        source="backdoorbench_leaderboard",
        attack="trojan",
        defense="abl",
        poison_rate=0.1,
    ) == (0.1107, 1.0, 0.0)
    assert get(
        "backdoorbench",
        source="backdoorbench_leaderboard",
        attack="wanet",
        defense="dbd",
        poison_rate=0.01,
    ) == (0.7974, 0.046, 0.7846)


def test_abl_unlearning_log_parses():
    with open(REFERENCE / "abl_unlearning_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for source in ("abl_readme_demo", "abl_readme_augment_log"):
        epochs = [int(r["epoch"]) for r in rows if r["source"] == source]
        assert epochs == list(range(len(epochs))) and len(epochs) >= 5
    assert all(0 <= float(r[m]) <= 1 for r in rows for m in ("ba", "asr"))
