"""config.json round-trips exactly and refuses what it does not understand."""

from __future__ import annotations

import json

import pytest

from uniseg_cli.config import UniSegConfig, small_config
from uniseg_cli.errors import ConfigError
from uniseg_cli.tasks import UPSTREAM_TASKS


@pytest.mark.parametrize("config", [UniSegConfig(), small_config(license="CC BY-NC 4.0", source="test"),
                                    small_config(mirror_axes=(0, 1)), small_config(mirror_axes=())])
def test_config_round_trips_through_config_json(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert UniSegConfig.from_json_file(path) == config


def test_published_defaults():
    config = UniSegConfig()
    assert config.mirror_axes == (0, 1, 2) and "mirror_axes" not in config.to_dict()  # the published TTA
    assert config.patch_size == (64, 192, 192)
    assert config.stage_features == (32, 64, 128, 256, 320, 320)
    assert config.prompt_shape == (4, 6, 6)
    assert config.fusion_features == 82
    assert config.num_tasks == 11 and config.tasks == UPSTREAM_TASKS


def _edited(**arch):
    data = UniSegConfig().to_dict()
    data["architecture"].update(arch)
    return data


@pytest.mark.parametrize("data,message", [
    (_edited(patch_size=[64, 192, 190]), "must be divisible by the total stride"),
    (_edited(patch_size=[16, 32, 32]), "instance normalisation needs more than one"),
    (_edited(conv_kernels=[[3, 3, 3]] * 5), "conv_kernels: expected 6 .one per stage., got 5"),
    (_edited(base_features="32"), "base_features must be int"),
    (_edited(input_channels=[1, 1]), "input_channels must be distinct"),
    (_edited(num_classes=3), "reads 4 output channels but the network emits 3"),
    (_edited(dropout=0.1), "unknown key.s. dropout"),
    ({**UniSegConfig().to_dict(), "format_version": 9}, "format_version 9 is not supported"),
    ({**UniSegConfig().to_dict(), "tasks": []}, "at least one task"),
    ({**UniSegConfig().to_dict(), "mirror_axes": [3]}, r"mirror_axes must be distinct axes among 0, 1, 2 \(z, y, x\)"),
    ({**UniSegConfig().to_dict(), "mirror_axes": [1, 0]}, r"in order, got \[1, 0\]"),
])
def test_invalid_configs_are_refused_with_the_reason(data, message):
    with pytest.raises(ConfigError, match=message):
        UniSegConfig.from_dict(data)


def test_task_errors_name_the_task():
    data = UniSegConfig().to_dict()
    data["tasks"][1]["target_spacing"] = [3, 1.5]
    with pytest.raises(ConfigError, match="task 'kidney': target_spacing must be a list of 3 numbers"):
        UniSegConfig.from_dict(data)
    data = UniSegConfig().to_dict()
    data["tasks"][2]["id"] = 5
    with pytest.raises(ConfigError, match="ids must be 0…10 in order"):
        UniSegConfig.from_dict(data)


def test_a_model_can_carry_an_extra_task(tmp_path):
    extra = json.loads(json.dumps(UPSTREAM_TASKS[6].to_dict()))
    extra.update(id=11, key="gallbladder", name="gallbladder", aliases=[], labels=["gallbladder"])
    data = UniSegConfig().to_dict()
    data["tasks"].append(extra)
    config = UniSegConfig.from_dict(data)
    assert config.num_tasks == 12 and config.fusion_features == (320 + 12) // 4


def test_unreadable_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not a readable JSON file"):
        UniSegConfig.from_json_file(path)
