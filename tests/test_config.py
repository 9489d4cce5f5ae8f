"""params.yaml is the single source of settings: strict, typed, and every preset valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from segan.config import ConfigError, load_params, params_from_dict
from segan.preset import preset_command

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.train.g_lambda == 1000.0 and params.model.residual
    assert params.train.stft_lambda > 0 and params.model.kernel_size == 15
    assert params.prepare.window % 2 ** len(params.model.g_channels) == 0


@pytest.mark.parametrize("override, needle", [
    ({"train.g_lambdaa": 1}, "unknown key train.g_lambdaa"),
    ({"train.g_lambda": "high"}, "train.g_lambda: expected a number"),
    ({"train.batch_size": 0}, "train.batch_size: expected a value >= 1"),
    ({"train.batch_size": 2.5}, "train.batch_size: expected an integer"),
    ({"train.optimizer": "sgd"}, "train.optimizer: expected one of ['adam', 'rmsprop']"),
    ({"train.compile": "yes"}, "train.compile: expected true or false"),
    ({"prepare.hop": 20000}, "prepare.hop: expected at most prepare.window"),
    ({"prepare.window": 1000, "prepare.hop": 500}, "prepare.window: expected a multiple of"),
    ({"model.kernel_size": 30}, "model.kernel_size: expected an odd number"),
    ({"train.betas": [0.5]}, "train.betas: expected two numbers"),
    ({"data.source": "folder"}, "data.folder.clean_dir: required"),
    ({"gate.tolerances": {"pesq": "x"}}, "gate.tolerances.pesq: expected a number"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", override)
    assert needle in str(err.value)
    assert "params.yaml" in str(err.value)


def test_unknown_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key trian"):
        params_from_dict({"trian": {}})
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_paper_preset_prints_valid_overrides():
    result = CliRunner().invoke(preset_command, [str(REPO / "presets/paper.yaml"),
                                                 "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    args = result.output.split()
    overrides = {}
    for flag, pair in zip(args[::2], args[1::2]):
        assert flag == "-S"
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    params = load_params(REPO / "params.yaml", overrides)
    assert params.data.source == "valentini" and params.train.optimizer == "rmsprop"
    assert params.model.g_channels[-1] == 1024 and params.train.epochs == 86
    # the paper's architecture and the seed's loss
    assert params.model.kernel_size == 31 and params.model.resize_layers == 0 and not params.model.residual
    assert params.train.stft_lambda == 0.0 and params.train.g_lambda == 100.0


def test_preset_write_and_bad_preset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    good = tmp_path / "good.yaml"
    good.write_text("train.g_lambda: 50\n")
    result = CliRunner().invoke(preset_command, [str(good), "--params", str(params), "--write"])
    assert result.exit_code == 0, result.output
    assert load_params(params).train.g_lambda == 50.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.g_lambda: fifty\n")
    result = CliRunner().invoke(preset_command, [str(bad), "--params", str(params)])
    assert result.exit_code != 0 and "train.g_lambda" in result.output
