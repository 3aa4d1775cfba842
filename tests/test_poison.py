import pytest
import torch

from attacks import ATTACKS
from bench.errors import ConfigError
from bench.poison import COVER, POISONED, AttackSpec, poison
from tests.conftest import image_set


def spec(name="badnets", rate=0.25, target=0, mode="all2one", select_from="non_target", **p):
    return AttackSpec(name=name, poison_rate=rate, target=target, label_mode=mode,
                      select_from=select_from, params=ATTACKS.params(name, p))


def test_exact_count_non_target_and_labels():
    train, test = image_set(40), image_set(20, seed=1)
    pt, tt = poison(train, test, spec(), seed=0)
    idx = torch.nonzero(pt.kind == POISONED).flatten()
    assert len(idx) == pt.n_poisoned == round(0.25 * 40)
    assert (pt.y_true[idx] != 0).all()  # drawn from non-target samples
    assert (pt.data.y[idx] == 0).all()
    untouched = pt.kind == 0
    assert torch.equal(pt.data.x[untouched], train.x[untouched])
    assert torch.equal(pt.data.y[untouched], train.y[untouched])
    assert not (pt.data.x[idx] == train.x[idx]).all()


def test_triggered_test_excludes_target_class():
    train, test = image_set(40), image_set(20, seed=1)
    _, tt = poison(train, test, spec(target=2), seed=0)
    assert len(tt.y) == int((test.y != 2).sum())
    assert (tt.y_true != 2).all() and (tt.y == 2).all()


def test_all2all_shifts_labels_and_keeps_every_test_sample():
    train, test = image_set(40), image_set(20, seed=1)
    pt, tt = poison(train, test, spec(mode="all2all"), seed=0)
    idx = pt.kind == POISONED
    assert torch.equal(pt.data.y[idx], (pt.y_true[idx] + 1) % 4)
    assert len(tt.y) == 20 and torch.equal(tt.y, (tt.y_true + 1) % 4)


def test_badnets_changes_exactly_the_patch_pixels():
    train = image_set(8, c=3, hw=10)
    attack = ATTACKS.get("badnets").obj(ATTACKS.params("badnets", {"size": 3}), (3, 10, 10),
                                        torch.Generator())
    x = train.x.clone()
    x[:, :, 7:, 7:] = 0  # make sure every patch pixel changes
    out = attack.apply(x)
    diff = (out != x).any(1)
    expect = torch.zeros(10, 10, dtype=torch.bool)
    expect[7:, 7:] = True
    assert torch.equal(diff, expect.expand(8, 10, 10))
    assert (out[:, :, 7:, 7:] == 255).all()


def test_abl_grid_pattern():
    attack = ATTACKS.get("badnets").obj(ATTACKS.params("badnets", {"pattern": "abl_grid"}),
                                        (1, 32, 32), torch.Generator())
    out = attack.apply(torch.full((1, 1, 32, 32), 77, dtype=torch.uint8))[0, 0]
    grid = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(out[29:, 29:], grid)
    assert (out[:29] == 77).all() and (out[:, :29] == 77).all()


def test_blended_equals_blend_equation():
    attack = ATTACKS.get("blended").obj(ATTACKS.params("blended", {"alpha": 0.2}), (1, 8, 8),
                                        torch.Generator())
    x = image_set(5).x
    expect = 0.8 * x.double() + 0.2 * attack.pattern.double()
    assert (attack.apply(x).double() - expect).abs().max() <= 0.5 + 1e-6


def test_blended_test_alpha_applies_at_test_time_only():
    """DBD's and BackdoorBench's Blended may use another opacity on the test set: the
    training trigger keeps ``alpha``; ``for_test`` blends with ``test_alpha``, and poison() uses
    it for the triggered test set."""
    params = ATTACKS.params("blended", {"alpha": 0.1, "test_alpha": 0.3})
    attack = ATTACKS.get("blended").obj(params, (1, 8, 8), torch.Generator())
    x = image_set(5).x
    expect = {a: ((1 - a) * x.double() + a * attack.pattern.double()) for a in (0.1, 0.3)}
    assert (attack.apply(x).double() - expect[0.1]).abs().max() <= 0.5 + 1e-6
    assert (attack.for_test().apply(x).double() - expect[0.3]).abs().max() <= 0.5 + 1e-6
    assert attack.apply(x).double().sub(expect[0.3]).abs().max() > 1  # not the test opacity

    train, test = image_set(40), image_set(20, seed=1)
    s = spec("blended", alpha=0.1, test_alpha=0.3)
    pt, tt = poison(train, test, s, seed=0)
    idx = torch.nonzero(pt.kind == POISONED).flatten()
    src = test.x[test.y != 0]
    assert torch.equal(pt.data.x[idx], attack.apply(train.x[idx]))
    assert torch.equal(tt.x, attack.for_test().apply(src))


def test_select_from_all_also_poisons_target_class_samples():
    """``select_from: all`` (BackdoorBench's pool) draws from every sample, target class
    included (those keep their label); ``non_target`` never does."""
    train, test = image_set(400), image_set(20, seed=1)
    everywhere, _ = poison(train, test, spec(select_from="all"), seed=0)
    idx = torch.nonzero(everywhere.kind == POISONED).flatten()
    assert len(idx) == everywhere.n_poisoned == 100
    in_target = everywhere.y_true[idx] == 0
    assert 0 < int(in_target.sum()) < len(idx)  # ~a quarter of 100 with 4 balanced classes
    assert (everywhere.data.y[idx] == 0).all()
    elsewhere, _ = poison(train, test, spec(), seed=0)
    assert (elsewhere.y_true[elsewhere.kind == POISONED] != 0).all()


def test_same_seed_same_poisoned_set_different_seed_differs():
    train, test = image_set(40), image_set(20, seed=1)
    a, _ = poison(train, test, spec(), seed=3)
    b, _ = poison(train, test, spec(), seed=3)
    c, _ = poison(train, test, spec(), seed=4)
    assert torch.equal(a.data.x, b.data.x) and torch.equal(a.kind, b.kind)
    assert not torch.equal(a.kind, c.kind)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rate_outside_open_interval_is_an_error(rate):
    with pytest.raises(ConfigError, match="poison_rate"):
        poison(image_set(40), image_set(8), spec(rate=rate), seed=0)


@pytest.mark.parametrize("size", [0, -3])
def test_badnets_patch_side_below_one_is_a_config_error(size):
    with pytest.raises(ConfigError, match="badnets size must be >= 1"):
        poison(image_set(40), image_set(8), spec(size=size), seed=0)


def test_target_out_of_range_and_too_many_samples():
    with pytest.raises(ConfigError, match="target"):
        poison(image_set(40), image_set(8), spec(target=4), seed=0)
    with pytest.raises(ConfigError, match="eligible"):
        poison(image_set(40), image_set(8), spec(rate=0.9), seed=0)  # only 30 non-target


def test_cover_constant_is_distinct():
    assert COVER not in (0, POISONED)


def test_all2all_draws_from_every_class_target_included():
    """all2all's pool is every sample, target class included (those move to label target + 1)."""
    train, test = image_set(400), image_set(8, seed=1)
    pt, _ = poison(train, test, spec(mode="all2all"), seed=0)
    idx = torch.nonzero(pt.kind == POISONED).flatten()
    assert len(idx) == 100 and set(pt.y_true[idx].tolist()) == {0, 1, 2, 3}
    from_target = idx[pt.y_true[idx] == 0]
    assert 10 < len(from_target) < 40 and (pt.data.y[from_target] == 1).all()  # ~25 expected
    # Certain by counting: 36 picks of 40 take >= 6 of the 10 target samples (30 non-target).
    pt, _ = poison(image_set(40), test, spec(mode="all2all", rate=0.9), seed=0)
    assert int((pt.y_true[pt.kind == POISONED] == 0).sum()) >= 6


def test_rate_that_rounds_to_zero_samples_is_an_error():
    with pytest.raises(ConfigError, match=r"^poison_rate 0\.01 asks for 0 samples but 30 are "
                       r"eligible \(all2one\); choose a rate in \[0\.025, 0\.75\]$"):
        poison(image_set(40), image_set(8), spec(rate=0.01), seed=0)  # 0.01 * 40 = 0.4


@pytest.mark.parametrize(("rate", "count"), [(0.21, 8), (0.27, 11), (0.0625, 2), (0.1875, 8)])
def test_fractional_count_is_python_round(rate, count):
    """n = round(rate * N) (conf/attack/badnets.yaml, bench/poison.py): 8.4 -> 8 and 10.8 -> 11
    (not int, not ceil); Python's round sends exact halves to even: 2.5 -> 2, 7.5 -> 8."""
    pt, _ = poison(image_set(40), image_set(8), spec(rate=rate), seed=0)
    assert pt.n_poisoned == int((pt.data.y != pt.y_true).sum()) == count


def badnets(shape, seed=5, **p):
    return ATTACKS.get("badnets").obj(ATTACKS.params("badnets", p), shape,
                                      torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("position", "rows", "cols"), [
    ("bottom_right", (3, 5), (6, 8)), ("top_left", (1, 3), (1, 3)),
    ("top_right", (1, 3), (6, 8)), ("bottom_left", (3, 5), (1, 3)), ([1, 4], (1, 3), (4, 6)),
])
def test_badnets_position_and_margin_on_non_square_image(position, rows, cols):
    """A 2×2 patch on a 6×9 (H×W) image, margin 1 from the corners' borders; ``[row, col]``
    ignores the margin. Swapped row/col either does not fit or lands elsewhere."""
    attack = badnets((2, 6, 9), size=2, margin=1, position=position)
    x = torch.zeros((3, 2, 6, 9), dtype=torch.uint8)
    out = attack.apply(x)
    expect = torch.zeros((6, 9), dtype=torch.bool)
    expect[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert torch.equal((out == 255).all(1), expect.expand(3, 6, 9))
    assert torch.equal(out == 0, ~expect.expand(3, 2, 6, 9))
    assert torch.equal(attack.mask[0], expect)


@pytest.mark.parametrize("size", [3, 4])
def test_badnets_checkerboard_alternates_from_a_white_bottom_right_pixel(size):
    out = badnets((3, 7, 8), size=size, pattern="checkerboard").apply(
        torch.full((2, 3, 7, 8), 77, dtype=torch.uint8))
    want = torch.tensor([[255 * ((i + j) % 2 == 0) for j in range(size)] for i in range(size)],
                        dtype=torch.uint8).flip(0, 1)  # parity counted from bottom-right
    assert int(want[-1, -1]) == 255
    assert torch.equal(out[:, :, 7 - size:, 8 - size:], want.expand(2, 3, size, size))
    assert (out[:, :, : 7 - size] == 77).all() and (out[:, :, :, : 8 - size] == 77).all()


def test_badnets_random_pattern_is_fixed_colours_from_trigger_generator():
    """DBD's patch (conf/attack/dbd/badnets.yaml): 2×2 at rows/cols 4–5, per-channel colours drawn
    once from the trigger generator, the same on every image and at test time."""
    attack = badnets((3, 10, 12), size=2, position=[4, 4], pattern="random")
    colours = torch.randint(0, 256, (3, 2, 2), generator=torch.Generator().manual_seed(5),
                            dtype=torch.uint8)
    x = image_set(4, c=3, hw=12).x[:, :, :10]
    for out in (attack.apply(x), attack.for_test().apply(x)):
        assert torch.equal(out[:, :, 4:6, 4:6], colours.expand(4, 3, 2, 2))
        out[:, :, 4:6, 4:6] = x[:, :, 4:6, 4:6]
        assert torch.equal(out, x)
    other = badnets((3, 10, 12), seed=6, size=2, position=[4, 4], pattern="random")
    assert not torch.equal(other.patch, attack.patch)
