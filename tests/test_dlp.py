"""DLP: entropy ranking, the dominant-class filter, active unlearning, the labelled budget, the
interface and the ablation switches end to end."""

import inspect
import math

import pytest
import torch
import torch.nn as nn

from bench.data import ImageSet
from bench.errors import ConfigError
from bench.registry import build_params
from bench.run import run
from defenses.dlp import DLPParams, UnlearnCfg, active_unlearn, dlp, select_labelled
from defenses.dlp_filter import (
    FilterCfg,
    disowned_filter,
    entropy_filter,
    expand_suspects,
    late_filter,
)
from defenses.selection import knn_label_agreement, knn_label_shares, otsu, predictive_entropy
from tests.conftest import cpu_engine

CPU = torch.device("cpu")


def test_predictive_entropy_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0, 0]])
    h = predictive_entropy(logits)
    assert h[0] == pytest.approx(math.log(4))
    assert h[1] == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6])  # softmax of row 2
    assert h[2] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    # lower entropy = more confident: the ranking puts the one-hot row first
    assert torch.argsort(h).tolist() == [1, 2, 0]


def test_otsu_two_point_masses_and_a_spread():
    cut, sep = otsu(torch.tensor([-5.0] * 10 + [1.0] * 30))
    assert sep == pytest.approx(1.0) and -5 <= cut < 1
    _, sep_uniform = otsu(torch.linspace(0, 1, 1001))
    assert sep_uniform == pytest.approx(0.75, abs=0.01)
    assert otsu(torch.ones(5)) == (1.0, 0.0)


def planted_entropies(n_per_class=100, k=5, target=2, n_low=40, seed=0):
    """Unimodal entropies for every class; the target class also holds ``n_low`` samples with
    near-zero entropy (the learned backdoor)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    h = torch.exp(torch.randn(len(y), generator=g) * 0.5 - 1.0)  # log-normal around 0.37
    low = (y == target).nonzero()[:n_low, 0]
    h[low] = 1e-5 * torch.rand(n_low, generator=g) + 1e-6
    planted = torch.zeros(len(y), dtype=torch.bool)
    planted[low] = True
    return h, y, planted


def test_dominant_class_filter_finds_the_planted_cluster():
    h, y, planted = planted_entropies()
    sus, info = entropy_filter(h, y, 5, FilterCfg())
    assert info["filter_class"] == 2 and info["filter_separability"] > 0.9
    assert torch.equal(sus, planted)


def test_filter_adds_the_last_epochs_low_cluster_of_the_chosen_class():
    avg, y, planted = planted_entropies()
    late = planted.nonzero()[-5:, 0]  # learned late: low entropy at the last epoch only
    avg[late] = 0.4
    last = avg.clone()
    last[late] = 1e-6
    last[(y == 3).nonzero()[:40, 0]] = 1e-6  # a low cluster in another class: not chosen
    sus, info = entropy_filter(avg, y, 5, FilterCfg(), last=last)
    assert info["filter_class"] == 2 and torch.equal(sus, planted)
    sus_avg, _ = entropy_filter(avg, y, 5, FilterCfg())
    assert torch.equal(sus_avg, planted & ~torch.isin(torch.arange(len(y)), late))


def test_filter_cap_and_global_mode():
    h, y, planted = planted_entropies()
    sus, _ = entropy_filter(h, y, 5, FilterCfg(ratio=0.05))  # cap 25 of 500
    assert int(sus.sum()) == 25 and bool((sus <= planted).all())
    glob, _ = entropy_filter(h, y, 5, FilterCfg(mode="global", ratio=0.1))
    assert torch.equal(glob, torch.zeros_like(glob).index_fill_(0, torch.argsort(h)[:50], True))


def test_filter_flags_nothing_without_a_separable_class():
    h, y, _ = planted_entropies(n_low=0)
    sus, info = entropy_filter(h, y, 5, FilterCfg())
    assert not sus.any() and info["filter_class"] == -1
    assert info["filter_separability"] < FilterCfg().min_separability


def planted_backdoor(n=240, k=3, seed=0):
    """Noise images; a bright 3×3 corner patch on a fifth of them, labelled 0 (the target)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 100, (n, 1, 10, 10), generator=g, dtype=torch.uint8)
    y = torch.randint(1, k, (n,), generator=g)
    y[: n // 3] = 0
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[n - n // 5 :] = True
    x[poisoned, :, -3:, -3:] = 255
    y[poisoned] = 0
    return ImageSet(x=x, y=y, num_classes=k, mean=(0.3,), std=(0.3,), hflip=False,
                    name="toy"), poisoned


def spy_clean_batches(monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Record what ``active_unlearn`` asks ``_cycle`` for: the confident clean indices it
    cycles over, and every clean batch it actually draws (one per descent step)."""
    import defenses.dlp

    pools, drawn = [], []
    real = defenses.dlp._cycle

    def cycle(idx, size, gen):
        pools.append(idx.clone())  # on the call, before any batch is drawn

        def draw():
            for b in real(idx, size, gen):
                drawn.append(b.clone())
                yield b

        return draw()

    monkeypatch.setattr(defenses.dlp, "_cycle", cycle)
    return pools, drawn


def test_active_unlearning_lowers_suspects_target_confidence(monkeypatch):
    import copy

    from bench.models import create_model
    from bench.train import TrainCfg, fit, per_sample_loss, predict

    data, poisoned = planted_backdoor()
    eng = cpu_engine()
    torch.manual_seed(0)
    model = create_model("cnn_small", 3, 1, width=0.25)
    fit(model, data.x, data.y, TrainCfg(epochs=8, lr=0.05, batch_size=32), eng,
        torch.Generator().manual_seed(0), hflip=False)
    conf_before = predict(model, data.x[poisoned], eng).softmax(1)[:, 0]
    assert conf_before.mean() > 0.8  # the planted backdoor is learned
    losses = per_sample_loss(model, data.x, data.y, eng, normalize=True)
    trained = copy.deepcopy(model)
    pools, drawn = spy_clean_batches(monkeypatch)
    out = active_unlearn(model, data, poisoned, UnlearnCfg(lr=0.05, batch_size=16), eng,
                         torch.Generator().manual_seed(1), norm=True)
    conf_after = predict(model, data.x[poisoned], eng).softmax(1)[:, 0]
    assert out["unlearn_suspect_acc_before"] > 0.9
    assert out["unlearn_suspect_acc_after"] <= 0.1 and out["unlearn_steps"] >= 1
    assert conf_after.mean() < 0.5 * conf_before.mean()

    # the clean side: the clean_ratio = 0.5 lowest-loss samples of the pool of non-suspects
    # outside the suspects' label classes (here class 0, which holds 80 clean samples too)
    assert len(pools) == 1 and data.y[poisoned].unique().tolist() == [0]
    clean = pools[0]
    pool = ~poisoned & (data.y != 0)
    assert not poisoned[clean].any() and not (data.y[clean] == 0).any()
    assert len(clean) == len(clean.unique()) == int(0.5 * pool.sum()) == 56
    chosen = torch.zeros_like(pool)
    chosen[clean] = True
    assert losses[clean].max() < losses[pool & ~chosen].min()
    # and descent on it: one clean batch (of at most 16) drawn per step, each from that set
    assert len(drawn) == out["unlearn_steps"]
    assert all(0 < len(b) <= 16 and chosen[b].all() for b in drawn)
    drawn.clear()
    active_unlearn(trained, data, poisoned, UnlearnCfg(lr=0.05, batch_size=16, descend=False),
                   eng, torch.Generator().manual_seed(1), norm=True)
    assert not drawn  # pure ascent draws no clean batch


class LookupModel(nn.Module):
    """Returns fixed logits per sample; the sample's index is stored in pixel (0, 0)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits[(x[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long()]


def test_labelled_selection_follows_budget_and_balance():
    g = torch.Generator().manual_seed(0)
    n, k = 120, 3
    y = torch.tensor([0] * 60 + [1] * 40 + [2] * 20)
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    data = ImageSet(x=x, y=y, num_classes=k, mean=(0.5,), std=(0.25,), hflip=False, name="t")
    logits = torch.randn(n, k, generator=g) * 3
    exclude = torch.zeros(n, dtype=torch.bool)
    exclude[:10] = True  # suspects: never labelled
    eng, model = cpu_engine(), LookupModel(logits)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")

    lab = select_labelled(model, data, exclude, 0.5, eng, norm=True, balanced=True)
    assert not (lab & exclude).any()
    for c, members in ((0, 50), (1, 40), (2, 20)):  # non-excluded members per class
        in_c = (y == c) & ~exclude
        assert int((lab & in_c).sum()) == int(0.5 * members)
        # the chosen are the lowest-loss members of their class
        assert ce[lab & in_c].max() <= ce[~lab & in_c].min()

    # a fixed share for one class (the flagged one), the budget for the others
    fixed = select_labelled(model, data, exclude, 0.9, eng, norm=True, balanced=True,
                            class_budget={0: 0.2})
    assert [int((fixed & (y == c)).sum()) for c in range(k)] == [10, 36, 18]
    assert ce[fixed & (y == 0)].max() <= ce[~fixed & (y == 0) & ~exclude].min()

    glob = select_labelled(model, data, exclude, 0.25, eng, norm=True, balanced=False)
    assert int(glob.sum()) == int(0.25 * 110) and not (glob & exclude).any()
    assert ce[glob].max() <= ce[~glob & ~exclude].min()


def test_expansion_adds_the_flagged_classs_samples_that_side_with_the_suspects():
    g = torch.Generator().manual_seed(0)
    d = 16
    trigger, clean0, other = torch.eye(d)[0], torch.eye(d)[1], torch.eye(d)[2]
    y = torch.tensor([0] * 60 + [1] * 20)
    poisoned = torch.zeros(80, dtype=torch.bool)
    poisoned[:30] = True  # class 0's first 30 carry the trigger
    feats = torch.randn(80, d, generator=g) * 0.3
    feats[:30] += 2 * trigger + 0.5 * clean0  # poisoned: trigger plus a little class content
    feats[30:60] += 2 * clean0
    feats[60:70] += 2 * trigger  # class 1 samples that look like the trigger: never flagged
    feats[70:] += 2 * other
    suspects = torch.zeros(80, dtype=torch.bool)
    suspects[:20] = True  # the entropy cut caught 20 of the 30
    out = expand_suspects(feats, y, suspects)
    assert torch.equal(out[:30], poisoned[:30])  # the 10 missed ones join, no clean one does
    assert not out[30:].any() and torch.equal(suspects[:20], out[:20])
    assert not suspects[20:30].any()  # the input mask is not modified
    strict = expand_suspects(feats, y, suspects, margin=1.9)
    assert torch.equal(strict, suspects)  # a margin beyond any cosine gap adds nothing
    none = torch.zeros(80, dtype=torch.bool)
    assert not expand_suspects(feats, y, none).any()  # nothing flagged: nothing to expand


def test_knn_label_agreement_counts_same_label_neighbours():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.3, 1.0], [0.1, 1.0]])
    y = torch.tensor([0, 0, 1, 0, 1])
    # sample 3 (label 0) sits among label-1 samples; itself never counts as a neighbour
    assert knn_label_agreement(feats, y, k=1).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    two = knn_label_agreement(feats, y, k=2, chunk=2)  # chunking gives the same answer
    assert two.tolist() == [1.0, 1.0, 0.5, 0.0, 0.5]
    assert torch.equal(two, knn_label_agreement(feats, y, k=2))
    # any label values: negative, sparse, int32
    odd = torch.tensor([-1, -1, 7, -1, 7], dtype=torch.int32)
    assert torch.equal(knn_label_agreement(feats, odd, k=2), two)
    shares = knn_label_shares(feats, y, 3, k=2)  # every label's share; label 2 has no sample
    assert shares.tolist() == [[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0.5, 0.5, 0]]
    assert torch.equal(shares.gather(1, y[:, None])[:, 0], two)


def test_disowned_filter_flags_the_class_whose_samples_sat_among_another_label():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(500) % 5
    own = 0.5 + 0.4 * torch.rand(500, generator=g)  # most neighbours share the label
    early = torch.zeros(500, 5)
    early[torch.arange(500), y] = own
    early[torch.arange(500), (y + 1) % 5] = 1 - own  # the rest: one confusable class
    planted = (y == 2).nonzero()[:30, 0]  # 30 of class 2's 100 look like their true class 4
    early[planted] = 0.0
    early[planted, 4] = torch.linspace(0.8, 1.0, 30)
    early[planted, 2] = 1 - early[planted, 4]
    mixed = (y == 1).nonzero()[:30, 0]  # neighbours spread over three other labels: not one
    early[mixed] = torch.tensor([0.1, 0.0, 0.3, 0.3, 0.3])
    few = (y == 3).nonzero()[:8, 0]  # a few confusable samples elsewhere: 8% < 12%
    early[few] = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.9])
    sus, info = disowned_filter(early, y, FilterCfg())
    assert info["disowned_class"] == 2 and info["disowned_share"] == pytest.approx(0.3)
    six = torch.cat([early, torch.zeros(500, 1)], 1)  # a sixth class with no sample: no NaN
    assert torch.equal(disowned_filter(six, y, FilterCfg())[0], sus)
    assert torch.equal(sus.nonzero()[:, 0], planted.sort().values)
    capped, _ = disowned_filter(early, y, FilterCfg(ratio=0.02))  # cap 10, most disowned first
    assert torch.equal(capped.nonzero()[:, 0], planted[-10:].sort().values)
    strict, info = disowned_filter(early, y, FilterCfg(disowned_agree=0.95,
                                                       disowned_min_share=0.05))
    n_strict = int((early[planted, 4] >= 0.95).sum())  # 8 of the 30
    assert info["disowned_class"] == 2 and int(strict.sum()) == n_strict == 8
    early[planted[:20]] = 0.0  # 20 of them back among their label: 10% < 12%, not flagged
    early[planted[:20], 2], early[planted[:20], 4] = 0.9, 0.1
    none, info = disowned_filter(early, y, FilterCfg())
    assert not none.any() and info["disowned_class"] == -1
    assert info["disowned_share"] == pytest.approx(0.1)


def test_late_filter_flags_the_class_whose_samples_joined_their_label_late():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(500) % 5
    early = 0.4 + 0.3 * torch.rand(500, generator=g)
    last = early + 0.3 * torch.rand(500, generator=g) - 0.1  # ordinary drift, below late_rise
    late = (y == 3).nonzero()[:40, 0]  # 40 of class 3's 100 sat among other labels early on
    early[late] = 0.1 * torch.rand(40, generator=g)
    last[late] = 0.9 + 0.1 * torch.rand(40, generator=g)  # and among their own label at the end
    few = (y == 1).nonzero()[:8, 0]  # a few memorised samples elsewhere: 8% < 15%
    early[few], last[few] = 0.0, 0.9
    sus, info = late_filter(early, last, y, 5, FilterCfg())
    assert info["late_class"] == 3 and info["late_share"] == pytest.approx(0.4)
    assert torch.equal(sus.nonzero()[:, 0], late.sort().values)
    capped, _ = late_filter(early, last, y, 5, FilterCfg(ratio=0.02))  # cap 10, largest rise
    rise = last - early
    assert int(capped.sum()) == 10 and rise[capped].min() >= rise[late].sort().values[-10]
    # the direction matters: samples that *left* their label's neighbourhood are not flagged
    backwards, info = late_filter(last, early, y, 5, FilterCfg())
    assert not backwards.any() and info["late_class"] == -1
    early[late] = last[late]
    none, info = late_filter(early, last, y, 5, FilterCfg())
    assert not none.any() and info["late_class"] == -1
    assert info["late_share"] == pytest.approx(0.08)


def test_defense_cannot_reach_ground_truth():
    assert list(inspect.signature(dlp).parameters) == ["data", "p", "ctx"]
    assert not {"y_true", "kind"} & set(ImageSet.__dataclass_fields__)


@pytest.mark.parametrize("key,value", [("filter", {"mode": "nope"}), ("semi", {"budget": 1.5}),
                                       ("semi", {"budget_flagged": 0.0}),
                                       ("semi", {"rounds": 99}), ("filter", {"ratio": 0}),
                                       ("filter", {"from_epoch": 0}),
                                       ("filter", {"expand_margin": 2.0}),
                                       ("filter", {"late_rise": 0.0}),
                                       ("filter", {"late_rise": 1.0}),
                                       ("filter", {"late_min_share": 1.0}),
                                       ("filter", {"late_k": 0}),
                                       ("filter", {"disowned_agree": 0.0}),
                                       ("filter", {"disowned_agree": 1.5}),
                                       ("filter", {"disowned_min_share": 0.0}),
                                       ("filter", {"disowned_min_share": 1.0}),
                                       ("supervised", {"eval_batch_size": 0})])
def test_bad_params_are_config_errors(key, value):
    from defenses.dlp import _check

    with pytest.raises(ConfigError):  # when built (a recipe's own check) or by the defense's
        _check(build_params(DLPParams, {key: value}, "defense dlp"))


SMALL = ["defense=dlp", "defense.params.supervised.epochs=2",
         "defense.params.semi.mixmatch.epochs=2", "defense.params.semi.mixmatch.iters_per_epoch=3",
         "defense.params.semi.mixmatch.batch_size=16", "defense.params.semi.rounds=2",
         "defense.params.filter.min_separability=0.5", "attack=badnets"]


def test_dlp_end_to_end_with_ablation_switches(tiny_cfg):
    row = run(tiny_cfg(*SMALL))
    assert row["status"] == "ok"
    stages = list(row["stage_s"])
    assert stages[1:3] == ["supervised", "filter"] and "semi" in stages and "select" in stages
    ex = row["extra"]
    assert {"filter_iso_precision", "filter_iso_recall", "semi_iso_precision"} <= set(ex)
    assert row["n_suspects"] == ex["n_filtered"] > 0  # the headline is the entropy filter
    assert ex["semi_n_labelled_r1"] < ex["semi_n_labelled_r2"]  # budget 0.5 -> 0.9
    # every round's split is scored; the last round's is the "semi" entry
    assert {"semi_r1_kept_poison", "semi_r2_kept_poison"} <= set(ex)
    assert ex["semi_r2_kept_poison"] == ex["semi_kept_poison"]
    assert ex["semi_r2_iso_recall"] == ex["semi_iso_recall"]
    # the expansion only adds to the entropy cut, which is the whole filter without it
    assert ex["entropy_iso_recall"] <= ex["filter_iso_recall"]
    no_expand = run(tiny_cfg(*SMALL, "+ablation=dlp_no_expand"))
    assert no_expand["defense"] == "dlp.no_expand" and "n_expanded" not in no_expand["extra"]
    assert no_expand["n_suspects"] == row["n_suspects"] - ex["n_expanded"]
    assert no_expand["iso_recall"] == ex["entropy_iso_recall"]

    assert row["defense"] == "dlp" and row["iso_precision"] == ex["filter_iso_precision"]
    assert ex["filter_epochs"] == 1  # from_epoch 2 of 2 supervised epochs
    every = run(tiny_cfg(*SMALL, "defense.params.filter.from_epoch=1"))
    assert every["extra"]["filter_epochs"] == 2
    # same supervised model, a different entropy: the suspects change, the training does not
    assert every["extra"]["supervised_acc"] == ex["supervised_acc"]
    assert every["extra"]["filter_separability"] != ex["filter_separability"]

    no_semi = run(tiny_cfg(*SMALL, "+ablation=dlp_no_semi"))
    assert no_semi["defense"] == "dlp.no_semi" and no_semi["run_id"] != row["run_id"]
    assert "semi" not in no_semi["stage_s"] and "semi_iso_precision" not in no_semi["extra"]
    no_unlearn = run(tiny_cfg(*SMALL, "+ablation=dlp_no_unlearn"))
    assert "unlearn" not in no_unlearn["stage_s"]
    assert "unlearn_steps" not in no_unlearn["extra"]
    no_filter = run(tiny_cfg(*SMALL, "+ablation=dlp_no_filter"))
    assert no_filter["n_suspects"] == 0 and "unlearn" not in no_filter["stage_s"]
    assert no_filter["extra"]["filter_class"] == -1  # nothing flagged, none named


def test_inference_passes_use_the_supervised_eval_batch_size():
    """supervised.eval_batch_size sets the batches of every inference pass of the defense, not
    the run's train.eval_batch_size (the engine's)."""
    from dataclasses import replace

    from bench.stages import StageTimer
    from bench.train import TrainCfg
    from defenses.base import DefenseContext

    data, _ = planted_backdoor()
    seen = []

    def make_model():
        from bench.models import create_model

        torch.manual_seed(0)
        m = create_model("cnn_small", data.num_classes, 1, width=0.25)
        m.register_forward_pre_hook(lambda mod, a: seen.append(len(a[0])) if not mod.training
                                    else None)
        return m

    p = DLPParams()
    p = replace(p, supervised=replace(p.supervised, epochs=2, batch_size=32, eval_batch_size=7),
                unlearn=replace(p.unlearn, enabled=False), semi=replace(p.semi, enabled=False))
    ctx = DefenseContext(cpu_engine(), TrainCfg(), make_model, 0, StageTimer(CPU))
    dlp(data, p, ctx)
    assert seen and max(seen) == 7 and ctx.engine.eval_batch_size == 1024


def test_dlp_falls_back_on_the_late_filter_when_no_class_is_separable(tiny_cfg):
    # no class reaches separability 0.99, so the late filter (3 supervised epochs: early = 1-2)
    # decides; thresholds low enough that the tiny model's drift flags a class
    late = [*SMALL, "defense.params.supervised.epochs=3",
            "defense.params.filter.min_separability=0.99",
            "defense.params.filter.late_rise=0.01", "defense.params.filter.late_min_share=0.01"]
    row = run(tiny_cfg(*late))
    ex = row["extra"]
    assert row["status"] == "ok" and ex["filter_separability"] < 0.99
    assert ex["late_class"] >= 0 and ex["filter_class"] == ex["late_class"]
    assert ex["entropy_iso_recall"] == 0  # the entropy cut flagged nothing
    assert ex["late_iso_recall"] <= ex["filter_iso_recall"]  # the expansion only adds
    assert row["n_suspects"] == ex["n_filtered"] > ex["n_expanded"]  # the late cut is not empty
    assert row["iso_recall"] == ex["filter_iso_recall"] and "unlearn" in row["stage_s"]
    off = run(tiny_cfg(*late, "+ablation=dlp_no_late"))
    assert off["defense"] == "dlp.no_late" and off["n_suspects"] == 0
    assert "late_share" not in off["extra"] and "late_iso_recall" not in off["extra"]
    assert "disowned_share" not in off["extra"]  # the entropy filter alone
    assert "unlearn" not in off["stage_s"]
    assert off["extra"]["supervised_acc"] == ex["supervised_acc"]  # same supervised model
    no_filter = run(tiny_cfg(*late, "+ablation=dlp_no_filter"))  # flags nothing, late or not
    assert no_filter["n_suspects"] == 0 and "late_share" not in no_filter["extra"]


def test_dlp_falls_back_on_the_disowned_filter_when_no_class_was_learned_late(tiny_cfg):
    # a faint blend (alpha 0.02) is not learned in 3 supervised epochs: neither the entropy
    # (separability 0.99) nor the late filter (share 0.99) flags a class, and the poisoned
    # samples still sit among their true classes, so the disowned filter finds the target class
    disowned = [*SMALL[:-1], "attack=blended", "attack.params.alpha=0.02",
                "defense.params.supervised.epochs=3",
                "defense.params.filter.min_separability=0.99",
                "defense.params.filter.late_min_share=0.99",
                "defense.params.filter.disowned_agree=0.5",
                "defense.params.filter.disowned_min_share=0.01"]
    row = run(tiny_cfg(*disowned))
    ex = row["extra"]
    assert row["status"] == "ok" and ex["late_class"] == -1 and ex["entropy_iso_recall"] == 0
    assert ex["disowned_class"] == row["target"] == ex["filter_class"]
    # the poisoned samples are about half of the target class; the cut is mostly them
    assert ex["disowned_iso_precision"] > 0.7 and ex["disowned_iso_recall"] > 0.5
    assert ex["disowned_iso_recall"] <= ex["filter_iso_recall"]  # the expansion only adds
    assert row["n_suspects"] == ex["n_filtered"] > ex["n_expanded"]
    assert "unlearn" in row["stage_s"]
    off = run(tiny_cfg(*disowned, "+ablation=dlp_no_disowned"))
    assert off["defense"] == "dlp.no_disowned" and off["n_suspects"] == 0
    assert "disowned_share" not in off["extra"] and off["extra"]["late_class"] == -1
    assert off["extra"]["supervised_acc"] == ex["supervised_acc"]  # same supervised model
    # without the late filter the disowned one decides alone, on the same early features
    alone = run(tiny_cfg(*disowned, "defense.params.filter.late=false"))
    assert "late_share" not in alone["extra"]
    assert alone["extra"]["disowned_share"] == ex["disowned_share"]
    # where the late filter flags a class, the disowned filter is not consulted
    first = run(tiny_cfg(*disowned, "defense.params.filter.late_rise=0.01",
                         "defense.params.filter.late_min_share=0.01"))
    assert first["extra"]["late_class"] >= 0 and "disowned_share" not in first["extra"]
    assert first["extra"]["filter_class"] == first["extra"]["late_class"]


def test_budget_grows_linearly_over_rounds():
    from defenses.dlp import SemiCfg, _budget

    cfg = SemiCfg(rounds=5, budget=0.5, budget_final=0.9)
    assert [round(_budget(cfg, r), 6) for r in range(5)] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert _budget(SemiCfg(rounds=4, budget=0.5, budget_final=None), 3) == 0.5
