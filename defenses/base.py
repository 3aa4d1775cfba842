"""The interface every defense implements, and its registry.

A defense is a function ``defend(data, params, ctx) -> DefenseResult``. It receives the poisoned
training set as an ``ImageSet`` (images and the labels as given) and nothing else: the
ground-truth labels and the poison mask stay with the harness, which scores the suspects a
defense reports (isolation precision/recall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bench.data import ImageSet
from bench.registry import Registry
from bench.seeding import generator
from bench.stages import StageTimer
from bench.train import Engine, TrainCfg


@dataclass
class DefenseResult:
    """Args:
    model: the final model (the last one; never selected on the test set).
    suspects: stage name → boolean mask ``[N]`` of training samples the defense flagged as
        poisoned (ABL's isolated set, DBD's unlabelled set, ...). Scored by the harness.
    extra: defense-specific numbers worth a column (flat ``{name: float}``).
    normalize: whether the final model expects normalised inputs (None: the run's
        ``train.normalize``); evaluation prepares test images the same way.
    headline: the ``suspects`` entry scored in the row's ``iso_precision``/``iso_recall``
        (None: the last one); every entry is also scored in ``extra`` as ``<stage>_iso_precision``,
        ``<stage>_iso_recall`` and ``<stage>_kept_poison`` (poisoned share of the unflagged).
    """

    model: nn.Module
    suspects: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    normalize: bool | None = None
    headline: str | None = None


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may use besides the data: engine, recipe, model factory, seeds, timer."""

    engine: Engine
    train: TrainCfg
    make_model: Callable[[], nn.Module]
    seed: int
    stage: StageTimer

    def gen(self, purpose: str) -> torch.Generator:
        """A generator on the run's device for ``purpose`` (data order, augmentation, ...)."""
        return generator(self.seed, f"defense/{purpose}", self.engine.device)


DefenseFn = Callable[[ImageSet, object, DefenseContext], DefenseResult]
DEFENSES: Registry[DefenseFn] = Registry("defense")
