"""No defense: standard supervised training on the poisoned set (the reference every defense is
compared with). Uses the run's ``train`` recipe as is."""

from __future__ import annotations

from bench.data import ImageSet
from bench.train import fit
from defenses.base import DEFENSES, DefenseContext, DefenseResult


@DEFENSES.register("none")
def none(data: ImageSet, params: None, ctx: DefenseContext) -> DefenseResult:
    model = ctx.engine.place(ctx.make_model())
    with ctx.stage("train"):
        fit(model, data.x, data.y, ctx.train, ctx.engine, ctx.gen("train"), hflip=data.hflip)
    return DefenseResult(model)
