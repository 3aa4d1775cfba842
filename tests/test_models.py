"""Tests for bench.models: registry, the features/fc split, architectures' sizes, timm wrapping."""

import math

import pytest
import torch
from torch import nn

from bench.models import (
    MODELS,
    ModelError,
    count_macs,
    create_model,
    list_models,
    register_model,
)

LOCAL = ["cnn_small", "preact_resnet18", "resnet18", "vgg16_bn", "wrn16_1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-2 forwards are latency-bound: one thread avoids OpenMP barrier stalls on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_matches_list_models():
    assert list_models() == sorted(MODELS) == LOCAL


def test_register_model_refuses_duplicates():
    with pytest.raises(ModelError, match="already registered"):
        register_model(MODELS["cnn_small"])


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_features_head_split(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=in_chans).eval()
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (model.feature_dim, 10)
    for size in (28, 32):
        x = torch.randn(2, in_chans, size, size)
        with torch.no_grad():
            feats = model.features(x)
            logits = model(x)
        assert feats.shape == (2, model.feature_dim)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(model.fc(feats), logits)
        torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize("name", LOCAL)
def test_smallest_input_trains(name):
    """16 px is the documented minimum; a train-mode step must give finite gradients everywhere."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3).train()
    loss = model(torch.randn(2, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "name,params",
    [  # reference counts of the usual CIFAR implementations (10 classes, 3 channels)
        ("preact_resnet18", 11_171_146),
        ("resnet18", 11_173_962),
        ("wrn16_1", 175_066),
        ("vgg16_bn", 14_728_266 - 4_224),  # conv biases before BN dropped (redundant with BN)
    ],
)
def test_reference_parameter_counts(name, params):
    model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params


def test_cnn_small_budget():
    model = create_model("cnn_small", num_classes=10, in_chans=1)
    macs = count_macs(model, (1, 28, 28))
    assert 3e6 < macs < 3e7
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 1e6
    assert count_macs(model, (1, 28, 28)) == macs and model.training  # no side effects


def test_cnn_small_width_scales():
    tiny = create_model("cnn_small", num_classes=10, in_chans=1, width=0.25)
    full = create_model("cnn_small", num_classes=10, in_chans=1)
    assert tiny.feature_dim == 32 and full.feature_dim == 128
    assert count_macs(tiny) < count_macs(full) / 8
    assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_inits_follow_sources():
    resnet = create_model("resnet18", num_classes=10)
    bns = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in bns)
    conv = resnet.body[0]  # kaiming fan_out: std = sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
    wrn = create_model("wrn16_1", num_classes=10)
    last_conv = [m for m in wrn.modules() if isinstance(m, nn.Conv2d)][-1]  # 64 -> 64, 3x3
    assert last_conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
    assert (wrn.fc.bias == 0).all()


def test_same_seed_same_weights():
    torch.manual_seed(1)
    a = create_model("wrn16_1", num_classes=10)
    torch.manual_seed(1)
    b = create_model("wrn16_1", num_classes=10)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=k)


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError) as e:
        create_model("nope", num_classes=10)
    msg = str(e.value)
    assert "unknown model 'nope'" in msg and "timm/<name>" in msg
    assert all(name in msg for name in LOCAL)


def test_unknown_kwarg_lists_valid_ones():
    with pytest.raises(ModelError, match=r"unknown kwargs \['depth'\]; valid: width"):
        create_model("cnn_small", num_classes=10, depth=3)
    with pytest.raises(ModelError, match="valid: none"):
        create_model("resnet18", num_classes=10, width=2)


def test_timm_model_wrapped():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model("timm/resnet10t", num_classes=7, in_chans=1).eval()
    assert model.fc is model.body.get_classifier()
    assert model.feature_dim == 512
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in model.body.parameters())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        reference = model.body(x)
    assert feats.shape == (2, 512) and logits.shape == (2, 7)
    torch.testing.assert_close(model.head(feats), logits)
    torch.testing.assert_close(logits, reference)
    assert isinstance(model.body, timm.models.ResNet)


def test_timm_errors():
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet_nope'.*timm\.list_models"):
        create_model("timm/resnet_nope", num_classes=10)
    with pytest.raises(ModelError, match="pretrained"):
        create_model("timm/resnet10t", num_classes=10, pretrained=True)
    with pytest.raises(ModelError, match="bad kwargs"):
        create_model("timm/resnet10t", num_classes=10, bogus_option=1)


def test_engine_keeps_onednn_unsafe_convs_out_of_channels_last():
    """fp32 channels-last training on a CPU corrupts the heap in oneDNN's 1x1 strided
    convolutions with few input channels (cnn_small at width 0.25: 4 and 8). The engine keeps
    exactly those in the default layout, feeds them contiguous input, and training then runs;
    full-width models are placed as before."""
    from bench.train import Engine, onednn_unsafe_convs

    assert onednn_unsafe_convs(create_model("cnn_small", 10, 1)) == []
    narrow = create_model("cnn_small", 10, 1, width=0.25)
    unsafe = onednn_unsafe_convs(narrow)
    assert [narrow.get_submodule(n).in_channels for n in unsafe] == [4, 8]
    eng = Engine(torch.device("cpu"), (0.5,), (0.25,), amp=False, channels_last=True)
    placed = eng.place(narrow)
    seen = {}
    for name, m in placed.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels > 1:  # a one-channel weight has no layout to tell apart
                default = torch.empty(m.weight.shape).stride()
                assert (m.weight.stride() == default) == (name in unsafe), name
            m.register_forward_hook(lambda mod, a, out, n=name: seen.__setitem__(
                n, a[0].is_contiguous() and a[0].shape[1] > 1))
    placed(eng.prep(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)))
    assert [n for n, contiguous in seen.items() if contiguous] == unsafe  # the pre-hook's work
    bf16 = Engine(torch.device("cpu"), (0.5,), (0.25,), amp=True, channels_last=True)
    conv = bf16.place(create_model("cnn_small", 10, 1, width=0.25)).get_submodule(unsafe[0])
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # bf16: not affected


def test_narrow_model_trains_in_fp32_channels_last():
    """The crash itself, in a child process (it aborts the interpreter): 30 steps of cnn_small
    at width 0.25 placed by the engine with channels_last, fp32, batch 64."""
    import subprocess
    import sys

    code = """if 1:
        import torch
        from bench.models import create_model
        from bench.train import Engine
        torch.set_num_threads(1)
        torch.manual_seed(0)
        eng = Engine(torch.device("cpu"), (0.5,), (0.25,), amp=False, channels_last=True)
        m = eng.place(create_model("cnn_small", 10, 1, width=0.25))
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(30):
            x = eng.prep(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8))
            loss = m(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print("trained", torch.isfinite(loss).item())
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "trained True" in out.stdout, out.stderr[-500:]
