"""TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018). Dirty-label patch
whose pixels are optimised to excite selected internal neurons of a clean model.

Threat model: the paper retrains a published model; as in BackdoorBench (``specs/field.md`` 1.4)
we use its trigger in a poison-only setting: a fixed square mask, pixels optimised on a clean
surrogate, stamped on a fraction of the training set relabelled to the target, and a fresh model
is trained on that set by the defense under test.

Trigger generation (paper §III-B): pick the internal neuron(s) most strongly connected to their
neighbouring layer, then run gradient descent on the masked pixels to minimise
``Σ_t (v − f_t(x'))²`` (f_t the selected activations, v a large target value), with
``x' = (1 − m) x + m · patch`` and the pixels kept in [0, 1].

Defaults: 5×5 patch at the bottom-right, 1 neuron, v = 100, 200 Adam steps of lr 0.1 on a batch of
256 clean training images, poison rate 0.1 all-to-one (BackdoorBench's rate).

Deliberate deviations: the selected layer is the pooled feature layer (``model.features``, the
last one before ``fc``); its units are ranked by the summed |weight| of their connections to
``fc`` (the paper ranks a fully-connected layer's neurons by their incoming weights; our CPU
models have no hidden fc layer). The patch is initialised from the trigger generator
(uniform noise) and optimised over clean images, not the paper's blank input. The surrogate is a
clean ``cnn_small`` trained in-process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from attacks.base import ATTACKS, Attack, check_batch
from bench.errors import ConfigError
from bench.seeding import generator
from bench.surrogate import cached_tensor, fingerprint, surrogate


@dataclass(frozen=True)
class TrojanParams:
    """Args:
    size: side of the square patch (bottom-right corner), pixels.
    n_neurons: feature units whose activation the patch drives to ``target_value``.
    target_value: v in the paper's cost ``(v − f(x'))²``.
    steps, lr: Adam iterations and learning rate on the patch pixels ([0, 1] units).
    batch: clean training images the patch is optimised over.
    surrogate_epochs, surrogate_model, surrogate_width: the clean surrogate (width: cnn_small
        only; None = the model's default).
    """

    size: int = 5
    n_neurons: int = 1
    target_value: float = 100.0
    steps: int = 200
    lr: float = 0.1
    batch: int = 256
    surrogate_epochs: int = 5
    surrogate_model: str = "cnn_small"
    surrogate_width: float | None = None


def select_neurons(fc: torch.nn.Linear, n: int) -> torch.Tensor:
    """Indices of the ``n`` feature units with the largest Σ_k |W[k, j]| into the head."""
    if not 1 <= n <= fc.weight.shape[1]:
        raise ConfigError(f"trojan n_neurons must be in [1, {fc.weight.shape[1]}], got {n}")
    return fc.weight.detach().abs().sum(0).topk(n).indices.sort().values


def optimise_patch(model, x: torch.Tensor, mask: torch.Tensor, init: torch.Tensor,
                   units: torch.Tensor, v: float, steps: int, lr: float) -> torch.Tensor:
    """Adam on the masked pixels minimising mean((v − features(x')[:, units])²).

    ``x``: float [B, C, H, W] in [0, 1]; ``mask``: bool [H, W]; ``init``: float [C, H, W].
    Returns the optimised full-size pattern, float [C, H, W] in [0, 1] (only mask pixels matter).
    """
    patch = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    m = mask.to(x.dtype)
    for _ in range(steps):
        xt = x * (1 - m) + patch * m
        loss = (v - model.features(xt)[:, units]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
    return patch.detach()


@ATTACKS.register("trojan", TrojanParams)
class Trojan(Attack):
    def __init__(self, params: TrojanParams, shape, gen: torch.Generator) -> None:
        super().__init__(params, shape, gen)
        c, h, w = shape
        s = params.size
        if not 1 <= s <= min(h, w):
            raise ConfigError(f"trojan patch size {s} does not fit {h}×{w} images")
        if params.steps < 0 or params.lr <= 0 or params.batch < 1:
            raise ConfigError("trojan needs steps >= 0, lr > 0 and batch >= 1")
        self.mask = torch.zeros((h, w), dtype=torch.bool)
        self.mask[h - s :, w - s :] = True
        self.init = torch.rand((c, h, w), generator=gen)  # starting pixels of the patch
        self.pattern: torch.Tensor | None = None  # uint8 [C, H, W] once prepared

    def prepare(self, train, idx: torch.Tensor, ctx) -> None:
        """Train (or load) the surrogate and optimise the patch (cached)."""
        p = self.params
        key = ["trojan", fingerprint(train), asdict(p), ctx.seed, ctx.amp,
               torch.device(ctx.device).type]

        def build() -> torch.Tensor:
            model = surrogate(train, ctx, model=p.surrogate_model, width=p.surrogate_width,
                              epochs=p.surrogate_epochs, purpose="clean")
            dev = torch.device(ctx.device)
            pick = torch.randperm(len(train), generator=generator(ctx.seed, "trojan/batch"))
            x = train.x[pick[: p.batch]].to(dev).float().div(255)
            units = select_neurons(model.fc, p.n_neurons)
            pat = optimise_patch(model, x, self.mask.to(dev), self.init.to(dev), units,
                                 p.target_value, p.steps, p.lr)
            return pat.mul(255).round().clamp(0, 255).to(torch.uint8)

        self.pattern = cached_tensor(key, build, ctx, name="trojan_patch", shape=self.shape,
                                     dtype=torch.uint8)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.shape)
        if self.pattern is None:
            raise RuntimeError("trojan: call prepare(train, idx, ctx) before apply "
                               "(bench.poison.poison does)")
        return torch.where(self.mask.to(x.device), self.pattern.to(x.device), x)
