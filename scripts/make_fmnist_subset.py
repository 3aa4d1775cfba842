"""Regenerates ``bench/assets/fashion_mnist_subset.npz`` from the real Fashion-MNIST.

The subset is stratified and deterministic: 1000 images per class from the 60k training set and
200 per class from the 10k test set, drawn without replacement with a fixed numpy seed and kept
in their original order. Reads the IDX files of Debian's ``dataset-fashion-mnist`` package
(``apt-get install -y dataset-fashion-mnist``) or any folder given as the first argument.

Usage (from the repository root)::

    python -m scripts.make_fmnist_subset [IDX_DIR]
"""

import sys
from pathlib import Path

import numpy as np

from bench.data import ASSETS
from bench.data_files import DEBIAN_FMNIST, read_idx

SEED = 20170825  # Fashion-MNIST's release date; any fixed value works
PER_CLASS = {"train": 1000, "t10k": 200}


def stratified(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class, drawn without replacement."""
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def main(src: Path = DEBIAN_FMNIST, out: Path = ASSETS / "fashion_mnist_subset.npz") -> None:
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, key in (("train", "train"), ("t10k", "test")):
        x = read_idx(src / f"{split}-images-idx3-ubyte.gz", 3)
        y = read_idx(src / f"{split}-labels-idx1-ubyte.gz", 1)
        idx = stratified(y, PER_CLASS[split], rng)
        arrays[f"x_{key}"], arrays[f"y_{key}"] = x[idx], y[idx].astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): "
          + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEBIAN_FMNIST)
