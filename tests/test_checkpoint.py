"""Checkpoints: safetensors + config.json, HF layout, and a clear error for every way they break."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model
from course_lib import checkpoint
from course_lib.config import GPTConfig
from course_lib.errors import CheckpointError

CONFIG = GPTConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)


@pytest.fixture
def saved(tmp_path):
    model = random_model(CONFIG)
    checkpoint.save(model, tmp_path)
    return model, tmp_path


def test_round_trip(saved):
    model, path = saved
    loaded = checkpoint.load(path)
    idx = torch.arange(10)[None]
    assert torch.equal(model(idx), loaded(idx))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not loaded.training


def test_files_are_hf_layout(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == 16
    names = set(load_file(str(path / "model.safetensors")))
    assert "transformer.h.1.attn.c_attn.weight" in names and "lm_head.weight" not in names


def test_no_pickle_is_ever_loaded(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled .bin checkpoints are not read"):
        checkpoint.load(path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file(saved, missing):
    _, path = saved
    (path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing {missing}"):
        checkpoint.load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_file_is_not_a_checkpoint_directory(saved, name):
    _, path = saved
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory") as e:
        checkpoint.load(path / name)
    assert "config.json and model.safetensors" in str(e.value) and str(path) in str(e.value)
    assert "does not exist" not in str(e.value)
    (path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        checkpoint.load_state(path / "notes.txt")


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_garbage_safetensors(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_wrong_shaped_tensor(saved):
    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(16, 32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"c_fc.weight has shape \(16, 32\) but the config implies \(16, 64\)"):
        checkpoint.load(path)


def test_missing_tensor(saved):
    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    del state["transformer.ln_f.bias"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*ln_f.bias"):
        checkpoint.load(path)


def test_nan_weights(saved):
    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    state["transformer.wpe.weight"][3, 2] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        checkpoint.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("n_layer"), "missing required field"),
    (lambda c: c.update(n_head=3), "divisible by n_head"),
    (lambda c: c.update(n_layer=3), "does not match its config"),
    (lambda c: c.update(vocab_size=-1), "vocab_size"),
])
def test_bad_config(saved, edit, message):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)


def test_config_not_json(saved):
    _, path = saved
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)


def test_save_is_atomic_and_overwrites(saved):
    model, path = saved
    checkpoint.save(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
