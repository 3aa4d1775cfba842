"""Tests for the pure attacks WaNet, SIG, BppAttack and Adaptive-Blend: trigger formulas against
independent computations, determinism, and the harness bookkeeping (counts, kinds, labels)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from attacks import ATTACKS
from attacks.base import blend
from attacks.bpp import floyd_steinberg
from attacks.wanet import warp
from bench.data import load_dataset
from bench.poison import CLEAN, COVER, POISONED, AttackSpec, build_attack, poison

NAMES = ("wanet", "sig", "bpp", "adaptive_blend")
RANDOM = ("wanet", "adaptive_blend")  # attacks whose trigger depends on the generator
CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"
SHAPE = (3, 16, 16)


def make(name: str, seed: int = 0, shape=SHAPE, **params):
    entry = ATTACKS.get(name)
    return entry.obj(ATTACKS.params(name, params), shape, torch.Generator().manual_seed(seed))


def images(n: int = 6, shape=SHAPE, seed: int = 7) -> torch.Tensor:
    """Random uint8 images (seed != 0: seed 0 would reproduce the blend pattern itself)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", synthetic={"n_train": 400, "n_test": 80, "channels": 3,
                                                "size": 16, "num_classes": 4})


def spec(name: str, rate: float, target: int = 1, label_mode: str = "all2one") -> AttackSpec:
    return AttackSpec(name=name, poison_rate=rate, target=target, label_mode=label_mode,
                      params=ATTACKS.params(name, {}))


# --------------------------------------------------------------------------- every attack


@pytest.mark.parametrize("name", NAMES)
def test_yaml_matches_params(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    assert set(cfg) >= {"name", "poison_rate", "target", "label_mode", "select_from", "params"}
    assert ATTACKS.params(name, cfg["params"]) == ATTACKS.params(name, {})  # YAML = defaults


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_input_untouched(name):
    attack = make(name)
    x = images()
    before = x.clone()
    for a in (attack, attack.for_test()):
        out = a.apply(x)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert not torch.equal(out, x)  # the trigger changes something
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output(name):
    x = images()
    assert torch.equal(make(name, seed=3).apply(x), make(name, seed=3).apply(x))


@pytest.mark.parametrize("name", RANDOM)
def test_different_seed_different_output(name):
    x = images()
    assert not torch.equal(make(name, seed=3).apply(x), make(name, seed=4).apply(x))


# --------------------------------------------------------------------------- WaNet


def test_wanet_warp_field_matches_formula():
    h = w = 13  # (13 - 1) / (4 - 1) = 4: the control points fall on pixels 0, 4, 8, 12
    s, rescale = 2.0, 1.0
    a = make("wanet", seed=1, shape=(1, h, w), s=s, grid_rescale=rescale)
    ctrl = a.control[0].numpy()  # [2, k, k]
    assert np.isclose(np.abs(ctrl).mean(), 1.0, atol=1e-6)  # normalised to unit mean |P|
    lin = np.linspace(-1, 1, h)
    grid = a.grid[0].numpy()  # [H, W, 2]
    for r in range(4):
        for c in range(4):
            # align_corners bicubic passes exactly through its control points
            want_x = np.clip((lin[4 * c] + s * ctrl[0, r, c] / h) * rescale, -1, 1)
            want_y = np.clip((lin[4 * r] + s * ctrl[1, r, c] / h) * rescale, -1, 1)
            assert np.allclose(grid[4 * r, 4 * c], [want_x, want_y], atol=1e-5)
    assert np.abs(grid).max() <= 1.0


def test_wanet_grid_sample_is_bilinear_lookup():
    h = w = 13
    a = make("wanet", seed=2, shape=(1, h, w), s=4.0)
    x = images(1, (1, h, w), seed=5)
    out = a.apply(x)
    img = x[0, 0].double().numpy()
    for i, j in ((5, 6), (7, 3), (9, 10)):
        gx, gy = a.grid[0, i, j].double().numpy()
        px, py = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)  # align_corners=True
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        fx, fy = px - x0, py - y0
        want = ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1]
                + (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])
        assert abs(float(out[0, 0, i, j]) - want) <= 0.5 + 1e-3


def test_wanet_zero_strength_is_identity_and_test_uses_same_warp():
    x = images()
    assert torch.equal(make("wanet", s=0.0).apply(x), x)
    a = make("wanet")
    assert torch.equal(a.for_test().apply(x), a.apply(x))


def test_wanet_cover_samples_counts_and_labels(data):
    train, test = data
    rate = 0.1
    ptrain, trig = poison(train, test, spec("wanet", rate), seed=0)
    kind = ptrain.kind
    n_p = int((kind == POISONED).sum())
    n_c = int((kind == COVER).sum())
    assert n_p == ptrain.n_poisoned == round(rate * len(train.y))
    assert n_c == round(2.0 * n_p)  # cross_ratio 2
    poisoned, cover = kind == POISONED, kind == COVER
    assert (ptrain.data.y[poisoned] == 1).all()
    assert torch.equal(ptrain.data.y[cover], train.y[cover])  # cover keeps its label
    assert torch.equal(ptrain.data.y[kind == CLEAN], train.y[kind == CLEAN])
    assert torch.equal(ptrain.data.x[kind == CLEAN], train.x[kind == CLEAN])
    attack = _harness_attack("wanet", train)  # cover = the trigger warp plus per-sample noise
    assert torch.equal(ptrain.data.x[poisoned], attack.apply(train.x[poisoned]))
    assert not torch.equal(ptrain.data.x[cover], attack.apply(train.x[cover]))
    changed = (ptrain.data.x[cover] != train.x[cover]).flatten(1).float().mean(1)
    assert (changed > 0.5).all()  # every cover image is warped, not left clean (~96% of pixels)
    assert (trig.y == 1).all() and (trig.y_true != 1).all()


def test_wanet_cover_is_trigger_warp_plus_fresh_noise_per_sample():
    a = make("wanet")
    h = SHAPE[1]
    x = images(1).expand(4, -1, -1, -1).clone()  # four copies of one image
    out = a.cover(x, torch.Generator().manual_seed(3))
    noise = torch.rand((4, h, h, 2), generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(out, warp(x, (a.grid + noise / h).clamp(-1, 1)))  # noise mode, ±1/H
    for i in range(4):
        assert not torch.equal(out[i], x[i]) and not torch.equal(out[i], a.apply(x[:1])[0])
        for j in range(i):
            assert not torch.equal(out[i], out[j])  # the noise grid is drawn per sample


def _harness_attack(name: str, train):
    """The attack instance ``poison(..., seed=0)`` builds (same trigger generator)."""
    return build_attack(spec(name, 0.1), train, seed=0)


# --------------------------------------------------------------------------- SIG


def test_sig_closed_form_and_clipping():
    c, h, w = SHAPE
    a = make("sig")
    for level in (100, 250, 10):
        x = torch.full((2, c, h, w), level, dtype=torch.uint8)
        out = a.apply(x).double()
        j = torch.arange(w, dtype=torch.float64)
        want = (level + 40 * torch.sin(2 * math.pi * j * 6 / w)).round().clamp(0, 255)
        assert torch.equal(out, want.expand(2, c, h, w))


def test_sig_test_delta():
    x = torch.full((1, *SHAPE), 128, dtype=torch.uint8)
    assert torch.equal(make("sig", test_delta=60).for_test().apply(x),
                       make("sig", delta=60).apply(x))
    assert torch.equal(make("sig").for_test().apply(x), make("sig").apply(x))


def test_sig_is_clean_label(data):
    train, test = data
    target, rate = 2, 0.1
    ptrain, trig = poison(train, test, spec("sig", rate, target, "clean_label"), seed=0)
    touched = (ptrain.data.x != train.x).flatten(1).any(1)
    poisoned = ptrain.kind == POISONED
    assert int(poisoned.sum()) == round(rate * len(train.y))  # a fraction of the WHOLE set
    assert (train.y[poisoned] == target).all()
    assert not (touched & ~poisoned).any()
    assert torch.equal(ptrain.data.y, train.y)  # no label changes anywhere
    assert (ptrain.kind != COVER).all()
    assert torch.equal(ptrain.data.x[poisoned], make("sig").apply(train.x[poisoned]))
    assert (trig.y == target).all() and (trig.y_true != target).all()


# --------------------------------------------------------------------------- BppAttack


def levels(q: int) -> set[int]:
    return {round(k * 255 / (q - 1)) for k in range(q)}


def test_bpp_squeeze_levels_without_dithering():
    x = images(8)
    for q in (8, 4):
        out = make("bpp", squeeze_num=q, dithering=False).apply(x)
        for ch in range(SHAPE[0]):
            assert set(out[:, ch].unique().tolist()) <= levels(q)
        want = (x.double() / 255 * (q - 1)).round() / (q - 1) * 255
        assert torch.equal(out, want.round().to(torch.uint8))


def test_bpp_dithering_keeps_levels_and_local_mean():
    ramp = torch.linspace(40, 60, 32).round().to(torch.uint8)  # between levels 36 and 73
    x = ramp.expand(1, 3, 32, 32).contiguous()
    plain = make("bpp", shape=(3, 32, 32), dithering=False).apply(x)
    dith = make("bpp", shape=(3, 32, 32), dithering=True).apply(x)
    assert set(dith.unique().tolist()) <= levels(8)

    def block_error(y):  # error of 4x4 block means: what the eye (and a low-pass) sees
        pool = torch.nn.functional.avg_pool2d
        return (pool(y.double(), 4) - pool(x.double(), 4)).abs().mean()

    assert block_error(dith) < 0.5 * block_error(plain)


def reference_floyd_steinberg(img: np.ndarray, q: int) -> np.ndarray:
    """Textbook scalar Floyd–Steinberg on one 2-D channel, 0–255 units."""
    a = img.astype(np.float64).copy()
    h, w = a.shape
    step = 255 / (q - 1)
    out = np.zeros_like(a)
    for i in range(h):
        for j in range(w):
            new = min(max(round(a[i, j] / step), 0), q - 1) * step
            err = a[i, j] - new
            out[i, j] = new
            for di, dj, wt in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    a[i + di, j + dj] += err * wt / 16
    return out


def test_bpp_dithering_matches_scalar_reference():
    x = images(2, (2, 7, 9), seed=11)
    got = floyd_steinberg(x.float(), 8).round().to(torch.uint8).numpy()
    for b in range(2):
        for c in range(2):
            want = reference_floyd_steinberg(x[b, c].numpy(), 8).round()
            assert np.array_equal(got[b, c], want)


# --------------------------------------------------------------------------- Adaptive-Blend


def blended_pieces(a, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """bool [B, pieces]: which pieces differ from the clean image; checks the exact blend."""
    changed = (out != x).any(1)  # [B, H, W]
    on = torch.zeros((len(x), a.params.pieces), dtype=torch.bool)
    for p in range(a.params.pieces):
        on[:, p] = changed[:, a.pieces == p].any(1)
    mask = on[:, a.pieces].unsqueeze(1)
    want = torch.where(mask, blend(x, a.pattern, a.params.alpha), x)
    assert torch.equal(out, want)
    return on


def test_adaptive_blend_partial_trigger_and_full_test_trigger():
    a = make("adaptive_blend")
    x = images(10)
    on = blended_pieces(a, x, a.apply(x))
    assert (on.sum(1) == 8).all()  # round(0.5 * 16) pieces per sample
    assert len({tuple(r.tolist()) for r in on}) > 1  # subsets differ between samples
    assert torch.equal(a.for_test().apply(x), blend(x, a.pattern, 0.2))
    # stateful in call order: a second call draws fresh subsets, a fresh instance replays
    assert not torch.equal(a.apply(x), make("adaptive_blend").apply(x))


def test_adaptive_blend_cover_samples(data):
    train, test = data
    rate = 0.05
    ptrain, _ = poison(train, test, spec("adaptive_blend", rate), seed=0)
    poisoned, cover = ptrain.kind == POISONED, ptrain.kind == COVER
    n_p = int(poisoned.sum())
    assert n_p == round(rate * len(train.y)) and int(cover.sum()) == n_p  # cover_ratio 1
    assert torch.equal(ptrain.data.y[cover], train.y[cover])
    assert (ptrain.data.y[poisoned] == 1).all()
    a = _harness_attack("adaptive_blend", train)
    on = blended_pieces(a, train.x[cover], ptrain.data.x[cover])
    assert (on.sum(1) == 8).all()
    # reproducible: the same seed gives the same poisoned set
    again, _ = poison(train, test, spec("adaptive_blend", rate), seed=0)
    assert torch.equal(again.data.x, ptrain.data.x)
