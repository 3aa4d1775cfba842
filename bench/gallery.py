"""Trigger gallery: one figure row per attack with a clean image, its poisoned version and the
amplified residual, built through the real poisoning harness.

    python -m bench.gallery [--dataset fashion_mnist] [--attacks a,b,...]
                            [--out results/gallery_<dataset>.png] [--n 1] [--seed 0]

Each attack is poisoned exactly as a run would do it: ``conf/attack/<name>.yaml`` gives
``poison_rate``/``target``/``label_mode``/``select_from``/``params`` (plus the optional
``conf/attack_dataset/<name>_<dataset>.yaml`` specialisation), and ``bench.poison.poison`` picks
the indices, rewrites labels and adds cover samples. Only a prefix of the dataset
(:data:`N_TRAIN`/:data:`N_TEST` samples) is poisoned so attacks that learn a surrogate in
``prepare`` stay cheap; the shown samples are the first ``kind == 1`` (and ``kind == 2``) indices
of that prefix, and the clean original is the same index in the clean set.

With the default (all registered attacks), an attack whose poisoning raises is skipped with a
printed note; an attack named with ``--attacks`` must work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from attacks import ATTACKS
from bench.data import DATASETS, ImageSet, load_dataset
from bench.errors import BenchError
from bench.poison import COVER, POISONED, AttackSpec, PrepareContext, poison

N_TRAIN, N_TEST = 2000, 200  # poisoned prefix: keeps surrogate-based ``prepare`` steps cheap
SPEC_KEYS = ("poison_rate", "target", "label_mode", "select_from")


@dataclass(frozen=True)
class Pair:
    """A clean image, its triggered version and ``|poisoned - clean|``.

    Attributes:
        index: Index in the (prefix of the) training set.
        clean, poisoned: uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) numpy arrays.
        residual: int16 ``|poisoned - clean|``, same shape.
        y_from, y_to: True label and the label the harness gave the sample.
    """

    index: int
    clean: np.ndarray
    poisoned: np.ndarray
    residual: np.ndarray
    y_from: int
    y_to: int

    @property
    def linf(self) -> int:
        return int(self.residual.max(initial=0))

    @property
    def changed(self) -> int:
        """Pixels (spatial positions) where any channel changed."""
        r = self.residual
        return int((r.max(axis=-1) if r.ndim == 3 else r).astype(bool).sum())


@dataclass(frozen=True)
class Row:
    """One gallery row: a poisoned sample of ``attack`` and, if it has them, a cover sample."""

    attack: str
    spec: AttackSpec
    sample: Pair
    cover: Pair | None


def attack_spec(name: str, dataset: str) -> AttackSpec:
    """The ``AttackSpec`` a run of ``name`` on ``dataset`` uses, read from ``conf/``.

    Raises ConfigError (one line, listing known attacks) for an unregistered name.
    """
    entry = ATTACKS.get(name)
    conf = resources.files("conf")
    path = conf / "attack" / f"{name}.yaml"
    if path.is_file():
        values = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    else:  # a newly added attack without its YAML yet: dataclass defaults
        print(f"note: {path} missing; using {name}'s default params", file=sys.stderr)
        values = {"label_mode": "clean_label"} if entry.obj.clean_label else {}
    special = conf / "attack_dataset" / f"{name}_{dataset}.yaml"
    if special.is_file():  # `# @package _global_` files hold an `attack:` section
        extra = OmegaConf.to_container(OmegaConf.load(str(special)), resolve=True)
        values = OmegaConf.to_container(
            OmegaConf.merge(values, extra.get("attack", {})), resolve=True)
    kw = {k: values[k] for k in SPEC_KEYS if k in values}
    return AttackSpec(name=name, params=ATTACKS.params(name, values.get("params")), **kw)


def _image(x: torch.Tensor) -> np.ndarray:
    """uint8 ``[C, H, W]`` -> ``[H, W]`` (C == 1) or ``[H, W, C]``."""
    return (x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).numpy()


def _pair(clean: ImageSet, x: torch.Tensor, y: torch.Tensor, i: int) -> Pair:
    c, p = _image(clean.x[i]), _image(x[i])
    res = np.abs(p.astype(np.int16) - c.astype(np.int16))
    return Pair(i, c, p, res, int(clean.y[i]), int(y[i]))


def attack_rows(train: ImageSet, test: ImageSet, name: str, seed: int = 0,
                n: int = 1) -> list[Row]:
    """Poison ``train``/``test`` with ``name`` as a run would; ``n`` rows of poisoned samples."""
    spec = attack_spec(name, train.name)
    ptrain, _ = poison(train, test, spec, seed, PrepareContext(seed=seed, progress=False))
    x, y = ptrain.data.x, ptrain.data.y
    poisoned = torch.nonzero(ptrain.kind == POISONED).flatten().tolist()
    covers = torch.nonzero(ptrain.kind == COVER).flatten().tolist()
    return [Row(name, spec, _pair(train, x, y, i),
                _pair(train, x, y, covers[k]) if k < len(covers) else None)
            for k, i in enumerate(poisoned[:n])]


def gallery_rows(dataset: str | tuple[ImageSet, ImageSet], attacks: list[str] | None = None,
                 seed: int = 0, n: int = 1) -> list[Row]:
    """Rows for ``attacks`` (default: every registered attack, sorted) on a dataset prefix.

    Args:
        dataset: A name from ``bench.data.DATASETS`` or an already loaded ``(train, test)``.
        attacks: Attack names; unknown names raise ConfigError. When None, attacks whose
            poisoning raises are skipped with a note on stderr.
        seed: Run seed (index selection and trigger resources derive from it).
        n: Poisoned samples (rows) per attack.
    """
    explicit = attacks is not None
    names = list(attacks) if explicit else ATTACKS.names()
    for name in names:
        ATTACKS.get(name)  # fail fast, before loading data, on a typo
    train, test = load_dataset(dataset) if isinstance(dataset, str) else dataset
    train = train.subset(torch.arange(min(N_TRAIN, len(train))))
    test = test.subset(torch.arange(min(N_TEST, len(test))))
    rows: list[Row] = []
    for name in names:
        try:
            rows += attack_rows(train, test, name, seed, n)
        except Exception as e:
            if explicit:
                raise
            print(f"note: skipped {name}: {type(e).__name__}: {e}".splitlines()[0],
                  file=sys.stderr)
    return rows


def _label(r: Row) -> str:
    s = r.sample
    if r.spec.label_mode == "clean_label":
        return f"{s.y_to} (clean-label)"
    return f"{s.y_from} → {s.y_to}"


def _show(ax, img: np.ndarray, title: str, xlabel: str = "", vmax: float = 255) -> None:
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(img / vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _residual(ax, p: Pair, title: str) -> None:
    """``|Δ|`` scaled so its max is white (all black when nothing changed)."""
    gain = 255 / max(p.linf, 1)
    _show(ax, p.residual.astype(np.float32), f"{title} ×{gain:.3g}",
          f"L∞={p.linf}, {p.changed} px changed", vmax=max(p.linf, 1))


def draw(rows: list[Row], title: str = "") -> Figure:
    """The gallery figure: clean | poisoned | residual [| cover sample] per row."""
    with_cover = any(r.cover is not None for r in rows)
    ncol = 4 if with_cover else 3
    fig = Figure(figsize=(1.9 * ncol, 2.0 * max(len(rows), 1) + 0.4), dpi=120)
    axes = fig.subplots(max(len(rows), 1), ncol, squeeze=False)
    for ax_row, r in zip(axes, rows, strict=False):
        s = r.sample
        _show(ax_row[0], s.clean, f"clean #{s.index}, y={s.y_from}")
        ax_row[0].set_ylabel(f"{r.attack}\nrate {r.spec.poison_rate:g}, {r.spec.label_mode}",
                             fontsize=8)
        _show(ax_row[1], s.poisoned, f"{r.attack}: {_label(r)}")
        _residual(ax_row[2], s, "|poisoned − clean|")
        if with_cover and r.cover is not None:
            _residual(ax_row[3], r.cover, f"cover #{r.cover.index} (y={r.cover.y_to}) |Δ|")
        elif with_cover:
            ax_row[3].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    # keep a title's band (about 0.35 in) clear of the first row's panel titles
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight() if title else 1))
    return fig


def save_png(fig: Figure, out: Path) -> None:
    """Atomic write: a temp file in ``out``'s folder, then ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=fig.dpi)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gallery(dataset: str = "fashion_mnist", attacks: list[str] | None = None,
            out: str | os.PathLike | None = None, seed: int = 0, n: int = 1) -> Path:
    """Build the gallery PNG (default ``results/gallery_<dataset>.png``); returns its path."""
    rows = gallery_rows(dataset, attacks, seed, n)
    if not rows:
        raise BenchError("no attack could be poisoned; nothing to draw")
    path = Path(out) if out else Path("results") / f"gallery_{dataset}.png"
    title = f"{dataset}: first {N_TRAIN} train samples poisoned, seed {seed}"
    save_png(draw(rows, title), path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gallery", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    ap.add_argument("--attacks", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--out", default=None, help="PNG path (default results/gallery_<dataset>.png)")
    ap.add_argument("--n", type=int, default=1, help="poisoned samples per attack")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    try:
        path = gallery(args.dataset, names, args.out, args.seed, args.n)
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
