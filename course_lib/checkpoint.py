"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` in HF GPT-2's layout.

``transformers.GPT2LMHeadModel.from_pretrained(dir)`` loads what :func:`save` writes, and
:func:`load` reads what ``save_pretrained`` writes (with or without the ``transformer.``
prefix). Weights are read with safetensors only: never pickle, which can run code.
Introduced in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .model import GPT, parameter_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Buffers some transformers versions store beside the weights; they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def save(model: GPT, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors``; files are replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to transformer.wte.weight, as HF saves it
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, directory / WEIGHTS_NAME)
    tmp = directory / (CONFIG_NAME + ".tmp")
    model.config.save(tmp)
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def _canonical_name(key: str) -> str:
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def load_state(directory: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read and check a checkpoint; return its config and a state dict in our naming."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory (give the directory "
                              f"that holds {CONFIG_NAME} and {WEIGHTS_NAME})"
                              + (f": here {directory.parent}" if directory.name in (CONFIG_NAME, WEIGHTS_NAME) else ""))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            hint = " (pickled .bin checkpoints are not read: convert them to safetensors)" \
                if name == WEIGHTS_NAME and (directory / "pytorch_model.bin").exists() else ""
            raise CheckpointError(f"checkpoint {directory} is missing {name}{hint}")
    try:
        config = GPTConfig.load(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from None
    try:
        raw = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} is truncated or corrupt ({e}); "
                              "save or copy the checkpoint again") from None

    state = {_canonical_name(k): v for k, v in raw.items() if not k.endswith(_IGNORED_SUFFIXES)}
    expected = parameter_shapes(config)
    lm_head = state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory} does not match its config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"tensor {k} has shape {tuple(state[k].shape)} but the config "
                                  f"implies {shape}; config.json and model.safetensors disagree")
        if not state[k].dtype.is_floating_point:
            raise CheckpointError(f"tensor {k} has dtype {state[k].dtype}; weights must be floating point")
        if not torch.isfinite(state[k]).all():
            raise CheckpointError(f"tensor {k} contains NaN or infinite values; the checkpoint is damaged")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight; "
                              "the reference GPT ties them (untied heads are not supported)")
    return config, state


def from_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """An eval-mode :class:`GPT` that uses the tensors of ``state`` (our naming, no ``lm_head``) as
    its weights, as they are: no copy, no random initialisation."""
    model = GPT(config, device="meta")                # modules without memory or random values
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def load(directory: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> GPT:
    """Load a checkpoint directory as an eval-mode :class:`GPT`."""
    config, state = load_state(directory)
    return from_state(config, {k: v.to(device=device, dtype=dtype) for k, v in state.items()})
