"""course_lib.engine: a prefill/decode engine for GPT-2-family models.

The path of a request, one file per idea (read them in this order):

``llm.py`` (public :class:`LLM`) → ``engine.py`` (the step loop) → ``scheduler.py`` (who gets
how many tokens) → ``block_manager.py`` (paged KV blocks, prefix cache) → ``batch.py`` (the
step's flat batch) → ``runner.py`` (the batch through the weights; whole-step CUDA graphs in
``step_graphs.py``) → ``attention.py`` (batched SDPA, or the unified Triton kernel of
``triton_unified.py`` + ``attention_tiles.py``, over the paged ``kv_cache.py``) → ``sampler.py``.
Around them: ``config.py`` (:class:`EngineConfig`, every setting), ``sequence.py`` (requests and
their checks), ``metrics.py`` (ledger, MFU/MBU, TTFT/TPOT), ``snapshot.py`` (the glass box) and
``tensor_parallel.py`` (``tensor_parallel_size=N``: the same forward split by heads over N processes).
Introduced in notebooks/11_inside_an_engine.ipynb.
"""

from .config import EngineConfig
from .engine import LLMEngine
from .llm import LLM, RequestOutput, StreamEvent
from .metrics import Ledger, RequestMetrics, StepRecord
from .sequence import SamplingParams, Sequence

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "Sequence", "RequestOutput", "StreamEvent",
           "Ledger", "StepRecord", "RequestMetrics"]
