"""Adaptive-Blend (Qi, Xie, Li, Mahloujifar & Mittal, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses", ICLR 2023, arXiv 2205.13613, first titled "Circumventing
Backdoor Defenses That Are Based on Latent Separability"). Dirty-label blend attack built to
defeat defenses that separate poisoned from clean samples in latent space.

Two ingredients on top of Blended:
- **Asymmetric, diversified trigger.** The image is cut into a ``√pieces × √pieces`` grid; each
  poisoned training sample blends the pattern into a random subset of ``round(mask_rate·pieces)``
  pieces only, at a low opacity ``alpha``. At test time the whole pattern is blended at the
  higher ``test_alpha``, so a weak, varied training trigger still yields a strong test trigger.
- **Regularization ("cover") samples.** Further samples carry the same kind of partial trigger
  but keep their **true** label; they stop the trigger alone from defining a separate latent
  cluster. The harness draws ``round(cover_ratio·n_poisoned)`` of them (``kind = 2``) and calls
  ``cover``; ``cover_ratio = 1`` means as many cover as poisoned samples, i.e. the paper's equal
  poison and cover rates (a conservatism ratio of 0.5).

Threat model: poison-only, all-to-one, very low poison rate.

Defaults: ``pieces = 16`` (4×4), ``mask_rate = 0.5``, ``alpha = 0.15`` (train),
``test_alpha = 0.2`` and equal poison and cover rates of 0.003 on CIFAR-10 (paper; the official
README's quick start uses 0.005 each), hence ``cover_ratio = 1`` and ``poison_rate: 0.003`` in
``conf/attack/adaptive_blend.yaml``.

Deliberate deviations: the paper blends a Hello-Kitty photo, which cannot be downloaded here; the
pattern is generated locally by ``attacks.blended.make_pattern`` from ``pattern_seed`` (noise or
smooth). Piece subsets are drawn from a generator derived in ``__init__`` from the trigger
generator and consumed in call order, so ``apply`` is stateful: the harness calls it once, in
index order, on the poisoned samples, which makes the poisoned set a function of the seed;
calling ``apply`` again draws fresh subsets. Pieces are contiguous blocks, with ragged edges
when the image side is not a multiple of ``√pieces``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attacks.base import ATTACKS, Attack, blend, check_batch
from attacks.blended import make_pattern
from bench.errors import ConfigError


@dataclass(frozen=True)
class AdaptiveBlendParams:
    """Args:
    alpha: blend opacity of the partial trigger on poisoned and cover samples.
    test_alpha: blend opacity of the full trigger on the test set.
    pieces: number of pieces (a square number: 16 = a 4×4 grid).
    mask_rate: fraction of the pieces blended on each training sample.
    cover_ratio: regularization (true-label) samples per poisoned sample.
    pattern: ``noise`` or ``smooth`` (see ``attacks.blended.make_pattern``).
    pattern_seed: seed of the pattern, fixed across runs.
    """

    alpha: float = 0.15
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    cover_ratio: float = 1.0
    pattern: str = "noise"
    pattern_seed: int = 0


def piece_map(h: int, w: int, side: int) -> torch.Tensor:
    """int64 ``[H, W]``: the index ``row_block · side + col_block`` of each pixel's piece."""
    rows = torch.arange(h) * side // h
    cols = torch.arange(w) * side // w
    return rows[:, None] * side + cols[None, :]


def random_pieces(n: int, pieces: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """bool ``[n, pieces]`` with exactly ``k`` True per row, uniformly at random."""
    order = torch.rand((n, pieces), generator=gen).argsort(dim=1)
    on = torch.zeros((n, pieces), dtype=torch.bool)
    return on.scatter_(1, order[:, :k], True)


def _validate(p: AdaptiveBlendParams, h: int, w: int) -> int:
    side = math.isqrt(p.pieces)
    if p.pieces < 1 or side * side != p.pieces or side > min(h, w):
        raise ConfigError(
            f"adaptive_blend pieces must be a square number with side <= {min(h, w)}, "
            f"e.g. 16 (4×4); got {p.pieces}"
        )
    for a in (p.alpha, p.test_alpha):
        if not 0.0 < a <= 1.0:
            raise ConfigError(f"adaptive_blend alphas must be in (0, 1], got {a}")
    if not 0.0 < p.mask_rate <= 1.0 or round(p.mask_rate * p.pieces) < 1:
        raise ConfigError(
            f"adaptive_blend mask_rate must select at least one piece and be <= 1; "
            f"got {p.mask_rate} of {p.pieces} pieces"
        )
    if p.cover_ratio < 0:
        raise ConfigError(f"adaptive_blend cover_ratio must be >= 0, got {p.cover_ratio}")
    return side


@ATTACKS.register("adaptive_blend", AdaptiveBlendParams)
class AdaptiveBlend(Attack):
    def __init__(self, params: AdaptiveBlendParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        _, h, w = shape
        side = _validate(params, h, w)
        self.pattern = make_pattern(params.pattern, shape, params.pattern_seed)
        self.pieces = piece_map(h, w, side)
        self.n_on = round(params.mask_rate * params.pieces)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        self._gen = torch.Generator().manual_seed(seed)  # piece subsets, consumed in call order
        self.full = False  # True on the test-time variant: every piece, test_alpha

    @property
    def cover_ratio(self) -> float:  # type: ignore[override]
        return float(self.params.cover_ratio)

    def partial(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Blend at ``alpha`` into a random ``mask_rate`` of the pieces, per sample."""
        on = random_pieces(len(x), self.params.pieces, self.n_on, gen)  # [B, pieces]
        mask = on[:, self.pieces].unsqueeze(1).to(x.device)  # [B, 1, H, W]
        return blend(x, self.pattern.to(x.device), self.params.alpha * mask.float())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        if self.full:
            return blend(x, self.pattern.to(x.device), self.params.test_alpha)
        return self.partial(x, self._gen)

    def cover(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Regularization samples: the same partial trigger, labels kept by the harness."""
        check_batch(x, self.shape)
        return self.partial(x, gen)

    def for_test(self) -> AdaptiveBlend:
        twin = AdaptiveBlend.__new__(AdaptiveBlend)
        twin.__dict__.update(self.__dict__, full=True)
        return twin
