"""DBD: SCE, SimCLR loss, schedule and augmentation, credibility split, end to end (MixMatch:
tests/test_mixmatch.py)."""

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.augment import AugmentCfg, augment
from bench.data import ImageSet
from bench.errors import ConfigError
from bench.models import create_model
from bench.simclr_augment import SimCLRAugCfg, gaussian_blur, hsv_to_rgb, rgb_to_hsv, simclr_augment
from defenses.dbd import DBDParams, LinearProbe, SplitCfg, credibility_split
from defenses.dbd import _check as dbd_check
from defenses.losses import sce
from defenses.simclr import SimCLRCfg, simclr_loss, train_simclr
from tests.conftest import cpu_engine

RCE = -math.log(1e-4)
PLAIN = SimCLRAugCfg(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=0.0,
                     grayscale_p=0.0, blur_p=0.0)


# ---------------------------------------------------------------- SCE


@pytest.mark.parametrize("y, p_y", [(0, 0.7), (2, 0.1)])
def test_sce_hand_computed(y, p_y):
    logits = torch.tensor([[0.7, 0.2, 0.1]]).log()
    want_ce, want_rce = -math.log(p_y), RCE * (1 - p_y)
    got = sce(logits, torch.tensor([y]), alpha=0.1, beta=1.0)
    assert got.item() == pytest.approx(0.1 * want_ce + want_rce, rel=1e-5)
    assert sce(logits, torch.tensor([y]), alpha=0.0, beta=1.0).item() == pytest.approx(
        want_rce, rel=1e-5)


def test_sce_per_sample():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    out = sce(logits, torch.tensor([0, 0]), reduction="none")
    assert out.shape == (2,) and out[0] < 0.2 < 9.0 < out[1]


# ---------------------------------------------------------------- SimCLR loss and schedule


def simclr_loop(z1, z2, tau, symmetric):
    z = torch.cat([z1, z2])
    n2 = len(z)
    anchors = range(n2) if symmetric else range(len(z1))
    total = 0.0
    for a in anchors:
        pos = (a + len(z1)) % n2
        num = math.exp(float(z[a] @ z[pos]) / tau)
        den = sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(n2) if k != a)
        total += -math.log(num / den)
    return total / len(anchors)


@pytest.mark.parametrize("symmetric", [False, True])
def test_simclr_loss_matches_loop(symmetric):
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    z2 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    got = simclr_loss(z1, z2, 0.5, symmetric).item()
    assert got == pytest.approx(simclr_loop(z1, z2, 0.5, symmetric), rel=1e-5)


def test_simclr_official_is_one_direction():
    g = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    z2 = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    sym = simclr_loss(z1, z2, 0.5, symmetric=True)
    back = simclr_loss(z2, z1, 0.5, symmetric=False)
    assert sym == pytest.approx(((simclr_loss(z1, z2, 0.5) + back) / 2).item(), rel=1e-5)


def test_simclr_loss_lower_for_aligned_views():
    g = torch.Generator().manual_seed(2)
    z1 = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    noisy = F.normalize(z1 + 0.1 * torch.randn(32, 16, generator=g), dim=1)
    rand = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    for sym in (False, True):
        assert simclr_loss(z1, noisy, 0.5, sym) < simclr_loss(z1, rand, 0.5, sym) - 1.0


def test_lr_follows_cosine_per_epoch_over_schedule_epochs(monkeypatch):
    """torch's CosineAnnealingLR(T_max=schedule_epochs), stepped once per epoch, over the
    ``epochs`` actually run (DBD loads epoch 100 of a 1000-epoch schedule)."""
    seen, step = [], torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    x = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8)
    eng = cpu_engine()
    model = create_model("cnn_small", 4, 1, width=0.25)
    cfg = SimCLRCfg(epochs=3, schedule_epochs=4, batch_size=8, lr=0.4, proj_dim=8)
    train_simclr(model, x, cfg, eng, torch.Generator().manual_seed(0), hflip=False)
    monkeypatch.undo()

    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=4)
    want = []
    for _ in range(3):
        want += [ref_opt.param_groups[0]["lr"]] * 2  # 16 images, batch 8: two steps an epoch
        ref_opt.step()
        sched.step()
    assert len(seen) == len(want) == 6
    assert all(abs(a - b) < 1e-9 for a, b in zip(seen, want, strict=True)), (seen, want)


# ---------------------------------------------------------------- SimCLR augmentation


def _images(n=8, c=1, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


def test_plain_config_is_identity_and_flip_mirrors():
    x = _images(32)
    out = simclr_augment(x, PLAIN, torch.Generator().manual_seed(0), hflip=False)
    assert out.dtype == torch.float32 and torch.allclose(out, x.float() / 255, atol=1e-5)
    flip = replace(PLAIN, flip=None)
    out = simclr_augment(x, flip, torch.Generator().manual_seed(0), hflip=True)
    same = (out - x.float() / 255).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(3).float() / 255).abs().amax((1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_identical_images_get_independent_views():
    x = _images(1, c=3).repeat(2, 1, 1, 1)
    for cfg in (SimCLRAugCfg(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0), SimCLRAugCfg()):
        out = simclr_augment(x, cfg, torch.Generator().manual_seed(3), hflip=True)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        assert (out[0] - out[1]).abs().max() > 0.05  # different crops of the same image


def test_hsv_round_trip_and_blur():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    const = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0]), 2.0), const, atol=1e-6)
    blurred = gaussian_blur(x, torch.tensor([0.0, 2.0, 0.0, 1.0]), 2.0)
    assert torch.allclose(blurred[0], x[0], atol=1e-6)  # sigma 0 = untouched, per sample
    assert blurred[1].std() < x[1].std() * 0.7


def test_jitter_factors_are_per_image():
    cfg = replace(PLAIN, jitter_p=1.0, brightness=0.4, contrast=0.0)
    x = torch.full((64, 1, 8, 8), 100, dtype=torch.uint8)
    out = simclr_augment(x, cfg, torch.Generator().manual_seed(0), hflip=False)
    scale = out.mean((1, 2, 3)) / (100 / 255)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # brightness only: uniform
    assert scale.min() >= 0.6 - 1e-5 and scale.max() <= 1.4 + 1e-5 and scale.std() > 0.1


# ---------------------------------------------------------------- stages


class Oracle(nn.Module):
    """Constant image of value 50·c+5 (uint8) → confident logits for class c; 250 → uniform."""

    def forward(self, x):
        v = x.mean((1, 2, 3)) * 255
        cls = ((v - 5) / 50).round().long().clamp(0, 3)
        return torch.where((v < 240)[:, None], 10.0 * F.one_hot(cls, 4).float(),
                           torch.zeros(len(x), 4))


class TexturedOracle(nn.Module):
    """Image = level 50·c+5 plus a texture in [0, 10) (uint8) → logits ``s·one_hot(c)`` with
    ``s = 3 + (left half − right half)·0.2`` in (1, 5): the confidence depends on where the
    texture's bright pixels are, so a crop shift or a flip changes it; level 240 → uniform."""

    def forward(self, x):
        v = x.mean((1, 2, 3)) * 255
        cls = ((v - 10) / 50).round().long().clamp(0, 3)
        w = x.shape[-1] // 2
        s = 3 + 0.2 * 255 * (x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3)))
        return torch.where((v < 230)[:, None], s[:, None] * F.one_hot(cls, 4).float(),
                           torch.zeros(len(x), 4))


@pytest.mark.parametrize("split_on", ["augmented", "clean"])
def test_credibility_split_keeps_planted_low_loss(split_on):
    n = 40
    y = torch.arange(n) % 4
    planted = torch.zeros(n, dtype=torch.bool)
    planted[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:12]] = True
    level = torch.where(planted, 50 * y + 5, torch.full((n,), 240))
    texture = torch.randint(0, 10, (n, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    x = (level.view(n, 1, 1, 1) + texture).to(torch.uint8)
    data = ImageSet(x=x, y=y, num_classes=4, mean=(0.5,), std=(0.25,), hflip=True, name="toy")
    eng = cpu_engine(data.mean, data.std)
    p = DBDParams(split=SplitCfg(epsilon=0.5, split_on=split_on), normalize=False)
    p = replace(p, linear=replace(p.linear, normalize=False))
    model = TexturedOracle()
    labelled, losses = credibility_split(model, data, p, eng, torch.Generator().manual_seed(2))
    assert labelled.sum() == 20 and labelled[planted].all()
    assert losses[planted].max() < losses[~planted].min()

    def sce_of(view):
        return sce(model(eng.prep(view, False)), y, p.sce_alpha, p.sce_beta, reduction="none")

    # one view per sample: the linear stage's augmentation (reflect-pad crop + flip, as the
    # official record loader), replayed from the same generator seed, or the images themselves
    assert p.linear.augment == AugmentCfg(crop_pad=4, pad_mode="reflect", flip=None)
    on_clean = sce_of(x)
    if split_on == "augmented":
        view = augment(x, p.linear.augment, torch.Generator().manual_seed(2), hflip=True)
        assert torch.allclose(losses, sce_of(view))
        assert (losses - on_clean)[planted].abs().max() > 0.1  # the augmentation matters here
    else:
        assert torch.allclose(losses, on_clean)


def test_class_floor_gives_a_starved_class_its_lowest_loss_labels():
    n = 40
    y = torch.arange(n) % 4
    confident = y < 2  # the head fits classes 0 and 1 (one sample aside) and one of class 3
    confident[(y == 1).nonzero()[-1]] = False
    confident[(y == 3).nonzero()[3]] = True
    confident[(y == 2).nonzero()[-1]] = True  # ties with the fitted ones, past the global cut
    value = torch.where(confident, 50 * y + 5, torch.full((n,), 250))
    x = value.view(n, 1, 1, 1).expand(n, 1, 8, 8).to(torch.uint8).contiguous()
    data = ImageSet(x=x, y=y, num_classes=4, mean=(0.5,), std=(0.25,), hflip=True, name="toy")
    eng = cpu_engine(data.mean, data.std)
    for floor, per_class in ((0.0, [10, 9, 0, 1]), (0.2, [10, 9, 2, 2])):
        p = DBDParams(split=SplitCfg(epsilon=0.5, split_on="clean", class_floor=floor),
                      normalize=False)
        p = replace(p, linear=replace(p.linear, normalize=False))
        labelled, _ = credibility_split(Oracle(), data, p, eng, torch.Generator())
        assert [int(labelled[y == c].sum()) for c in range(4)] == per_class
        # the floor takes a class's lowest-loss samples first
        assert labelled[(y == 2).nonzero()[-1]] == (floor > 0)


@pytest.mark.parametrize("split", [SplitCfg(split_on="test"), SplitCfg(resplit="never"),
                                   SplitCfg(epsilon=1.0), SplitCfg(class_floor=0.6),
                                   SplitCfg(class_floor=-0.1)])
def test_bad_split_settings_are_one_line_config_errors(split):
    with pytest.raises(ConfigError, match="dbd split"):
        dbd_check(DBDParams(split=split))


def test_linear_probe_freezes_backbone_but_not_bn_stats():
    torch.manual_seed(0)
    model = create_model("cnn_small", 3, 1, width=0.25)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for freeze, moves in ((False, True), (True, False)):
        before = bn.running_mean.clone()
        probe = LinearProbe(model, freeze_bn=freeze).train()
        probe(torch.randn(8, 1, 16, 16) + 3).sum().backward()
        assert (not torch.equal(before, bn.running_mean)) == moves
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc"))
        assert model.fc.weight.grad is not None
        model.zero_grad(set_to_none=True)


TINY_DBD = ("defense=dbd", "defense.params.simclr.epochs=2",
            "defense.params.simclr.batch_size=128", "defense.params.linear.epochs=1",
            "defense.params.mixmatch.epochs=2", "defense.params.mixmatch.iters_per_epoch=2",
            "defense.params.mixmatch.batch_size=16")


def spy_splits(monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Record every labelled mask ``credibility_split`` returns and the one each MixMatch
    epoch trains with."""
    import defenses.dbd

    splits, used = [], []
    real_split, real_mixmatch = defenses.dbd.credibility_split, defenses.dbd.mixmatch_epoch

    def split(*args, **kwargs):
        keep, losses = real_split(*args, **kwargs)
        splits.append(keep.clone())
        return keep, losses

    def mixmatch(model, opt, x, y, labelled, *args, **kwargs):
        used.append(labelled.clone())
        return real_mixmatch(model, opt, x, y, labelled, *args, **kwargs)

    monkeypatch.setattr(defenses.dbd, "credibility_split", split)
    monkeypatch.setattr(defenses.dbd, "mixmatch_epoch", mixmatch)
    return splits, used


def split_epochs(extra: dict) -> set[int]:
    """The epochs ``k`` of every ``split*_ep<k>*`` key of a row's extra."""
    return {int(m[1]) for k in extra if (m := re.match(r"split.*_ep(\d+)", k))}


def test_dbd_end_to_end(tiny_cfg, monkeypatch):
    from bench.run import run

    splits, used = spy_splits(monkeypatch)
    row = run(tiny_cfg(*TINY_DBD))
    assert row["status"] == "ok"
    # resplit every_epoch: a fresh split before each of the 2 MixMatch epochs, each one used
    assert len(splits) == len(used) == 2
    assert all(torch.equal(a, b) for a, b in zip(splits, used, strict=True))
    assert split_epochs(row["extra"]) == {1, 2}
    assert list(row["stage_s"])[1:] == ["simclr", "linear", "credibility_split", "mixmatch",
                                        "evaluate"]
    assert row["n_suspects"] == 300  # ε = 0.5 of the 600 training samples
    extra = row["extra"]
    assert {"simclr_loss_ep2", "linear_loss_ep1", "mixmatch_lx_ep2", "split_turnover_ep2",
            "split_iso_precision"} <= set(extra)
    # every re-split is scored: the poisoned share of the labelled set per epoch
    assert extra["split_ep2_kept_poison"] == extra["split_kept_poison"]
    assert 0 <= extra["split_ep1_kept_poison"] <= 1
    assert extra["split_ep1_iso_recall"] == pytest.approx(
        1 - extra["split_ep1_kept_poison"] * 300 / row["n_poisoned"])
    assert 0 <= extra["split_min_class_share_ep1"] <= 1
    shares = extra["split_class_share_ep2"]  # the labelled share of each of the 4 classes
    assert len(shares) == 4 and all(0 <= s <= 1 for s in shares)
    assert min(shares) == pytest.approx(extra["split_min_class_share_ep2"], abs=1e-4)
    assert shares.index(min(shares)) == extra["split_min_class_ep2"]
    assert row["iso_precision"] == extra["split_iso_precision"]
    # λu at the end of semi epoch 2 = 15·(1 warm-up + 1 + 1/2)/190
    assert extra["mixmatch_lambda_u_ep2"] == pytest.approx(15 * 2.5 / 190)


def test_dbd_resplit_once_splits_before_the_first_epoch_only(tiny_cfg, monkeypatch):
    from bench.run import run

    splits, used = spy_splits(monkeypatch)
    row = run(tiny_cfg(*TINY_DBD, "defense.params.split.resplit=once"))
    assert row["status"] == "ok" and row["n_suspects"] == 300
    # one split (the paper's reading), and both MixMatch epochs train on it
    assert len(splits) == 1 and len(used) == 2
    assert torch.equal(used[0], splits[0]) and torch.equal(used[1], splits[0])
    extra = row["extra"]
    assert split_epochs(extra) == {1} and "mixmatch_lx_ep2" in extra
    assert not any(k.startswith("split_turnover") for k in extra)
    assert extra["split_kept_poison"] == extra["split_ep1_kept_poison"]
    assert row["iso_recall"] == extra["split_ep1_iso_recall"]
