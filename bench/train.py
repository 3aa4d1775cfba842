"""The one supervised training loop, plus per-sample loss / prediction helpers.

Data live as uint8 tensors on the run's device. Each epoch slices batches by a device-side
permutation, augments them per sample (``bench/augment.py``), converts to float, normalises and
trains under optional bf16 autocast and channels_last. No DataLoader, no per-sample Python.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.augment import AugmentCfg, augment
from bench.errors import ConfigError, DivergedError

log = logging.getLogger("bench")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "constant")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainCfg:
    """Supervised training recipe (``conf/train/*.yaml``).

    Args:
        epochs: passes over the training set.
        batch_size: training batch size.
        optimizer: ``sgd`` or ``adam``.
        lr, momentum, nesterov, weight_decay: optimiser settings (momentum/nesterov: SGD only).
        schedule: ``cosine`` (per iteration, to 0), ``multistep`` (× ``gamma`` at each epoch in
            ``milestones``) or ``constant``.
        augment: per-sample augmentation (crop/flip/cutout).
        normalize: subtract the dataset mean and divide by std (ABL trains without).
        eval_batch_size: batch size of inference passes.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    normalize: bool = True
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        """Reject impossible values when the config is built, before any data or attack work
        (``build_params`` prefixes the section, e.g. ``train`` or ``defense 'abl'.finetune``)."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; known: "
                              f"{', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}'; known: {', '.join(SCHEDULES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"epochs must be >= 0 and batch_size, eval_batch_size >= 1 (got "
                              f"{self.epochs}, {self.batch_size}, {self.eval_batch_size})")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def onednn_unsafe_convs(model: nn.Module) -> list[str]:
    """Names of ``model``'s convolutions that fp32 channels-last training on a CPU must avoid:
    1×1, strided, fewer than 16 input channels. oneDNN's weight-gradient kernel for them writes
    past its workspace (uxlfoundation/oneDNN#6035: with torch 2.14.1 on an AVX2 CPU, 2 to 7 input
    channels corrupt the heap, e.g. ``cnn_small`` at width 0.25; 16 is the AVX-512 block)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels < 16]


class Engine:
    """Device, precision and input preparation shared by every stage of a run."""

    def __init__(self, device: torch.device, mean, std, *, amp: bool, channels_last: bool,
                 normalize: bool = True, progress: bool | None = None,
                 eval_batch_size: int = 1024) -> None:
        if eval_batch_size < 1:
            raise ConfigError(f"train.eval_batch_size must be >= 1 (got {eval_batch_size})")
        self.device = device
        self.amp = amp and (device.type == "cpu" or torch.cuda.is_bf16_supported())
        self.channels_last = channels_last
        self.progress = progress
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.normalize = normalize
        self.eval_batch_size = eval_batch_size  # inference passes (predict, per_sample_loss)

    def prep(self, xb: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` → float32 in [0, 1], optionally normalised, in model layout."""
        x = xb.float().div_(255)
        if self.normalize if normalize is None else normalize:
            x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on the engine's device, in channels-last layout if the engine uses it. In
        fp32 on a CPU the convolutions of ``onednn_unsafe_convs`` stay in the default layout
        and get their input in it (a pre-hook), so training them cannot hit the oneDNN bug."""
        model = model.to(self.device)
        if not self.channels_last:
            return model
        model = model.to(memory_format=torch.channels_last)
        if self.device.type == "cpu" and not self.amp:
            for name in onednn_unsafe_convs(model):
                conv = model.get_submodule(name)
                conv.to(memory_format=torch.contiguous_format)
                if not getattr(conv, "_bench_contiguous_input", False):
                    conv.register_forward_pre_hook(_contiguous_input)
                    conv._bench_contiguous_input = True
        return model

    def bar(self, iterable, **kw):
        return tqdm(iterable, disable=True if self.progress is False else None, leave=False, **kw)


def make_optimizer(params, cfg: TrainCfg) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (one of ``OPTIMIZERS``, checked when ``cfg`` was built)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainCfg, epoch: float) -> float:
    """Multiplier of the base lr at (fractional) ``epoch`` under ``cfg.schedule`` (one of
    ``SCHEDULES``, checked when ``cfg`` was built)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch / max(cfg.epochs, 1), 1.0)))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(int(epoch) >= m for m in cfg.milestones)
    return 1.0  # constant


def batches(n: int, size: int, gen: torch.Generator | None, drop_last: bool = False
            ) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: shuffled by ``gen`` (device-side) or in order if None."""
    order = (torch.randperm(n, generator=gen, device=gen.device) if gen is not None
             else torch.arange(n))
    stop = n - n % size if drop_last and n >= size else n
    for i in range(0, stop, size):
        yield order[i : i + size]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainCfg, eng: Engine,
        gen: torch.Generator, *, hflip: bool, loss_fn: LossFn | None = None,
        desc: str = "train", optimizer: torch.optim.Optimizer | None = None,
        shuffle: bool = True, on_epoch: Callable[[int], None] | None = None,
        adversary: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        ) -> list[dict]:
    """Train ``model`` on uint8 ``x`` [N, C, H, W] and labels ``y`` [N] (both on ``eng.device``).

    ``gen`` drives data order (unless ``shuffle`` is False: in index order) and augmentation.
    Returns one dict per epoch (``epoch``, ``loss``, ``acc``, ``lr``). Raises ``DivergedError`` on a
    non-finite loss, naming the epoch, and ``ConfigError`` on an empty set. ``on_epoch(epoch)``
    (1-based) is called after each epoch.
    ``adversary(model, xb, yb)``, if given, replaces every prepared batch before the step
    (adversarial training); the statistics then describe the replaced batches.
    """
    if len(x) == 0:
        raise ConfigError(f"{desc}: no samples to train on; the ratio that selects this set is "
                          "too small for the dataset size (raise it or use more data)")
    loss_fn = loss_fn or F.cross_entropy
    opt = optimizer or make_optimizer(model.parameters(), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps = math.ceil(len(x) / cfg.batch_size)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        tot_loss = torch.zeros((), device=eng.device)
        correct = torch.zeros((), device=eng.device, dtype=torch.long)
        order = batches(len(x), cfg.batch_size, gen if shuffle else None)
        bar = eng.bar(enumerate(order), total=steps,
                      desc=f"{desc} {epoch + 1}/{cfg.epochs}")
        for i, idx in bar:
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * lr_factor(cfg, epoch + i / steps)
            xb = eng.prep(augment(x[idx], cfg.augment, gen, hflip), cfg.normalize)
            if adversary is not None:
                xb = adversary(model, xb, y[idx])
            with eng.autocast():
                out = model(xb)
                loss = loss_fn(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.detach() * len(idx)
            correct += (out.argmax(1) == y[idx]).sum()
        mean_loss = tot_loss.item() / len(x)
        if not math.isfinite(mean_loss):
            raise DivergedError(f"{desc}: loss became {mean_loss} in epoch {epoch + 1}; "
                                f"lower the learning rate (now {base_lrs[0]:g})")
        stats = {"epoch": epoch + 1, "loss": mean_loss, "acc": correct.item() / len(x),
                 "lr": opt.param_groups[0]["lr"]}
        history.append(stats)
        log.info("%s epoch %d/%d loss %.4f acc %.4f lr %.4g", desc, epoch + 1, cfg.epochs,
                 mean_loss, stats["acc"], stats["lr"])
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, eng: Engine, batch_size: int | None = None,
            normalize: bool | None = None, features: bool = False) -> torch.Tensor:
    """Logits (float32, on ``eng.device``) for uint8 ``x``, model in eval mode, no augmentation;
    with ``features``, the pooled backbone features (``model.features``) instead. Batches of
    ``batch_size``, by default the engine's ``eval_batch_size`` (``train.eval_batch_size``).

    ``normalize`` overrides the engine's input normalisation (a model trained without it must be
    evaluated without it)."""
    model.eval()
    fn = model.features if features else model
    batch_size = batch_size or eng.eval_batch_size
    outs = []
    for i in range(0, len(x), batch_size):
        with eng.autocast():
            outs.append(fn(eng.prep(x[i : i + batch_size], normalize)).float())
    if not outs:
        return torch.zeros((0, 0), device=eng.device)
    return torch.cat(outs)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eng: Engine,
                    batch_size: int | None = None, normalize: bool | None = None) -> torch.Tensor:
    """Cross-entropy of every sample, eval mode, un-augmented: float32 ``[N]``."""
    return F.cross_entropy(predict(model, x, eng, batch_size, normalize), y, reduction="none")
