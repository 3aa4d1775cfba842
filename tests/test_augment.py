import torch

from bench.augment import AugmentCfg, augment, cutout, random_crop, random_flip


def ramp(b=64, h=8, w=8):
    x = torch.arange(h * w, dtype=torch.uint8).view(1, 1, h, w) + 1
    return x.repeat(b, 1, 1, 1)


def test_crop_offsets_are_per_sample_and_preserve_content():
    x = ramp()
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 5  # independent offsets, not one per batch
    # every output pixel is either padding (0) or a pixel of the input at a constant shift
    for o in out[:8]:
        nz = o[0] != 0
        vals = o[0][nz].long() - 1
        rows, cols = vals // 8, vals % 8
        ys, xs = torch.nonzero(nz, as_tuple=True)
        assert len(set((rows - ys).tolist())) == 1 and len(set((cols - xs).tolist())) == 1


def test_reflect_crop_equals_numpy_reflect_pad_at_replayed_offsets():
    """``pad_mode: reflect`` (DBD's RandomCrop padding) mirrors the border without repeating
    the edge pixel, as numpy's ``reflect``; offsets are drawn per image from the generator."""
    import numpy as np

    x = torch.randint(0, 256, (6, 2, 8, 8), generator=torch.Generator().manual_seed(3),
                      dtype=torch.uint8)
    out = random_crop(x, 3, torch.Generator().manual_seed(0), mode="reflect")
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
    for i in range(6):
        want = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert np.array_equal(out[i].numpy(), want), i
    assert len({(int(a), int(b)) for a, b in zip(dy, dx, strict=True)}) > 1


def test_flip_is_per_sample():
    x = ramp()
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped | same).all() and 10 < int(flipped.sum()) < 54


def test_cutout_zeroes_one_square_per_sample():
    x = torch.full((32, 1, 10, 10), 9, dtype=torch.uint8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    holes = (out == 0).flatten(1).sum(1)
    assert (holes >= 4).all() and (holes <= 16).all()  # clipped at the border
    assert len({tuple(torch.nonzero(o[0] == 0)[0].tolist()) for o in out}) > 5


def test_augment_deterministic_given_generator():
    cfg = AugmentCfg(crop_pad=2, flip=True, cutout=3)
    a = augment(ramp(), cfg, torch.Generator().manual_seed(1), hflip=False)
    b = augment(ramp(), cfg, torch.Generator().manual_seed(1), hflip=False)
    assert torch.equal(a, b)
