"""Clean surrogate classifiers and cached resources for attacks that learn their trigger.

Label-consistent, TrojanNN and the low-frequency trigger all need a clean model of the data to
optimise against. ``surrogate`` trains one in-process with the shared engine (``bench.train``)
on the **clean** training set; nothing is downloaded. Everything learned is cached under
``PrepareContext.cache_dir``, content-addressed by a sha256 of what determines it, so a sweep
computes each resource once and every defense sees the identical poisoned set.

Cache guarantees (both ``surrogate`` and ``cached_tensor``): files are written atomically (temp
file in the same folder + ``os.replace``), read with ``torch.load(weights_only=True)``, and carry
their full key; a truncated, corrupt or mismatching file is logged as a warning and rebuilt. A
read-only cache folder only costs the cache (warning), never the run.

Surrogates take float images in [0, 1] and normalise internally (``PixelModel``), so attacks
optimise directly in pixel space and round back to uint8 at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.augment import AugmentCfg
from bench.data import ImageSet
from bench.models import create_model
from bench.rows import atomic_write, file_lock
from bench.seeding import derive_seed, generator
from bench.train import Engine, TrainCfg, fit

if TYPE_CHECKING:  # bench.poison imports the attacks, which import this module
    from bench.poison import PrepareContext

log = logging.getLogger("bench")

CACHE_VERSION = 1  # bump when the recipe below changes: old files then simply miss


class PixelModel(nn.Module):
    """A trained classifier that takes float images in [0, 1] and normalises them itself.

    ``forward(x)`` → logits ``[B, K]``; ``features(x)`` → ``[B, D]``; ``fc`` is the linear head.
    ``x``: float32 ``[B, C, H, W]`` in [0, 1], on the model's device (gradients flow to it).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def fc(self) -> nn.Module:
        return self.net.fc

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def fingerprint(s: ImageSet) -> str:
    """A cheap content hash of a dataset: labels, per-image pixel sums and a strided sample.

    Catches a different subset, order, size or poisoning of the images in one pass over ``x``
    (a full sha256 of CIFAR-10 costs ~0.3 s; this costs a few ms)."""
    x = s.x.detach().cpu()
    h = hashlib.sha256()
    h.update(repr((s.name, tuple(x.shape), s.num_classes)).encode())
    h.update(s.y.detach().cpu().numpy().tobytes())
    h.update(x.sum((1, 2, 3), dtype=torch.int64).numpy().tobytes())
    flat = x.reshape(-1)
    h.update(flat[:: max(1, flat.numel() // 1_000_003)].numpy().tobytes())
    return h.hexdigest()


def cache_key(parts: Any) -> str:
    """sha256 of the JSON form of ``parts`` (tuples become lists; other objects ``str``)."""
    text = json.dumps([CACHE_VERSION, parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def builder(ctx: PrepareContext) -> list:
    """What computes a cached resource, part of its key: the hardware, the memory format
    (``channels_last`` picks other convolution kernels, so other rounding) and, on a CPU, the
    thread count. bf16 training on a CPU depends on the threads too (oneDNN's kernels and
    reduction order differ): a surrogate trained with two threads gives another trigger than one
    trained with one. So a run only ever reuses what a run with its own settings built, and its
    row never depends on which run filled the cache first."""
    if torch.device(ctx.device).type == "cpu":
        return [ctx.hardware, torch.get_num_threads(), bool(ctx.channels_last)]
    return [ctx.hardware, bool(ctx.channels_last)]


def _path(ctx: PrepareContext, name: str, key: str) -> Path | None:
    if ctx.cache_dir is None:
        return None
    return Path(ctx.cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:24]}.pt"


def _save(path: Path, blob: dict) -> None:
    """``torch.save`` via a temp file in the same folder and ``os.replace`` (never half-written)."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    try:
        atomic_write(path, buf.getvalue())
    except OSError as e:  # read-only or full disk: keep going without the cache
        log.warning("could not write cache %s (%s); continuing without it", path, e)


def _load(path: Path | None, key: str) -> dict | None:
    """The cached blob for ``key``, or None when absent, unreadable or for another key."""
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("key") != key:
            raise ValueError("key mismatch")
        return blob
    except Exception as e:  # noqa: BLE001 — truncated/corrupt/foreign file: rebuild it
        log.warning("cache %s unusable (%s: %s); rebuilding it", path, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None


def cached_tensor(key_parts: Any, build_fn: Callable[[], Tensor], ctx: PrepareContext, *,
                  name: str = "resource", shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """``build_fn()`` computed once per content key and builder, cached in ``ctx.cache_dir``.

    Args:
        key_parts: JSON-able description of everything the tensor depends on (include
            ``fingerprint(train)``, the params and the seed; ``builder(ctx)`` is added here).
        build_fn: computes the tensor (any device; stored and returned on CPU).
        ctx: the prepare context (``cache_dir`` None: no caching).
        name: file-name prefix, for humans.
        shape, dtype: expected shape/dtype; a cached tensor that differs is rebuilt.

    Returns:
        The CPU tensor, bit-identical whether built now or loaded.
    """
    key = cache_key([name, key_parts, builder(ctx)])
    path = _path(ctx, name, key)
    with file_lock(path):  # parallel jobs: one builds, the others wait and load
        blob = _load(path, key)
        if blob is not None:
            t = blob.get("tensor")
            ok = (isinstance(t, Tensor) and (shape is None or tuple(t.shape) == tuple(shape))
                  and (dtype is None or t.dtype == dtype))
            if ok:
                log.info("loaded %s from cache %s", name, path)
                return t
            log.warning("cache %s holds a tensor of the wrong shape/dtype; rebuilding it", path)
        t = build_fn().detach().cpu().contiguous()
        if path is not None:
            _save(path, {"key": key, "tensor": t})
        return t


def pgd_adversary(eng: Engine, eps: float, steps: int, gen: torch.Generator
                  ) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """An L∞ PGD attack on prepared batches, for ``fit(adversary=...)`` (Madry et al. 2018).

    ``eps`` is in pixel units ([0, 1]); batches are prepared as ``eng.prep`` does by default
    (normalised when ``eng.normalize``), so the ball and the valid range are mapped through the
    engine's mean/std. Uniform random start drawn from ``gen``, ``steps`` signed-gradient steps
    of 2.5·eps/steps, the model in its current mode."""
    mean = eng.mean if eng.normalize else torch.zeros_like(eng.mean)
    std = eng.std if eng.normalize else torch.ones_like(eng.std)
    lo, hi, rad = (0 - mean) / std, (1 - mean) / std, eps / std
    step = rad * (2.5 / steps)

    def attack(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        x0 = xb.detach()
        noise = torch.rand(x0.shape, generator=gen, device=x0.device).mul_(2).sub_(1)
        delta = torch.clamp(x0 + noise * rad, lo, hi) - x0
        for _ in range(steps):
            delta.requires_grad_(True)
            with eng.autocast():
                loss = F.cross_entropy(model(x0 + delta).float(), yb)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = torch.clamp(delta.detach() + step * grad.sign(), -rad, rad)
            delta = torch.clamp(x0 + delta, lo, hi) - x0
        return (x0 + delta).detach()

    return attack


def surrogate(train: ImageSet, ctx: PrepareContext, *, model: str = "cnn_small",
              width: float | None = None, epochs: int = 5, purpose: str,
              adv_eps: float = 0.0, adv_steps: int = 7) -> PixelModel:
    """A classifier trained on ``train`` (uint8, clean labels), cached by content and builder.

    Recipe (the default CPU recipe, shortened): SGD lr 0.05, momentum 0.9, Nesterov, wd 5e-4,
    batch 128, cosine to 0 over ``epochs``, random crop with 2 px padding, flips where the
    dataset allows, normalised inputs. Init and data order come from generators derived from
    ``ctx.seed`` and ``purpose``; the global RNG is left untouched.

    Args:
        train: the clean training set (CPU).
        ctx: device/precision switches, seed and cache folder.
        model: a ``bench.models`` name; ``width`` is passed to it when not None (cnn_small).
        epochs: training epochs.
        purpose: names the surrogate in its key and seeds (attacks that may share one, share
            the purpose).
        adv_eps, adv_steps: > 0: PGD adversarial training (``pgd_adversary``; L∞ radius in
            pixel units [0, 1], steps per batch), as the robust models label-consistent
            poisoning is built on. 0: standard training.

    Returns:
        A ``PixelModel`` in eval mode on ``ctx.device``, parameters frozen (requires_grad False).
    """
    kwargs = {} if width is None else {"width": width}
    device = torch.device(ctx.device)
    robust = [adv_eps, adv_steps] if adv_eps > 0 else []  # standard surrogates keep their keys
    key = cache_key(["surrogate", train.name, len(train), fingerprint(train), model, kwargs,
                     epochs, ctx.seed, purpose, ctx.amp, device.type, *robust, builder(ctx)])
    path = _path(ctx, f"surrogate-{purpose}", key)
    with torch.random.fork_rng(devices=[]):  # same init whatever the global RNG state
        torch.manual_seed(derive_seed(ctx.seed, f"surrogate/{purpose}/init"))
        net = create_model(model, train.num_classes, train.x.shape[1], **kwargs)
    eng = Engine(device, train.mean, train.std, amp=ctx.amp, channels_last=ctx.channels_last,
                 normalize=True, progress=ctx.progress)
    net = eng.place(net)
    with file_lock(path):  # never call cached_tensor inside: lock order is outer -> here
        blob = _load(path, key)
        loaded = False
        if blob is not None:
            try:
                net.load_state_dict(blob["state_dict"])
                loaded = True
                log.info("loaded surrogate '%s' from cache %s", purpose, path)
            except Exception as e:  # noqa: BLE001 — architecture/key mismatch: retrain
                log.warning("cache %s does not fit %s (%s); rebuilding it", path, model, e)
        if not loaded:
            log.info("training surrogate '%s' (%s, %d epochs%s) on %d clean images", purpose,
                     model, epochs, f", PGD-{adv_steps} eps {adv_eps:.4g}" if robust else "",
                     len(train))
            cfg = TrainCfg(epochs=epochs, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                           nesterov=True, weight_decay=5e-4, schedule="cosine",
                           augment=AugmentCfg(crop_pad=2), normalize=True)
            gen = generator(ctx.seed, f"surrogate/{purpose}/data", device)
            adv = (pgd_adversary(eng, adv_eps, adv_steps,
                                 generator(ctx.seed, f"surrogate/{purpose}/adv", device))
                   if robust else None)
            fit(net, train.x.to(device), train.y.to(device), cfg, eng, gen, hflip=train.hflip,
                desc=f"surrogate {purpose}", adversary=adv)
            if path is not None:
                state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
                _save(path, {"key": key, "state_dict": state})
    out = PixelModel(net.float(), train.mean, train.std).to(device).eval()
    out.requires_grad_(False)
    return out
