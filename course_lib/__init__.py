"""course_lib: the library behind the notebooks on prefill, decode and the KV cache.

Layers, from the bottom up (each module's docstring names the notebook that introduces it):

* ``config``, ``tokenizer``, ``data`` — the model's settings, its tokenizer, the offline corpus
* ``model`` — the reference GPT (GPT-2 architecture) with an opt-in trace and a KV cache
* ``sampling``, ``train``, ``checkpoint``, ``tiny`` — sampling, training, safetensors files,
  the shipped tiny model
* ``viz``, ``widgets``, ``perf`` — pictures, interactive views, and this machine's ceilings
* ``exercises`` — the notebooks' exercise checks, one module per notebook
* ``tiled`` — FlashAttention's ideas in numpy: online softmax, causal tiles, split-KV decode, RoPE
* ``parallel`` — tensor and pipeline parallelism over CPU processes with ``torch.distributed``
* ``engine`` — a prefill/decode engine: paged KV cache, continuous batching, chunked prefill,
  prefix cache, preemption, tensor parallel, an OpenAI-compatible server
"""

from .config import GPTConfig
from .errors import CheckpointError, ConfigError, CourseError, InputError, TokenizerError
from .model import GPT, KVCache, Trace
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "Trace", "Tokenizer", "CourseError", "ConfigError",
           "InputError", "TokenizerError", "CheckpointError", "default_device"]


def default_device() -> str:
    """'cuda' when an NVIDIA GPU is usable, else 'cpu' (notebooks/00_start_here.ipynb)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
