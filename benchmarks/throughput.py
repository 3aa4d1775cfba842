"""Training throughput (images/s): our engine vs the conventional DataLoader + PIL pipeline.

What is timed: whole training steps, i.e. fetching a batch, per-sample augmentation (random crop
with padding, horizontal flip where the dataset allows it), conversion to normalised float input,
forward, cross-entropy, backward and an SGD step. Warm-up batches are excluded; ``--batches``
batches are timed with ``time.perf_counter``; each measurement uses a fresh model from the same
init seed. Measurements of A and B alternate within every repeat round (the machine may be shared,
so drifting background load hits both alike) and medians over ``--repeats`` rounds are reported.

- A (engine): the train split as one uint8 tensor in memory, batches sliced by a device-side
  permutation (``bench.train.batches``), ``bench.augment.augment`` with the recipe of
  ``conf/train/default.yaml``, ``Engine.prep`` and ``Engine.autocast``, as in ``bench.train.fit``.
- B (baseline): a ``torch.utils.data.Dataset`` over the same uint8 numpy images that builds a PIL
  image per sample and applies ``RandomCrop(size, padding) [+ RandomHorizontalFlip] + ToTensor +
  Normalize``, batched by ``DataLoader(shuffle=True)``. ``num_workers`` 0 and 2 are probed once
  and the faster one is the baseline.

Why it is fair: same data, same model architecture and init, same batch size, optimiser and loss,
the same augmentation distribution, and in the main pair the same precision and memory layout
(``--amp``/``--channels-last`` apply to both), so the ratio isolates the input pipeline. A second
pair shows what a user gets: A with the engine defaults (channels_last, and bf16 autocast where
the CPU has native bf16, as ``amp=auto`` decides) vs B in plain fp32. A third pair times the
input pipelines alone (batches produced, no model), which shows how much of the difference is the
data path. CPU only; nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bench.augment import AugmentCfg, augment
from bench.data import load_dataset
from bench.models import create_model
from bench.run import native_bf16
from bench.train import Engine, TrainCfg, batches, make_optimizer

TRAIN_YAML = Path(__file__).resolve().parents[1] / "conf" / "train" / "default.yaml"
WARMUP = 3
SEED = 0


def train_cfg() -> TrainCfg:
    """The default training recipe (batch size, optimiser, augmentation) from the YAML."""
    d = yaml.safe_load(TRAIN_YAML.read_text())
    d["milestones"] = tuple(d.get("milestones") or ())
    return TrainCfg(**{**d, "augment": AugmentCfg(**d["augment"])})


class PILDataset(Dataset):
    """Conventional per-sample dataset: uint8 CHW array -> PIL image -> transforms."""

    def __init__(self, x, y, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        a = self.x[i]
        img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        return self.transform(img), int(self.y[i])


def build(ds, cfg: TrainCfg, eng: Engine, model_name: str):
    torch.manual_seed(SEED)
    model = eng.place(create_model(model_name, ds.num_classes, in_chans=ds.x.shape[1]))
    return model.train(), make_optimizer(model.parameters(), cfg)


def step(model, opt, eng: Engine, xb: torch.Tensor, yb: torch.Tensor) -> None:
    with eng.autocast():
        loss = F.cross_entropy(model(xb).float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(batch_iter, ds, cfg: TrainCfg, eng: Engine, model_name: str | None, n: int) -> float:
    """Images/s over ``n`` train steps after ``WARMUP`` untimed ones (input only if no model)."""
    model, opt = build(ds, cfg, eng, model_name) if model_name else (None, None)
    seen, t0 = 0, time.perf_counter()
    for i in range(WARMUP + n):
        if i == WARMUP:
            seen, t0 = 0, time.perf_counter()
        xb, yb = next(batch_iter)
        if model is not None:
            step(model, opt, eng, xb, yb)
        seen += len(yb)
    return seen / (time.perf_counter() - t0)


def run_engine(ds, cfg: TrainCfg, model_name: str | None, n: int, amp: bool, cl: bool) -> float:
    eng = Engine(torch.device("cpu"), ds.mean, ds.std, amp=amp, channels_last=cl, progress=False)
    gen = torch.Generator().manual_seed(SEED)

    def it():
        while True:
            for idx in batches(len(ds), cfg.batch_size, gen):
                yield eng.prep(augment(ds.x[idx], cfg.augment, gen, ds.hflip)), ds.y[idx]

    return timed(it(), ds, cfg, eng, model_name, n)


def run_loader(ds, cfg: TrainCfg, model_name: str | None, n: int, amp: bool, cl: bool,
               workers: int) -> float:
    eng = Engine(torch.device("cpu"), ds.mean, ds.std, amp=amp, channels_last=cl, progress=False)
    aug, size = cfg.augment, ds.x.shape[-1]
    tf = [T.RandomCrop(size, padding=aug.crop_pad,
                       padding_mode="constant" if aug.pad_mode == "zeros" else aug.pad_mode)
          ] if aug.crop_pad else []
    if aug.flip if aug.flip is not None else ds.hflip:
        tf.append(T.RandomHorizontalFlip())
    tf += [T.ToTensor(), T.Normalize(ds.mean, ds.std)]
    loader = DataLoader(PILDataset(ds.x.numpy(), ds.y.numpy(), T.Compose(tf)),
                        batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(SEED))
    fmt = torch.channels_last if cl else torch.contiguous_format

    def it():
        while True:
            for xb, yb in loader:
                yield xb.contiguous(memory_format=fmt), yb

    return timed(it(), ds, cfg, eng, model_name, n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for both A and B in the like-for-like pair")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last for both A and B in the like-for-like pair")
    p.add_argument("--json", type=Path, help="also write all measurements here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds, cfg = load_dataset(a.dataset)[0], train_cfg()
    flags = f"amp={'on' if a.amp else 'off'}, channels_last={'on' if a.channels_last else 'off'}"
    print(f"{a.model} on {a.dataset} train ({len(ds)} x {tuple(ds.x.shape[1:])}), batch "
          f"{cfg.batch_size}, {a.threads} threads, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")

    run_engine(ds, cfg, a.model, 1, a.amp, a.channels_last)  # process warm-up, discarded
    probe = {w: run_loader(ds, cfg, a.model, a.batches, False, False, w) for w in (0, 2)}
    workers = max(probe, key=probe.get)
    print("DataLoader probe (fp32 training, 1 run each): " + ", ".join(
        f"num_workers={w}: {v:.0f} img/s" for w, v in probe.items()) +
        f" -> baseline uses num_workers={workers}")

    A, B, amp, cl = "A engine", "B DataLoader+PIL", a.amp, a.channels_last
    auto = native_bf16(torch.device("cpu"))  # what the default amp=auto gives on this CPU
    names = [f"{A} ({flags})", f"{B} ({flags})",
             f"{A} (defaults: amp=auto={'on' if auto else 'off'}, channels_last=on)",
             f"{B} (amp=off, channels_last=off)", f"{A}, input only (no model)",
             f"{B}, input only (no model)"]  # equal names share one entry (same measurement)
    eng, dl, m, n = partial(run_engine, ds, cfg), partial(run_loader, ds, cfg), a.model, a.batches
    fns = [partial(eng, m, n, amp, cl), partial(dl, m, n, amp, cl, workers),
           partial(eng, m, n, auto, True), partial(dl, m, n, False, False, workers),
           partial(eng, None, n, amp, cl), partial(dl, None, n, amp, cl, workers)]
    runs = dict(zip(names, fns, strict=True))
    res: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.repeats):
        for k, fn in runs.items():  # interleaved: A, B, A, B, ... in every round
            res[k].append(fn())
        print(f"round {r + 1}/{a.repeats} (img/s, table order): "
              + ", ".join(f"{v[-1]:.0f}" for v in res.values()))
    med = {k: statistics.median(v) for k, v in res.items()}
    pairs = {"like-for-like": names[0:2], "user defaults": names[2:4], "input only": names[4:6]}
    ratios = {k: med[x] / med[y] for k, (x, y) in pairs.items()}

    print(f"\n{'pipeline (training img/s unless input only)':<50}{'median':>8}   runs")
    for k, v in res.items():
        print(f"{k:<50}{med[k]:>8.0f}   " + " ".join(f"{x:.0f}" for x in v))
    print("ratios A/B of medians: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"engine/baseline throughput ratio: {ratios['like-for-like']:.2f}x (engine "
          f"{med[names[0]]:.0f} img/s, DataLoader+PIL {med[names[1]]:.0f} img/s; {flags}, "
          f"num_workers={workers})")
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "probe_num_workers": probe, "baseline_num_workers": workers, "runs": res,
           "median": med, "pairs": pairs, "ratio": ratios}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
