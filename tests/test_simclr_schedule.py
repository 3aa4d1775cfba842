"""SimCLR's learning-rate schedule: torch's CosineAnnealingLR(T_max=schedule_epochs), stepped once
per epoch, over the ``epochs`` actually run (DBD loads epoch 100 of a 1000-epoch schedule)."""

import torch

from bench.models import create_model
from bench.train import Engine
from defenses.simclr import SimCLRCfg, train_simclr


def test_lr_follows_cosine_per_epoch_over_schedule_epochs(monkeypatch):
    seen, step = [], torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    x = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8)
    eng = Engine(torch.device("cpu"), (0.5,), (0.25,), amp=False, channels_last=False)
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
