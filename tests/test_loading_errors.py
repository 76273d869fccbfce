"""Bad model folders give typed library errors and one clear CLI line, never a crash."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mrs
from mrs.cli import main
from mrs.errors import ModelNotFoundError, NotAModelError, UnsupportedModelError, WeightsError


@pytest.fixture
def llama_copy(fixture_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(fixture_path("llama"), folder)
    return folder


@pytest.fixture
def sharded_copy(fixture_path, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(fixture_path("llama-sharded"), folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def cli_error(capsys, *args) -> str:
    assert main(list(args)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_missing_folder(tmp_path, capsys):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        mrs.load(str(tmp_path / "nope"))
    assert "does not exist" in cli_error(capsys, "generate", "hi", "--model", str(tmp_path / "nope"))


def test_unknown_model_name_suggests_pull(tmp_path):
    with pytest.raises(ModelNotFoundError, match="mrs pull"):
        mrs.load("someorg/somemodel", home=tmp_path)


def test_folder_without_config_json(llama_copy, capsys):
    (llama_copy / "config.json").unlink()
    with pytest.raises(NotAModelError, match="no config.json"):
        mrs.load(str(llama_copy))
    assert "config.json" in cli_error(capsys, "generate", "hi", "--model", str(llama_copy))


def test_unsupported_model_type(llama_copy, capsys):
    edit_config(llama_copy, model_type="gpt_oss_9000")
    with pytest.raises(UnsupportedModelError, match="gpt_oss_9000"):
        mrs.load(str(llama_copy))
    assert "not supported" in cli_error(capsys, "generate", "hi", "--model", str(llama_copy))


def test_unsupported_rope_type(llama_copy):
    edit_config(llama_copy, rope_parameters={"rope_type": "mystery", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="mystery"):
        mrs.load(str(llama_copy))


def test_shard_missing_from_the_index(sharded_copy, capsys):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded_copy / shard).unlink()
    with pytest.raises(WeightsError, match=shard):
        mrs.load(str(sharded_copy))
    assert shard in cli_error(capsys, "generate", "hi", "--model", str(sharded_copy))


def test_truncated_safetensors(llama_copy, capsys):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        mrs.load(str(llama_copy))
    assert "truncated" in cli_error(capsys, "generate", "hi", "--model", str(llama_copy))


def test_missing_unexpected_and_misshaped_tensors_are_named(llama_copy):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(WeightsError, match=name):
        mrs.load(str(llama_copy))
    save_file({**tensors, "model.extra.weight": np.zeros(3, np.float32)}, weights)
    with pytest.raises(WeightsError, match="model.extra.weight"):
        mrs.load(str(llama_copy))
    save_file({**tensors, name: np.zeros((3, 3), np.float32)}, weights)
    with pytest.raises(WeightsError, match=r"up_proj.weight has shape \(3, 3\)"):
        mrs.load(str(llama_copy))


def test_pickle_checkpoints_are_refused_with_the_reason(llama_copy):
    (llama_copy / "model.safetensors").rename(llama_copy / "pytorch_model.bin")
    with pytest.raises(NotAModelError, match="pickle"):
        mrs.load(str(llama_copy))


def test_invalid_sampling_values_from_the_cli(fixture_path, capsys):
    err = cli_error(capsys, "generate", "hi", "--model", str(fixture_path("llama")), "--top-p", "1.5")
    assert "top_p" in err
