"""The configuration system: defaults, files, overrides, type checks, saving."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import fileio
import pytest
import runconfig
from runconfig import ConfigError, build_config


def test_defaults_are_the_config_constants():
    cfg = runconfig.default_config()
    assert cfg["PATCH_SIZE"] == 64 and cfg["PATCH_LENGTH"] == 512 and cfg["LORA_R"] == 8
    assert cfg["LORA_TARGET_MODULES"] == ["query", "key", "value"]
    assert cfg["CLAMP3_WEIGHTS_PATH"].startswith("code/weights_clamp3_c2_h_size_768")


def test_overrides_are_type_checked():
    cfg = build_config(overrides=["--LORA_R=4", "--LORA_LEARNING_RATE=3e-4", "--LORA_DROPOUT=0",
                                  "--LORA_TARGET_MODULES=['query','value']", "--TEXT_MODEL_NAME=/tmp/tok"])
    assert cfg["LORA_R"] == 4 and cfg["LORA_LEARNING_RATE"] == 3e-4 and cfg["LORA_DROPOUT"] == 0.0
    assert isinstance(cfg["LORA_DROPOUT"], float)
    assert cfg["LORA_TARGET_MODULES"] == ["query", "value"] and cfg["TEXT_MODEL_NAME"] == "/tmp/tok"
    with pytest.raises(ConfigError, match="LORA_R .* must be an integer"):
        build_config(overrides=["--LORA_R=four"])
    with pytest.raises(ConfigError, match="must hold str items"):
        build_config(overrides=["--LORA_TARGET_MODULES=[1, 2]"])
    with pytest.raises(ConfigError, match="unknown config key 'LORA_RANK'"):
        build_config(overrides=["--LORA_RANK=4"])


def test_config_files_py_and_json(tmp_path):
    py = tmp_path / "exp.py"
    py.write_text("LORA_R = 16\nLORA_ALPHA = 32\n_helper = 3\n")
    js = tmp_path / "exp.json"
    js.write_text(json.dumps({"LORA_NUM_EPOCHS": 2}))
    assert build_config(py)["LORA_R"] == 16
    cfg = build_config(js, ["--LORA_NUM_EPOCHS=3"])
    assert cfg["LORA_NUM_EPOCHS"] == 3  # the command line wins over the file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"LORA_EPOCHS": 2}))
    with pytest.raises(ConfigError, match="did you mean LORA_NUM_EPOCHS"):
        build_config(bad)


def test_parse_args_separates_script_options(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--get_global", action="store_true")
    args, cfg = runconfig.parse_args(parser, ["--get_global", "--SEED=7"])
    assert args.get_global and cfg["SEED"] == 7
    with pytest.raises(SystemExit):
        runconfig.parse_args(parser, ["--nonsense"])
    assert "unrecognized argument '--nonsense'" in capsys.readouterr().err
    saved = runconfig.save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads(saved.read_text())["config"]["SEED"] == 7


def test_relative_paths_resolve_against_the_repository():
    assert fileio.repo_path("data/x") == fileio.REPO_ROOT / "data" / "x"
    assert fileio.repo_path("/abs/x") == Path("/abs/x")
