"""The real on-disk formats: idx, CIFAR pickles via torchvision, GTSRB, Tiny-ImageNet folders.

Variable-size sets are decoded once and cached as ``.pt`` next to the data.
"""

import gzip
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data import DEFAULT_DATA_ROOT, FMNIST_CLASSES, DatasetError, ImageSet, _make

log = logging.getLogger(__name__)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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
