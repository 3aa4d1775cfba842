"""Config composition of every group option, and registry <-> YAML both ways."""

from dataclasses import replace

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


@pytest.mark.parametrize("overrides, match", [
    (["train.optimizer=adamw"], r"^train: unknown optimizer 'adamw'; known: sgd, adam$"),
    (["train.schedule=step"], r"^train: unknown schedule 'step'"),
    (["train.batch_size=0"], r"^train: epochs must be >= 0 and batch_size"),
    (["defense=abl", "defense.params.isolation.eval_batch_size=0"],
     r"^defense 'abl'\.isolation: epochs must be >= 0"),
    (["defense=abl", "defense.params.finetune.optimizer=rmsprop"],
     r"^defense 'abl'\.finetune: unknown optimizer"),
    (["defense=abl", "+defense.params.finetune.eval_batch_size=512"],
     r"abl finetune\.eval_batch_size is not used .*isolation\.eval_batch_size"),
    (["defense=abl", "defense.params.ascent=sign"], r"abl ascent must be flooding or lga"),
    (["attack.target=1.5"], r"^attack\.target must be int, got 1\.5$"),
    (["attack.poison_rate=abc"], r"^attack\.poison_rate must be float, got 'abc'$"),
    (["seed=abc"], r"^seed must be int, got 'abc'$"),
    (["channels_last=abc"], r"^channels_last must be bool, got 'abc'$"),
    (["dataset.limit_train=ten"], r"^dataset\.limit_train must be int \| None, got 'ten'$"),
    (["train.milestones=[a]"], r"^train\.milestones must be tuple\[int, \.\.\.\]"),
    (["attack.params.size=2.5"], r"^attack 'badnets'\.size must be int, got 2\.5$"),
    (["dataset.limit_train=-5"], r"^dataset: limit_train must be >= 1 or null"),
    (["device=tpu0"], r"^unknown device 'tpu0'; use auto, cpu, cuda"),
    (["+model.kwargs.depth=3"], r"^model: model 'cnn_small' got unknown kwargs \['depth'\]"),
    (["dataset.limit_test=0"], r"^dataset: limit_test must be >= 1 or null"),
    (["defense=abl", "defense.params.gamma=0"], r"abl gamma must be > 0"),
    (["defense=abl", "defense.params.unlearn.normalize=true"], r"abl .* must share normalize"),
    (["defense=dbd", "defense.params.split.epsilon=1.5"], r"dbd split\.epsilon must be in"),
    (["defense=dlp", "defense.params.filter.ratio=0"], r"dlp filter\.ratio must be in"),
])
def test_impossible_values_fail_when_the_config_is_built(overrides, match):
    """Values no stage can run with are rejected by ``from_dict``, before any data, attack or
    training work, with one line naming the section."""
    with pytest.raises(ConfigError, match=match) as e:
        compose_cfg(overrides)
    assert "\n" not in str(e.value)


def test_values_take_their_field_type():
    """Ints widen to float, lists become tuples (so equal settings hash equally), and a text
    field takes a number as its text (results_dir=2024 arrives as an int)."""
    cfg = compose_cfg(["train.lr=1", "train.milestones=[3,6]", "results_dir=2024"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == (3, 6)
    assert cfg.results_dir == "2024"


@pytest.mark.parametrize("overrides, ok", [
    (["results_dir=runs/${now:%Y%m%d}", "seed=0,1"], True),  # resolved per job, as Hydra does
    (["model.kwargs.width=0.5,0.25"], True),
    (["+model.kwargs.depth=1,2"], False),
    (["device=cpu,tpu0"], False),
])
def test_sweep_validation_builds_each_job_as_it_will_run(overrides, ok):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from bench.cli import ValidateSweep

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", [], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = overrides  # the command line of a multirun
        if ok:
            ValidateSweep().on_multirun_start(cfg)
        else:
            with pytest.raises(SystemExit) as e:
                ValidateSweep().on_multirun_start(cfg)
            assert e.value.code == 2


def test_a_partial_nested_section_keeps_the_defense_defaults():
    """Through the Python API a nested section may be given in part: the keys it leaves out
    keep the defense's own recipe (ABL's isolation is SGD-Nesterov at lr 0.1, constant), not
    the generic ``TrainCfg`` defaults."""
    from defenses.abl import ABLParams

    p = DEFENSES.params("abl", {"isolation": {"epochs": 5}})
    assert p.isolation == replace(ABLParams().isolation, epochs=5)


def test_default_config_is_the_documented_default():
    cfg = compose_cfg()
    assert (cfg.dataset.name, cfg.model.name, cfg.attack.name, cfg.defense.name) == (
        "fashion_mnist", "cnn_small", "badnets", "none")
    assert cfg.attack.poison_rate == 0.1 and cfg.attack.target == 0
