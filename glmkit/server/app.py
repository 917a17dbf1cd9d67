"""The HTTP server: OpenAI-compatible and GLM-native endpoints over the continuous-batching engine.

    glmkit serve --model DIR [--host 127.0.0.1 --port 8000] [--keys-db PATH | --no-auth] \\
        [--max-batch 8 --max-waiting 64] [--price-per-hour 2.0 --price-input 0.5 --price-output 1.5]
    app = create_app(model, tokenizer, "glm-tiny")          # auth off, in-memory ledger
    app = create_app(model, tokenizer, "glm-tiny", maas=MaaS(KeyStore(p), Ledger(p), Pricing(...)))

Endpoints. OpenAI: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming,
usage). GLM: POST /v1/fill (any number of [MASK] / [sMASK] / [gMASK] blanks), POST /infill
(llama.cpp's `input_prefix` / `input_suffix` -> `content`), POST /v1/classify (cloze with
verbalizers -> label probabilities). GET /health, GET /metrics (Prometheus), GET /openapi.json.

How a prompt meets the model (token ids are what the engine sees; the layouts are GLM's):
- completions, GLM-objective models (learned_2d, rope_2d): Part A = prompt [gMASK], read
  bidirectionally; generation starts with <sop> at the mask's position, block positions 1, 2, ...,
  and ends at <eop> (or <|endoftext|>). Causal models (rope_partial, GLM-4): [gMASK] <sop> prompt,
  read causally (what GLM-4's tokenizer produces), ending at <|endoftext|>. A prompt given as
  token ids gets the same layout.
- completions with `suffix`, and /infill: GLM models read prefix [MASK] suffix and fill the blank;
  causal models cannot see the suffix, so they continue the prefix and stop where the suffix is
  likely to begin (`generate.causal_infill_stops`, a heuristic).
- chat: the GLM-4 chat template (`Tokenizer.render_chat`) read causally, for every model (the
  layout `glmkit chat` and SFT use), stopping at the chat stop tokens.
These three go through the engine (batched, streamable, cancellable). /v1/fill (several blanks
filled in turn, each seeing the earlier ones) and /v1/classify (scoring, not generation) are not
batched by the engine: they call `generate.fill` and `finetune.candidate_scores` in a worker
thread, one at a time under a lock, next to the engine's own thread.

The server translates and checks; it does no model work of its own. Parameters are validated at the
boundary (pydantic in strict mode, then SamplingParams); a prompt that does not fit the context is a
400, never truncated. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}:
400 invalid request (validation too: the spec says 400, not FastAPI's 422), 401 unknown or revoked
key, 404 unknown model, 408 / 413 a body too slow / too large, 429 limits (Retry-After for rate
limits, `x-should-retry: false` for an exhausted budget), 500 the engine failed on this request
(only this one: a row's fault never ends another's), 503 overloaded (Retry-After).

Hostile input. Request preparation (tokenizing, prompt layouts) runs in a worker thread, so a huge
prompt never stalls the event loop, /health or other streams; the tokenizer's batch call releases
the GIL. A text longer than context x the longest token's characters can never fit and is refused
before it is tokenized. Every string must be valid Unicode (no lone surrogates). A cloze pattern
takes plain {text} fields only (no format specs: "{text:a>10000000}" made 10 MB per text). A request
that names no max_tokens (chat, /infill) gets --default-max-tokens, not the rest of the context.
/metrics (all tenants' counts) needs the admin token when auth is on.

Threads: the engine runs `step()` in its own thread, started and stopped with the app (lifespan).
Its callbacks hand tokens to the event loop with `loop.call_soon_threadsafe` onto one asyncio queue
per HTTP request. Stop strings are matched on the decoded text here (`generate.StopText`); a match,
a client disconnect, or the end of the HTTP exchange cancels the engine request.

Metering (metering.py over maas.py): a pure ASGI middleware wraps every /v1/* and /infill request:
authentication, the key's limits, and its ledger row.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import Engine, EngineFull, Request
from ..generate import MASK_STRINGS, causal_infill_stops
from ..sampling import GREEDY_BELOW, REPETITION_PENALTY_RANGE, SamplingParams, StopText
from ..tokenizer import check_unicode
from .maas import KeyRecord, LimitError, MaaS
from .http import HEADER_TIMEOUT_S, serve
from .metering import BODY_TIMEOUT_S, MAX_BODY_BYTES, Call, MeterMiddleware, error_response, limit_response

# ---- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers, OpenAI's shape."""

    error: ErrorDetail


# what each kind of route can answer besides 200, documented in the spec (validation errors are 400, as
# OpenAI answers them, not FastAPI's 422)
_ERRORS = {
    "generation": {400: "invalid request (schema, values, context length, tokenizer)", 401: "missing, unknown or revoked API key",
                   404: "unknown model, or one the key may not use", 408: "the request body did not arrive in time",
                   413: "request body over the server's limit",
                   429: "a limit of the key (Retry-After), or its budget (x-should-retry: false)",
                   500: "the engine failed on this request", 503: "overloaded (Retry-After)"},
    "keyed": {401: "missing, unknown or revoked API key", 404: "unknown model, or one the key may not use"},
    "health": {503: "the engine thread is not running"},
}


def _openapi(app: FastAPI) -> dict:
    """The spec as the server behaves: 400 (not 422) with the error schema, and every error status a route
    can answer, so a client generator or a conformance checker sees what really comes back."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = spec.setdefault("components", {}).setdefault("schemas", {})
    err = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    comps.update(err.pop("$defs", {}))
    comps["ErrorResponse"] = err
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            kind = ("generation" if method == "post" else "keyed" if path.startswith("/v1/") else
                    "health" if path == "/health" else None)
            for status, what in _ERRORS.get(kind, {}).items():
                responses.setdefault(str(status), {"description": what, "content": content})
            if path in ("/v1/completions", "/v1/chat/completions"):  # "stream": true answers server-sent events
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"description": "data: {chunk JSON} events, then data: [DONE]"}}
    app.openapi_schema = spec
    return spec


# ---- request schemas (they make the OpenAPI spec) ---------------------------------------------------
def _no_surrogates(v, where: str = ""):
    """Every string of a request, however nested: a lone surrogate ("\\ud800") is valid JSON but not
    text; left in, it fails later (tokenizer, UTF-8 output) as a 500 instead of this 400."""
    if isinstance(v, str):
        check_unicode(v, where)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _no_surrogates(x, where)
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_surrogates(k, " of a key")
            _no_surrogates(x, where)
    return v


def _integral(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


class _Body(BaseModel):
    """Base of every request schema: strings must be valid Unicode, and types are strict (1.0 is not an
    integer, 0 is not a boolean: the spec says what is accepted, and nothing else is)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, v, info):
        # JSON Schema counts 1.0 as an integer; strict pydantic does not: integral floats become ints in
        # fields with integers and no floats (prompt token ids included)
        ann = str(cls.model_fields[info.field_name].annotation)
        return _integral(v) if "int" in ann and "float" not in ann else v

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v):
        return _no_surrogates(v)


NonEmpty = Annotated[str, Field(min_length=1)]
MAX_SEED = 2**53 - 1  # every seed a JSON number holds exactly (larger ones round in clients that parse doubles)
# a cloze pattern: literal text, {{ and }} for braces, and at least one plain {text}, nothing else: str.format
# would otherwise run a client's format spec ("{text:a>10000000}" made 10 MB per text) or look up attributes
CLOZE_PATTERN = r"^([^{}]|\{\{|\}\}|\{text\})*\{text\}([^{}]|\{\{|\}\}|\{text\})*$"
Stops = NonEmpty | Annotated[list[NonEmpty], Field(max_length=16)] | None
REPETITION_PENALTY = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                           description="HF / CTRL repetition penalty (1 = off)")
TEMPERATURE_NOTE = f"0, or below {GREEDY_BELOW}, is greedy"


class _Sampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (vLLM's extras top_k, min_p, repetition_penalty too)."""

    model: str | None = Field(None, description="the served model's name (default: it)")
    temperature: float = Field(1.0, ge=0, le=2, description=TEMPERATURE_NOTE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = REPETITION_PENALTY
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i uses seed + i")
    n: int = Field(1, ge=1, le=16)
    stop: Stops = Field(None, description="up to 16 non-empty stop strings, cut from the text")
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: must be empty")
    user: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], Annotated[list[int], Field(min_length=1)],
                  Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]] = Field(
        ..., description="text(s) or token ids; a text of more than context x the longest token's "
        "characters is refused before tokenizing")
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the completion")
    max_tokens: int = Field(16, ge=1, description="per choice; prompt + max_tokens must fit the context")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen and top-k tokens")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


class ContentPart(_Body):
    type: Literal["text"] = Field(..., description="only text parts are supported")
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "observation", "tool"]
    content: str | list[ContentPart] | None = ""
    name: str | None = None


class ResponseFormat(_Body):
    type: Literal["text"] = Field("text", description="only text (json_object and json_schema are not supported yet)")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default max tokens "
                                   "(`glmkit serve --default-max-tokens`), within the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = Field(None, max_length=0, description="not supported yet: must be empty")
    tool_choice: str | dict | None = None
    response_format: ResponseFormat | None = None


class FillRequest(_Body):
    model: str | None = None
    text: str = Field(..., pattern=r"\[(MASK|sMASK|gMASK)\]", description="text with one or more [MASK], [sMASK] or [gMASK] blanks")
    max_tokens: int = Field(32, ge=1, description="per blank")
    temperature: float = Field(0.0, ge=0, le=2, description="default greedy, as `glmkit fill`; " + TEMPERATURE_NOTE)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stops = None


class InfillRequest(_Body):
    """llama.cpp's /infill (defaults as llama.cpp's server)."""

    model: str | None = None
    input_prefix: str = ""
    input_suffix: str = ""
    n_predict: int = Field(-1, ge=-1, description="-1: the server's default max tokens, within the context")
    temperature: float = Field(0.8, ge=0, le=2, description=TEMPERATURE_NOTE)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = REPETITION_PENALTY
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    stop: Annotated[list[NonEmpty], Field(max_length=16)] = Field(default_factory=list)
    stream: Literal[False] = Field(False, description="not supported on /infill (use /v1/completions with suffix and stream)")

    @field_validator("stream", mode="before")
    @classmethod
    def _false_only(cls, v):
        if v is not False:  # Literal[False] would take 0
            raise ValueError("stream is not supported on /infill; use /v1/completions with suffix and stream")
        return v


class ClassifyRequest(_Body):
    model: str | None = None
    text: str | Annotated[list[str], Field(min_length=1, max_length=64)] = Field(..., description="one text or a list (at most 64)")
    pattern: str = Field("{text}[MASK]", pattern=CLOZE_PATTERN, description="the cloze: each plain {text} is replaced by the text (no "
                         "other fields, format specs or conversions; {{ and }} are literal braces), [MASK] is the blank")
    labels: dict[str, NonEmpty] = Field(
        ..., min_length=2, max_length=32, description="2 to 32 labels, label -> verbalizer, the text that fills the blank")
    score: Literal["sum", "mean"] = Field("sum", description="sum or per-token mean of the blank's log-probability")


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()


# ---- metrics ----------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process never clash)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        Gauge("glmkit_requests_running", "engine requests in the running batch", registry=r).set_function(lambda: engine.num_running)
        Gauge("glmkit_requests_waiting", "engine requests waiting for a batch row", registry=r).set_function(lambda: engine.num_waiting)
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("glmkit_time_to_first_token_seconds", "submission to first generated token", buckets=lat, registry=r)
        self.itl = Histogram("glmkit_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.e2e = Histogram("glmkit_e2e_request_latency_seconds", "HTTP request arrival to end of response", buckets=lat, registry=r)
        self.prompt_tokens = Counter("glmkit_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("glmkit_cached_prompt_tokens", "prompt tokens served from the prompt cache", registry=r)
        self.generation_tokens = Counter("glmkit_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter("glmkit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)


# ---- the engine's thread ------------------------------------------------------------------------------
class EngineRunner:
    """Runs `engine.run_forever` in a thread; no request is ever left without its on_finish.

    `Engine.run_forever` fails the running rows and re-raises when a step raises; we log and run it
    again. A request that raised while being admitted sits in neither the waiting queue nor the
    batch: after any failure, and at shutdown, every request we submitted that the engine has not
    finished is finished here ("error", or "cancelled" at shutdown), so its HTTP handler returns."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.inflight: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.failures, self.last_error = 0, None

    def track(self, req: Request):
        with self.lock:
            self.inflight[id(req)] = req

    def forget(self, req: Request):
        with self.lock:
            self.inflight.pop(id(req), None)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stop_event.is_set()

    def start(self):
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop_event.is_set():
            try:
                self.engine.run_forever(self.stop_event)
            except Exception as e:  # a failed step: its requests got "error"; keep serving the rest
                self.failures, self.last_error = self.failures + 1, f"{type(e).__name__}: {e}"
                traceback.print_exc()
                self._finish_orphans("error", only_lost=True)

    def _finish_orphans(self, reason: str, only_lost: bool):
        # both locks at once: a request is tracked only after `submit` queued it, so one we track that
        # is not queued now was taken by this (failed) engine thread (lock order: engine, then ours)
        with self.engine.lock, self.lock:
            queued = {id(r) for r in self.engine.waiting} if only_lost else set()
            reqs = [r for r in self.inflight.values() if r.t_done is None and id(r) not in queued]
        for r in reqs:
            r.finish_reason, r.t_done = reason, time.perf_counter()
            if r.on_finish:
                r.on_finish(r)

    def stop(self):
        self.stop_event.set()
        self.engine.wake.set()
        if self.thread is not None:
            self.thread.join()
        self._finish_orphans("cancelled", only_lost=False)


# ---- one HTTP request's choices ------------------------------------------------------------------
@dataclass
class _Choice:
    """One generated sequence as the HTTP side sees it: text cut at stop strings, logprob entries."""

    index: int
    group: int  # which prompt it continues
    req: Request
    stop: StopText
    strip_newline: bool = False  # chat: the template's newline after <|assistant|> is not part of the reply
    prefix: str = ""  # echo
    text: str = ""
    entries: list = field(default_factory=list)  # (token id, logprob, top {id: logprob}, text offset)
    matched: bool = False
    finish_reason: str | None = None

    def emit(self, piece: str) -> str:
        if self.strip_newline and piece:
            piece, self.strip_newline = (piece[1:] if piece.startswith("\n") else piece), False
        self.text += piece
        return piece


# ---- the server -----------------------------------------------------------------------------------------
def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# a stream that fails mid-way ends with an error event (the status line is already sent)
def _sse_engine_error(req) -> str:
    return _sse({"error": {"message": f"the engine failed on this request ({req.error or 'see the server log'})",
                           "type": "server_error", "param": None, "code": "engine_error"}})


def _sse_end(base: dict, call, include_usage: bool) -> list[str]:
    """The end of an OpenAI stream: the usage chunk when asked for (no choices), then [DONE]."""
    return ([_sse({**base, "choices": [], "usage": call.usage()})] if include_usage else []) + ["data: [DONE]\n\n"]


_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


def _param_error(e: ValueError) -> APIError:
    m = re.match(r"SamplingParams\.(\w+)=", str(e))
    name = _PARAM_NAMES.get(m[1], m[1]) if m else None
    return APIError(400, str(e).replace("SamplingParams.", ""), param=name, code="invalid_value")


class Server:
    """The model, tokenizer, engine and MaaS behind one app; handlers call its methods."""

    def __init__(self, model, tokenizer, model_name: str, maas: MaaS, max_batch: int, max_waiting: int,
                 max_len: int | None, default_max_tokens: int = 1024, admin_token: str | None = None,
                 waiting_per_key: int | None = None):
        self.model, self.tok, self.name, self.maas = model, tokenizer, model_name, maas
        self.engine = Engine(model, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting)
        self.runner = EngineRunner(self.engine)
        self.metrics = Metrics(self.engine)
        self.causal = not model.cfg.prefix_lm
        self.work_lock = threading.Lock()  # fill / classify: one at a time, beside the engine
        self.created = int(time.time())
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens={default_max_tokens}: must be >= 1")
        self.default_max_tokens = default_max_tokens
        self.admin_token = admin_token
        # one key's share of the waiting queue: a tenant's n x prompts cannot fill it and 503 the others
        self.waiting_per_key = waiting_per_key or max(1, max_waiting // 4)
        if self.waiting_per_key < 1:
            raise ValueError(f"waiting_per_key={waiting_per_key}: must be >= 1")
        # a text longer than this can never fit the context (no token stands for more characters):
        # refused before it is tokenized, so an oversized text costs a length check, not seconds of CPU
        self.max_text_chars = self.engine.max_len * tokenizer.max_token_chars

    # ---- helpers ----
    def special(self, role: str) -> int:
        try:
            return self.tok.special(role)
        except KeyError as e:
            raise APIError(400, f"this model's tokenizer has no {role} token, which this endpoint needs ({e})") from None

    def check_model(self, request: HTTPRequest, name: str | None) -> Call:
        call: Call = request.scope["glmkit.call"]
        name = name or self.name
        key: KeyRecord | None = request.scope.get("glmkit.key")
        if name != self.name or (key is not None and not key.allows(name)):
            raise APIError(404, f"the model {name!r} does not exist or you do not have access to it; "
                           "GET /v1/models lists yours", param="model", code="model_not_found")
        call.model = name
        return call

    def record(self, call: Call, admitted: bool = True):
        if call.recorded:
            return
        call.recorded = True
        row = self.maas.record(call.row(), call.key, admitted=admitted)
        m = self.metrics
        m.requests.labels(call.endpoint, str(row.status)).inc()
        m.e2e.observe(row.latency_s)
        m.prompt_tokens.inc(row.prompt_tokens)
        m.cached_tokens.inc(row.cached_tokens)
        m.generation_tokens.inc(row.completion_tokens)
        for _, r in call.jobs:
            if r.t_first is not None:
                m.ttft.observe(r.t_first - r.t_submit)

    @staticmethod
    def params(**kw) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise _param_error(e) from None

    def sampling(self, body, max_tokens: int, stop_ids, i: int, logprobs: bool = False, top: int = 0,
                 stops=()) -> SamplingParams:
        """SamplingParams of choice i from an OpenAI-style body (fields it lacks keep their defaults)."""
        kw = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                            "presence_penalty", "frequency_penalty") if hasattr(body, k)}
        return self.params(max_new_tokens=max_tokens, seed=None if body.seed is None else body.seed + i,
                           stop=tuple(stops), stop_ids=tuple(stop_ids), logprobs=logprobs, top_logprobs=top, **kw)

    @staticmethod
    def stops(stop) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 16:
            raise APIError(400, f"{len(stops)} stop strings; at most 16", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops

    def check_chars(self, chars: int, param: str):
        """400 for text of `chars` characters: it can never fit the context, whatever it encodes to."""
        if chars > self.max_text_chars:
            raise APIError(400, f"{param}: {chars} characters can never fit the context of {self.engine.max_len} "
                           f"tokens (at most {self.max_text_chars} characters)", param=param, code="context_length_exceeded")

    def encode(self, text: str, param: str) -> list[int]:
        """Token ids of a request's text (call it off the event loop: see `prepare`); 400 for a text that
        cannot fit the context whatever it encodes to, or that the tokenizer refuses."""
        self.check_chars(len(text), param)
        try:
            return self.tok.encode(text)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def max_sequences(self, call: Call) -> int:
        """The most engine requests (prompts x n) one HTTP request may queue: its key's share of the
        queue, or the whole queue with auth off (one tenant)."""
        return self.engine.max_waiting if call.key is None else min(self.engine.max_waiting, self.waiting_per_key)

    def rest_of_context(self, prompt_len: int) -> int:
        """max_tokens when a request gives none: the server's default, within the context."""
        return max(1, min(self.default_max_tokens, self.engine.max_len - prompt_len))

    @staticmethod
    async def prepare(fn, *args):
        """Run a handler's request preparation (tokenizing, layouts) in a worker thread: a 10 MB prompt
        must not stall the event loop, which serves every other stream and /health."""
        return await asyncio.to_thread(fn, *args)

    def encode_prompt(self, p, param: str) -> list[int]:
        if isinstance(p, str):
            return self.encode(p, param)
        V = self.model.cfg.vocab_size
        if any(not 0 <= t < V for t in p):
            raise APIError(400, f"token ids must lie in 0..{V - 1}", param=param)
        return list(p)

    # ---- prompt layouts (token ids -> engine Request) ----
    def blank_request(self, before: list[int], mask_role: str, after: list[int], params: SamplingParams) -> Request:
        """GLM blank infilling: Part A = before [mask] after (bidirectional); <sop> at the mask's position,
        block position 1; generated token k at (mask position, k + 2)."""
        part_a = before + [self.special(mask_role)] + after
        T, m = len(part_a), len(before)
        pos = [list(range(T)) + [m], [0] * T + [1]]
        return Request(part_a + [self.special("sop")], params, position_ids=pos, sep=T, gen_start=(m, 2), gen_step=(0, 1))

    def causal_request(self, ids: list[int], params: SamplingParams) -> Request:
        return Request([self.special("gmask"), self.special("sop")] + ids, params)

    def completion_stop_ids(self) -> tuple[int, ...]:
        return (self.special("eos"),) if self.causal else (self.special("eop"), self.special("eos"))

    def submit_all(self, call: Call, choices: list[_Choice], max_tokens: int):
        """Submit every choice's request; all or nothing: each is checked (400) before any is queued, then
        the call reserves its prompt tokens + max_tokens per choice against the key's limits (429)."""
        try:
            for c in choices:
                self.engine.check(c.req)
        except ValueError as e:
            code = "context_length_exceeded" if "exceeds the context" in str(e) else "invalid_value"
            raise APIError(400, str(e), param="messages" if call.endpoint.endswith("chat/completions") else "prompt",
                           code=code) from None
        if call.key is not None and self.engine.waiting_in(call.scope) + len(choices) > self.waiting_per_key:
            # checked and submitted on the event loop with no await between: no other request of the key interleaves
            raise LimitError(f"this key's requests already fill its share of the waiting queue ({self.waiting_per_key} "
                             "sequences); retry when they start", "requests", "rate_limit_exceeded", 1)
        call.reserve(call.prompt_tokens + max_tokens * len(choices))
        try:
            for c in choices:
                call.submit(c)
        except EngineFull as e:
            call.cancel()
            raise APIError(503, f"the server is overloaded ({e}); retry shortly", "server_error", None, "overloaded",
                           {"retry-after": "1"}) from None

    async def events(self, call: Call, choices: list[_Choice]):
        """(choice, new text, new logprob entries, finished) as tokens arrive, for all choices."""
        left = len(choices)
        while left:
            i, item = await call.queue.get()
            ch = choices[i]
            if item is None:
                left -= 1
                piece = ch.emit(ch.stop.close())
                r = ch.req.finish_reason
                ch.finish_reason = "stop" if ch.matched else r
                yield ch, piece, [], True
                continue
            if ch.matched:
                continue
            tok, logprob, top = item
            offset = len(ch.prefix) + len(ch.text)
            piece = ch.emit(ch.stop.add(tok))
            if ch.stop.matched is not None:  # cut here; the engine stops at its next step
                ch.matched = True
                self.engine.cancel(ch.req)
            entry = (tok, logprob, top, offset)
            ch.entries.append(entry)
            yield ch, piece, [entry], False

    async def collect(self, request: HTTPRequest, call: Call, choices: list[_Choice]):
        """Run every choice to its end (non-streaming); a client that leaves cancels them."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(watch())  # the middleware's receive cancels on disconnect
        try:
            async for _ in self.events(call, choices):
                pass
        finally:
            watcher.cancel()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            why = failed[0].req.error or "see the server log"
            raise APIError(500, f"the engine failed on this request ({why})", "server_error", None, "engine_error")

    async def locked(self, fn, *args, **kw):
        """Run fn in a worker thread, one at a time; returns (result, seconds)."""
        def run():
            with self.work_lock, torch.inference_mode():
                t0 = time.perf_counter()
                return fn(*args, **kw), time.perf_counter() - t0
        return await asyncio.to_thread(run)

    # ---- formatting ----
    def token_str(self, t: int) -> str:
        return self.tok.decode([t])

    def completion_logprobs(self, entries) -> dict:
        return {"tokens": [self.token_str(t) for t, *_ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
                "top_logprobs": [{self.token_str(i): v for i, v in top.items()} if top else None for _, _, top, _ in entries],
                "text_offset": [o for *_, o in entries]}

    def chat_logprobs(self, entries) -> dict:
        def one(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in (top or {}).items()]}
                            for t, lp, top, _ in entries]}


# what a failed regex of the schema means, in words (pydantic's message quotes the regex)
_PATTERN_ERRORS = {
    "pattern": "the cloze pattern must contain a plain {text} field and no other fields, format specs or conversions "
               "(write literal braces as {{ and }})",
    "text": "no [MASK], [sMASK] or [gMASK] in text: mark each blank to fill",
}


def _common_checks(body: _Sampling):
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(model, tokenizer, model_name: str, maas: MaaS | None = None, max_batch: int = 8, max_waiting: int = 64,
               max_len: int | None = None, default_max_tokens: int = 1024, admin_token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S,
               waiting_per_key: int | None = None) -> FastAPI:
    """The FastAPI app serving `model`. maas=None: no authentication, an in-memory ledger (local use).
    default_max_tokens: what chat and /infill generate when a request names no limit (within the context).
    admin_token: the credential /metrics needs when auth is on. max_body_bytes / body_timeout: a request body
    larger (413) or slower (408) than these is refused before it takes a slot. waiting_per_key: the
    sequences one key may have waiting (default a quarter of max_waiting), so no tenant fills the queue.
    The engine thread starts with the app's lifespan (uvicorn, or `TestClient` used as a context manager)."""
    maas = maas or MaaS.local()
    server = Server(model.eval(), tokenizer, model_name, maas, max_batch, max_waiting, max_len, default_max_tokens,
                    admin_token, waiting_per_key)

    @asynccontextmanager
    async def lifespan(app):
        server.runner.start()
        try:
            yield
        finally:
            server.runner.stop()

    app = FastAPI(title="glmkit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible and GLM-native endpoints for a GLM model (see glmkit/server/app.py).")
    app.state.server = server
    app.openapi = lambda: _openapi(app)
    app.add_middleware(MeterMiddleware, server=server, max_body_bytes=max_body_bytes, body_timeout=body_timeout)

    # ---- errors in OpenAI's shape ----
    def _note(request, message):
        call = request.scope.get("glmkit.call")
        if call is not None:
            call.error = message

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        _note(request, e.message)
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(LimitError)
    async def _limit(request, e: LimitError):  # a reservation the key's budget or TPM cannot take
        _note(request, str(e))
        return limit_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errs = e.errors()
        # a union field reports one error per branch; a value error (ours: bounds, surrogates) says most
        specific = [x for x in errs if x.get("type") in ("value_error", "string_unicode")]
        first = (specific or errs or [{"loc": (), "msg": "invalid request"}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        what = first["msg"]
        if first.get("type") == "string_pattern_mismatch":
            what = _PATTERN_ERRORS.get(param, what)
        msg = f"{param}: {what}" if param else what
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problems)"
        _note(request, msg)
        return error_response(400, msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = str(e.detail) if e.status_code != 404 else f"no route {request.method} {request.url.path}"
        _note(request, msg)
        return error_response(e.status_code, msg, "invalid_request_error", None, None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        traceback.print_exception(e)
        _note(request, f"{type(e).__name__}: {e}")
        return error_response(500, f"internal error ({type(e).__name__}); see the server log", "server_error", None, "internal_error")

    # ---- service ----
    @app.get("/", include_in_schema=False)
    async def playground():
        """The playground: fill the blanks, chat, and this key's usage (plain HTML and JS)."""
        return HTMLResponse((Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/usage")
    async def usage(request: HTTPRequest):
        """The calling key's totals from the ledger (all keys' when auth is off, for local use)."""
        key = request.scope.get("glmkit.key")
        rows = server.maas.ledger.totals(key_id=key.id if key is not None else None)
        return {"object": "usage", "data": rows}

    @app.get("/health")
    async def health():
        ok = server.runner.alive
        body = {"status": "ok" if ok else "unavailable", "model": server.name, "running": server.engine.num_running,
                "waiting": server.engine.num_waiting, "engine_failures": server.runner.failures}
        return JSONResponse(body, status_code=200 if ok else 503)

    error_json = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition format 0.0.4",
              "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}},
        401: {"description": "missing or wrong admin token", "content": error_json},
        403: {"description": "auth is on and no admin token is configured", "content": error_json}})
    async def metrics(request: HTTPRequest):
        """Prometheus metrics over all tenants. With auth on they need the admin token
        (`Authorization: Bearer ...`, from `glmkit serve --admin-token-file`); with --no-auth they are open."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if server.maas.auth:
            if server.admin_token is None:
                raise APIError(403, "/metrics covers every tenant: start the server with --admin-token-file FILE (or "
                               "GLMKIT_ADMIN_TOKEN) and send that token as 'Authorization: Bearer ...'",
                               "permission_error", code="admin_token_not_configured")
            scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), server.admin_token.encode()):
                raise APIError(401, "/metrics needs the admin token: 'Authorization: Bearer ADMIN_TOKEN'",
                               code="invalid_admin_token")
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card():
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "glmkit",
                "max_model_len": server.engine.max_len}

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest):
        key = request.scope.get("glmkit.key")
        data = [model_card()] if key is None or key.allows(server.name) else []
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: HTTPRequest):
        key = request.scope.get("glmkit.key")
        if name != server.name or (key is not None and not key.allows(name)):
            raise APIError(404, f"the model {name!r} does not exist or you do not have access to it", param="model",
                           code="model_not_found")
        return model_card()

    # ---- OpenAI completions ----
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        call = server.check_model(request, body.model)
        _common_checks(body)
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported; use n", param="best_of", code="unsupported_parameter")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt scoring) is not served: the engine does not score prompts; "
                           "use /v1/classify or `glmkit lm-eval`", param="echo", code="unsupported_parameter")
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) * body.n > server.max_sequences(call):
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} sequences; this server takes at most "
                           f"{server.max_sequences(call)} in one request", param="n")
        lp = body.logprobs is not None

        def build() -> list[_Choice]:  # in a worker thread
            stops = server.stops(body.stop)
            stop_ids = server.completion_stop_ids()
            suffix_ids = server.encode(body.suffix, "suffix") if body.suffix is not None else None
            if body.suffix is not None and server.causal:
                stops += causal_infill_stops(body.suffix)
            choices = []
            for g, prompt in enumerate(prompts):
                ids = server.encode_prompt(prompt, "prompt")
                echo = (prompt if isinstance(prompt, str) else server.tok.decode(ids)) if body.echo else ""
                for k in range(body.n):
                    params = server.sampling(body, body.max_tokens, stop_ids, k, lp, body.logprobs or 0, stops)
                    if server.causal:
                        req = server.causal_request(ids, params)
                    elif suffix_ids is not None:
                        req = server.blank_request(ids, "mask", suffix_ids, params)
                    else:
                        req = server.blank_request(ids, "gmask", [], params)
                    choices.append(_Choice(len(choices), g, req, StopText(server.tok, stops), prefix=echo))
            return choices

        choices = await server.prepare(build)
        call.prompt_tokens = sum(len(c.req.prompt_ids) for c in choices if c.index % body.n == 0)
        server.submit_all(call, choices, body.max_tokens)
        cid, created = "cmpl-" + call.id, int(time.time())

        def choice_obj(ch, text, entries, finish):
            return {"index": ch.index, "text": text, "logprobs": server.completion_logprobs(entries) if lp else None,
                    "finish_reason": finish}

        if not body.stream:
            await server.collect(request, call, choices)
            return {"id": cid, "object": "text_completion", "created": created, "model": server.name,
                    "choices": [choice_obj(c, c.prefix + c.text, c.entries, c.finish_reason) for c in choices],
                    "usage": call.usage()}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            base = {"id": cid, "object": "text_completion", "created": created, "model": server.name}
            if include_usage:
                base["usage"] = None
            for ch in choices:
                if ch.prefix:
                    yield _sse({**base, "choices": [choice_obj(ch, ch.prefix, [], None)]})
            async for ch, piece, entries, done in server.events(call, choices):
                if done and ch.finish_reason == "error":
                    yield _sse_engine_error(ch.req)
                    return
                if piece or entries or done:
                    yield _sse({**base, "choices": [choice_obj(ch, piece, entries, ch.finish_reason if done else None)]})
            for event in _sse_end(base, call, include_usage):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # ---- OpenAI chat ----
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: HTTPRequest):
        call = server.check_model(request, body.model)
        _common_checks(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.n > server.max_sequences(call):
            raise APIError(400, f"n={body.n}: this server takes at most {server.max_sequences(call)} in one request", param="n")
        messages = []
        for m in body.messages:
            content = m.content if m.content is not None else ""
            if not isinstance(content, str):
                content = "".join(part.text for part in content)
            role = {"developer": "system", "tool": "observation"}.get(m.role, m.role)
            messages.append({"role": role, "content": content})
        server.check_chars(sum(len(m["content"]) for m in messages), "messages")
        lp, top = body.logprobs, body.top_logprobs or 0

        def build() -> list[_Choice]:  # in a worker thread
            try:
                ids, _ = server.tok.render_chat(messages, add_generation_prompt=True)
                stop_ids = tuple(server.tok.chat_stop_ids())
            except KeyError as e:
                raise APIError(400, f"this model's tokenizer has no chat template tokens ({e}); use /v1/completions") from None
            except ValueError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            stops = server.stops(body.stop)
            max_tokens = body.max_completion_tokens or body.max_tokens or server.rest_of_context(len(ids))
            return [_Choice(k, 0, Request(ids, server.sampling(body, max_tokens, stop_ids, k, lp, top, stops)),
                            StopText(server.tok, stops), strip_newline=True) for k in range(body.n)]

        choices = await server.prepare(build)
        call.prompt_tokens = len(choices[0].req.prompt_ids)
        server.submit_all(call, choices, choices[0].req.params.max_new_tokens)
        cid, created = "chatcmpl-" + call.id, int(time.time())

        if not body.stream:
            await server.collect(request, call, choices)
            return {"id": cid, "object": "chat.completion", "created": created, "model": server.name,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": server.chat_logprobs(c.entries) if lp else None,
                                 "finish_reason": c.finish_reason} for c in choices],
                    "usage": call.usage()}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.name}
            if include_usage:
                base["usage"] = None

            def chunk(i, delta, entries=None, finish=None):
                logprobs = server.chat_logprobs(entries) if lp and entries else None
                return _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

            for ch in choices:
                yield chunk(ch.index, {"role": "assistant", "content": ""})
            held: dict[int, list] = {c.index: [] for c in choices}  # logprob entries of tokens whose text is held back
            async for ch, piece, entries, done in server.events(call, choices):
                if done and ch.finish_reason == "error":
                    yield _sse_engine_error(ch.req)
                    return
                held[ch.index] += entries
                if piece:
                    yield chunk(ch.index, {"content": piece}, held[ch.index])
                    held[ch.index] = []
                if done:
                    yield chunk(ch.index, {}, held[ch.index], ch.finish_reason)
            for event in _sse_end(base, call, include_usage):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # ---- GLM-native ----
    @app.post("/v1/fill")
    async def fill_blanks(body: FillRequest, request: HTTPRequest):
        from ..generate import fill

        call = server.check_model(request, body.model)
        if server.causal:
            raise APIError(400, "/v1/fill needs a model trained with GLM's blank-infilling objective; this one is causal "
                           "(GLM-4 family): use /v1/completions", param="model", code="unsupported_model")
        parts = re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", body.text)
        marks = parts[1::2]
        if not marks:
            raise APIError(400, "no [MASK], [sMASK] or [gMASK] in text: mark each blank to fill", param="text")
        for m in set(marks):
            server.special(MASK_STRINGS[m])
        part_a = await server.prepare(lambda: sum(len(server.encode(t, "text")) for t in parts[0::2] if t) + len(marks))
        need = part_a + len(marks) * (body.max_tokens + 1)
        if need > server.engine.max_len:
            raise APIError(400, f"the text ({part_a} tokens) plus {len(marks)} blanks of up to max_tokens={body.max_tokens} "
                           f"need {need} positions; the context is {server.engine.max_len}", param="text",
                           code="context_length_exceeded")
        params = server.sampling(body, body.max_tokens, (), 0, stops=server.stops(body.stop))
        call.prompt_tokens = part_a
        call.reserve(part_a + len(marks) * body.max_tokens)
        call.start()
        try:
            res, dt = await server.locked(fill, server.model, server.tok, body.text, params)
        except ValueError as e:
            raise APIError(400, str(e), param="text") from None
        call.compute_s, call.completion_tokens = dt, sum(len(s.token_ids) for s in res.spans)
        call.finish_reason = ",".join(sorted({s.finish_reason for s in res.spans}))
        return {"id": "fill-" + call.id, "object": "fill", "created": int(time.time()), "model": server.name,
                "text": res.text,
                "spans": [{"mask": s.mask, "text": s.text, "start": s.start, "tokens": len(s.token_ids),
                           "finish_reason": s.finish_reason} for s in res.spans],
                "usage": call.usage()}

    @app.post("/infill")
    async def infill(body: InfillRequest, request: HTTPRequest):
        call = server.check_model(request, body.model)
        pre, suf = await server.prepare(lambda: (server.encode(body.input_prefix, "input_prefix"),
                                                 server.encode(body.input_suffix, "input_suffix")))
        stops = server.stops(body.stop)
        if server.causal:
            stops += causal_infill_stops(body.input_suffix)
        T = len(pre) + 2 + (0 if server.causal else len(suf))  # [gMASK] <sop> prefix, or prefix [MASK] suffix <sop>
        n = body.n_predict if body.n_predict > 0 else server.rest_of_context(T)
        params = server.params(max_new_tokens=n, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                               min_p=body.min_p, repetition_penalty=body.repeat_penalty,
                               seed=None if body.seed < 0 else body.seed, stop=stops,
                               stop_ids=server.completion_stop_ids())
        req = server.causal_request(pre, params) if server.causal else server.blank_request(pre, "mask", suf, params)
        ch = _Choice(0, 0, req, StopText(server.tok, stops))
        call.prompt_tokens = len(req.prompt_ids)
        server.submit_all(call, [ch], n)
        await server.collect(request, call, [ch])
        stop_type = "word" if ch.matched else {"stop": "eos", "length": "limit"}.get(ch.finish_reason, ch.finish_reason)
        return {"content": ch.text, "model": server.name, "stop": True, "stop_type": stop_type,
                "stopping_word": ch.stop.matched or "", "tokens_predicted": len(req.output_ids),
                "tokens_evaluated": len(req.prompt_ids), "truncated": False}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: HTTPRequest):
        from ..infill import special_ids
        from ..finetune import ClozeTask, candidate_scores

        call = server.check_model(request, body.model)
        if server.causal:
            raise APIError(400, "/v1/classify scores blanks with GLM's infilling objective; this model is causal "
                           "(GLM-4 family)", param="model", code="unsupported_model")
        texts = [body.text] if isinstance(body.text, str) else body.text
        # the schema's CLOZE_PATTERN admits plain {text} fields only; each repeats the text
        server.check_chars(max(len(t) for t in texts) * body.pattern.count("{text}") + len(body.pattern), "text")

        def build():  # in a worker thread
            try:
                task = ClozeTask(body.pattern, dict(body.labels))
                return task, [task.encode(server.tok, {"text": t}, max_len=1 << 30) for t in texts]  # never truncated here
            except (KeyError, ValueError, IndexError) as e:
                raise APIError(400, str(e).strip('"'), param="pattern") from None

        task, items = await server.prepare(build)
        if any(not c for c in items[0][2]):
            raise APIError(400, "a verbalizer encodes to no tokens; give each label a non-empty text", param="labels")
        longest = max(len(c) for c in items[0][2])
        sizes = [len(pre) + len(suf) + 2 + longest for pre, suf, _ in items]
        if max(sizes) > server.engine.max_len:
            i = sizes.index(max(sizes))
            raise APIError(400, f"text {i} with the pattern needs {sizes[i]} tokens; the context is {server.engine.max_len}",
                           param="text", code="context_length_exceeded")
        call.prompt_tokens = sum(len(pre) + len(suf) + 2 + len(c) for pre, suf, cands in items for c in cands)
        call.reserve(call.prompt_tokens)
        call.start()
        scores, dt = await server.locked(candidate_scores, server.model, items, special_ids(server.tok), body.score)
        call.compute_s, call.finish_reason = dt, "scored"
        probs = scores.float().softmax(-1)
        labels = task.labels
        data = [{"index": i, "label": labels[int(s.argmax())],
                 "probs": {lab: float(p) for lab, p in zip(labels, pr)},
                 "scores": {lab: float(v) for lab, v in zip(labels, s)}} for i, (s, pr) in enumerate(zip(scores, probs))]
        return {"id": "cls-" + call.id, "object": "classification", "created": int(time.time()), "model": server.name,
                "data": data, "usage": call.usage()}

    return app


# ---- command line ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """`glmkit serve`."""
    from pathlib import Path

    from ..cli import load_for_cli
    from .maas import KeyStore, Ledger, Pricing, default_db_path

    p = argparse.ArgumentParser(prog="glmkit serve", description="Serve a model over HTTP: OpenAI-compatible "
                                "/v1/completions and /v1/chat/completions, GLM /v1/fill, /infill, /v1/classify, /metrics.")
    p.add_argument("--model", default=None, help="checkpoint directory (with tokenizer.json); default: the embedded model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model's directory)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the model directory's name)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|xpu|npu|mlu|musa")
    p.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-auth", action="store_true", help="no API keys (local use only); requests are still metered")
    p.add_argument("--keys-db", default=None, help=f"keys database, also the ledger by default (default: {default_db_path()})")
    p.add_argument("--ledger", default=None, help="usage ledger database (default: the keys database)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 503")
    p.add_argument("--max-waiting-per-key", type=int, default=None,
                   help="queued requests one key may have (default: a quarter of --max-waiting); over it, 429")
    p.add_argument("--max-len", type=int, default=None, help="context per row (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="tokens a chat or /infill request may generate when it names no limit (within the context)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20), help="largest request body (413 above)")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, help="seconds a request body may take to arrive (408)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds a client has to send a request head before the connection is closed")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--admin-token-file", default=None,
                   help="file holding the admin token that /metrics needs when auth is on (or set GLMKIT_ADMIN_TOKEN)")
    g = p.add_argument_group("prices (for the ledger's cost and revenue; one currency)")
    g.add_argument("--price-per-hour", type=float, default=0.0, help="the machine's price per hour of compute")
    g.add_argument("--price-input", type=float, default=0.0, help="per million prompt tokens")
    g.add_argument("--price-cached-input", type=float, default=None, help="per million cached prompt tokens (default: input)")
    g.add_argument("--price-output", type=float, default=0.0, help="per million completion tokens")
    a = p.parse_args(argv)
    for name in ("max_batch", "max_waiting"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    pricing = Pricing(a.price_per_hour, a.price_input, a.price_cached_input, a.price_output)
    db = a.keys_db or default_db_path()
    ledger = Ledger(a.ledger or db)
    if a.no_auth:
        maas = MaaS(None, ledger, pricing, auth=False)
        if a.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"glmkit serve: warning: --no-auth on {a.host}: anyone who reaches this address can use the model",
                  file=sys.stderr)
    else:
        keys = KeyStore(db)
        maas = MaaS(keys, ledger, pricing)
        if not keys.list():
            print(f"glmkit serve: no active API keys in {db}: every request will get 401. Create one with "
                  f"`glmkit keys create --db {db}`, or use --no-auth on this machine only", file=sys.stderr)
    admin_token = os.environ.get("GLMKIT_ADMIN_TOKEN")
    if a.admin_token_file:
        admin_token = Path(a.admin_token_file).read_text().strip()
    if admin_token is not None and len(admin_token) < 16:
        raise ValueError("the admin token must be at least 16 characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'`)")
    name = a.model_name or (Path(a.model).name if a.model else "glmkit-default")
    model, tok = load_for_cli(a, "serve")
    try:
        app = create_app(model, tok, name, maas, a.max_batch, a.max_waiting, a.max_len, a.default_max_tokens, admin_token,
                         int(a.max_body_mb * (1 << 20)), a.body_timeout, a.max_waiting_per_key)
    except MemoryError as e:  # the KV cache cannot fit: refused before allocating, with the flags that fit
        print(f"glmkit serve: {e}", file=sys.stderr)
        return 1
    print(f"glmkit serve: {name} on http://{a.host}:{a.port} (auth {'off' if a.no_auth else 'on'}, ledger {ledger.path})",
          file=sys.stderr)
    serve(app, a.host, a.port, header_timeout=a.header_timeout, timeout_keep_alive=a.timeout_keep_alive)
    return 0
