"""Tests for the input-aware dynamic backdoor (``attacks/input_aware.py``): the trigger formula,
per-image (input-dependent) triggers, cross-mode cover samples, harness bookkeeping, determinism
and the generator cache. Tiny synthetic data and tiny networks keep every poisoning sub-second."""

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import attacks.input_aware as IA
from attacks import ATTACKS
from bench.data import load_dataset
from bench.errors import ConfigError
from bench.poison import CLEAN, COVER, POISONED, AttackSpec, PrepareContext, poison
from tests.conftest import cpu_engine

CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"
TARGET = 1
N_TRAIN = 240
TINY = {"mask_epochs": 3, "epochs": 3, "width": 4, "batch": 64, "surrogate_width": 0.25,
        "target": TARGET, "cross_ratio": 2.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from threads and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", synthetic={"n_train": N_TRAIN, "n_test": 60, "size": 16,
                                                "channels": 3, "num_classes": 4})


def spec(label_mode: str = "all2one", **params) -> AttackSpec:
    values = {**TINY, "label_mode": label_mode, **params}
    return AttackSpec(name="input_aware", poison_rate=0.1, target=TARGET, label_mode=label_mode,
                      params=ATTACKS.params("input_aware", values))


def run(data, cache_dir, seed: int = 0, **kw):
    train, test = data
    ctx = PrepareContext(seed=seed, cache_dir=None if cache_dir is None else str(cache_dir))
    return poison(train, test, spec(**kw), seed, ctx)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """The poisoned set and triggered test set of seed 0, and the cache folder that holds the
    trained generators (the one training run most tests share)."""
    cache = tmp_path_factory.mktemp("cache")
    p, t = run(data, cache)
    return p, t, cache


@pytest.fixture(scope="module")
def attack(data, base):
    """A prepared attack, its generators read from ``base``'s cache."""
    train, _ = data
    a = ATTACKS.get("input_aware").obj(spec().params, tuple(train.x.shape[1:]), torch.Generator())
    a.prepare(train, torch.arange(4), PrepareContext(seed=0, cache_dir=str(base[2])))
    return a


def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the generators were retrained instead of read from the cache")

    monkeypatch.setattr(IA, "train_mask", boom)
    monkeypatch.setattr(IA, "train_joint", boom)


# --------------------------------------------------------------------------- config


def test_yaml_matches_params():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "input_aware.yaml"), resolve=True)
    assert cfg["name"] == "input_aware" and cfg["label_mode"] == "all2one"
    assert cfg["poison_rate"] == 0.1 and cfg["params"]["p_attack"] == cfg["poison_rate"]
    assert cfg["params"]["target"] == cfg["target"]
    assert ATTACKS.params("input_aware", cfg["params"]) == ATTACKS.params("input_aware", {})


@pytest.mark.parametrize("bad", [{"label_mode": "clean_label"}, {"p_attack": 0.0},
                                 {"cross_ratio": -1}, {"width": 0}, {"lr_g": 0}])
def test_bad_params_are_config_errors(bad):
    with pytest.raises(ConfigError, match="input_aware"):
        ATTACKS.get("input_aware").obj(ATTACKS.params("input_aware", bad), (1, 8, 8),
                                       torch.Generator())


def test_target_out_of_range_and_unprepared_apply(data):
    train, _ = data
    a = ATTACKS.get("input_aware").obj(ATTACKS.params("input_aware", {"target": 9}),
                                       tuple(train.x.shape[1:]), torch.Generator())
    with pytest.raises(RuntimeError, match="prepare"):
        a.apply(train.x[:2])
    with pytest.raises(ConfigError, match=r"target must be in \[0, 3\]"):
        a.prepare(train, torch.arange(2), PrepareContext())


# --------------------------------------------------------------------------- building blocks


def test_codec_shapes_and_range():
    torch.manual_seed(0)
    for depth in (1, 2, 3):
        net = IA.Codec(3, 1, 4, depth).eval()
        out = net(torch.rand(2, 3, 15, 13))  # odd sizes survive the pools (ceil mode)
        assert out.shape == (2, 1, 15, 13) and out.min() >= 0 and out.max() <= 1


def test_sharpen_compose_and_diversity_by_hand():
    m = torch.tensor([0.0, 0.45, 0.5, 0.55, 1.0])
    s = IA.sharpen(m)
    assert s[2] == 0.5 and s[0] < 1e-6 and s[4] > 1 - 1e-6 and s[1] < 0.12 and s[3] > 0.88
    x = torch.full((1, 1, 2, 2), 0.2)
    pattern = torch.full((1, 1, 2, 2), 1.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert torch.allclose(IA.compose(x, pattern, mask),
                          torch.tensor([[[[1.0, 0.2], [0.6, 0.2]]]]))
    xs = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # RMS distance 1 between the two images
    outs = torch.tensor([[0.0, 0.0], [0.5, 0.5]])  # ... and 0.5 between their outputs
    assert torch.allclose(IA.diversity(xs, outs), torch.tensor(2.0), atol=1e-4)


def test_pack_unpack_roundtrip():
    torch.manual_seed(0)
    a, b = IA.Codec(1, 1, 4, 2), IA.Codec(1, 1, 4, 2)
    a(torch.rand(4, 1, 8, 8))  # train mode: moves the BN running statistics off their init
    vec = IA.pack([a])
    IA.unpack(vec, [b])
    assert torch.equal(IA.pack([b]), vec)
    a.eval(), b.eval()
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="state vector"):
        IA.unpack(torch.cat([vec, vec[:1]]), [b])


def test_mask_sparsity_loss_pulls_masks_down(data):
    train, _ = data
    p = ATTACKS.params("input_aware", {**TINY, "mask_epochs": 5, "lambda_div": 0.0})
    torch.manual_seed(0)
    M = IA.Codec(3, 1, p.width, p.depth)
    x = train.x[:64].float() / 255
    before = IA.sharpen(M.eval()(x)).mean()
    eng = cpu_engine(train.mean, train.std)
    IA.train_mask(M, train.x, p, eng, torch.Generator().manual_seed(0))
    after = IA.sharpen(M(x))
    assert not M.training and not any(q.requires_grad for q in M.parameters())
    assert after.mean() < min(0.1 * before, p.mask_density)  # λ_norm alone: mask collapses


# --------------------------------------------------------------------------- the trigger


def test_apply_is_the_composite_of_own_pattern_and_mask(attack, data):
    _, test = data
    x = test.x[:8]
    before = x.clone()
    out = attack.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape and torch.equal(x, before)
    pattern, mask = attack.parts(x)
    assert pattern.shape == x.shape and mask.shape == (8, 1, 16, 16)
    assert 0 <= pattern.min() and pattern.max() <= 1 and 0 <= mask.min() and mask.max() <= 1
    want = (IA.compose(x.float() / 255, pattern, mask) * 255).round().clamp(0, 255)
    assert torch.equal(out, want.to(torch.uint8))
    assert not torch.equal(out, x)
    assert torch.equal(attack.for_test().apply(x), out)


def test_trigger_is_input_dependent_and_per_sample(attack, data):
    _, test = data
    x = test.x[:8]
    out = attack.apply(x)
    residual = out.int() - x.int()
    assert not torch.equal(residual[0], residual[1])  # two images, two different triggers
    pattern, mask = attack.parts(x)
    assert (pattern[0] - pattern[1]).abs().max() > 0.01 and (mask[0] - mask[1]).abs().max() > 0
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    assert torch.equal(attack.apply(x[perm]), out[perm])  # a function of each image alone


def test_cover_uses_another_images_trigger(attack, data):
    _, test = data
    x = test.x[:8]
    out = attack.cover(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    pattern, mask = attack.parts(x)
    xf = x.float() / 255
    donors = []
    for i in range(8):
        cands = [j for j in range(8)
                 if torch.equal(out[i], (IA.compose(xf[i : i + 1], pattern[j : j + 1],
                                                    mask[j : j + 1]) * 255).round()
                                .clamp(0, 255).to(torch.uint8)[0])]
        assert cands and i not in cands  # someone else's trigger, never its own
        donors.append(cands[0])
    assert sorted(donors) == list(range(8))  # every image lends its trigger exactly once
    again = attack.cover(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    lone = attack.cover(x[:1], torch.Generator())
    assert lone.shape == (1, *x.shape[1:]) and not torch.equal(lone, attack.apply(x[:1]))


# --------------------------------------------------------------------------- the harness


def test_counts_kinds_and_labels(data, base):
    train, test = data
    p, t, _ = base
    n_pois = round(0.1 * len(train))
    pois, cov = p.kind == POISONED, p.kind == COVER
    assert p.n_poisoned == n_pois and int(cov.sum()) == 2 * n_pois
    assert not (pois & cov).any() and set(p.kind.unique().tolist()) == {CLEAN, POISONED, COVER}
    assert (p.data.y[pois] == TARGET).all() and (p.y_true[pois] != TARGET).all()
    assert torch.equal(p.data.y[cov], train.y[cov]) and torch.equal(p.y_true, train.y)
    assert torch.equal(p.data.x[p.kind == CLEAN], train.x[p.kind == CLEAN])
    changed = (p.data.x != train.x).flatten(1).any(1)
    assert changed[pois].all() and changed[cov].float().mean() > 0.9
    keep = test.y != TARGET
    assert len(t.x) == int(keep.sum()) and (t.y == TARGET).all()
    assert torch.equal(t.y_true, test.y[keep])


def test_all2all_labels(data):
    train, _ = data
    p, t = run(data, None, label_mode="all2all")
    pois = p.kind == POISONED
    assert torch.equal(p.data.y[pois], (train.y[pois] + 1) % 4)
    assert torch.equal(t.y, (t.y_true + 1) % 4)


def test_deterministic_cached_and_uncached(data, base, monkeypatch):
    p1, t1, cache = base
    assert len(list(cache.glob("input_aware_nets-*.pt"))) == 1
    p2, t2 = run(data, None)  # trained again, no cache at all
    no_training(monkeypatch)
    p3, t3 = run(data, cache)  # served from the cache
    for p, t in ((p2, t2), (p3, t3)):
        assert torch.equal(p.data.x, p1.data.x) and torch.equal(p.data.y, p1.data.y)
        assert torch.equal(p.kind, p1.kind) and torch.equal(t.x, t1.x)


def test_other_seed_other_poison(data, base):
    a, ta, _ = base
    b, tb = run(data, None, seed=1)
    assert not torch.equal(a.data.x, b.data.x) and not torch.equal(ta.x, tb.x)


def test_corrupt_cache_is_rebuilt(data, base, tmp_path, caplog):
    p1, t1, cache = base
    (src,) = cache.glob("input_aware_nets-*.pt")
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING, logger="bench"):
        p2, t2 = run(data, tmp_path)
    assert "unusable" in caplog.text
    assert torch.equal(p2.data.x, p1.data.x) and torch.equal(t2.x, t1.x)
    blob = torch.load(path, weights_only=True)  # rewritten whole
    assert torch.equal(blob["tensor"], torch.load(src, weights_only=True)["tensor"])
    assert not list(tmp_path.glob("*.tmp"))
