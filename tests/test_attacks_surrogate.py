"""Tests for the attacks that learn their trigger on a clean surrogate (label-consistent, TrojanNN,
low-frequency) and for ``bench/surrogate.py``'s cache: trigger geometry and budgets, label
bookkeeping, frequency content, determinism with and without the cache, and cache recovery."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import bench.surrogate as S
from attacks import ATTACKS
from attacks.lc import four_corner_trigger, pgd
from attacks.lf import LFParams, lowpass, lowpass_mask, project, universal_perturbation
from attacks.trojan import optimise_patch, select_neurons
from bench.data import load_dataset
from bench.errors import ConfigError
from bench.poison import POISONED, AttackSpec, PrepareContext, poison

CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"
TINY = {"surrogate_epochs": 1, "surrogate_width": 0.25}  # a seconds-scale surrogate
FAST = {"lc": {"steps": 5}, "trojan": {"steps": 10, "batch": 64}, "lf": {"steps": 10}}
MODES = {"lc": ("clean_label", 0.05), "trojan": ("all2one", 0.1), "lf": ("all2one", 0.1)}
TARGET = 1


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", synthetic={"n_train": 400, "n_test": 100, "size": 16,
                                                "channels": 3, "num_classes": 4})


def spec(name: str, **params) -> AttackSpec:
    mode, rate = MODES[name]
    extra = {"target": TARGET} if name == "lf" else {}
    values = {**TINY, **FAST[name], **extra, **params}
    return AttackSpec(name=name, poison_rate=rate, target=TARGET, label_mode=mode,
                      params=ATTACKS.params(name, values))


def run(data, name: str, cache_dir, seed: int = 0, **params):
    train, test = data
    ctx = PrepareContext(seed=seed, cache_dir=None if cache_dir is None else str(cache_dir))
    return poison(train, test, spec(name, **params), seed, ctx)


def linear_net(side: int = 8, classes: int = 4) -> torch.nn.Module:
    """A fixed, frozen linear classifier over flattened 3×side×side images in [0, 1]; weights
    N(0, 0.2²) so that an 8/255 perturbation moves its loss clearly."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, classes))
    with torch.no_grad():
        net[1].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        net[1].bias.zero_()
    return net.requires_grad_(False)


def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the surrogate was retrained instead of read from the cache")

    monkeypatch.setattr(S, "fit", boom)


# --------------------------------------------------------------------------- every attack


@pytest.mark.parametrize("name", sorted(MODES))
def test_yaml_matches_params(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
    assert cfg["name"] == name and cfg["label_mode"] == MODES[name][0]
    assert cfg["poison_rate"] == MODES[name][1]
    assert ATTACKS.params(name, cfg["params"]) == ATTACKS.params(name, {})  # YAML = defaults


@pytest.mark.parametrize("name", sorted(MODES))
def test_deterministic_fresh_cached_and_uncached(data, name, tmp_path, monkeypatch):
    p1, t1 = run(data, name, tmp_path / "a")
    p3, t3 = run(data, name, tmp_path / "b")  # a fresh cache
    p4, t4 = run(data, name, None)  # no cache at all
    no_training(monkeypatch)
    p2, t2 = run(data, name, tmp_path / "a")  # served from the cache
    for p, t in ((p2, t2), (p3, t3), (p4, t4)):
        assert torch.equal(p.data.x, p1.data.x) and torch.equal(p.data.y, p1.data.y)
        assert torch.equal(p.kind, p1.kind) and torch.equal(t.x, t1.x)
    train = data[0]
    assert p1.data.x.dtype == torch.uint8 and p1.data.x.shape == train.x.shape
    assert torch.equal(p1.data.x[p1.kind == 0], train.x[p1.kind == 0])  # clean rows untouched
    assert p1.n_poisoned == round(MODES[name][1] * len(train))


def test_other_seed_other_poison(data, tmp_path):
    a, _ = run(data, "trojan", tmp_path)
    b, _ = run(data, "trojan", tmp_path, seed=1)
    assert not torch.equal(a.data.x, b.data.x)


# --------------------------------------------------------------------------- label-consistent


def test_lc_perturbs_only_target_class_within_eps(data, tmp_path):
    train, _ = data
    p, _ = run(data, "lc", tmp_path)
    pois = p.kind == POISONED
    assert (train.y[pois] == TARGET).all() and torch.equal(p.data.y, train.y)  # clean-label
    pattern, mask = four_corner_trigger(tuple(train.x.shape[1:]))
    xp, x0 = p.data.x[pois], train.x[pois]
    assert (xp[:, :, mask] == pattern[:, mask]).all()  # full-amplitude corners
    diff = (xp.int() - x0.int()).abs()[:, :, ~mask]
    assert diff.max() <= 8 + 1  # ε = 8 on the 0-255 scale, +1 for rounding
    assert (diff.flatten(1).max(1).values >= 4).float().mean() > 0.9  # really perturbed


def test_lc_test_set_gets_the_trigger_only(data, tmp_path):
    _, test = data
    _, t = run(data, "lc", tmp_path)
    keep = test.y != TARGET
    pattern, mask = four_corner_trigger(tuple(test.x.shape[1:]))
    assert torch.equal(t.x[:, :, ~mask], test.x[keep][:, :, ~mask])
    assert (t.x[:, :, mask] == pattern[:, mask]).all()
    assert (t.y == TARGET).all() and torch.equal(t.y_true, test.y[keep])


def test_lc_apply_matches_rows_by_content(data, tmp_path):
    train, _ = data
    sp = spec("lc")
    attack = ATTACKS.get("lc").obj(sp.params, tuple(train.x.shape[1:]), torch.Generator())
    idx = torch.nonzero(train.y == TARGET).flatten()[:6]
    attack.prepare(train, idx, PrepareContext(seed=0, cache_dir=str(tmp_path)))
    straight = attack.apply(train.x[idx])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    mixed = torch.cat([train.x[idx][order], train.x[:2]])  # shuffled, plus 2 unknown rows
    out = attack.apply(mixed)
    assert torch.equal(out[:6], straight[order])
    assert torch.equal(out[6:], attack.for_test().apply(train.x[:2]))  # unknown: trigger only


def test_lc_pgd_raises_the_loss_inside_the_ball():
    net = linear_net()
    x = torch.rand((16, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    x[:, :, 0] = 0  # pixels at the bottom of the range can only move up
    y = net(x).argmax(1)  # correctly classified: the loss starts low
    eps = 8 / 255

    def attack(steps: int) -> torch.Tensor:
        return pgd(net, x, y, eps, 2 / 255, steps, torch.Generator().manual_seed(2), batch=5)

    def ce(a: torch.Tensor) -> float:
        return float(F.cross_entropy(net(a), y))

    adv = attack(10)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert ce(adv) > ce(x) + 0.3  # measured 0.58 -> 1.16
    start, one, three = (ce(attack(s)) for s in (0, 1, 3))
    assert abs(start - ce(x)) < 0.02  # the random start alone barely moves the loss
    assert start + 0.05 < one < three < ce(adv)  # every ascent step adds loss (0.59/0.71/0.92)
    assert torch.equal(attack(10), adv)  # the start is drawn from the generator only


@pytest.mark.parametrize("normalize", [True, False])
def test_pgd_adversary_stays_in_the_pixel_ball_and_raises_the_loss(normalize):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    eng = S.Engine(torch.device("cpu"), [0.2, 0.4, 0.6], [0.5, 0.25, 0.2], amp=False,
                   channels_last=False, normalize=normalize)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    x[:, :, 0] = 0  # pixels at the bottom of the range can only move up
    y = torch.randint(0, 4, (32,))
    xb = eng.prep(x)
    adv = S.pgd_adversary(eng, 8 / 255, 7, torch.Generator().manual_seed(0))(net, xb, y)
    pix = adv * eng.std + eng.mean if normalize else adv  # back to pixel space
    pix0 = x.float() / 255
    assert (pix - pix0).abs().max() <= 8 / 255 + 1e-5
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5 and (pix[:, :, 0] >= -1e-5).all()
    ce = torch.nn.functional.cross_entropy
    assert ce(net(adv), y) > ce(net(xb), y) + 0.05
    assert not any(q.grad is not None for q in net.parameters())  # only the input is attacked


def test_lc_robust_surrogate_is_adversarially_trained_and_keyed_apart(data, tmp_path,
                                                                        monkeypatch):
    seen = []
    real_fit = S.fit

    def spy(*a, adversary=None, **k):
        seen.append(adversary)
        return real_fit(*a, adversary=adversary, **k)

    monkeypatch.setattr(S, "fit", spy)
    plain, _ = run(data, "lc", tmp_path)
    robust, _ = run(data, "lc", tmp_path, surrogate_adv_eps=8, surrogate_adv_steps=2)
    assert seen[0] is None and callable(seen[1])
    assert len(list(tmp_path.glob("surrogate-clean-*.pt"))) == 1
    assert len(list(tmp_path.glob("surrogate-robust-*.pt"))) == 1
    assert not torch.equal(plain.data.x, robust.data.x)
    with pytest.raises(ConfigError, match="surrogate_adv_eps"):
        run(data, "lc", None, surrogate_adv_eps=-1)


def test_lc_reduced_amplitude_blends_corners():
    shape = (1, 8, 8)
    attack = ATTACKS.get("lc").obj(ATTACKS.params("lc", {"amplitude": 0.25}), shape,
                                   torch.Generator())
    x = torch.full((2, *shape), 100, dtype=torch.uint8)
    out = attack.apply(x)
    pattern, mask = four_corner_trigger(shape)
    want = (0.75 * 100 + 0.25 * pattern.float()).round().to(torch.uint8)
    assert torch.equal(out[0][:, mask], want[:, mask]) and (out[:, :, ~mask] == 100).all()
    assert set(out[0][:, mask].unique().tolist()) == {75, 139}


def test_four_corner_trigger_is_mirrored():
    pattern, mask = four_corner_trigger((1, 10, 10))
    assert int(mask.sum()) == 36
    p = pattern[0]
    assert torch.equal(p, p.flip(0)) and torch.equal(p, p.flip(1))  # symmetric image
    assert p[0, 0] == p[9, 9] == p[0, 9] == p[9, 0] == 255


# --------------------------------------------------------------------------- TrojanNN


def test_trojan_changes_only_the_patch(data, tmp_path):
    train, test = data
    p, t = run(data, "trojan", tmp_path)
    pois = p.kind == POISONED
    changed = (p.data.x[pois] != train.x[pois]).any(1).any(0)  # [H, W]
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[-5:, -5:] = True
    assert not changed[~region].any() and changed[region].float().mean() > 0.5
    patch = p.data.x[pois][:, :, -5:, -5:]
    assert (patch == patch[:1]).all()  # one fixed patch, replaced pixels
    assert (p.data.y[pois] == TARGET).all() and (p.y_true[pois] != TARGET).all()
    assert (t.x[:, :, -5:, -5:] == patch[:1]).all()
    assert torch.equal(t.x[:, :, :-5], test.x[test.y != TARGET][:, :, :-5])


def test_trojan_selects_most_connected_unit_and_excites_it():
    fc = torch.nn.Linear(4, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.1, -2.0, 0.3, 0.0], [0.2, 0.5, -0.9, 0.1],
                                      [0.0, 0.1, 1.5, 0.1]]))
    assert select_neurons(fc, 1).tolist() == [2]  # column |sums| 0.3, 2.6, 2.7, 0.2
    assert select_neurons(fc, 2).tolist() == [1, 2]

    class Tiny(torch.nn.Module):  # features = ReLU(conv) pooled; 2 units
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def features(self, x):
            return torch.relu(self.conv(x)).mean((2, 3))

    model = Tiny().requires_grad_(False)
    with torch.no_grad():  # unit 1: a local mean (grows with every pixel); unit 0: its negative
        model.conv.weight.copy_(torch.stack([-torch.ones(1, 3, 3), torch.ones(1, 3, 3)]) / 9)
        model.conv.bias.zero_()
    x = torch.rand(8, 1, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[-3:, -3:] = True
    init = torch.full((1, 8, 8), 0.5)
    units = torch.tensor([1])
    pat = optimise_patch(model, x, mask, init, units, 100.0, steps=30, lr=0.1)
    m = mask.float()

    def act(pt):
        return model.features(x * (1 - m) + pt * m)[:, 1].mean()

    assert act(pat) > act(init) + 0.02 and pat.min() >= 0 and pat.max() <= 1
    assert (pat[:, mask] == 1).all()  # driven to the bright end, clipped to the pixel range


# --------------------------------------------------------------------------- low frequency


def test_lowpass_projection():
    mask = lowpass_mask(16, 16, 0.25)
    assert mask[0, 0] and not mask[0, -1] and not mask[8, 0]  # DC kept, Nyquist dropped
    assert int(mask.sum()) == 5 + 3 + 1  # bins kx >= 0, kx² + ky² <= 2²: kx = 0, 1, 2
    d = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    once = project(d, mask, 0.1)
    assert once.abs().max() <= 0.1 + 1e-7
    assert torch.allclose(project(once, mask, 0.1), once, atol=1e-7)  # a projection
    assert torch.allclose(lowpass(once, mask), once, atol=1e-7)


def out_of_band(d: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the spectral energy of ``d`` outside ``mask``."""
    e = torch.fft.rfft2(d.double()).abs() ** 2
    return float(e[..., ~mask].sum() / e.sum())


def test_lf_trigger_is_smooth_and_bounded(data, tmp_path):
    train, _ = data
    p, _ = run(data, "lf", tmp_path)
    sp = spec("lf")
    attack = ATTACKS.get("lf").obj(sp.params, (3, 16, 16), torch.Generator())
    attack.prepare(train, torch.arange(4), PrepareContext(seed=0, cache_dir=str(tmp_path)))
    delta, mask = attack.delta, lowpass_mask(16, 16, 0.25)
    assert delta.dtype == torch.float32 and delta.shape == (3, 16, 16)
    assert 0.02 < delta.abs().max() <= 0.1 + 1e-6
    assert out_of_band(delta, mask) < 1e-10
    grey = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)  # no clipping at ±25.5
    res = attack.apply(grey)[0].double() - 128
    assert (res - 255 * delta).abs().max() <= 0.5 + 1e-4  # only rounding
    assert out_of_band(res, mask) < 0.02
    pois = p.kind == POISONED
    assert (p.data.x[pois].int() - train.x[pois].int()).abs().max() <= 26  # 255·eps, rounded
    assert (p.data.y[pois] == TARGET).all()


def test_lf_universal_perturbation_steers_towards_the_target():
    net = linear_net()
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    y = net(x.float() / 255).argmax(1)
    x, y = x[y != TARGET], y[y != TARGET]  # as prepare: non-target images, none predicted TARGET
    mask = lowpass_mask(8, 8, 0.5)
    p = LFParams(eps=0.2, cutoff=0.5, target=TARGET, steps=15, lr=0.02, batch=32)
    delta = universal_perturbation(net, x, y, p, mask, torch.Generator().manual_seed(3))
    assert delta.abs().max() <= 0.2 + 1e-6 and out_of_band(delta, mask) < 1e-10

    def logits(d: torch.Tensor) -> torch.Tensor:
        return net((x.float() / 255 + d).clamp(0, 1))

    def to_target(d: torch.Tensor) -> tuple[float, float]:  # mean p(TARGET), share predicted
        out = logits(d)
        hit = (out.argmax(1) == TARGET).float().mean()
        return float(out.softmax(1)[:, TARGET].mean()), float(hit)

    prob, share = to_target(delta)
    assert prob > to_target(torch.zeros(3, 8, 8))[0] + 0.15 and share > 0.4  # 0.17 -> 0.37, 0.51
    g = torch.Generator().manual_seed(4)
    for _ in range(5):  # random δ under the same constraint (low-pass, same ‖·‖∞) do far less
        r = lowpass(torch.randn(3, 8, 8, generator=g), mask)
        r_prob, r_share = to_target(r * (delta.abs().max() / r.abs().max()))
        assert r_prob < prob - 0.1 and r_share < 0.2  # at most 0.20 and 0.06
    untargeted = universal_perturbation(net, x, y, replace(p, target=None), mask,
                                        torch.Generator().manual_seed(3))
    ce = F.cross_entropy
    assert ce(logits(untargeted), y) > ce(logits(torch.zeros(3, 8, 8)), y) + 0.3  # 0.62 -> 1.27


# --------------------------------------------------------------------------- the cache


def test_surrogate_is_cached_and_rebuilt_when_truncated(data, tmp_path, monkeypatch, caplog):
    train, test = data
    ctx = PrepareContext(seed=0, cache_dir=str(tmp_path))
    kw = {"width": 0.25, "epochs": 1, "purpose": "t"}
    m1 = S.surrogate(train, ctx, **kw)
    assert not m1.training and not any(q.requires_grad for q in m1.parameters())
    x = test.x[:16].float() / 255
    want = m1(x)
    (path,) = tmp_path.glob("surrogate-t-*.pt")
    with monkeypatch.context() as mp:
        no_training(mp)
        assert torch.equal(S.surrogate(train, ctx, **kw)(x), want)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with caplog.at_level(logging.WARNING, logger="bench"):
        m3 = S.surrogate(train, ctx, **kw)
    assert "unusable" in caplog.text and torch.equal(m3(x), want)
    assert len(torch.load(path, weights_only=True)["state_dict"]) > 0  # rewritten whole
    other = train.subset(torch.arange(len(train) - 1))  # other data: another key, another file
    S.surrogate(other, ctx, **kw)
    assert len(list(tmp_path.glob("surrogate-t-*.pt"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_cached_tensor_recovers_from_bad_files(tmp_path, caplog):
    ctx = PrepareContext(seed=0, cache_dir=str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return torch.arange(6, dtype=torch.float32).view(2, 3)

    def get(**kw):
        return S.cached_tensor(["k", 1], build, ctx, name="res", **kw)

    assert torch.equal(get(), build()) and len(calls) == 2
    get()
    assert len(calls) == 2  # hit
    (path,) = tmp_path.glob("res-*.pt")
    with caplog.at_level(logging.WARNING, logger="bench"):
        path.write_bytes(b"\x00garbage")
        assert torch.equal(get(), build())
        torch.save({"key": "someone else's", "tensor": torch.zeros(2, 3)}, path)
        assert torch.equal(get(), build())
        assert torch.equal(get(shape=(3, 2)).view(2, 3), build())  # wrong shape: rebuilt
    assert len(calls) == 8 and caplog.text.count("rebuilding") == 3
    uncached = S.cached_tensor(["k", 1], build, PrepareContext(), name="res")
    assert torch.equal(uncached, build())


def test_cache_is_per_thread_count_hardware_and_memory_format(data, tmp_path, monkeypatch):
    """On a CPU a cached surrogate or trigger is reused only by runs with the thread count,
    hardware and memory format that built it (training differs with each), so a row never
    depends on which run filled the cache first; on a GPU the thread count plays no part."""
    train, _ = data
    calls = []

    def build():
        calls.append(1)
        return torch.ones(2)

    def get(threads, hw="isa-A", device="cpu", channels_last=False):
        monkeypatch.setattr(S.torch, "get_num_threads", lambda: threads)
        ctx = PrepareContext(cache_dir=str(tmp_path), hardware=hw, device=device,
                             channels_last=channels_last)
        S.cached_tensor(["who"], build, ctx, name="res")
        return S.builder(ctx)

    assert get(2) == ["isa-A", 2, False] and len(calls) == 1
    get(2)
    assert len(calls) == 1  # same builder: hit
    get(1)
    get(2, hw="isa-B")
    get(2, channels_last=True)
    assert len(calls) == 4 and len(list(tmp_path.glob("res-*.pt"))) == 4
    assert S.builder(PrepareContext(device="cuda", hardware="GPU")) == ["GPU", False]
    kw = {"width": 0.25, "epochs": 1, "purpose": "t"}
    for threads in (1, 2):
        monkeypatch.setattr(S.torch, "get_num_threads", lambda t=threads: t)
        S.surrogate(train, PrepareContext(cache_dir=str(tmp_path)), **kw)
    assert len(list(tmp_path.glob("surrogate-t-*.pt"))) == 2
