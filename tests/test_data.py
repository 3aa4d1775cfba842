"""Tests for bench.data: every loader on tiny files written in the real on-disk formats."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import DATASETS, DatasetError, ImageSet, load_dataset
from bench.data_files import DEBIAN_FMNIST, read_idx

# --------------------------------------------------------------------------- helpers


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000_08_<ndim>, big-endian dims, payload."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_set(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for stem, a in ((f"{split}-images-idx3-ubyte", x), (f"{split}-labels-idx1-ubyte", y)):
            data = idx_bytes(a)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        arrays[split] = (x, y)
    return arrays


def write_ppm(path: Path, w: int, h: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (value, 255 - value, 7)).save(path)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks CIFAR md5 sums; tiny fake files cannot match them."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


# --------------------------------------------------------------------------- API basics


def test_unknown_name_lists_known():
    with pytest.raises(DatasetError, match="unknown dataset 'fmnist'; known: fashion_mnist, mnist"):
        load_dataset("fmnist")
    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "cifar100", "gtsrb",
                             "tiny_imagenet", "synthetic"}


def test_imageset_subset_and_validation():
    train, _ = load_dataset("synthetic", synthetic={"n_train": 40, "n_test": 8})
    sub = train.subset(torch.tensor([3, 1, 4]))
    assert len(sub) == 3 and torch.equal(sub.x[1], train.x[1]) and torch.equal(sub.y[2], train.y[4])
    assert (sub.num_classes, sub.mean, sub.name) == (train.num_classes, train.mean, "synthetic")
    assert sub.x.is_contiguous()
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(train.x.float(), train.y, 4, (0.5,), (0.25,), False, "synthetic")
    with pytest.raises(ValueError, match="int64"):
        ImageSet(train.x, train.y[:-1], 4, (0.5,), (0.25,), False, "synthetic")


# --------------------------------------------------------------------------- fashion_mnist / mnist


def test_embedded_fashion_mnist_subset():
    train, test = load_dataset("fashion_mnist")
    assert train.x.shape == (10000, 1, 28, 28) and test.x.shape == (2000, 1, 28, 28)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.x.is_contiguous() and train.x.device.type == "cpu"
    assert torch.bincount(train.y).tolist() == [1000] * 10
    assert torch.bincount(test.y).tolist() == [200] * 10
    assert (train.num_classes, train.mean, train.std, train.hflip) == (10, (0.2860,), (0.3530,),
                                                                       False)
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    # Real Fashion-MNIST pixels: mean close to the published statistic.
    assert abs(train.x.float().mean().item() / 255 - 0.2860) < 0.01
    again, _ = load_dataset("fashion_mnist")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_full_fashion_mnist_from_debian_contains_subset():
    train, test = load_dataset("fashion_mnist", full=True)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    sub, _ = load_dataset("fashion_mnist")
    match = (train.x == sub.x[0]).flatten(1).all(1)
    assert match.any() and train.y[match][0] == sub.y[0]


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_full_mnist_reads_idx_files(tmp_path, gz, torchvision_layout):
    folder = tmp_path / "MNIST" / "raw" if torchvision_layout else tmp_path
    arrays = write_idx_set(folder, 12, 5, gz)
    train, test = load_dataset("mnist", data_root=str(tmp_path), full=True)
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert torch.equal(train.x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert test.y.tolist() == arrays["t10k"][1].tolist() and test.y.dtype == torch.int64
    assert (train.mean, train.hflip, train.classes[3]) == ((0.1307,), False, "3")


def test_full_fashion_mnist_prefers_data_root(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", 7, 3, gz=True)
    train, test = load_dataset("fashion_mnist", data_root=str(tmp_path), full=True)
    assert (len(train), len(test)) == (7, 3)


def test_read_idx_header_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "ok").write_bytes(idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "ok", 3), a)
    with pytest.raises(DatasetError, match="3 dims, expected 1"):
        read_idx(tmp_path / "ok", 1)
    (tmp_path / "bad_magic").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "bad_magic")


def test_truncated_idx_file_is_reported(tmp_path):
    write_idx_set(tmp_path, 4, 2, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"corrupt IDX file .*train-images-idx3-ubyte.*delete"):
        load_dataset("mnist", data_root=str(tmp_path))


def test_truncated_gzip_idx_file_is_reported(tmp_path):
    write_idx_set(tmp_path, 4, 2, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"corrupt IDX file .*t10k-labels.*re-download"):
        load_dataset("mnist", data_root=str(tmp_path))


@pytest.mark.parametrize("labels", [np.arange(3, dtype=np.uint8),
                                    np.array([0, 1, 10, 2], dtype=np.uint8)])
def test_labels_that_do_not_match_images_are_reported(tmp_path, labels):
    """Three labels for four images, or a label outside 0-9: a one-line DatasetError."""
    write_idx_set(tmp_path, 4, 2, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match=r"corrupt IDX file .*train-labels-idx1-ubyte "
                       r"\(labels do not match images\); delete it"):
        load_dataset("mnist", data_root=str(tmp_path))


def test_trailing_bytes_after_idx_payload_are_reported(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "long").write_bytes(idx_bytes(a) + b"\x00")
    with pytest.raises(DatasetError, match=r"corrupt IDX file .*long \(25 payload bytes for "
                       r"dims \(2, 3, 4\)\); delete it and re-download it$"):
        read_idx(tmp_path / "long", 3)


def test_truncated_idx_header_is_reported(tmp_path):
    """The magic promises 3 dims but the file ends after one and a half of them."""
    write_idx_set(tmp_path, 4, 2, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DatasetError, match=r"corrupt IDX file .*t10k-images-idx3-ubyte "
                       r"\(truncated header\); delete it"):
        load_dataset("mnist", data_root=str(tmp_path))


def test_missing_mnist_says_how_to_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"data_root=.*dataset\.download=true"):
        load_dataset("mnist", data_root=str(tmp_path))


# --------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, hundred: bool, n: int = 4) -> dict:
    """Writes CIFAR-10/100 in the python-pickle layout torchvision reads."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + [
        "test_batch"]
    written = {}
    for i, name in enumerate(files):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % (100 if hundred else 10) for j in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels, "coarse_labels": [0] * n}, f)
        written[name] = (data, labels)
    meta_key, meta_name = ("fine_label_names", "meta") if hundred else ("label_names",
                                                                        "batches.meta")
    names = [f"c{i}" for i in range(100 if hundred else 10)]
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: names}, f)
    return written


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loader(tmp_path, no_md5, hundred):
    written = write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    train, test = load_dataset(name, data_root=str(tmp_path))
    assert train.x.shape == (4 if hundred else 20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.x.is_contiguous() and train.hflip
    data, labels = written["test" if hundred else "test_batch"]
    assert torch.equal(test.x, torch.from_numpy(data).reshape(4, 3, 32, 32))  # CHW rows
    assert test.y.tolist() == labels and test.y.dtype == torch.int64
    batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]  # in this order
    x = np.concatenate([written[b][0] for b in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.x, torch.from_numpy(x))  # CHW rows, data_batch_1 first
    assert train.y.tolist() == [c for b in batches for c in written[b][1]]
    assert train.y.dtype == torch.int64
    assert train.num_classes == (100 if hundred else 10) and train.classes[1] == "c1"
    assert train.mean[0] == (0.5071 if hundred else 0.4914)


def test_missing_cifar_says_how_to_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 not found.*data_root=.*download=true"):
        load_dataset("cifar10", data_root=str(tmp_path))


# --------------------------------------------------------------------------- GTSRB


def write_gtsrb(root: Path) -> None:
    """torchvision layout: gtsrb/GTSRB/Training/<class>/*.ppm, Final_Test/Images + csv."""
    base = root / "gtsrb"
    for c in range(3):
        for j, (w, h) in enumerate([(30, 34), (50, 41)]):
            write_ppm(base / "GTSRB" / "Training" / f"{c:05d}" / f"{j:05d}_00000.ppm", w, h, 40 * c)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate([2, 0]):
        write_ppm(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", 45, 29, 40 * c)
        rows.append(f"{i:05d}.ppm;45;29;5;5;40;24;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_loader_and_cache(tmp_path):
    write_gtsrb(tmp_path)
    train, test = load_dataset("gtsrb", data_root=str(tmp_path))
    assert train.x.shape == (6, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
    # The class-sorted folders come back in a fixed mixed order, so a prefix holds every class.
    mixed = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    by_class = [0, 0, 1, 1, 2, 2]
    assert train.y.tolist() == torch.tensor(by_class)[mixed].tolist() != by_class
    assert test.y.tolist() == [2, 0]
    first_of_class_1 = mixed.tolist().index(2)
    assert train.x[first_of_class_1, :, 5, 5].tolist() == [40, 215, 7]  # colour survives resize
    assert (train.num_classes, train.hflip) == (43, False)
    cache = tmp_path / "gtsrb" / "cache_32.pt"
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))

    # The cache alone suffices once built.
    for p in (tmp_path / "gtsrb" / "GTSRB" / "Training").rglob("*.ppm"):
        p.write_bytes(b"")
    again, _ = load_dataset("gtsrb", data_root=str(tmp_path))
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)

    # A corrupt or wrong-shaped cache is rebuilt from the raw files.
    write_gtsrb(tmp_path)
    wrong = {f"x_{s}": torch.zeros(2, 3, 8, 8, dtype=torch.uint8) for s in ("train", "test")}
    wrong |= {"y_train": torch.zeros(2, dtype=torch.int64), "y_test": torch.zeros(2,
              dtype=torch.int64), "classes": ["a"]}
    for bad in (b"not a torch file", wrong):
        if isinstance(bad, bytes):
            cache.write_bytes(bad)
        else:
            torch.save(bad, cache)
        rebuilt, _ = load_dataset("gtsrb", data_root=str(tmp_path))
        assert torch.equal(rebuilt.x, train.x)
        assert torch.load(cache, weights_only=True)["x_train"].shape == (6, 3, 32, 32)

    small, _ = load_dataset("gtsrb", data_root=str(tmp_path), image_size=16)
    assert small.x.shape == (6, 3, 16, 16) and (tmp_path / "gtsrb" / "cache_16.pt").is_file()


def test_missing_gtsrb_says_how_to_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"gtsrb train split not found.*data_root="):
        load_dataset("gtsrb", data_root=str(tmp_path))


# --------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_loader(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, w in enumerate(wnids):
        for j in range(3):
            path = base / "train" / w / "images" / f"{w}_{j}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = "L" if j == 0 else "RGB"  # the real set has some grayscale JPEGs
            Image.new(mode, (64, 64), 100 * c if mode == "L" else (100 * c, 0, 0)).save(path)
    (base / "val" / "images").mkdir(parents=True)
    ann = []
    for i, c in enumerate([1, 0, 1]):
        Image.new("RGB", (64, 64), (100 * c, 0, 0)).save(base / "val" / "images" / f"val_{i}.JPEG")
        ann.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")

    train, test = load_dataset("tiny_imagenet", data_root=str(tmp_path))
    assert train.x.shape == (6, 3, 64, 64) and test.x.shape == (3, 3, 64, 64)
    mixed = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    by_class = [0, 0, 0, 1, 1, 1]
    assert train.y.tolist() == torch.tensor(by_class)[mixed].tolist() != by_class
    assert test.y.tolist() == [1, 0, 1]
    assert (train.num_classes, train.hflip, train.classes) == (200, True, tuple(wnids))
    gray = mixed.tolist().index(3)  # class 1's grayscale JPEG, expanded to RGB
    assert abs(int(train.x[gray, 1, 10, 10]) - 100) <= 2
    assert (base / "cache_64.pt").is_file()


def test_missing_tiny_imagenet_names_url(tmp_path):
    with pytest.raises(DatasetError, match=r"tiny-imagenet-200\.zip.*data_root"):
        load_dataset("tiny_imagenet", data_root=str(tmp_path))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_and_learnable():
    train, test = load_dataset("synthetic")
    assert train.x.shape == (2000, 1, 16, 16) and test.x.shape == (500, 1, 16, 16)
    assert torch.bincount(train.y).tolist() == [500] * 4
    assert torch.bincount(test.y).tolist() == [125] * 4
    again, _ = load_dataset("synthetic")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    other, _ = load_dataset("synthetic", synthetic={"seed": 1})
    assert not torch.equal(other.x, train.x)
    # Planted signal: nearest class mean already separates the classes.
    centroids = torch.stack([train.x[train.y == c].float().mean(0) for c in range(4)])
    dist = torch.cdist(test.x.float().flatten(1), centroids.flatten(1))
    assert (dist.argmin(1) == test.y).float().mean() > 0.9
    assert abs(train.mean[0] - train.x.float().mean().item() / 255) < 1e-4


def test_synthetic_params_and_resize():
    train, test = load_dataset("synthetic", image_size=8, synthetic={
        "n_train": 30, "n_test": 9, "num_classes": 3, "channels": 3, "size": 12})
    assert train.x.shape == (30, 3, 8, 8) and test.x.shape == (9, 3, 8, 8)
    assert train.num_classes == 3 and len(train.mean) == 3
    with pytest.raises(DatasetError, match="unknown synthetic keys"):
        load_dataset("synthetic", synthetic={"n_trian": 5})


def test_failed_cache_write_leaves_no_temp_file(tmp_path, monkeypatch, caplog):
    """A full disk while saving the cache: the data still load, and no partial file is left."""
    write_gtsrb(tmp_path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file: No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    train, _ = load_dataset("gtsrb", data_root=str(tmp_path))
    assert train.x.shape == (6, 3, 32, 32)
    assert not list((tmp_path / "gtsrb").glob("*.tmp")) and "could not write cache" in caplog.text
