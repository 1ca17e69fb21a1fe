"""GPTConfig: the hyper-parameters of a GPT-2-style model.

Field names are those of Hugging Face's GPT-2 ``config.json`` so that a checkpoint written by
the course loads in ``transformers`` and one written by ``transformers`` loads here.
Introduced in notebooks/00_start_here.ipynb and used from notebooks/01_tokens_and_embeddings.ipynb on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError

# Sanity limits: far above anything GPT-2 XL needs, low enough to catch a typo (n_embd=76800).
_LIMITS = {
    "vocab_size": (1, 1_000_000),
    "n_positions": (1, 1_000_000),
    "n_embd": (1, 65_536),
    "n_layer": (1, 1_024),
    "n_head": (1, 1_024),
}
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    n_positions: int = 128
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in GPT-2
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        for name, (lo, hi) in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config field {name!r} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise ConfigError(f"config field {name!r} = {value} is outside [{lo}, {hi}]")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head dimensions"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ConfigError(f"n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"use one of {SUPPORTED_ACTIVATIONS}"
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and 0 < self.layer_norm_epsilon < 1):
            raise ConfigError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0 <= p < 1):
                raise ConfigError(f"{name} must be a probability in [0, 1), got {p!r}")
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if tid is not None and not (isinstance(tid, int) and 0 <= tid < self.vocab_size):
                raise ConfigError(f"{name} = {tid!r} is not a token id in [0, {self.vocab_size})")

    # ----------------------------------------------------------------- (de)serialisation
    def to_hf_dict(self) -> dict:
        """The dict written as config.json; readable by transformers' GPT2Config."""
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], tie_word_embeddings=True,
                 n_ctx=self.n_positions, scale_attn_weights=True, use_cache=True)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a config.json dict (ours or transformers'); unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not a GPT-2 model")
        required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config is missing required field(s) {missing}; "
                              f"a GPT-2 config.json needs {list(required)}")
        unsupported = {k: d[k] for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                                          "add_cross_attention") if d.get(k)}
        if unsupported:
            raise ConfigError(f"config options {unsupported} are not supported by the reference model")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None
        return cls.from_dict(d)
