"""Datasets as whole in-memory uint8 tensors: ``load_dataset(name) -> (train, test)``.

Each split is one CPU uint8 ``[N, C, H, W]`` tensor that the harness moves to the device once; no
PIL after load. Variable-size sets (GTSRB, Tiny ImageNet) are resized once and cached as ``.pt``
next to the data (the on-disk readers are in ``bench.data_files``). The default ``fashion_mnist``
is a stratified real subset shipped in ``bench/assets/`` (``scripts/make_fmnist_subset.py``) so
the demo and CI run offline.
"""

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "cifar100", "gtsrb",
                             "tiny_imagenet", "synthetic")
DEFAULT_DATA_ROOT = Path("~/.cache/backdoor-bench/data").expanduser()
ASSETS = Path(__file__).parent / "assets"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
# Class names by label index (torchvision's), for reports; datasets not listed show indices.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": FMNIST_CLASSES,
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}
SYNTHETIC_DEFAULTS: dict[str, Any] = {"n_train": 2000, "n_test": 500, "num_classes": 4,
                                      "channels": 1, "size": 16, "seed": 0, "noise": 0.35}
# Per-channel mean/std in [0, 1] units (the values every reference implementation uses).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
_HFLIP = {"cifar10", "cifar100", "tiny_imagenet"}


class DatasetError(BenchError):
    """A dataset is missing, corrupt or unknown; the message says how to fix it."""


@dataclass(frozen=True, eq=False)  # tensors: identity equality, not elementwise
class ImageSet:
    """One split of a dataset, held whole in memory.

    Attributes:
        x: uint8 ``[N, C, H, W]`` images, contiguous, on CPU (the harness moves them).
        y: int64 ``[N]`` labels in ``[0, num_classes)``.
        num_classes: Number of classes.
        mean: Per-channel normalisation mean in [0, 1] units, length C.
        std: Per-channel normalisation std in [0, 1] units, length C.
        hflip: Whether a horizontal flip preserves the label (natural images, not digits/signs).
        name: Dataset name, one of :data:`DATASETS`.
        classes: Human-readable class names (may be empty).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    name: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or len(y) != len(x):
            raise ValueError(f"need x uint8 [N,C,H,W] and y int64 [N], got x {x.dtype} "
                             f"{tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        """Rows ``idx`` (int64 indices or bool mask, CPU) with the same metadata."""
        return replace(self, x=self.x[idx].contiguous(), y=self.y[idx].clone())


def load_dataset(name: str, *, data_root: str | None = None, full: bool = False,
                 download: bool = False, image_size: int | None = None,
                 synthetic: dict | None = None) -> tuple[ImageSet, ImageSet]:
    """Loads a dataset as a ``(train, test)`` pair of in-memory uint8 sets.

    Args:
        name: One of :data:`DATASETS`.
        data_root: Folder holding the raw data (torchvision layouts); ``None`` means
            :data:`DEFAULT_DATA_ROOT` (plus Debian's folder for Fashion-MNIST).
        full: ``fashion_mnist`` only: the full 60k/10k set instead of the embedded 10k/2k subset.
        download: Let torchvision download missing files (not for ``tiny_imagenet``).
        image_size: Square side to resize to; defaults to the native size (32 for GTSRB).
        synthetic: Overrides of :data:`SYNTHETIC_DEFAULTS` for ``synthetic``.

    Returns:
        ``(train, test)`` with x uint8 ``[N, C, H, W]`` and y int64 ``[N]`` on CPU.

    Raises:
        DatasetError: Unknown name, or data missing/corrupt (the message says how to fix it).
    """
    # Imported here, not at the top: bench.data_files imports this module.
    from bench.data_files import _cifar, _gtsrb, _idx_dataset, _tiny_imagenet

    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = Path(data_root).expanduser() if data_root else None
    if name == "gtsrb":
        return _gtsrb(root or DEFAULT_DATA_ROOT, download, image_size or 32)
    if name == "tiny_imagenet":
        return _tiny_imagenet(root or DEFAULT_DATA_ROOT, image_size or 64)
    if name == "synthetic":
        sets = _synthetic(synthetic or {})
    elif name == "fashion_mnist" and not full:
        sets = _embedded_fmnist()
    elif name in ("fashion_mnist", "mnist"):
        sets = _idx_dataset(name, root, download)
    else:
        sets = _cifar(name, root or DEFAULT_DATA_ROOT, download)
    return sets if image_size is None else (_resize(sets[0], image_size),
                                            _resize(sets[1], image_size))


def _make(name: str, x: np.ndarray | torch.Tensor, y: Any, num_classes: int,
          classes: Iterable[str] = (), stats: tuple | None = None) -> ImageSet:
    """Builds an ImageSet from uint8 NHW (grayscale) or NCHW images."""
    x = torch.as_tensor(np.array(x, copy=True) if isinstance(x, np.ndarray) else x)
    x = (x.unsqueeze(1) if x.ndim == 3 else x).contiguous()
    mean, std = stats or _STATS[name]
    return ImageSet(x, torch.as_tensor(np.asarray(y, dtype=np.int64)), num_classes,
                    tuple(mean), tuple(std), name in _HFLIP, name, tuple(classes))


def _resize(s: ImageSet, size: int) -> ImageSet:
    if s.x.shape[-2:] == (size, size):
        return s
    x = F.interpolate(s.x.float(), size=(size, size), mode="bilinear", antialias=True)
    return replace(s, x=x.round().clamp(0, 255).to(torch.uint8).contiguous())


def _embedded_fmnist() -> tuple[ImageSet, ImageSet]:
    path = ASSETS / "fashion_mnist_subset.npz"
    if not path.is_file():
        raise DatasetError(f"embedded subset {path} missing; reinstall the package or run "
                           "python -m scripts.make_fmnist_subset")
    with np.load(path) as z:
        train, test = (_make("fashion_mnist", z[f"x_{s}"], z[f"y_{s}"], 10, FMNIST_CLASSES)
                       for s in ("train", "test"))
    return train, test


def _synthetic(params: dict) -> tuple[ImageSet, ImageSet]:
    """Planted-signal set: one random low-frequency template per class plus uniform noise."""
    unknown = set(params) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise DatasetError(f"unknown synthetic keys {sorted(unknown)}; known: "
                           f"{', '.join(SYNTHETIC_DEFAULTS)}")
    p = {**SYNTHETIC_DEFAULTS, **params}
    k, c, s, noise = int(p["num_classes"]), int(p["channels"]), int(p["size"]), float(p["noise"])
    g = torch.Generator().manual_seed(int(p["seed"]))
    grid = torch.rand(k, c, 4, 4, generator=g)
    templates = F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        u = torch.rand(n, c, s, s, generator=g)
        x = (templates[y] * (1 - noise) + noise * u) * 255
        return x.round().clamp(0, 255).to(torch.uint8), y

    (xtr, ytr), (xte, yte) = make(int(p["n_train"])), make(int(p["n_test"]))
    xf = xtr.float() / 255
    stats = (tuple(xf.mean((0, 2, 3)).tolist()), tuple(xf.std((0, 2, 3)).tolist()))
    classes = [f"class_{i}" for i in range(k)]
    return (_make("synthetic", xtr, ytr, k, classes, stats),
            _make("synthetic", xte, yte, k, classes, stats))
