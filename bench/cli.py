"""Command line: ``python -m bench [group=option ...] [key=value ...] [-m]``.

Hydra's entry point (the library below takes typed dataclasses; besides this module only the
other command lines import Hydra: ``bench.report`` for its sweep callback, ``bench.paper`` to
compose the reduced jobs). It checks group options before Hydra sees them (so an unknown name is
one line listing the valid ones), composes ``conf/config.yaml``, converts it to a typed
``RunConfig`` and hands it to ``bench.run``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import typing
from importlib import resources

import hydra
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.config import RunConfig, from_dict
from bench.errors import BenchError
from bench.rows import collect
from bench.run import run_and_record, summary

log = logging.getLogger("bench")
PLUGINS = {  # launcher option -> (plugin module, pyproject extra)
    "local_parallel": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
}
GROUPS = ("dataset", "model", "attack", "defense", "train", "sweep", "experiment", "logger",
          "ablation", "scale")


def group_options(group: str, nested: bool = False) -> list[str]:
    """Options of a config group; ``nested`` adds the variants kept in its sub-folders
    (``conf/attack/dbd/blended.yaml`` is the option ``dbd/blended``)."""
    folder = resources.files("conf") / group
    if not folder.is_dir():
        return []
    opts = [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")]
    if nested:
        opts += [f"{d.name}/{p.name[:-5]}" for d in folder.iterdir() if d.is_dir()
                 for p in d.iterdir() if p.name.endswith(".yaml")]
    return sorted(opts)


def _chosen(group: str, argv: list[str], default: str) -> list[str] | None:
    """The component names ``group=`` selects on the command line (its YAML's ``name``), the
    default when absent, or None when an experiment or sweep may choose it instead."""
    if any(a.lstrip("+~").split("=")[0] in ("experiment", "sweep") for a in argv):
        return None
    opts = next((a.partition("=")[2] for a in argv if a.partition("=")[0] == group), default)
    names = []
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        path = resources.files("conf").joinpath(group, *f"{opt}.yaml".split("/"))
        name = OmegaConf.load(str(path)).get("name") if path.is_file() else None
        names.append(name or opt.split("/")[-1])  # a variant (dbd/blended) extends its attack
    return names


def unknown_key(key: str, argv: list[str]) -> str | None:
    """A one-line error if the dotted ``key`` names no field of its section (``train.nosuch``,
    ``attack.params.nosuch`` for the attack chosen on the command line), else None. Keys of free
    mappings (``model.kwargs.*``) and sections an experiment may change are not checked."""
    from attacks import ATTACKS
    from bench.config import DatasetCfg, DefenseCfg, ModelCfg, RunConfig
    from bench.logger import LoggerCfg
    from bench.poison import AttackSpec
    from bench.train import TrainCfg
    from defenses import DEFENSES

    head, *parts = key.split(".")
    if not parts:
        valid = [f.name for f in dataclasses.fields(RunConfig) if f.name not in GROUPS]
        if head in valid or head in GROUPS or head.endswith("_dataset") or head.endswith("scale"):
            return None
        return f"unknown key {key}; valid: {', '.join(valid)}; groups: {', '.join(GROUPS)}"
    if head in ("attack", "logger") and parts != ["name"]:
        default = "badnets" if head == "attack" else "none"
        if _chosen(head, argv, default) == ["none"]:
            pick = "an attack (attack=badnets, ...)" if head == "attack" else "logger=wandb"
            return f"{key} has no effect with {head}=none; choose {pick} or drop the key"
    roots: list[tuple[str, str, type | None]] = []
    static = {"train": TrainCfg, "dataset": DatasetCfg, "model": ModelCfg, "logger": LoggerCfg}
    if head in static:
        roots = [(head, "", static[head])]
    elif head in ("attack", "defense") and parts and parts[0] != "params":
        roots = [(head, "", AttackSpec if head == "attack" else DefenseCfg)]
    elif head in ("attack", "defense") and parts:
        reg = ATTACKS if head == "attack" else DEFENSES
        names = _chosen(head, argv, "badnets" if head == "attack" else "none")
        if names is None or any(n not in reg.names() for n in names):
            return None  # an experiment chooses it, or the unknown name is reported instead
        roots = [(f"{head}.params", f" ({head} '{n}')", reg.get(n).params) for n in names]
        parts = parts[1:]
    for owner, which, cls in roots:
        for i, part in enumerate(parts):
            if cls is None:
                return f"unknown key {key}: {which.strip(' ()')} takes no parameters"
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if part not in fields:
                where = ".".join([owner, *parts[:i]])
                return f"unknown key {key}; valid under {where}{which}: {', '.join(fields)}"
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                break  # a value, or a free mapping (model.kwargs)
    return None


def check_overrides(argv: list[str]) -> None:
    """Exit 2 with one line if an override names an unknown option of a config group or a key
    no section has."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("-", "hydra")) and (msg := unknown_key(key.lstrip("+~"),
                                                                                argv)):
            sys.stderr.write(f"error: {msg}\n")
            sys.exit(2)
        key = key.lstrip("+~")
        showing = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info"} & set(argv)
        if key == "hydra/launcher" and value in PLUGINS and not showing:
            try:
                importlib.import_module(PLUGINS[value][0])
            except ImportError:
                sys.stderr.write(f"error: launcher '{value}' needs its plugin; "
                                 f"pip install -e '.[{PLUGINS[value][1]}]'\n")
                sys.exit(2)
        if not sep or key not in GROUPS:
            continue
        known = group_options(key, nested=True)
        for opt in value.split(","):
            opt = opt.strip()
            if opt and opt not in known:
                sys.stderr.write(f"error: unknown {key} '{opt}'; known: {', '.join(known)}\n")
                sys.exit(2)


def sweep_jobs(config: DictConfig, task: list[str]) -> list[list[str]]:
    """The override list of every job of a multirun, as Hydra's basic sweeper expands them:
    ``config``'s ``hydra.sweeper.params`` with the command line's ``task`` overrides."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_config(config_name: str, job: list[str]) -> RunConfig:
    """A job's typed config, composed from its overrides as the job will compose it (needs an
    initialised Hydra: inside the app, or ``initialize_config_module``)."""
    return from_dict(OmegaConf.to_container(compose(config_name=config_name, overrides=job),
                                            resolve=True))


class ValidateSweep(Callback):
    """Before a multirun launches anything, build every job's typed config the way the job
    will (its sweep overrides composed, then ``from_dict``): one impossible value in a sweep
    list is one ``error:`` line and exit 2 before the first job, not a stop after hours of
    the jobs before it (Hydra's sweeper itself only checks that each job composes)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # as Hydra
        for num, job in enumerate(sweep_jobs(config, task)):
            try:
                job_config(config.hydra.job.config_name, job)
            except BenchError as e:
                sys.stderr.write(f"error: sweep job #{num} ({' '.join(job)}): {e}; nothing "
                                 f"was run\n")
                sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def _main(dcfg: DictConfig) -> None:
    try:
        cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True))
        row = run_and_record(cfg)
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(summary(row), flush=True)
    collect(cfg.results_dir)
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    if row["status"] != "ok" and not multirun:
        sys.exit(1)


def main() -> None:
    check_overrides(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
