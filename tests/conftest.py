"""Shared fixtures: tiny synthetic data and a composed-and-shrunk run config."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bench.config import RunConfig, from_dict
from bench.data import ImageSet
from bench.train import Engine

# channels_last off: the plain layout the tiny runs were written with. Their cnn_small at width
# 0.25 has 1x1 stride-2 shortcuts with 4 and 8 input channels, where fp32 channels-last training
# corrupts the heap in oneDNN (uxlfoundation/oneDNN#6035); the engine now keeps those in the
# plain layout (onednn_unsafe_convs), and the whole suite also passes with channels_last on.
TINY = ["dataset=synthetic", "model.kwargs.width=0.25", "train.epochs=2", "progress=false",
        "dataset.synthetic.n_train=600", "dataset.synthetic.n_test=200", "amp=false",
        "channels_last=false", "train.augment.crop_pad=0"]


def compose_cfg(overrides: list[str] | None = None) -> RunConfig:
    """The real config tree (conf/), composed like the CLI does, with ``overrides``."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides or [])
    return from_dict(OmegaConf.to_container(dcfg, resolve=True))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> RunConfig:
        return compose_cfg([*TINY, f"results_dir={tmp_path / 'res'}", *extra])

    return make


def image_set(n: int = 40, num_classes: int = 4, c: int = 1, hw: int = 8, seed: int = 0
              ) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    return ImageSet(x=x, y=y, num_classes=num_classes, mean=(0.5,) * c, std=(0.25,) * c,
                    hflip=False, name="toy")


def cpu_engine(mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.25,)) -> Engine:
    """The engine of the mechanism tests: CPU, fp32, plain layout."""
    return Engine(torch.device("cpu"), mean, std, amp=False, channels_last=False)
