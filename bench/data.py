"""Datasets as whole in-memory uint8 tensors: ``load_dataset(name) -> (train, test)``.

Each split is one CPU uint8 ``[N, C, H, W]`` tensor that the harness moves to the device once; no
PIL after load. Variable-size sets (GTSRB, Tiny ImageNet) are resized once and cached as ``.pt``
next to the data. The default ``fashion_mnist`` is a stratified real subset shipped in
``bench/assets/`` (``scripts/make_fmnist_subset.py``) so the demo and CI run offline.
"""

import gzip
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "cifar100", "gtsrb",
                             "tiny_imagenet", "synthetic")
DEFAULT_DATA_ROOT = Path("~/.cache/backdoor-bench/data").expanduser()
ASSETS = Path(__file__).parent / "assets"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
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
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Reads a uint8 IDX file (MNIST format; ``.gz`` or raw) as an array of its header's dims.

    ``ndim`` (3 for images, 1 for labels) is checked if given. Raises DatasetError naming the file
    on a bad magic number, wrong ndim, bad gzip stream or truncated payload.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, _short(e)) from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise _corrupt(path, "bad magic number (expected unsigned-byte IDX)")
    n = data[3]
    if ndim is not None and n != ndim:
        raise _corrupt(path, f"{n} dims, expected {ndim}")
    if len(data) < 4 + 4 * n:
        raise _corrupt(path, "truncated header")
    dims = struct.unpack(f">{n}I", data[4:4 + 4 * n])
    if len(data) != 4 + 4 * n + int(np.prod(dims)):
        raise _corrupt(path, f"{len(data) - 4 - 4 * n} payload bytes for dims {dims}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * n).reshape(dims)


def _corrupt(path: Path, why: str) -> DatasetError:
    return DatasetError(f"corrupt IDX file {path} ({why}); delete it and re-download it")


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


def _find_idx_dir(dirs: Iterable[Path]) -> dict[str, Path] | None:
    """First folder holding all four IDX files (raw preferred over .gz)."""
    for d in dirs:
        found = {s: next((p for p in (d / s, d / f"{s}.gz") if p.is_file()), None)
                 for s in _IDX_FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _idx_dataset(name: str, root: Path | None, download: bool) -> tuple[ImageSet, ImageSet]:
    tv_name = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
    dirs = [root, root / tv_name / "raw"] if root else []
    if name == "fashion_mnist":
        dirs.append(DEBIAN_FMNIST)
    files = _find_idx_dir(dirs)
    if files is None and download:
        import torchvision.datasets as tvd

        dl_root = root or DEFAULT_DATA_ROOT
        try:
            getattr(tvd, tv_name)(str(dl_root), train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise DatasetError(f"downloading {name} into {dl_root} failed ({_short(e)}); "
                               "fetch the IDX files by hand and set data_root") from e
        files = _find_idx_dir([dl_root / tv_name / "raw"])
    if files is None:
        apt = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
        raise DatasetError(f"{name} IDX files not found under data_root={root}; set data_root to "
                           f"a folder holding them (or {tv_name}/raw/){apt}, or set "
                           "dataset.download=true")
    classes = FMNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(10)))
    sets = []
    for split in ("train", "t10k"):
        x = read_idx(files[f"{split}-images-idx3-ubyte"], 3)
        y = read_idx(files[f"{split}-labels-idx1-ubyte"], 1)
        if len(x) != len(y) or y.max(initial=0) >= 10:
            raise _corrupt(files[f"{split}-labels-idx1-ubyte"], "labels do not match images")
        sets.append(_make(name, x, y, 10, classes))
    return sets[0], sets[1]


def _cifar(name: str, root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        dss = [cls(str(root), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"{name} not found or corrupt under data_root={root} ({_short(e)}); "
                           f"set data_root to the folder holding {cls.base_folder}/ or set "
                           "dataset.download=true") from e
    n = len(dss[0].classes)
    train, test = (_make(name, torch.from_numpy(d.data).permute(0, 3, 1, 2), d.targets, n,
                         d.classes) for d in dss)
    return train, test


def _pil_stack(items: Sequence[tuple[Any, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(PIL image or path, label)`` items -> uint8 ``[N,3,size,size]`` (bilinear), int64 [N]."""
    from PIL import Image

    x = np.empty((len(items), size, size, 3), np.uint8)
    y = torch.empty(len(items), dtype=torch.int64)
    for i in range(len(items)):
        src, y[i] = items[i]
        with src if isinstance(src, Image.Image) else Image.open(src) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            x[i] = np.asarray(rgb)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


def _cached(name: str, path: Path, size: int, num_classes: int,
            build: Callable[[], dict[str, Any]], mix_train: bool = False
            ) -> tuple[ImageSet, ImageSet]:
    """Loads the tensor cache at ``path``, rebuilding (and atomically saving) it if absent/bad.

    ``mix_train``: the raw training split is sorted by class (one folder per class), so it is
    returned in a fixed mixed order (a permutation seeded 0, the same on every run): a prefix
    (``dataset.limit_train``) then holds every class, and poisoning by index draws from all."""
    blob = _load_cache(path, size)
    if blob is None:
        blob = build()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # read-only folder, full disk: go on without it
            log.warning("could not write cache %s (%s)", path, _short(e))
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    train, test = (_make(name, blob[f"x_{s}"], blob[f"y_{s}"], num_classes, blob["classes"])
                   for s in ("train", "test"))
    if mix_train:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0)))
    return train, test


def _load_cache(path: Path, size: int) -> dict[str, Any] | None:
    """The cache's contents, or None if it is absent, unreadable or has the wrong shapes."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
        for s in ("train", "test"):
            x, y = blob[f"x_{s}"], blob[f"y_{s}"]
            if (x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, size, size)
                    or y.dtype != torch.int64 or y.shape != (x.shape[0],) or not blob["classes"]):
                raise ValueError(f"{s} tensors have the wrong dtype or shape")
        return blob
    except Exception as e:  # any failure (corrupt file, missing key, shape) means: rebuild
        log.warning("cache %s unreadable (%s); rebuilding it", path, _short(e))
        return None


def _gtsrb(root: Path, download: bool, size: int) -> tuple[ImageSet, ImageSet]:
    import torchvision.datasets as tvd

    def build() -> dict[str, Any]:
        blob: dict[str, Any] = {"classes": [f"{c:05d}" for c in range(43)]}
        for split in ("train", "test"):
            try:
                ds = tvd.GTSRB(str(root), split=split, download=download)
            except (RuntimeError, OSError) as e:
                raise DatasetError(f"gtsrb {split} split not found under data_root={root} "
                                   f"({_short(e)}); set data_root to the folder holding gtsrb/ "
                                   "or set dataset.download=true") from e
            blob[f"x_{split}"], blob[f"y_{split}"] = _pil_stack(ds, size)  # ds[i]: (PIL, int)
        return blob

    return _cached("gtsrb", root / "gtsrb" / f"cache_{size}.pt", size, 43, build, mix_train=True)


def _tiny_imagenet(root: Path, size: int) -> tuple[ImageSet, ImageSet]:
    base = root / "tiny-imagenet-200"

    def build() -> dict[str, Any]:
        if not (base / "wnids.txt").is_file():  # checked here: the cache alone is enough
            raise DatasetError(f"tiny_imagenet not found under data_root={root} (no automatic "
                               f"download): fetch {TINY_IMAGENET_URL}, unzip it into data_root "
                               "so that tiny-imagenet-200/wnids.txt is inside, and set data_root")
        wnids = (base / "wnids.txt").read_text().split()
        index = {w: i for i, w in enumerate(wnids)}
        train = [(p, c) for c, w in enumerate(wnids)
                 for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
        rows = [ln.split("\t") for ln in
                (base / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]
        test = [(base / "val" / "images" / r[0], index[r[1]]) for r in rows]
        blob: dict[str, Any] = {"classes": wnids}
        blob["x_train"], blob["y_train"] = _pil_stack(train, size)
        blob["x_test"], blob["y_test"] = _pil_stack(test, size)
        return blob

    return _cached("tiny_imagenet", base / f"cache_{size}.pt", size, 200, build,
                   mix_train=True)


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
