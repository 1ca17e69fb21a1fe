"""course_lib.engine: a prefill/decode engine for GPT-2-family models.

The path of a request, one file per idea (read them in this order):

``llm.py`` (public :class:`LLM`) → ``engine.py`` (the step loop) → ``scheduler.py`` (who gets
how many tokens) → ``block_manager.py`` (paged KV blocks, prefix cache) → ``runner.py`` (flat
batch through the weights, CUDA graphs; whole-step graphs in ``step_graphs.py``) → ``attention.py``
/ ``triton_decode.py`` / ``triton_unified.py`` + ``attention_tiles.py`` (attention over the paged
``kv_cache.py``) → ``sampler.py``; around them ``sequence.py`` (request state),
``metrics.py`` (ledger, MFU/MBU, TTFT/TPOT) and ``snapshot.py`` (the glass box).
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from .engine import LLMEngine
from .llm import LLM, RequestOutput, StreamEvent
from .metrics import Ledger, RequestMetrics, StepRecord, step_bytes, step_flops
from .sequence import SamplingParams, Sequence

__all__ = ["LLM", "LLMEngine", "SamplingParams", "Sequence", "RequestOutput", "StreamEvent",
           "Ledger", "StepRecord", "RequestMetrics", "step_flops", "step_bytes"]
