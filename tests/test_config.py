"""The pydantic config tree: every problem in one line, strings from --set coerced, one list per choice."""

from __future__ import annotations

from typing import get_args

import pytest
import yaml

from sdlora_dist.config import (
    Config,
    ConfigError,
    Interpolation,
    Normalize,
    Optimizer,
    Precision,
    ShardPolicy,
    config_from_dict,
    config_reference,
    config_root,
    config_yaml,
    load_config,
)
from sdlora_dist.errors import UserError


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=list(overrides))
    assert isinstance(err.value, UserError)
    return str(err.value)


def test_every_problem_is_reported_at_once_with_key_and_value():
    message = _error(
        "train.optimizer=adamm",
        "data.hflip=1.5",
        "adapter.rank=-3",
        "train.epochs=many",
        "adapter.blocks=[0,-1]",
        "train.milestones=[5,2]",
        "data.train_crop_scale=[0.9,0.1]",
        "adapter.rank_schedule=[[1,4],[0,2]]",
    )
    assert message.startswith("invalid config: ") and "\n" not in message
    problems = message.removeprefix("invalid config: ").split("; ")
    assert sorted(problems) == sorted(
        [
            "train.optimizer: must be one of sgd, adam, adamw (got 'adamm')",
            "data.hflip: must be in [0, 1] (got 1.5)",
            "adapter.rank: must be > 0 (got -3)",
            "train.epochs: expected an integer (got 'many')",
            "adapter.blocks[1]: must be >= 0 (got -1)",
            "train.milestones: must be ascending (got [5, 2])",
            "data.train_crop_scale: must be [lo, hi] with 0 < lo <= hi <= 1 (got [0.9, 0.1])",
            "adapter.rank_schedule: the first entry must start at task 0 and task indices must be strictly "
            "ascending (got [[1, 4], [0, 2]])",
        ]
    )


def test_unknown_keys_show_the_value_received_and_the_valid_keys():
    message = _error("train.lrr=0.5", "colour=blue")
    expected = "train.lrr: unknown key, expected one of checkpoint_every, checkpoint_every_s, deterministic, drift, "
    assert expected in message
    assert message.split("train.lrr: ")[1].split(";")[0].endswith("(got 0.5)")
    assert "colour: unknown key, expected one of adapter, data, model, run_dir, train (got 'blue')" in message


def test_a_section_given_a_scalar_and_non_finite_numbers_are_errors():
    message = _error("model=3", "train.lr=.inf", "train.first_task_lr=0")
    assert "model: expected a mapping (got 3)" in message
    assert "train.lr: must be a finite number (got inf)" in message
    assert "train.first_task_lr: must be a positive number (got 0)" in message


def test_strings_from_set_and_yaml_are_coerced_as_before():
    cfg = load_config(overrides=["adapter.kd=true", "train.lr='0.05'", "train.epochs='3'", "run_dir=2024"])
    assert cfg.adapter.kd is True and cfg.train.lr == 0.05 and cfg.train.epochs == 3 and cfg.run_dir == "2024"
    assert load_config(overrides=["adapter.kd=0"]).adapter.kd is False
    # an int given for a float is stored as a float, so config.yaml and the hash match the dataclass era's
    assert load_config(overrides=["adapter.init_magnitude=1"]).to_dict()["adapter"]["init_magnitude"] == 1.0
    assert isinstance(load_config(overrides=["adapter.init_magnitude=1"]).adapter.init_magnitude, float)


def test_round_trip_hash_and_mutation():
    cfg = load_config(overrides=["adapter.rank_schedule=[[0,4],[2,3]]", "model.kwargs={depth: 3}"])
    again = config_from_dict(yaml.safe_load(config_yaml(cfg)))
    assert again == cfg and again.hash() == cfg.hash()
    # A tripwire: the hash of the defaults moves only when a field is added or a default changes (update it then,
    # in the same commit); it must not move when the config's implementation changes.
    assert Config().hash() == "2fd66a9bb8f93321"
    cfg.run_dir = "elsewhere"  # code sets these after loading; run_dir is not part of the hash
    assert cfg.to_dict()["run_dir"] == "elsewhere" and cfg.hash() == again.hash()
    cfg.data.shards = "/tmp/shards"
    assert cfg.to_dict()["data"]["shards"] == "/tmp/shards" and cfg.hash() != again.hash()


def test_every_name_table_covers_exactly_its_literal():
    from sdlora_dist import preprocess, recipe
    from sdlora_dist.data import reading, transforms
    from sdlora_dist.jobs import distributed

    assert set(recipe.OPTIMIZERS) == set(get_args(Optimizer))
    assert set(preprocess.NORMALIZE_STATS) == set(get_args(Normalize))
    assert set(distributed.PRECISIONS) == set(get_args(Precision)) - {"auto"}
    assert set(reading.POLICIES) == set(get_args(ShardPolicy))
    assert set(transforms.INTERPOLATIONS) == set(get_args(Interpolation))


def test_reference_shows_choices_readably_and_config_root_holds_both_folders():
    assert "| `train.optimizer` | `'sgd' \\| 'adam' \\| 'adamw'` | `\"sgd\"` |" in config_reference()
    assert (config_root() / "benchmarks" / "digits.yaml").is_file()
    assert (config_root() / "deepspeed" / "template.json").is_file()
