"""Typed run configuration. Hydra composes YAML (``conf/``); this turns it into frozen
dataclasses, strictly: an unknown key or name is a one-line ``ConfigError`` listing valid ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from attacks import ATTACKS
from bench.errors import ConfigError
from bench.logger import LoggerCfg
from bench.models import check_model
from bench.poison import AttackSpec
from bench.registry import build_params, typed
from bench.rows import flatten
from bench.train import TrainCfg
from defenses import DEFENSES


@dataclass(frozen=True)
class DatasetCfg:
    """Args:
    name: dataset name (``bench.data.DATASETS``).
    full: fashion_mnist only: the full 60k/10k set instead of the embedded 10k/2k subset.
    download: let torchvision download missing files (needs network).
    image_size: resize target for datasets with varying image sizes (gtsrb).
    synthetic: parameters of the ``synthetic`` set.
    limit_train, limit_test: keep only the first N samples (quick runs and tests; the loaders
        return a mixed class order, GTSRB's and Tiny ImageNet's class-sorted training folders in
        a fixed shuffle, so a prefix is roughly balanced). None keeps all.
    """

    name: str = "fashion_mnist"
    full: bool = False
    download: bool = False
    image_size: int | None = None
    synthetic: dict | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def __post_init__(self) -> None:
        for key in ("limit_train", "limit_test"):
            if (n := getattr(self, key)) is not None and n < 1:
                raise ConfigError(f"{key} must be >= 1 or null (all samples), got {n}")


@dataclass(frozen=True)
class ModelCfg:
    name: str = "cnn_small"
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_model(self.name, self.kwargs)


@dataclass(frozen=True)
class DefenseCfg:
    """``variant`` names a non-default setting (an ablation); rows label the defense
    ``<name>.<variant>`` so leaderboards keep it apart from the default."""

    name: str = "none"
    params: Any = None
    variant: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}.{self.variant}" if self.variant else self.name


@dataclass(frozen=True)
class RunConfig:
    """One cell of the grid. ``results_dir``, ``data_root``, ``device``, ``threads``,
    ``progress`` and ``force`` say where and how to run; they do not enter the config hash."""

    dataset: DatasetCfg = field(default_factory=DatasetCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    attack: AttackSpec | None = field(default_factory=AttackSpec)
    defense: DefenseCfg = field(default_factory=DefenseCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    seed: int = 0
    amp: bool | str = "auto"  # bf16 autocast: true, false, or auto (bench.run.resolve_amp)
    channels_last: bool = True
    device: str = "auto"
    threads: int | None = None
    results_dir: str = "runs"
    data_root: str | None = None
    progress: bool | None = None
    force: bool = False
    logger: LoggerCfg = field(default_factory=LoggerCfg)  # tracking only: not in the hash

    def __post_init__(self) -> None:
        if self.device != "auto":
            parse_device(self.device)


def parse_device(name: str) -> torch.device:
    """``torch.device(name)``, or a ``ConfigError`` naming the valid forms."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or another "
                          "torch device type") from None


WHERE_KEYS = ("results_dir", "data_root", "device", "threads", "progress", "force",
              "logger")


def _section(cls: type, values: Any, owner: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{owner}' must be a mapping, got {values!r}")
    return build_params(cls, values, owner)


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Build a ``RunConfig`` from a resolved plain dict (as composed by Hydra)."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    hints = typing.get_type_hints(RunConfig)
    out: dict[str, Any] = {k: typed(v, hints[k], k) for k, v in d.items() if k not in
                           ("dataset", "model", "attack", "defense", "train", "logger")}
    out["logger"] = _section(LoggerCfg, d.get("logger", {}), "logger")
    out["dataset"] = _section(DatasetCfg, d.get("dataset", {}), "dataset")
    out["model"] = _section(ModelCfg, d.get("model", {}), "model")
    out["train"] = _section(TrainCfg, d.get("train", {}), "train")
    att = dict(d.get("attack") or {"name": "none"})
    if att.get("name", "none") == "none":
        out["attack"] = None
    else:
        name = att.get("name", AttackSpec.name)
        att["params"] = ATTACKS.params(name, att.get("params"))
        out["attack"] = _section(AttackSpec, att, "attack")
    if not (isinstance(out.get("amp", True), bool) or out.get("amp") == "auto"):
        raise ConfigError(f"amp must be true, false or auto, got {out['amp']!r}")
    dfn = dict(d.get("defense", {}))
    name = dfn.get("name", "none")
    dfn["params"] = DEFENSES.params(name, dfn.get("params"))
    out["defense"] = _section(DefenseCfg, dfn, "defense")
    return RunConfig(**out)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, JSON-able dict of the config (params dataclasses expanded)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def hashed_config(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the result (not where or how it ran), as a plain dict: what
    ``config_hash`` hashes and what a row stores as its ``config``."""
    return {k: v for k, v in to_dict(cfg).items() if k not in WHERE_KEYS}


def hash_of(config: Mapping[str, Any]) -> str:
    """The config hash of a ``hashed_config`` dict (12 hex digits of its SHA-256)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two config dicts (``+key``: only in ``new``,
    ``-key``: only in ``old``)."""
    a, b = flatten(dict(old)), flatten(dict(new))
    return sorted([f"-{k}" for k in a.keys() - b.keys()] + [f"+{k}" for k in b.keys() - a.keys()]
                  + [k for k in a.keys() & b.keys() if a[k] != b[k]])


def rebuild_diff(stored: Mapping[str, Any]) -> list[str]:
    """How this version builds a row's stored config differently (``config_diff``; empty when
    it rebuilds to the same hash). Raises ``ConfigError`` when it cannot build it at all (a key
    it no longer knows)."""
    return config_diff(stored, hashed_config(from_dict(stored)))


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that determines the result (not where or how it ran)."""
    return hash_of(hashed_config(cfg))
