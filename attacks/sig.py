"""SIG (Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019, arXiv 1902.11237). Clean-label attack with a sinusoidal signal.

Trigger (the paper's sinusoidal signal; its ramp signal is not implemented): a horizontal
sinusoid added to every row and every channel, then clipped to the pixel range:

    v(i, j) = Δ · sin(2π · j · f / W),    x' = clip(x + v, 0, 255)   (rounded to uint8)

Threat model: poison-only, clean-label. Only training images that already belong to the target
class carry the signal and their labels never change; at test time the signal on an image of any
other class should flip the prediction to the target. The harness selects from the target class
(``clean_label = True``) and ``poison_rate`` is a fraction of the **whole** training set, drawn
from the target class, as BackdoorBench does (so on a balanced 10-class set 0.1 poisons every
target-class image; see ``conf/attack/sig.yaml``).

Defaults: Δ = 40 (0–255 scale) and f = 6, as BackdoorBench's SIG (``specs/field.md`` 1.4;
ABL's README snippet uses Δ = 20, f = 6). ``test_delta`` optionally changes the test-time
amplitude (null = Δ, BackdoorBench's setting).

Deliberate deviations: values are rounded, not truncated, to uint8. ABL's ``signalTrigger`` is a
different trigger (a 0.8/0.2 blend with a stored mask whose negative half-waves wrapped around in
uint8, see ``specs/defenses.md`` 2.5); that quirk is not reproduced here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.base import ATTACKS, Attack, check_batch
from bench.errors import ConfigError


@dataclass(frozen=True)
class SIGParams:
    """Args:
    delta: amplitude Δ on the 0–255 scale.
    f: number of periods across the image width.
    test_delta: amplitude used on the test set (None: same as ``delta``).
    """

    delta: float = 40.0
    f: float = 6.0
    test_delta: float | None = None


def sig_signal(h: int, w: int, delta: float, f: float) -> torch.Tensor:
    """``v(i, j) = Δ sin(2π j f / W)``, float32 ``[H, W]`` (constant along the rows)."""
    j = torch.arange(w, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * f / w)
    return row.expand(h, w).float().contiguous()


@ATTACKS.register("sig", SIGParams)
class SIG(Attack):
    label_modes: ClassVar[tuple[str, ...]] = ("clean_label",)
    clean_label: ClassVar[bool] = True

    def __init__(self, params: SIGParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        for d in (params.delta, params.test_delta):
            if d is not None and not 0.0 < d <= 255.0:
                raise ConfigError(f"sig delta must be in (0, 255], got {d}")
        if params.f <= 0:
            raise ConfigError(f"sig frequency f must be > 0, got {params.f}")
        _, h, w = shape
        self.delta = params.delta
        self.signal = sig_signal(h, w, params.delta, params.f)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        out = x.float() + self.signal.to(x.device)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def for_test(self) -> SIG:
        d = self.params.test_delta
        if d is None or d == self.delta:
            return self
        twin = SIG.__new__(SIG)
        _, h, w = self.shape
        twin.__dict__.update(self.__dict__, delta=d,
                             signal=sig_signal(h, w, d, self.params.f))
        return twin
