"""Command line: ``python -m bench [group=option ...] [key=value ...] [-m]``.

The only module that imports Hydra. It checks group options before Hydra sees them (so an unknown
name is one line listing the valid ones), composes ``conf/config.yaml``, converts it to a typed
``RunConfig`` and hands it to ``bench.run``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import resources

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.config import from_dict
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


def check_overrides(argv: list[str]) -> None:
    """Exit 2 with one line if an override names an unknown option of a config group."""
    for arg in argv:
        key, sep, value = arg.partition("=")
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
