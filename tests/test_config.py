"""Config composition of every group option, and registry <-> YAML both ways."""

import pytest

from attacks import ATTACKS
from bench.cli import group_options
from bench.errors import ConfigError
from bench.models import list_models
from defenses import DEFENSES
from tests.conftest import compose_cfg


@pytest.mark.parametrize("group", ["dataset", "model", "attack", "defense", "train"])
def test_every_group_option_composes(group):
    for opt in group_options(group):
        cfg = compose_cfg([f"{group}={opt}"])
        section = getattr(cfg, group)
        if group == "attack" and opt == "none":
            assert section is None
        elif group in ("dataset", "attack", "defense"):
            assert section.name == opt


def test_registries_match_yaml_both_ways():
    assert set(group_options("attack")) == set(ATTACKS.names()) | {"none"}
    assert set(group_options("defense")) == set(DEFENSES.names())
    assert set(group_options("model")) == set(list_models()) | {"timm"}


def test_unknown_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown key.*bogus.*valid"):
        compose_cfg(["+attack.params.bogus=1"])
    with pytest.raises(ConfigError, match="unknown key.*nope"):
        compose_cfg(["+train.nope=3"])


def test_default_config_is_the_documented_default():
    cfg = compose_cfg()
    assert (cfg.dataset.name, cfg.model.name, cfg.attack.name, cfg.defense.name) == (
        "fashion_mnist", "cnn_small", "badnets", "none")
    assert cfg.attack.poison_rate == 0.1 and cfg.attack.target == 0
