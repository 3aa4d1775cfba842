"""SimCLR-stage throughput (images/s): DBD's stage 1 on our engine vs a per-sample PIL pipeline.

What is timed: whole SimCLR training steps. One step takes a batch of B images, makes two random
strong-augmentation views of each, passes the 2B views through ``model.features`` and the
projection head, computes the contrastive loss of ``defenses/simclr.py`` and takes an SGD step.
Throughput counts source images (each gives two views). Every measurement builds a fresh model
from the same seed, runs ``--warmup`` untimed steps and then times ``--batches`` steps with
``time.perf_counter``. The measurements alternate inside every repeat round (the machine may be
shared, so drifting background load hits all of them alike) and medians over ``--repeats``
rounds are reported. The recipe (batch size, SGD, temperature, loss, augmentation) is
``params.simclr`` of ``conf/defense/dbd.yaml``.

- (a) ours, engine defaults: ``defenses.simclr.train_simclr`` itself, the function the dbd stage
  calls, on the uint8 train tensor with bf16 autocast and channels_last (``conf/config.yaml``).
  Views come from ``bench.simclr_augment.simclr_augment``: batched tensor ops, per-sample random.
- (b) baseline: a ``torch.utils.data.Dataset`` that builds one PIL image per sample and returns two
  views of ``RandomResizedCrop → [RandomHorizontalFlip] → RandomApply(ColorJitter, p) →
  [RandomGrayscale] → RandomApply(GaussianBlur, p) → ToTensor → Normalize``, batched by
  ``DataLoader(shuffle=True, drop_last=True)``; same model, head, loss and optimiser, plain fp32
  (the usual recipe). Every ``--workers`` count is measured; the fastest median is the baseline.
- (c) like-for-like: (a) in fp32 without channels_last, so (c)/(b) isolates the input pipeline.
- (d) input pipelines alone: batches of two normalised fp32 views, no model, ours vs PIL, timed
  over ``--input-batches`` batches (after the batches DataLoader workers prefetched are used up).

Baseline choices, each made in the baseline's favour: bilinear resize (DBD: bicubic, slower; ours
is bilinear too); blur by PIL's ``ImageFilter.GaussianBlur`` with a random radius, as DBD's own
pipeline (``--pil-blur torchvision`` uses ``T.GaussianBlur``, which round-trips through a tensor
and is much slower); on 1-channel images ``ColorJitter`` gets brightness and contrast
only, because PIL's saturation and hue are no-ops on ``L`` images (same output, less work;
``--pil-jitter full`` passes all four strengths). Nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bench.data import load_dataset
from bench.models import create_model
from bench.simclr_augment import SimCLRAugCfg, simclr_augment
from bench.train import Engine, batches
from defenses.simclr import ProjectionHead, SimCLRCfg, simclr_loss, train_simclr

DBD_YAML = Path(__file__).resolve().parents[1] / "conf" / "defense" / "dbd.yaml"
SEED = 0


def simclr_cfg(batch_size: int | None) -> tuple[SimCLRCfg, bool]:
    """DBD's SimCLR recipe and its ``normalize`` switch from the YAML (batch size overridable)."""
    p = yaml.safe_load(DBD_YAML.read_text())["params"]
    d = dict(p["simclr"])
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("augment").items()}
    cfg = SimCLRCfg(**{**d, "augment": SimCLRAugCfg(**aug)})
    return (replace(cfg, batch_size=batch_size) if batch_size else cfg), p.get("normalize", True)


class PILBlur:
    """Gaussian blur of a PIL image with a radius uniform in ``sigma`` (DBD's / MoCo v2's op)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        s = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def pil_transform(aug: SimCLRAugCfg, ds, normalize: bool, blur: str, jitter: str) -> T.Compose:
    """The per-sample torchvision/PIL version of ``simclr_augment`` (+ ToTensor, Normalize)."""
    c, h, w = ds.x.shape[1:]
    tf = [T.RandomResizedCrop((h, w), scale=aug.scale, ratio=aug.ratio)]
    if aug.flip if aug.flip is not None else ds.hflip:
        tf.append(T.RandomHorizontalFlip())
    colour = c == 3 or jitter == "full"
    tf.append(T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast,
                                           aug.saturation if colour else 0,
                                           aug.hue if colour else 0)], p=aug.jitter_p))
    if c == 3:
        tf.append(T.RandomGrayscale(aug.grayscale_p))
    if aug.blur_p > 0:
        op = (PILBlur(aug.blur_sigma) if blur == "pil" else
              T.GaussianBlur(2 * max(1, math.ceil(3 * aug.blur_sigma[1])) + 1, aug.blur_sigma))
        tf.append(T.RandomApply([op], p=aug.blur_p))
    tf.append(T.ToTensor())
    if normalize:
        tf.append(T.Normalize(ds.mean, ds.std))
    return T.Compose(tf)


class TwoViews(Dataset):
    """Conventional SimCLR dataset: uint8 CHW array -> PIL image -> two independent views."""

    def __init__(self, x, transform) -> None:
        self.x, self.transform = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        a = self.x[i]
        img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        return self.transform(img), self.transform(img)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, device: torch.device, warmup: int, n: int, bs: int) -> float:
    """Images/s of ``n`` calls of ``step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return n * bs / (time.perf_counter() - t0)


def run_ours(ds, cfg: SimCLRCfg, normalize: bool, model_name: str | None, device: torch.device,
             warmup: int, n: int, amp: bool, cl: bool) -> float:
    """(a)/(c) with a model: ``train_simclr`` on ``n`` batches; (d) without: views only."""
    eng = Engine(device, ds.mean, ds.std, amp=amp, channels_last=cl, progress=False)
    x, bs = ds.x.to(device), cfg.batch_size
    gen = torch.Generator(device).manual_seed(SEED)
    if model_name is None:
        order = iter(())

        def views() -> None:
            nonlocal order
            idx = next(order, None)
            if idx is None:
                order = batches(len(x), bs, gen, drop_last=True)
                idx = next(order)
            v = torch.cat([simclr_augment(x[idx], cfg.augment, gen, ds.hflip) for _ in range(2)])
            if normalize:
                v = (v - eng.mean) / eng.std

        return rate(views, device, warmup, n, bs)
    torch.manual_seed(SEED)
    model = eng.place(create_model(model_name, ds.num_classes, in_chans=x.shape[1]))
    # train_simclr runs whole epochs over what it is given: n steps = epochs x steps_per_epoch
    per_epoch = min(n, len(x) // bs)
    epochs = math.ceil(n / per_epoch)
    run = partial(train_simclr, model, eng=eng, gen=gen, hflip=ds.hflip, normalize=normalize)
    if warmup:
        run(x[: warmup * bs], replace(cfg, epochs=1))
    sync(device)
    t0 = time.perf_counter()
    run(x[: per_epoch * bs], replace(cfg, epochs=epochs))
    sync(device)
    return epochs * per_epoch * bs / (time.perf_counter() - t0)


def run_pil(ds, cfg: SimCLRCfg, normalize: bool, model_name: str | None, device: torch.device,
            warmup: int, n: int, workers: int, blur: str, jitter: str) -> float:
    """(b) with a model, fp32: DataLoader + PIL views, same head/loss/SGD; (d) without."""
    torch.manual_seed(SEED)  # model init and the transforms' global-RNG draws
    tf = pil_transform(cfg.augment, ds, normalize, blur, jitter)
    loader = DataLoader(TwoViews(ds.x.numpy(), tf), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(SEED))

    def cycle():
        while True:
            yield from loader

    it = cycle()
    if model_name is None:  # first empty the batches workers prefetched (2 each) before timing
        return rate(lambda: torch.cat(next(it)).to(device), device, warmup + 2 * workers, n,
                    cfg.batch_size)
    model = create_model(model_name, ds.num_classes, in_chans=ds.x.shape[1]).to(device).train()
    head = ProjectionHead(model.feature_dim, cfg.proj_dim).to(device).train()
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def step() -> None:  # the body of train_simclr's loop
        views = torch.cat(next(it)).to(device, non_blocking=True)
        z = head(model.features(views))
        loss = simclr_loss(*z.chunk(2), cfg.temperature, cfg.loss == "symmetric")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return rate(step, device, warmup, n, cfg.batch_size)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--batch-size", type=int, help="default: params.simclr.batch_size of dbd.yaml")
    p.add_argument("--batches", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--input-batches", type=int, default=10,
                   help="timed batches per input-only measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0],
                   help="DataLoader num_workers values to measure (e.g. 0 2); fastest = baseline")
    p.add_argument("--pil-blur", choices=("pil", "torchvision"), default="pil")
    p.add_argument("--pil-jitter", choices=("matched", "full"), default="matched")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", type=Path, help="also write all measurements here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a, t_start = parse(argv), time.perf_counter()
    torch.set_num_threads(a.threads)
    ds, (cfg, norm) = load_dataset(a.dataset)[0], simclr_cfg(a.batch_size)
    dev = torch.device(a.device)
    print(f"SimCLR stage: {a.model} on {a.dataset} train ({len(ds)} x {tuple(ds.x.shape[1:])}), "
          f"batch {cfg.batch_size} images = {2 * cfg.batch_size} views, {a.threads} threads, "
          f"{os.cpu_count()} CPUs, {a.device}, torch {torch.__version__}; img/s counts images")

    ours, pil, m, n, w = (partial(run_ours, ds, cfg, norm), partial(run_pil, ds, cfg, norm),
                          a.model, a.batches, a.warmup)
    pil_opts = (a.pil_blur, a.pil_jitter)
    A, C, D = "(a) ours, bf16 + channels_last", "(c) ours, fp32", "(d) ours, input only"
    B = {k: f"(b) DataLoader+PIL, fp32, workers={k}" for k in a.workers}
    E = {k: f"(d) DataLoader+PIL, input only, workers={k}" for k in a.workers}
    runs = {A: partial(ours, m, dev, w, n, True, True),
            **{B[k]: partial(pil, m, dev, w, n, k, *pil_opts) for k in a.workers},
            C: partial(ours, m, dev, w, n, False, False),
            D: partial(ours, None, dev, w, a.input_batches, False, False),
            **{E[k]: partial(pil, None, dev, w, a.input_batches, k, *pil_opts)
               for k in a.workers}}
    res: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.repeats):
        for k, fn in runs.items():  # interleaved: every pipeline once per round
            res[k].append(fn())
        print(f"round {r + 1}/{a.repeats} (img/s, table order): "
              + ", ".join(f"{v[-1]:.0f}" for v in res.values()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    base = max(B.values(), key=med.get)
    base_in = max(E.values(), key=med.get)
    ratios = {"(a)/(b)": med[A] / med[base], "(c)/(b)": med[C] / med[base],
              "(d) input only": med[D] / med[base_in]}

    print(f"\n{'SimCLR training img/s (unless input only)':<46}{'median':>8}   runs")
    for k, v in res.items():
        print(f"{k:<46}{med[k]:>8.0f}   " + " ".join(f"{x:.0f}" for x in v))
    print(f"baseline (b) = {base}; PIL blur={a.pil_blur}, jitter={a.pil_jitter}")
    print("ratios of medians: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    wall = time.perf_counter() - t_start
    print(f"SimCLR stage throughput ratio: {ratios['(a)/(b)']:.2f}x (ours {med[A]:.0f} img/s "
          f"bf16 + channels_last vs DataLoader+PIL {med[base]:.0f} img/s fp32); "
          f"wall {wall:.0f} s")
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "batch_size": cfg.batch_size, "runs": res, "median": med, "baseline": base,
           "baseline_input_only": base_in, "ratio": ratios, "wall_s": wall}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
