"""Sampling from the trained model with a temperature slider.

``sample_text`` is the plain function; :class:`SamplingExplorer` wires it to a prompt box, a
temperature slider and a seed. Introduced in notebooks/06_tiny_gpt.ipynb.
"""

from __future__ import annotations

import math

import ipywidgets as widgets
import torch

from ..errors import InputError
from ..sampling import check_sampling_args
from .common import Explorer, prompt_ids


def sample_text(model, tokenizer, prompt: str, temperature: float = 0.8, max_new_tokens: int = 40,
                seed: int = 0, top_k: int | None = None) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens (temperature 0: greedy)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise InputError(f"temperature must be a number >= 0, got {temperature!r}")
    check_sampling_args(max_new_tokens, float(temperature), top_k)
    room = model.config.n_positions - max_new_tokens
    ids = prompt_ids(tokenizer, prompt, room, reserved=max_new_tokens)
    device = model.transformer.wte.weight.device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=float(temperature),
                         top_k=top_k, seed=seed)
    return tokenizer.decode(out[0].tolist())


def next_token_table(model, tokenizer, prompt: str, temperature: float = 1.0, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens and their probabilities at ``temperature`` (> 0)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"temperature must be > 0 here, got {temperature!r}")
    ids = prompt_ids(tokenizer, prompt, model.config.n_positions)
    device = model.transformer.wte.weight.device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device), last_only=True)[0]   # (V,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top = torch.topk(probs, k)
    return [(tokenizer.tokens([i])[0], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


class SamplingExplorer(Explorer):
    """Notebook 06: prompt, temperature and seed → a sampled continuation and the next-token odds."""

    def __init__(self, model, tokenizer, prompt: str = "The for statement", temperature: float = 0.8,
                 max_new_tokens: int = 40):
        self.model, self.tokenizer = model, tokenizer
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="95%"))
        self.temperature = widgets.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                               description="temperature", continuous_update=False,
                                               style={"description_width": "initial"})
        self.seed = widgets.IntSlider(value=0, min=0, max=20, description="seed", continuous_update=False)
        self.max_new_tokens = max_new_tokens
        super().__init__([self.prompt, widgets.HBox([self.temperature, self.seed])],
                         watch=[self.prompt, self.temperature, self.seed])
        self.image.layout.display = "none"
        self.update()

    def compute(self):
        t = self.temperature.value
        text = sample_text(self.model, self.tokenizer, self.prompt.value, t, self.max_new_tokens, self.seed.value)
        odds = next_token_table(self.model, self.tokenizer, self.prompt.value, max(t, 1e-3), k=5)
        table = "  ".join(f"{tok!r}:{p:.2f}" for tok, p in odds)
        mode = "greedy (argmax)" if t == 0 else f"temperature {t:.2f}"
        return f"{mode}, seed {self.seed.value}\nnext-token odds: {table}\n\n{text}", b""
