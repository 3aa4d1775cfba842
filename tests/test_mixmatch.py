"""MixMatch's losses and one step, against direct computations (DBD's stage 4, DLP's stage 3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bench.train import Engine
from defenses.mixmatch import MixMatchCfg, mixmatch_losses, mixmatch_step, sharpen


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
    eng = Engine(torch.device("cpu"), (0.5,), (0.25,), amp=False, channels_last=False)
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
