"""An OpenAI-compatible HTTP server over the engine: ``python -m course_lib.engine serve``.

    python -m course_lib.engine serve --model tiny --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "def ", "max_tokens": 20, "temperature": 0}'

Endpoints: ``POST /v1/completions`` (the OpenAI completions API, streaming with server-sent
events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text format).

One engine, many clients. A single background thread, :class:`EngineWorker`, owns the
:class:`~course_lib.engine.llm.LLM` and is the only code that touches its engine: it takes new
requests and aborts from a thread-safe command queue, runs ``engine.step()``, reads each
request's new tokens off its own :class:`~course_lib.engine.sequence.Sequence` and hands them to
that request's ``asyncio.Queue`` on the HTTP event loop (``loop.call_soon_threadsafe``). The HTTP
handlers never step the engine; they check a request, queue it, and relay what arrives. A client
that disconnects has its request aborted in the engine before the next step, which gives its KV
blocks back at once.

What the server adds to the engine (the engine knows token ids only):

* stop *strings*, matched on the decoded text: the text ends before the stop string, the finish
  reason is ``"stop"`` and the request is aborted in the engine so it stops using the batch;
  while a stream runs, the last ``len(longest stop) - 1`` characters are held back, since they
  may be the start of a stop string;
* the text of an end-of-text or ``stop_token_ids`` token is left out of ``text`` (its id stays in
  ``token_ids``), as OpenAI-style servers do;
* a bounded admission count: when ``max_pending`` prompts are already in the engine, a new request
  gets 503 with ``Retry-After`` instead of a queue that grows without limit;
* OpenAI-style JSON errors (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status
  for every request that cannot be served, checked before anything is queued.

Extension fields of a request (not in OpenAI's API; as vLLM names them): ``top_k``,
``ignore_eos``, ``stop_token_ids`` and ``return_token_ids`` (adds ``prompt_token_ids`` and
``token_ids`` to each choice, ``token_ids`` to each streamed chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CourseError
from .sequence import CheckedPrompt, SamplingParams, Sequence

log = logging.getLogger("course_lib.engine.server")

#: at most this many top log-probabilities per token (OpenAI allows 5, vLLM 20)
MAX_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- the request body
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields, types checked strictly (a number sent as
    a string is refused), unknown fields refused; ``None`` means "the default"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool | None = None


_PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """A pydantic error → (one readable message, the offending field)."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    kind = e["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})", None
    if kind == "model_type" and not loc:
        return "the request body must be a JSON object", None
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"missing required field '{'.'.join(loc)}'", param
    if param == "prompt":
        return f"prompt must be {_PROMPT_TYPES}", param
    if param == "stop":
        return "stop must be a string or a list of strings (token ids go in stop_token_ids)", param
    where = ".".join(x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool"))   # union tags out
    got = e.get("input")
    shown = json.dumps(got) if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    return f"{where}: {e['msg'].lower()}, got {shown}", param


# ---------------------------------------------------------------------------------------------- one request
@dataclass(eq=False)
class Choice:
    """One prompt of a request and what has been sent of its output (read and written by the worker)."""

    index: int
    prompt: CheckedPrompt
    params: SamplingParams
    stops: tuple[str, ...] = ()
    seq: Sequence | None = None
    num_sent: int = 0            # output tokens handed to the client so far
    text: str = ""               # decoded output so far (stop-token text left out)
    num_emitted: int = 0         # characters of ``text`` handed to the client
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    """What one step added to one choice."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


@dataclass(eq=False)
class ServerRequest:
    request_id: str
    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue                    # lists of Delta, then possibly an APIError
    return_token_ids: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    finished: bool = False                  # set by the worker once every choice is done or aborted


# ---------------------------------------------------------------------------------------------- metrics
class ServerMetrics:
    """The Prometheus metrics of one server (their own registry, so several servers can share a process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("course_requests", "Finished prompts (choices), by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("course_requests_rejected", "Requests answered with an error, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("course_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("course_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("course_time_to_first_token_seconds", "Arrival at the server to first token",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                              registry=r)
        self.itl = Histogram("course_inter_token_latency_seconds", "Gap between consecutive tokens of a request",
                             buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                             registry=r)
        self.kv_blocks_in_use = Gauge("course_kv_blocks_in_use", "KV blocks held by requests", registry=r)
        self.kv_blocks_total = Gauge("course_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.running = Gauge("course_requests_running", "Requests holding KV blocks", registry=r)
        self.waiting = Gauge("course_requests_waiting", "Requests queued in the engine", registry=r)
        self.pending = Gauge("course_requests_pending", "Prompts admitted and not finished", registry=r)
        self.preemptions = Counter("course_preemptions", "Requests preempted (their KV dropped, recomputed later)",
                                   registry=r)
        self.steps = Counter("course_engine_steps", "Engine steps run", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------- the engine thread
class Overloaded(Exception):
    pass


class EngineWorker:
    """The one thread that steps the engine. HTTP handlers call :meth:`submit` and :meth:`abort`
    (any thread); everything else here runs in the worker thread."""

    def __init__(self, llm, metrics: ServerMetrics, max_pending: int = 256):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.metrics = metrics
        self.max_pending = max_pending
        self._commands: queue.Queue = queue.Queue()
        self._pending = 0                      # prompts admitted and not finished
        self._pending_lock = threading.Lock()
        self._active: dict[int, ServerRequest] = {}
        self._step_lock = getattr(llm, "_step_lock", None) or threading.RLock()
        self._preemptions_seen = self.engine.scheduler.num_preemptions
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None   # what ended the thread, if it died
        metrics.kv_blocks_total.set(self.engine.block_manager.num_blocks)
        self._update_gauges()

    # ------------------------------------------------------------------ called from HTTP handlers
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, request: ServerRequest) -> None:
        """Admit a checked request, or raise :class:`Overloaded` when the bound is reached."""
        n = len(request.choices)
        with self._pending_lock:
            if self._pending + n > self.max_pending:
                raise Overloaded
            self._pending += n
        self._commands.put(("add", request))

    def abort(self, request: ServerRequest) -> None:
        self._commands.put(("abort", request))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left (those clients get a 503 error) and end the thread."""
        if self._thread is None:
            return
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        try:
            while True:
                if not self._drain(block=not self.engine.has_unfinished()):
                    break
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:          # a bug here: fail what is in flight rather than hang it
            self.error = e
            log.exception("the engine worker stopped")
            self._fail_all(APIError(500, f"the engine worker stopped: {e!r}", "server_error"))
            raise
        self._fail_all(APIError(503, "the server is shutting down", "server_error"))

    def _drain(self, block: bool) -> bool:
        """Run queued commands (wait for one when the engine is idle); False once told to stop."""
        while True:
            try:
                kind, request = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self._add(request)
            elif kind == "abort":
                self._abort(request)
            self._update_gauges()

    def _add(self, request: ServerRequest) -> None:
        with self._step_lock:
            for ch in request.choices:
                ch.seq = self.engine.enqueue(ch.prompt, ch.params, f"{request.request_id}-{ch.index}")
                self._active[id(ch.seq)] = request
        self.metrics.prompt_tokens.inc(sum(len(ch.prompt) for ch in request.choices))

    def _abort(self, request: ServerRequest) -> None:
        if request.finished:
            return
        with self._step_lock:
            for ch in request.choices:
                if ch.seq is not None and not ch.seq.is_finished:
                    self.engine.abort(ch.seq)
                if not ch.done:
                    ch.finish_reason = "abort"
        self._finish(request)

    def _step(self) -> None:
        try:
            with self._step_lock:
                self.engine.step()
        except Exception as e:       # the step left no trace (engine.step is atomic); its requests cannot go on
            log.exception("an engine step failed")
            # only the requests the engine holds: those still queued were not in the step and go on
            self._fail_all(APIError(500, f"the engine step failed: {type(e).__name__}: {e}", "server_error"),
                           queued=False)
            return
        self.metrics.steps.inc()
        for request in list(dict.fromkeys(self._active.values())):
            self._publish(request)
        self._update_gauges()

    def _publish(self, request: ServerRequest) -> None:
        deltas = [d for d in (self._advance(ch) for ch in request.choices if not ch.done) if d is not None]
        if deltas:
            self._send(request, deltas)
        if all(ch.done for ch in request.choices):
            self._finish(request)

    def _advance(self, ch: Choice) -> Delta | None:
        """The new tokens of one choice as a Delta; applies the stop strings."""
        seq = ch.seq
        n = seq.num_output_tokens
        if n == ch.num_sent and not seq.is_finished:
            return None
        start = ch.num_sent
        new = seq.token_ids[seq.num_prompt_tokens + start:seq.num_prompt_tokens + n]
        finish = seq.finish_reason if seq.is_finished else None
        text_ids = new
        if finish == "stop" and new:              # an end-of-text or stop_token_ids token: no text of its own
            text_ids = new[:-1]
        hit = -1
        if self.tokenizer is not None and ch.stops:
            # token by token: a decode burst (engine.py) brings several tokens at once, and none after
            # the one that completes a stop string may be sent or counted
            for k, token in enumerate(text_ids):
                ch.text += self.tokenizer.decode([token])
                hit = min((p for p in (ch.text.find(s, ch.num_emitted) for s in ch.stops) if p >= 0), default=-1)
                if hit >= 0:
                    new, n = new[:k + 1], start + k + 1
                    break
        elif self.tokenizer is not None:
            ch.text += self.tokenizer.decode(text_ids)
        logprobs = seq.logprobs[start:n] if ch.params.logprobs else None
        self._observe_latency(request_time=self._active[id(seq)].arrival, seq=seq, start=start, end=n)
        ch.num_sent = n
        if ch.stops:
            if hit >= 0:
                ch.text = ch.text[:hit]
                finish = "stop"
                if not seq.is_finished:
                    with self._step_lock:
                        self.engine.abort(seq)    # stops using the batch; its blocks go back now
            end = len(ch.text) if finish else max(ch.num_emitted, len(ch.text) - (max(map(len, ch.stops)) - 1))
        else:
            end = len(ch.text)
        text = ch.text[ch.num_emitted:end]
        ch.num_emitted = end
        ch.finish_reason = finish
        return Delta(ch.index, new, text, logprobs, finish)

    def _observe_latency(self, request_time: float, seq: Sequence, start: int, end: int) -> None:
        times = seq.token_times
        if start == 0 and end > 0:
            self.metrics.ttft.observe(max(0.0, times[0] - request_time))
        for i in range(max(1, start), end):
            self.metrics.itl.observe(times[i] - times[i - 1])
        self.metrics.generation_tokens.inc(end - start)

    def _send(self, request: ServerRequest, item) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
        except RuntimeError:                      # the event loop is closed: nobody is listening
            pass

    def _finish(self, request: ServerRequest) -> None:
        if request.finished:
            return
        request.finished = True
        for ch in request.choices:
            if ch.seq is not None:
                self._active.pop(id(ch.seq), None)
            self.metrics.requests.labels(ch.finish_reason or "abort").inc()
        with self._pending_lock:
            self._pending -= len(request.choices)

    def _fail_all(self, error: APIError, queued: bool = True) -> None:
        """Abort and answer `error` to every request in the engine, and with `queued` to those waiting in
        the command queue too (the worker is stopping: nobody will add them)."""
        for request in list(dict.fromkeys(self._active.values())):
            self._abort(request)
            self._send(request, error)
        while queued:                             # requests queued but never added
            try:
                kind, request = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                for ch in request.choices:
                    ch.finish_reason = "abort"
                self._finish(request)
                self._send(request, error)
        self._update_gauges()

    def _update_gauges(self) -> None:
        bm, sch = self.engine.block_manager, self.engine.scheduler
        self.metrics.kv_blocks_in_use.set(bm.num_blocks - bm.num_free_blocks)
        self.metrics.running.set(len(sch.running))
        self.metrics.waiting.set(len(sch.waiting))
        self.metrics.pending.set(self._pending)
        if sch.num_preemptions > self._preemptions_seen:
            self.metrics.preemptions.inc(sch.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = sch.num_preemptions


# ---------------------------------------------------------------------------------------------- checks
_UNSUPPORTED = {   # field: (value meaning "not used", what to do instead)
    "echo": (False, "echo is not supported; the prompt is not repeated in the output"),
    "suffix": (None, "suffix (insertion) is not supported"),
    "presence_penalty": (0, "presence_penalty is not supported; leave it at 0"),
    "frequency_penalty": (0, "frequency_penalty is not supported; leave it at 0"),
}


def _param_of(message: str) -> str | None:
    word = message.split(" ", 1)[0]
    return word if word in CompletionRequest.model_fields else None


def build_choices(req: CompletionRequest, llm) -> list[Choice]:
    """Check a request against the engine and the model, everything before anything is queued:
    an :class:`APIError` (400) says what is wrong."""
    for name, (unused, why) in _UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and value != unused:
            raise APIError(400, why, param=name)
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: only n=1 is supported; send the request n times (with different seeds)",
                       param="n")
    if req.best_of not in (None, 1):
        raise APIError(400, f"best_of={req.best_of}: only best_of=1 is supported", param="best_of")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {req.logprobs}", param="logprobs")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if stops and llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so stop strings cannot be matched; use stop_token_ids",
                       param="stop")
    try:
        params = SamplingParams(
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos),
            logprobs=0 if req.logprobs is None else max(1, req.logprobs))
    except CourseError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None

    p = req.prompt
    prompts = [p] if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)) else p
    if not prompts:
        raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
    choices = []
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}: " if len(prompts) > 1 else ""
        try:
            if isinstance(prompt, str):
                if llm.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
                if not prompt:
                    raise APIError(400, f"{where}the prompt is empty; give at least one token", param="prompt")
                prompt = llm.tokenizer.encode(prompt)
            ids = llm.engine.check_request(prompt, params)
        except CourseError as e:
            param = "max_tokens" if "max_tokens" in str(e) else "prompt"
            raise APIError(400, f"{where}{e}", param=param) from None
        choices.append(Choice(i, ids, params, stops))
    return choices


# ---------------------------------------------------------------------------------------------- responses
def _token_text(llm, token_id: int) -> str:
    return llm.tokenizer.decode([token_id]) if llm.tokenizer is not None else f"token_id:{token_id}"


def logprobs_body(llm, token_ids: list[int], entries: list[dict[int, float]], k: int, offset: int) -> dict:
    """OpenAI's completions ``logprobs`` object for these tokens (``text_offset`` from ``offset``)."""
    tokens, chosen, top, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        s = _token_text(llm, tid)
        tokens.append(s)
        chosen.append(entry[tid])
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        top.append({_token_text(llm, i): lp for i, lp in best})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}


def create_app(llm, model_name: str = "tiny", max_pending: int = 256, retry_after_s: int = 1):
    """The FastAPI application serving ``llm`` (an :class:`~course_lib.engine.llm.LLM`) as
    ``model_name``. Its lifespan starts and stops the engine thread; at most ``max_pending``
    prompts are in the engine at once (then 503 with ``Retry-After: retry_after_s``)."""
    if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
        raise CourseError(f"max_pending must be a positive integer, got {max_pending!r}")
    metrics = ServerMetrics()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = EngineWorker(llm, metrics, max_pending)
        app.state.worker = worker
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="course_lib engine", description="OpenAI-compatible completions over course_lib.engine",
                  lifespan=lifespan)
    app.state.llm, app.state.metrics, app.state.model_name = llm, metrics, model_name

    def error_response(e: APIError) -> JSONResponse:
        metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error_response(APIError(400, str(e.errors()[0].get("msg", e))))

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "course_lib",
                "max_model_len": llm.config.n_positions}

    @app.get("/health")
    async def health():
        worker = app.state.worker
        if not worker.alive:
            raise APIError(503, f"the engine worker is not running ({worker.error!r})", "server_error")
        return {"status": "ok", "pending": worker.pending}

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = CompletionRequest.model_validate_json(await request.body())
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param=param) from None
        check_model(req.model)
        choices = build_choices(req, llm)
        worker: EngineWorker = app.state.worker
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", "server_error")
        loop = asyncio.get_running_loop()
        sreq = ServerRequest(f"cmpl-{uuid.uuid4().hex}", choices, loop, asyncio.Queue(), bool(req.return_token_ids))
        if len(choices) > worker.max_pending:
            raise APIError(400, f"{len(choices)} prompts in one request; this server takes at most "
                           f"{worker.max_pending} at a time", param="prompt")
        try:
            worker.submit(sreq)
        except Overloaded:
            raise APIError(503, f"the server is at its limit of {worker.max_pending} prompts in flight; "
                           f"retry in {retry_after_s} s", "server_overloaded", code="overloaded",
                           headers={"Retry-After": str(retry_after_s)}) from None
        watcher = asyncio.create_task(_abort_on_disconnect(request, worker, sreq))
        head = {"id": sreq.request_id, "object": "text_completion", "created": int(time.time()), "model": model_name}
        k = req.logprobs
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(sreq, head, k, include_usage, watcher, worker),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            per_choice: dict[int, list[Delta]] = {ch.index: [] for ch in choices}
            open_choices = set(per_choice)
            while open_choices:
                item = await sreq.queue.get()
                if isinstance(item, APIError):
                    raise item
                if item is _DISCONNECTED:
                    return Response(status_code=499)
                for d in item:
                    per_choice[d.index].append(d)
                    if d.finish_reason is not None:
                        open_choices.discard(d.index)
        finally:
            watcher.cancel()
            if not sreq.finished:
                worker.abort(sreq)
        out = []
        for ch in choices:
            ds = per_choice[ch.index]
            ids = [t for d in ds for t in d.token_ids]
            body = {"index": ch.index, "text": "".join(d.text for d in ds), "logprobs": None,
                    "finish_reason": ds[-1].finish_reason}
            if k is not None:
                body["logprobs"] = logprobs_body(llm, ids, [e for d in ds for e in d.logprobs], k, 0)
            if req.return_token_ids:
                body["prompt_token_ids"], body["token_ids"] = ch.prompt.ids, ids
            out.append(body)
        prompt_tokens = sum(len(ch.prompt) for ch in choices)
        completion_tokens = sum(ch.num_sent for ch in choices)
        return {**head, "choices": out, "usage": _usage(prompt_tokens, completion_tokens)}

    async def _stream(sreq: ServerRequest, head: dict, k, include_usage: bool, watcher, worker):
        offsets = {ch.index: 0 for ch in sreq.choices}
        open_choices = {ch.index for ch in sreq.choices}
        try:
            while open_choices:
                item = await sreq.queue.get()
                if item is _DISCONNECTED:
                    return
                if isinstance(item, APIError):
                    metrics.rejected.labels(str(item.status)).inc()
                    yield f"data: {json.dumps(item.body())}\n\n"
                    return
                for d in item:
                    choice = {"index": d.index, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
                    if k is not None:
                        choice["logprobs"] = logprobs_body(llm, d.token_ids, d.logprobs, k, offsets[d.index])
                        offsets[d.index] += sum(len(t) for t in choice["logprobs"]["tokens"])
                    if sreq.return_token_ids:
                        choice["token_ids"] = d.token_ids
                    if d.finish_reason is not None:
                        open_choices.discard(d.index)
                    yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            if include_usage:
                prompt_tokens = sum(len(ch.prompt) for ch in sreq.choices)
                usage = _usage(prompt_tokens, sum(ch.num_sent for ch in sreq.choices))
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:               # finished, the client went away, or the task was cancelled
            watcher.cancel()
            if not sreq.finished:
                worker.abort(sreq)

    return app


_DISCONNECTED = object()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _abort_on_disconnect(request, worker: EngineWorker, sreq: ServerRequest) -> None:
    """Wait for the client to go away; then abort its request in the engine and wake its handler."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    if not sreq.finished:
        worker.abort(sreq)
        sreq.queue.put_nowait(_DISCONNECTED)


# ---------------------------------------------------------------------------------------------- running it
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port=0``: a free one), or :class:`CourseError` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
    # they are TCP, and with it on every small streamed chunk waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CourseError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, log_level: str = "info", shutdown_timeout: float | None = None):
    import uvicorn

    # keep idle connections longer than clients' pools do (httpx: 5 s, uvicorn's default is also 5 s): a
    # server that closes first races a client reusing the connection, which then sees a reset
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                                         timeout_keep_alive=65, lifespan="on", access_log=log_level == "debug"))


class ServerThread:
    """Serve ``app`` on ``host:port`` (0: a free port) in a background thread, in this process::

        with ServerThread(create_app(LLM("tiny"))) as server:
            OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(...)

    Leaving the block shuts down gracefully: requests in flight finish, new connections are refused."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 shutdown_timeout: float | None = None):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level, shutdown_timeout)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tiny", max_pending: int = 256,
          log_level: str = "info", shutdown_timeout: float | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (then requests in flight finish first): the ``serve`` command."""
    sock = bind_socket(host, port)
    app = create_app(llm, model_name=model_name, max_pending=max_pending)
    # this process now only serves: move everything built so far (the model, the engine, the imported
    # libraries: ~170k objects) out of the garbage collector's sight, so that its full collections do
    # not walk them. Without it, the first full collection after start-up paused the engine for
    # ~100-130 ms (benchmarks/NOTES.md); vLLM and SGLang freeze their heaps the same way
    gc.collect()
    gc.freeze()
    print(f"serving {model_name!r} on http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn_server(app, log_level, shutdown_timeout).run(sockets=[sock])
    except KeyboardInterrupt:        # uvicorn raises the Ctrl-C again once it has shut down gracefully
        pass
    finally:
        sock.close()

