"""MixMatch (DBD's stage 4, DLP's stage 3): sharpening, mixup, interleaving, the λu ramp, and
the losses and one step against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from defenses.mixmatch import (
    MixMatchCfg,
    interleave,
    lambda_u_at,
    mixmatch_losses,
    mixmatch_step,
    mixup,
    sharpen,
    uninterleave,
)
from tests.conftest import cpu_engine


def test_sharpen():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = sharpen(p, 0.5)
    assert torch.allclose(q.sum(1), torch.ones(2))
    ent = lambda t: -(t * t.log()).sum(1)  # noqa: E731
    assert (ent(q) < ent(p)).all()
    assert torch.allclose(sharpen(p, 1.0), p)
    assert torch.allclose(q[0], torch.tensor([25.0, 9.0, 4.0]) / 38)


def test_mixup_is_convex_with_lambda_prime():
    n = 12
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = F.one_hot(torch.arange(n) % 3, 3).float()
    xm, ym, lam = mixup(x, y, 0.3, torch.Generator().manual_seed(0))
    assert lam == pytest.approx(0.7) and lam >= 0.5
    partner = ((xm[:, 0] - lam * x[:, 0]) / (1 - lam)).round().long()
    assert sorted(partner.tolist()) == list(range(n))  # mixed with a permutation of the batch
    assert torch.allclose(xm[:, 0], lam * x[:, 0] + (1 - lam) * partner.float(), atol=1e-5)
    assert torch.allclose(ym, lam * y + (1 - lam) * y[partner])
    assert torch.allclose(ym.sum(1), torch.ones(n))
    assert mixup(x, y, 0.9, torch.Generator())[2] == pytest.approx(0.9)


def test_interleave_round_trip_and_mixing():
    b = 64
    chunks = [torch.full((b,), float(i)) for i in range(3)]
    mixed = interleave(chunks)
    assert all(len(m) == b for m in mixed)
    # chunk 0 (labelled) is spread over every forward pass, and each pass sees unlabelled rows
    assert [sorted(set(m.tolist())) for m in mixed] == [[0.0, 1.0, 2.0], [0.0, 1.0], [0.0, 2.0]]
    assert [(m == 0).sum().item() for m in mixed] == [21, 21, 22]
    data = list(torch.arange(3 * b).float().split(b))
    back = uninterleave(interleave(data))
    assert all(torch.equal(a, c) for a, c in zip(back, data, strict=True))


@pytest.mark.parametrize("t, want", [(0, 0.0), (95, 7.5), (190, 15.0), (300, 15.0)])
def test_lambda_u_ramp(t, want):
    assert lambda_u_at(t, 15.0, 190) == pytest.approx(want)


def test_losses_hand_computed():
    logits_x = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    targets_x = torch.tensor([[1.0, 0.0]])
    logits_u = torch.zeros(1, 2)  # softmax [1/2, 1/2]
    targets_u = torch.tensor([[1.0, 0.0]])
    lx, lu = mixmatch_losses(logits_x, targets_x, logits_u, targets_u)
    assert lx.item() == pytest.approx(math.log(4.0))
    assert lu.item() == pytest.approx(0.25)  # mean of (1/2 - 1)^2 and (1/2 - 0)^2


def _setup(b: int = 6, k: int = 3):
    """A linear model (no BatchNorm, so interleaving leaves each row's logits as they are),
    ``b`` labelled images and two different views of ``b`` unlabelled ones."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, 16, generator=g))
    xb = torch.randn(b, 1, 4, 4, generator=g)
    yb = F.one_hot(torch.randint(0, k, (b,), generator=g), k).float()
    ubs = [torch.randn(b, 1, 4, 4, generator=g) for _ in range(2)]
    eng = cpu_engine()
    return model, xb, yb, ubs, eng


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_step_equals_guess_sharpen_mixup_losses(lam):
    """The guess is the sharpened mean of the views' softmax; inputs and targets are mixed with
    λ' = max(λ, 1 − λ) and one permutation from the generator; the losses are taken on the mix."""
    model, xb, yb, ubs, eng = _setup()
    cfg = MixMatchCfg(temperature=0.5)
    lx, lu = mixmatch_step(model, xb, yb, ubs, cfg, lam, torch.Generator().manual_seed(1), eng)

    with torch.no_grad():
        q = sharpen(torch.stack([model(u).softmax(1) for u in ubs]).mean(0), 0.5)
        x_all, y_all = torch.cat([xb, *ubs]), torch.cat([yb, q, q])
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
        lp = max(lam, 1 - lam)
        x_mix, y_mix = lp * x_all + (1 - lp) * x_all[perm], lp * y_all + (1 - lp) * y_all[perm]
        logits = model(x_mix)
        b = len(xb)
        want_lx = -(y_mix[:b] * logits[:b].log_softmax(1)).sum(1).mean()
        want_lu = (logits[b:].softmax(1) - y_mix[b:]).pow(2).mean()
    assert lx.item() == pytest.approx(want_lx.item(), rel=1e-5)
    assert lu.item() == pytest.approx(want_lu.item(), rel=1e-5)

    # the guess is not the first view's alone, nor left unsharpened
    with torch.no_grad():
        for wrong_q in (sharpen(model(ubs[0]).softmax(1), 0.5),
                        torch.stack([model(u).softmax(1) for u in ubs]).mean(0)):
            y_wrong = torch.cat([yb, wrong_q, wrong_q])
            y_wrong = lp * y_wrong + (1 - lp) * y_wrong[perm]
            assert (logits[b:].softmax(1) - y_wrong[b:]).pow(2).mean().item() != pytest.approx(
                lu.item(), rel=1e-3)


def test_step_gradients_reach_only_the_mixed_forward():
    """Label guessing runs under no_grad: the loss's gradient equals the one taken through the
    mixed batch with the guesses held constant."""
    model, xb, yb, ubs, eng = _setup()
    lx, lu = mixmatch_step(model, xb, yb, ubs, MixMatchCfg(), 1.0,
                           torch.Generator().manual_seed(1), eng)
    (g,) = torch.autograd.grad(lx + 2.0 * lu, [model[1].weight])

    with torch.no_grad():
        q = sharpen(torch.stack([model(u).softmax(1) for u in ubs]).mean(0), 0.5)
    logits_x, logits_u = model(xb), model(torch.cat(ubs))
    want_lx, want_lu = mixmatch_losses(logits_x, yb, logits_u, torch.cat([q, q]))
    (want,) = torch.autograd.grad(want_lx + 2.0 * want_lu, [model[1].weight])
    assert torch.allclose(g, want, atol=1e-6)
