"""The harness side of poisoning: which samples, which labels, and the bookkeeping.

Attacks only transform pixels. Here we pick the poisoned indices (exact count), rewrite labels
(all-to-one, all-to-all, clean-label), keep ``y_true`` and ``kind`` for evaluation only, and build
the triggered test set on which ASR and RA are measured.

Poison-rate semantics: ``poison_rate`` is a fraction of the **whole** training set;
``n_poisoned = round(poison_rate * N)`` samples are drawn without replacement from
- the non-target samples for ``all2one`` (default ``select_from: non_target``, so every poisoned
  sample is an effective label flip; ``select_from: all`` draws from all samples like
  BackdoorBench and ABL, where target-class picks keep their label),
- all samples for ``all2all`` (label ``(y + 1) mod K``),
- the target class for clean-label attacks (labels never change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks import ATTACKS, Attack
from bench.data import ImageSet
from bench.errors import ConfigError
from bench.seeding import generator

CLEAN, POISONED, COVER = 0, 1, 2
LABEL_MODES = ("all2one", "all2all", "clean_label")


@dataclass(frozen=True)
class AttackSpec:
    """What the harness needs to poison a dataset (typed view of ``conf/attack/*.yaml``)."""

    name: str = "badnets"
    poison_rate: float = 0.1
    target: int = 0
    label_mode: str = "all2one"
    select_from: str = "non_target"
    params: object = None  # the attack's own params dataclass

    def __post_init__(self) -> None:
        entry = ATTACKS.get(self.name)
        if not 0.0 < self.poison_rate < 1.0:
            raise ConfigError(f"poison_rate must be in (0, 1), got {self.poison_rate}")
        if self.target < 0:
            raise ConfigError(f"target must be >= 0 (a class index), got {self.target}")
        modes = ("clean_label",) if entry.obj.clean_label else entry.obj.label_modes
        if self.label_mode not in modes:
            raise ConfigError(f"'{self.name}' supports label_mode {', '.join(modes)}; got "
                              f"'{self.label_mode}'")
        if self.select_from not in ("non_target", "all"):
            raise ConfigError(f"select_from must be non_target or all, got '{self.select_from}'")


@dataclass(frozen=True)
class PrepareContext:
    """What an attack's ``prepare`` step may use: the run's device and precision switches, the
    seed (for its own generators) and a cache folder for what it learns (surrogates).
    ``hardware`` names what computes the run (``bench.run.hardware``); cached resources are
    keyed by it and, on a CPU, by the thread count (``bench.surrogate.builder``)."""

    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    cache_dir: str | None = None
    progress: bool | None = False
    hardware: str = ""


@dataclass(frozen=True)
class PoisonedTrain:
    """The poisoned training set. Defenses receive ``data`` only, never ``y_true``/``kind``."""

    data: ImageSet  # x possibly triggered, y as given (possibly flipped)
    y_true: torch.Tensor  # int64 [N]
    kind: torch.Tensor  # int64 [N]: 0 clean, 1 poisoned, 2 cover (e.g. WaNet noise mode)

    @property
    def n_poisoned(self) -> int:
        return int((self.kind == POISONED).sum())


@dataclass(frozen=True)
class TriggeredTest:
    """Triggered test samples: all-to-one keeps only those whose true label ≠ target."""

    x: torch.Tensor  # uint8 [M, C, H, W]
    y: torch.Tensor  # attack target label per sample, int64 [M]
    y_true: torch.Tensor  # int64 [M]


def build_attack(spec: AttackSpec, train: ImageSet, seed: int) -> Attack:
    """Instantiate the attack with its trigger generator (depends on the seed only)."""
    entry = ATTACKS.get(spec.name)
    shape = tuple(train.x.shape[1:])
    return entry.obj(spec.params, shape, generator(seed, f"trigger/{spec.name}"))


def validate(spec: AttackSpec, num_classes: int) -> None:
    """What only the dataset can tell (the rest is checked when the spec is built)."""
    if not spec.target < num_classes:
        raise ConfigError(
            f"attack.target must be in [0, {num_classes - 1}] for this dataset, got {spec.target}"
        )


def select_indices(y: torch.Tensor, spec: AttackSpec, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``round(poison_rate * N)`` sorted indices drawn from the eligible pool."""
    n_total = len(y)
    n = round(spec.poison_rate * n_total)
    if spec.label_mode == "clean_label":
        pool = torch.nonzero(y == spec.target).flatten()
    elif spec.label_mode == "all2one" and spec.select_from == "non_target":
        pool = torch.nonzero(y != spec.target).flatten()
    else:
        pool = torch.arange(n_total)
    if n < 1 or n > len(pool):
        raise ConfigError(
            f"poison_rate {spec.poison_rate} asks for {n} samples but {len(pool)} are eligible "
            f"({spec.label_mode}); choose a rate in [{1 / n_total:.4g}, {len(pool) / n_total:.4g}]"
        )
    pick = torch.randperm(len(pool), generator=gen)[:n]
    return pool[pick].sort().values


def select_cover(kind: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` sorted indices among the not-yet-poisoned samples (at most all of them)."""
    pool = torch.nonzero(kind == CLEAN).flatten()
    return pool[torch.randperm(len(pool), generator=gen)[: min(n, len(pool))]].sort().values


def target_labels(y: torch.Tensor, spec: AttackSpec, num_classes: int) -> torch.Tensor:
    if spec.label_mode == "all2all":
        return (y + 1) % num_classes
    if spec.label_mode == "clean_label":
        return y.clone()
    return torch.full_like(y, spec.target)


def test_targets(y: torch.Tensor, spec: AttackSpec, num_classes: int) -> torch.Tensor:
    """The label a successful attack produces on a triggered test sample."""
    if spec.label_mode == "all2all":
        return (y + 1) % num_classes
    return torch.full_like(y, spec.target)


def apply_batched(attack: Attack, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([attack.apply(x[i : i + batch]) for i in range(0, len(x), batch)])


def poison(
    train: ImageSet, test: ImageSet, spec: AttackSpec, seed: int,
    ctx: PrepareContext | None = None,
) -> tuple[PoisonedTrain, TriggeredTest]:
    """Poison ``train`` and build the triggered test set, deterministically from ``seed``.

    Attacks that learn something (a surrogate-based perturbation, a generator) do it in
    ``attack.prepare(train, idx, ctx)`` on the clean training set before any image is triggered.
    """
    validate(spec, train.num_classes)
    attack = build_attack(spec, train, seed)
    idx = select_indices(train.y, spec, generator(seed, f"indices/{spec.name}"))
    attack.prepare(train, idx, ctx or PrepareContext(seed=seed))
    x = train.x.clone()
    y = train.y.clone()
    x[idx] = apply_batched(attack, train.x[idx])
    y[idx] = target_labels(train.y[idx], spec, train.num_classes)
    kind = torch.zeros(len(y), dtype=torch.int64)
    kind[idx] = POISONED
    if attack.cover_ratio > 0:
        cov = select_cover(kind, round(attack.cover_ratio * len(idx)),
                           generator(seed, f"cover/{spec.name}"))
        x[cov] = attack.cover(train.x[cov], generator(seed, f"cover_noise/{spec.name}"))
        kind[cov] = COVER
    data = ImageSet(x=x, y=y, num_classes=train.num_classes, mean=train.mean, std=train.std,
                    hflip=train.hflip, name=train.name, classes=train.classes)
    keep = torch.arange(len(test.y))
    if spec.label_mode != "all2all":
        keep = torch.nonzero(test.y != spec.target).flatten()
    tx = apply_batched(attack.for_test(), test.x[keep])
    ty = test_targets(test.y[keep], spec, test.num_classes)
    return PoisonedTrain(data, train.y.clone(), kind), TriggeredTest(tx, ty, test.y[keep].clone())


def clean(train: ImageSet) -> PoisonedTrain:
    """The no-attack case: the training set as is, every sample clean."""
    return PoisonedTrain(train, train.y.clone(), torch.zeros(len(train.y), dtype=torch.int64))
