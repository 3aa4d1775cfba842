"""Model zoo: a timm-style registry of CIFAR-style classifiers plus any timm model by name.

Every model splits into a backbone and one linear head, because DBD trains them separately::

    feats = model.features(x)   # [B, model.feature_dim], after global pooling + flatten
    logits = model.fc(feats)    # == model.head(feats) == model(x)

Local models (all take ``in_chans`` and any input of at least 16 px, thanks to adaptive pooling):

- ``cnn_small``: the CPU-scale default, a 3-stage ResNet sized for Fashion-MNIST on 2 cores.
- ``preact_resnet18``: BackdoorBench's ``models/preact_resnet.py`` (no BN-ReLU before pooling).
- ``resnet18``: DBD's CIFAR ResNet-18 (``model/network/resnet_cifar.py``), kaiming fan_out init.
- ``wrn16_1``: ABL's WideResNet-16-1 (``models/wresnet.py``), dropout 0, normal(0, √(2/n)) init.
- ``vgg16_bn``: CIFAR VGG16-BN with a 512→classes head. Deviations: max-pools use
  ``ceil_mode=True`` so 28 px inputs survive the five halvings (identical on 32 px inputs), and
  convs have no bias (BN removes it anyway; 4,224 fewer parameters than kuangliu's VGG16).
- ``timm/<name>``: ``timm.create_model(name, pretrained=False, ...)``; weights are never fetched.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import ConfigError

TIMM_PREFIX = "timm/"
MODELS: dict[str, Callable[..., nn.Module]] = {}


class ModelError(ConfigError):
    """An unknown model name or an unknown keyword argument for a model."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(num_classes, in_chans=3, **kwargs)`` under ``fn.__name__``."""
    if fn.__name__ in MODELS:
        raise ModelError(f"model {fn.__name__!r} is already registered")
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the local models, sorted (``timm/<name>`` is accepted on top of these)."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a freshly initialised classifier.

    Args:
        name: a key of ``MODELS`` or ``timm/<timm model name>``.
        num_classes: size of the logits.
        in_chans: image channels (1 for (Fashion-)MNIST, 3 otherwise).
        **kwargs: model-specific options (e.g. ``width`` for ``cnn_small``; timm kwargs for timm).

    Returns:
        A module with ``features(x) -> [B, feature_dim]``, ``fc``, ``head`` and ``feature_dim``.

    Raises:
        ModelError: unknown name, unknown kwarg, or a request for pretrained weights.
    """
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX) :], num_classes, in_chans, **kwargs)
    check_model(name, kwargs)
    return MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)


def check_model(name: str, kwargs: dict) -> None:
    """Raise ``ModelError`` for an unknown registered model or kwarg name (what can be told
    without building it; timm models are checked by timm when built)."""
    if name.startswith(TIMM_PREFIX):
        return
    if name not in MODELS:
        known = ", ".join(list_models())
        raise ModelError(f"unknown model {name!r}; known: {known}; or {TIMM_PREFIX}<name>")
    valid = [p for p in inspect.signature(MODELS[name]).parameters
             if p not in ("num_classes", "in_chans")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ModelError(
            f"model {name!r} got unknown kwargs {unknown}; valid: {', '.join(valid) or 'none'}"
        )


class Classifier(nn.Module):
    """``body``: images ``[B, C, H, W]`` -> ``[B, feature_dim]``; ``fc``: those -> logits.

    ``head`` is a class count (a new ``nn.Linear`` head) or an existing head module.
    """

    def __init__(self, body: nn.Module, feature_dim: int, head: int | nn.Module) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, head) if isinstance(head, int) else head

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features, ``[B, feature_dim]``, same dtype/device as ``x``."""
        return self.body(x)

    def head(self, feats: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` from features ``[B, feature_dim]``."""
        return self.fc(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` from images ``[B, C, H, W]`` (float, normalised)."""
        return self.fc(self.features(x))


class TimmClassifier(Classifier):
    """A timm model as ``body`` whose own classifier (shared, not copied) serves as ``fc``."""

    def __init__(self, model: nn.Module) -> None:
        fc = model.get_classifier()
        if isinstance(fc, nn.Linear):
            dim = fc.in_features
        else:  # num_classes=0 (Identity) or an exotic head
            dim = getattr(model, "head_hidden_size", None) or model.num_features
        super().__init__(model, dim, fc)

    def features(self, x: Tensor) -> Tensor:
        """Pre-logits features ``[B, feature_dim]`` (timm's pooling, norm and dropout included)."""
        return self.body.forward_head(self.body.forward_features(x), pre_logits=True)


def _create_timm(name: str, num_classes: int, in_chans: int, **kwargs) -> TimmClassifier:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a hard dependency
        raise ModelError(f"model 'timm/{name}' needs timm: pip install timm") from e
    if kwargs.pop("pretrained", False):
        raise ModelError("pretrained weights are not supported (nothing is downloaded)")
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}; see timm.list_models('*{name[:4]}*')")
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except TypeError as e:
        raise ModelError(f"bad kwargs {sorted(kwargs)} for timm model {name!r}: {e}") from e
    return TimmClassifier(model)


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 28, 28)) -> int:
    """Multiply-accumulates of one forward pass on a single ``input_size`` (C, H, W) image.

    Counts convolutions and matmuls (``FlopCounterMode`` FLOPs / 2); BN, ReLU, pooling are free.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


# --------------------------------------------------------------------------- building blocks


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation ResNet block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016); when the shape changes the shortcut is a 1×1 conv
    on the *pre-activated* input, as in BackdoorBench's PreActBlock and ABL's WRN BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


def _stages(block: type[nn.Module], cin: int, plan: Sequence[tuple[int, int, int]]) -> list:
    """One ``nn.Sequential`` per ``(width, depth, stride)`` of ``plan``; stride on its 1st block."""
    stages = []
    for width, depth, stride in plan:
        blocks = [block(cin, width, stride)] + [block(width, width) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        cin = width
    return stages


def _pool() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]


# --------------------------------------------------------------------------- registered models

_RESNET18 = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]  # (width, blocks, stride)


@register_model
def cnn_small(num_classes: int, in_chans: int = 3, width: float = 1.0) -> Classifier:
    """CPU-scale ResNet: 3×3 stem (16 ch) at full resolution, then three BasicBlock stages of
    widths (32, 64, 128), each halving the resolution (28→14→7→4).

    9.4 M MACs, 0.3 M parameters per 1×28×28 image; ~90% Fashion-MNIST test accuracy after 2
    epochs. Downsampling in stage 1 rather than in the stem keeps small triggers at full
    resolution in the first layer. ``width`` scales every channel count (tests use a tiny one).
    """
    stem_w, *widths = (max(4, round(c * width)) for c in (16, 32, 64, 128))
    body = nn.Sequential(
        _conv3x3(in_chans, stem_w),
        nn.BatchNorm2d(stem_w),
        nn.ReLU(inplace=True),
        *_stages(BasicBlock, stem_w, [(w, 1, 2) for w in widths]),
        *_pool(),
    )
    model = Classifier(body, widths[-1], num_classes)
    _init_kaiming(model)
    return model


@register_model
def preact_resnet18(num_classes: int, in_chans: int = 3) -> Classifier:
    """PreAct-ResNet-18 as in BackdoorBench: 3×3 stride-1 stem, [2,2,2,2] x 64–512, default init."""
    body = nn.Sequential(
        _conv3x3(in_chans, 64),
        *_stages(PreActBlock, 64, _RESNET18),
        *_pool(),
    )
    return Classifier(body, 512, num_classes)


@register_model
def resnet18(num_classes: int, in_chans: int = 3) -> Classifier:
    """CIFAR ResNet-18 as in DBD: 3×3 stride-1 stem, no max-pool, kaiming fan_out conv init."""
    body = nn.Sequential(
        _conv3x3(in_chans, 64),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        *_stages(BasicBlock, 64, _RESNET18),
        *_pool(),
    )
    model = Classifier(body, 512, num_classes)
    _init_kaiming(model)
    return model


@register_model
def wrn16_1(num_classes: int, in_chans: int = 3) -> Classifier:
    """WideResNet-16-1 as in ABL: widths 16/16/32/64, 2 pre-act blocks per stage, final BN-ReLU."""
    body = nn.Sequential(
        _conv3x3(in_chans, 16),
        *_stages(PreActBlock, 16, [(16, 2, 1), (32, 2, 2), (64, 2, 2)]),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        *_pool(),
    )
    model = Classifier(body, 64, num_classes)
    for m in model.modules():  # ABL's models/wresnet.py init
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register_model
def vgg16_bn(num_classes: int, in_chans: int = 3) -> Classifier:
    """CIFAR VGG16-BN: 13 conv-BN-ReLU, 5 max-pools (ceil mode), pool to 1×1, fc 512→classes."""
    layers: list[nn.Module] = []
    cin = in_chans
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [_conv3x3(cin, v), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return Classifier(nn.Sequential(*layers, *_pool()), 512, num_classes)


def _init_kaiming(model: nn.Module) -> None:
    """torchvision/DBD ResNet init: kaiming_normal fan_out for convs, BN weight 1 bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
