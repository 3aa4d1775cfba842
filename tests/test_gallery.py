"""Trigger gallery: rows come from the real harness, residuals are exact, the PNG is valid."""

from __future__ import annotations

import numpy as np
import pytest

import bench.gallery as G
from attacks import ATTACKS
from bench.data import load_dataset
from bench.errors import ConfigError


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")  # 2000/500 samples, 1×16×16, 4 classes


def test_gallery_writes_png(tmp_path):
    out = G.gallery("synthetic", ["badnets", "blended"], out=tmp_path / "g.png")
    data = out.read_bytes()
    assert out == tmp_path / "g.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temp file left behind


def test_badnets_residual_is_exactly_the_patch(synthetic):
    (row,) = G.gallery_rows(synthetic, ["badnets"])
    s = row.sample
    expected = np.zeros((16, 16), bool)
    expected[13:, 13:] = True  # default: 3×3 white patch, bottom-right, margin 0
    assert s.clean.shape == s.poisoned.shape == s.residual.shape == (16, 16)
    assert np.array_equal(s.residual != 0, expected)
    assert (s.poisoned[expected] == 255).all()
    assert np.array_equal(s.poisoned[~expected], s.clean[~expected])
    assert s.changed == 9 and s.linf == int(255 - s.clean[expected].min())
    assert s.y_from != 0 and s.y_to == 0  # all2one, target 0, drawn from non-target samples
    assert row.cover is None
    assert np.array_equal(s.clean, synthetic[0].x[s.index, 0].numpy())


def test_blended_residual_is_bounded_by_alpha(synthetic):
    (row,) = G.gallery_rows(synthetic, ["blended"])
    alpha = row.spec.params.alpha
    assert alpha == 0.2  # from conf/attack/blended.yaml
    # round((1-a)x + a t) - x = a (t - x) up to rounding: at most a*255 + 0.5
    assert 0 < row.sample.linf <= int(alpha * 255 + 0.5)


def test_wanet_cover_sample_keeps_its_label(synthetic):
    (row,) = G.gallery_rows(synthetic, ["wanet"])
    assert row.cover is not None and row.cover.index != row.sample.index
    assert row.cover.y_to == row.cover.y_from
    assert row.cover.linf > 0


def test_n_rows_per_attack_and_determinism(synthetic):
    a = G.gallery_rows(synthetic, ["badnets"], seed=3, n=2)
    b = G.gallery_rows(synthetic, ["badnets"], seed=3, n=2)
    assert len(a) == 2 and a[0].sample.index < a[1].sample.index
    assert [r.sample.index for r in a] == [r.sample.index for r in b]


def test_spec_comes_from_the_yaml():
    spec = G.attack_spec("sig", "fashion_mnist")
    assert (spec.poison_rate, spec.target, spec.label_mode) == (0.05, 0, "clean_label")
    assert spec.params == ATTACKS.params("sig", {"delta": 40, "f": 6, "test_delta": None})


def test_unknown_attack_is_the_registry_error(synthetic, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^unknown attack 'wannet'; known: .*badnets"):
        G.gallery_rows(synthetic, ["wannet"])
    with pytest.raises(SystemExit) as exc:
        G.main(["--dataset", "synthetic", "--attacks", "wannet", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: unknown attack 'wannet'; known: ") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_default_skips_failing_attacks_explicit_raises(synthetic, monkeypatch, capsys):
    def fake(train, test, name, seed=0, n=1):
        if name == "blended":
            raise RuntimeError("surrogate too slow\nsecond line")
        return [name]

    monkeypatch.setattr(G, "attack_rows", fake)
    assert G.gallery_rows(synthetic) == [n for n in ATTACKS.names() if n != "blended"]
    assert "note: skipped blended: RuntimeError: surrogate too slow\n" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="surrogate too slow"):
        G.gallery_rows(synthetic, ["badnets", "blended"])


def test_rgb_rows_are_hwc_and_draw(tmp_path):
    rgb = load_dataset("synthetic", synthetic={"channels": 3, "n_train": 400, "n_test": 100})
    (row,) = G.gallery_rows(rgb, ["badnets"])
    assert row.sample.clean.shape == row.sample.residual.shape == (16, 16, 3)
    assert row.sample.changed == 9  # a pixel counts once, not once per channel
    G.save_png(G.draw([row]), tmp_path / "rgb.png")
    assert (tmp_path / "rgb.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("repeat", [1, 2])
def test_figure_title_clears_the_panel_titles(synthetic, repeat):
    """Also at the committed gallery's ten rows, where the title once covered the first row's
    panel titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = G.gallery_rows(synthetic, ["badnets", "blended", "wanet", "sig", "bpp"]) * repeat
    fig = G.draw(rows, "fashion_mnist: first 2000 train samples poisoned, seed 0")
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    panel_tops = [ax.title.get_window_extent(renderer).y1 for ax in fig.axes if ax.get_title()]
    assert title.y0 > max(panel_tops)
