"""ABL: losses, isolation on a planted set, unlearning, and the defense interface."""

import inspect

import pytest
import torch

from bench.data import ImageSet
from bench.run import run
from defenses.abl import abl
from defenses.losses import flooding, lga, negative_ce
from defenses.selection import lowest_fraction


def test_flooding_value_and_gradient_sign():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y)  # ≈ 0.127 < γ = 0.5
    loss = flooding(logits, y, gamma=0.5)
    assert torch.isclose(loss, (ce - 0.5).abs() + 0.5)
    loss.backward()
    g_flood = logits.grad.clone()
    logits.grad = None
    ce2 = torch.nn.functional.cross_entropy(logits, y)
    ce2.backward()
    assert torch.allclose(g_flood, -logits.grad)  # below γ: ascent


def test_flooding_descends_above_gamma():
    logits = torch.tensor([[0.0, 2.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y)  # ≈ 2.13 > γ = 0.5
    loss = flooding(logits, y, gamma=0.5)
    assert torch.isclose(loss, ce)
    (g_flood,) = torch.autograd.grad(loss, logits)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), logits)
    assert torch.allclose(g_flood, g_ce)  # above γ: plain descent


def test_lga_is_per_sample():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    l1 = torch.nn.functional.cross_entropy(logits, y, reduction="none")  # ≈ [0.018, 0.693]
    expect = (-l1[0] + l1[1]) / 2
    assert torch.isclose(lga(logits, y, gamma=0.5), expect)
    lga(logits, y, gamma=0.5).backward()
    # sample 0 (below γ) is pushed up: its target logit gets a positive gradient (descent lowers it)
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] < 0


def test_negative_ce():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.isclose(negative_ce(logits, y), -torch.nn.functional.cross_entropy(logits, y))


def test_isolate_takes_lowest_fraction():
    losses = torch.tensor([0.5, 0.01, 3.0, 0.02, 1.0, 0.9, 0.7, 0.3, 2.0, 0.6])
    mask = lowest_fraction(losses, 0.2)
    assert mask.tolist() == [False, True, False, True] + [False] * 6


def test_defense_cannot_reach_ground_truth():
    params = list(inspect.signature(abl).parameters)
    assert params == ["data", "p", "ctx"]
    fields = set(ImageSet.__dataclass_fields__)
    assert not {"y_true", "kind"} & fields


def abl_cfg(res):
    from tests.conftest import compose_cfg

    # 3000 real Fashion-MNIST images, 10% BadNets (300), a half-width model: the backdoor is
    # learned within 5 epochs of flooding while the clean task is not, as ABL assumes.
    return compose_cfg([f"results_dir={res}", "progress=false", "defense=abl",
                        "dataset.limit_train=3000", "dataset.limit_test=500",
                        "model.kwargs.width=0.5", "defense.params.isolation.epochs=5",
                        "defense.params.finetune.epochs=2",
                        "defense.params.finetune.milestones=[1]",
                        "defense.params.isolation_ratio=0.02"])


@pytest.fixture(scope="module")
def abl_row(tmp_path_factory):
    return run(abl_cfg(tmp_path_factory.mktemp("abl")))


def test_same_seed_same_isolated_set_and_metrics(abl_row, tmp_path, monkeypatch):
    import defenses.abl as mod

    masks, rows = [], []
    original = mod.lowest_fraction
    monkeypatch.setattr(mod, "lowest_fraction", lambda *a: masks.append(original(*a)) or masks[-1])
    for i in range(2):
        rows.append(run(abl_cfg(tmp_path / str(i))))
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == 60
    for k in ("ba", "asr", "ra", "iso_precision", "iso_recall", "n_suspects"):
        assert rows[0][k] == rows[1][k] == abl_row[k], k


def planted(seed: int, n: int = 1000, rate: float = 0.1) -> tuple[ImageSet, torch.Tensor]:
    """Noise images with random labels (learned only by memorising, slowly) and ``rate`` of
    them with a white 3x3 corner patch and label 0: the fast-learned samples ABL assumes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n,), generator=g)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[torch.randperm(n, generator=g)[: int(rate * n)]] = True
    x[poisoned, :, -3:, -3:] = 255
    y[poisoned] = 0
    return ImageSet(x=x, y=y, num_classes=4, mean=(0.4,), std=(0.25,), hflip=False,
                    name="planted"), poisoned


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isolation_picks_planted_fast_learned_samples(seed):
    """The isolation stage (flooding at the official gamma, lowest 5% after isolation
    training) flags the planted poisoned samples, whatever the seed."""
    from dataclasses import replace

    from bench.models import create_model
    from bench.stages import StageTimer
    from bench.train import TrainCfg
    from defenses.abl import ABLParams
    from defenses.base import DefenseContext
    from tests.conftest import cpu_engine

    data, poisoned = planted(seed)
    eng = cpu_engine(data.mean, data.std)
    p = ABLParams(isolation_ratio=0.05)
    p = replace(p, isolation=replace(p.isolation, epochs=3, batch_size=64),
                finetune=replace(p.finetune, epochs=0), unlearn=replace(p.unlearn, epochs=0))

    def make_model():
        torch.manual_seed(seed)
        return create_model("cnn_small", 4, 1, width=0.25)

    ctx = DefenseContext(eng, TrainCfg(), make_model, seed, StageTimer(torch.device("cpu")))
    flagged = abl(data, p, ctx).suspects["isolation"]
    assert int(flagged.sum()) == 50
    # Precision (recall is then >= 0.43). Seeds 0-5 give 0.88-1.00 with one thread and
    # 0.94-1.00 with two (float sums differ); with 0 isolation epochs it is 0.00-0.10.
    assert poisoned[flagged].float().mean() >= 0.85


def test_abl_end_to_end_row(abl_row):
    assert abl_row["status"] == "ok" and abl_row["n_poisoned"] == 300
    assert list(abl_row["stage_s"])[1:5] == ["isolation_train", "isolate", "finetune", "unlearn"]


def test_unlearning_raises_loss_on_isolated_set():
    from bench.models import create_model
    from bench.train import TrainCfg, fit, per_sample_loss
    from tests.conftest import cpu_engine

    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8)
    y = torch.randint(0, 3, (64,))
    eng = cpu_engine()
    model = create_model("cnn_small", 3, 1, width=0.25)
    g = torch.Generator().manual_seed(0)
    fit(model, x, y, TrainCfg(epochs=6, lr=0.05, batch_size=16), eng, g, hflip=False)
    before = per_sample_loss(model, x, y, eng).mean()
    fit(model, x, y, TrainCfg(epochs=3, lr=2e-2, batch_size=16, schedule="constant"), eng, g,
        hflip=False, loss_fn=negative_ce)
    after = per_sample_loss(model, x, y, eng).mean()
    assert after > before * 1.3


def _tiny_abl(seed: int = 0):
    from dataclasses import replace

    from bench.models import create_model
    from bench.stages import StageTimer
    from bench.train import TrainCfg
    from defenses.abl import ABLParams
    from defenses.base import DefenseContext
    from tests.conftest import cpu_engine

    data, poisoned = planted(seed, n=300)
    eng = cpu_engine(data.mean, data.std)
    p = ABLParams(isolation_ratio=0.1)
    p = replace(p, isolation=replace(p.isolation, epochs=0), finetune=replace(p.finetune, epochs=0),
                unlearn=replace(p.unlearn, epochs=0))
    eval_batches = []

    def make_model():
        torch.manual_seed(seed)
        model = create_model("cnn_small", 4, 1, width=0.25)
        model.register_forward_pre_hook(
            lambda m, args: eval_batches.append(len(args[0])) if not m.training else None)
        return model

    ctx = DefenseContext(eng, TrainCfg(), make_model, seed, StageTimer(torch.device("cpu")))
    return data, p, ctx, eval_batches


def test_isolation_pass_uses_isolation_eval_batch_size():
    from dataclasses import replace

    data, p, ctx, eval_batches = _tiny_abl()
    abl(data, replace(p, isolation=replace(p.isolation, eval_batch_size=128)), ctx)
    assert eval_batches == [128, 128, 44]  # 300 samples; the run's default would be one 300


@pytest.mark.parametrize("optimizer, schedule", [("adam", "constant"), ("sgd", "multistep")])
def test_joint_unlearning_uses_its_optimizer_and_schedule(optimizer, schedule):
    """One joint step (the rest fits one batch): Adam's first step moves every weight by ~lr;
    a multistep schedule with gamma 0 from epoch 0 leaves the model unchanged."""
    from dataclasses import replace

    from defenses.abl import unlearn_joint

    data, p, ctx, _ = _tiny_abl()
    model = ctx.engine.place(ctx.make_model())
    iso = torch.zeros(len(data.y), dtype=torch.bool)
    iso[:30] = True
    cfg = replace(p.unlearn, epochs=1, batch_size=512, optimizer=optimizer, lr=1e-3,
                  weight_decay=0.0, schedule=schedule, milestones=(0,), gamma=0.0)
    before = [w.detach().clone() for w in model.parameters()]
    unlearn_joint(model, data.subset(~iso), data.subset(iso), cfg, ctx,
                  torch.Generator().manual_seed(0), hflip=False)
    step = torch.cat([(w - b).abs().flatten()
                      for w, b in zip(model.parameters(), before, strict=True)])
    if optimizer == "adam":
        assert step.max() <= 1e-3 * (1 + 1e-4) and step.median() > 0.99e-3
    else:
        assert step.max() == 0


def test_joint_unlearning_descends_on_rest_and_ascends_on_isolated():
    """One plain-SGD joint step (each set one batch) equals ``w − lr·∇[CE(rest) − CE(iso)]``
    computed directly, and not the step that descends on both."""
    import copy
    from dataclasses import replace

    import torch.nn.functional as F

    from defenses.abl import NO_AUG, unlearn_joint

    data, p, ctx, _ = _tiny_abl()
    model = ctx.engine.place(ctx.make_model())
    iso = torch.zeros(len(data.y), dtype=torch.bool)
    iso[:30] = True
    rest_set, iso_set = data.subset(~iso), data.subset(iso)
    cfg = replace(p.unlearn, epochs=1, batch_size=512, optimizer="sgd", lr=0.1, momentum=0.0,
                  nesterov=False, weight_decay=0.0, schedule="constant", augment=NO_AUG)

    def expected(sign: float) -> list[torch.Tensor]:
        ref = copy.deepcopy(model).train()
        prep = ctx.engine.prep
        loss = (F.cross_entropy(ref(prep(rest_set.x, False)), rest_set.y)
                + sign * F.cross_entropy(ref(prep(iso_set.x, False)), iso_set.y))
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        return [w.detach() - 0.1 * g for w, g in zip(ref.parameters(), grads, strict=True)]

    ascend, descend = expected(-1.0), expected(+1.0)
    unlearn_joint(model, rest_set, iso_set, cfg, ctx, torch.Generator().manual_seed(0),
                  hflip=False)
    after = list(model.parameters())
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(after, ascend, strict=True))
    assert not all(torch.allclose(a, e, atol=1e-6) for a, e in zip(after, descend, strict=True))


def test_stages_train_on_the_sets_isolation_leaves(monkeypatch):
    """Isolation trains on every sample; fine-tuning on exactly the unflagged ones; the
    unlearning ascends on exactly the flagged ones."""
    from dataclasses import replace

    import defenses.abl as mod

    data, p, ctx, _ = _tiny_abl()
    p = replace(p, isolation=replace(p.isolation, epochs=1), finetune=replace(p.finetune, epochs=1),
                unlearn=replace(p.unlearn, epochs=1))
    calls, original = [], mod.fit

    def spy(model, x, y, cfg, *args, **kwargs):
        calls.append((kwargs["desc"], x.clone(), y.clone(), kwargs.get("loss_fn")))
        return original(model, x, y, cfg, *args, **kwargs)

    monkeypatch.setattr(mod, "fit", spy)
    flagged = abl(data, p, ctx).suspects["isolation"]
    assert int(flagged.sum()) == 30
    (d_iso, x_iso, _, _), (d_ft, x_ft, y_ft, _), (d_ul, x_ul, y_ul, loss_ul) = calls
    assert (d_iso, d_ft, d_ul) == ("abl isolation", "abl finetune", "abl unlearn")
    assert torch.equal(x_iso, data.x)
    assert torch.equal(x_ft, data.x[~flagged]) and torch.equal(y_ft, data.y[~flagged])
    assert torch.equal(x_ul, data.x[flagged]) and torch.equal(y_ul, data.y[flagged])
    assert loss_ul is negative_ce


def test_isolation_ratio_that_isolates_nothing_fails_before_training():
    from dataclasses import replace

    from bench.errors import ConfigError

    data, p, ctx, eval_batches = _tiny_abl()
    with pytest.raises(ConfigError, match="isolates no sample of 300; raise it to at least"):
        abl(data, replace(p, isolation_ratio=0.003), ctx)
    assert eval_batches == []
