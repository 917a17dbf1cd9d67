"""The HTTP server: OpenAI-compatible and GLM-native endpoints over the continuous-batching engine.

    glmkit serve --model DIR [--host 127.0.0.1 --port 8000] [--db PATH|postgresql://... | --no-auth] \\
        [--max-batch 8 --max-waiting 64 --max-len N | --kv-memory 2GiB] [--price-per-hour 2.0 --price-input 0.5 --price-output 1.5]
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
  a causal model whose chat format has a code infilling prompt (CodeGeeX4) reads that; other causal
  models cannot see the suffix, so they continue the prefix and stop where the suffix is likely to
  begin (`generate.causal_infill_stops`, a heuristic).
- chat: the model's family's chat format (`chat.chat_format(cfg)`: GLM-4's unless the checkpoint names
  another; the layout `glmkit chat` uses too), stopping at that family's stop tokens; ChatGLM-6B's
  prompt is read as a GLM Part A, every other format's causally.
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

The modules, top down: app.py composes (the Server as app state, the engine thread as lifespan,
one handler per exception type, the router, the metering middleware) and runs `glmkit serve`;
routes.py the handlers; schemas.py the requests and the spec; state.py the Server the handlers share
(engine thread, prompt layouts, stop strings); metering.py the middleware, ledger rows and metrics;
maas.py keys, limits and the ledger; http.py the listener.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .. import __version__
from .admin import router as admin_router
from .http import HEADER_TIMEOUT_S, serve
from .maas import LimitError, MaaS
from .metering import BODY_TIMEOUT_S, MAX_BODY_BYTES, MeterMiddleware, error_response, limit_response
from .replicas import ReplicaHeader
from .routes import router
from .schemas import PATTERN_ERRORS, APIError, openapi
from .state import Server


# ---- errors in OpenAI's shape: an exception type, its answer --------------------------------------------------
def _note(request, message: str):
    """The error goes in the request's ledger row too."""
    call = request.scope.get("glmkit.call")
    if call is not None:
        call.error = message


async def _api_error(request, e: APIError):
    _note(request, e.message)
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def _limit(request, e: LimitError):  # a reservation the key's budget or TPM cannot take
    _note(request, str(e))
    return limit_response(e)


async def _invalid(request, e: RequestValidationError):
    errs = e.errors()
    # a union field reports one error per branch; a value error (ours: bounds, surrogates) says most
    specific = [x for x in errs if x.get("type") in ("value_error", "string_unicode")]
    first = (specific or errs or [{"loc": (), "msg": "invalid request"}])[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    what = first["msg"]
    if first.get("type") == "string_pattern_mismatch":
        what = PATTERN_ERRORS.get(param, what)
    msg = f"{param}: {what}" if param else what
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more problems)"
    _note(request, msg)
    return error_response(400, msg, "invalid_request_error", param, "invalid_value")


async def _http(request, e: StarletteHTTPException):
    msg = str(e.detail) if e.status_code != 404 else f"no route {request.method} {request.url.path}"
    _note(request, msg)
    headers = getattr(e, "headers", None)
    if e.status_code == 405:  # Starlette's Allow names the methods of one route; a path may have several
        headers = {"allow": ", ".join(sorted({m for r in request.app.router.routes if isinstance(r, Route)
                                              and r.matches(request.scope)[0] is not Match.NONE for m in r.methods}))}
    return error_response(e.status_code, msg, "invalid_request_error", None, None, headers)


async def _crash(request, e: Exception):
    traceback.print_exception(e)
    _note(request, f"{type(e).__name__}: {e}")
    return error_response(500, f"internal error ({type(e).__name__}); see the server log", "server_error", None, "internal_error")


EXCEPTION_HANDLERS = {APIError: _api_error, LimitError: _limit, RequestValidationError: _invalid,
                      StarletteHTTPException: _http, Exception: _crash}


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(model, tokenizer, model_name: str, maas: MaaS | None = None, max_batch: int = 8, max_waiting: int = 64,
               max_len: int | None = None, default_max_tokens: int = 1024, admin_token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S,
               waiting_per_key: int | None = None, kv_memory: int | None = None,
               prefill_chunk: int | str | None = "auto", kv_dtype=None) -> FastAPI:
    """The FastAPI app serving `model`. maas=None: no authentication, an in-memory ledger (local use).
    default_max_tokens: what chat and /infill generate when a request names no limit (within the context).
    admin_token: the credential /metrics needs when auth is on. max_body_bytes / body_timeout: a request body
    larger (413) or slower (408) than these is refused before it takes a slot. waiting_per_key: the
    sequences one key may have waiting (default a quarter of max_waiting), so no tenant fills the queue.
    kv_memory: bytes of the engine's paged KV pool (default: every row at max_len). prefill_chunk: prompt tokens
    prefilled per engine step, beside the running rows' decode ("auto": sized by measured step times; None:
    whole prompts). kv_dtype: None (the
    model's) or torch.int8, the KV pool's dtype.
    The engine thread starts with the app's lifespan (uvicorn, or `TestClient` used as a context manager)."""
    server = Server(model.eval(), tokenizer, model_name, maas or MaaS.local(), max_batch, max_waiting, max_len,
                    default_max_tokens, admin_token, waiting_per_key, kv_memory, prefill_chunk, kv_dtype)

    @asynccontextmanager
    async def lifespan(app):
        server.runner.start()
        try:
            yield
        finally:
            server.runner.stop()

    app = FastAPI(title="glmkit", version=__version__, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,
                  description="OpenAI-compatible and GLM-native endpoints for a GLM model (see glmkit/server/app.py).")
    app.state.server = server
    app.openapi = lambda: openapi(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.add_middleware(MeterMiddleware, server=server, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    app.add_middleware(ReplicaHeader)
    return app


# ---- command line ---------------------------------------------------------------------------------------------
def _prefill_chunk(text: str) -> int | str:
    """--prefill-chunk: 'auto' or a count of tokens (0: whole prompts)."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, a number of tokens, or 0 for whole prompts")
    return n


def main(argv=None) -> int:
    """`glmkit serve`."""
    from pathlib import Path

    from ..cli import add_kv_dtype_arg, add_quantize_arg, kv_dtype_arg, load_for_cli
    from ..plan import parse_size
    from .maas import KeyStore, Ledger, Pricing, default_db_path

    p = argparse.ArgumentParser(prog="glmkit serve", description="Serve a model over HTTP: OpenAI-compatible "
                                "/v1/completions and /v1/chat/completions, GLM /v1/fill, /infill, /v1/classify, /metrics.")
    p.add_argument("--model", default=None, help="checkpoint directory (with tokenizer.json); default: the embedded model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model's directory)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the model directory's name)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|xpu|npu|mlu|musa")
    p.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16")
    add_quantize_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-auth", action="store_true", help="no API keys (local use only); requests are still metered")
    p.add_argument("--db", default=None, help="keys, limits and the ledger: a SQLite file, or postgresql://user@host/dbname "
                   f"shared by replicas (default: {default_db_path()})")
    p.add_argument("--keys-db", default=None, help="keys database, also the ledger by default (default: --db)")
    p.add_argument("--ledger", default=None, help="usage ledger database, which holds the limits too (default: the keys database)")
    p.add_argument("--max-batch", type=int, default=None, help="streams decoded together (default 8)")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 503")
    p.add_argument("--max-waiting-per-key", type=int, default=None,
                   help="queued requests one key may have (default: a quarter of --max-waiting); over it, 429")
    p.add_argument("--prefill-chunk", type=_prefill_chunk, default="auto",
                   help="prompt tokens prefilled per step beside the other streams' tokens: auto (sized so their time "
                        "per token stays within about 2x idle), N, or 0 (whole prompts)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context per request (default: the model's; less only when the KV pool holds less)")
    p.add_argument("--kv-memory", default=None, help="the paged KV pool's size, e.g. 2GiB or 512MiB (default: what this "
                   "machine's memory holds after the weights and workspace, at most every stream at full context)")
    add_kv_dtype_arg(p)
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
    for name in ("max_batch", "max_waiting", "max_len"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    pricing = Pricing(a.price_per_hour, a.price_input, a.price_cached_input, a.price_output)
    db = a.keys_db or a.db or default_db_path()
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
            print(f"glmkit serve: no active API keys in {keys.path}: every request will get 401. Create one with "
                  f"`glmkit keys create --db {keys.path}`, or use --no-auth on this machine only", file=sys.stderr)
    admin_token = os.environ.get("GLMKIT_ADMIN_TOKEN")
    if a.admin_token_file:
        admin_token = Path(a.admin_token_file).read_text().strip()
    if admin_token is not None and len(admin_token) < 16:
        raise ValueError("the admin token must be at least 16 characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'`)")
    name = a.model_name or (Path(a.model).name if a.model else "glmkit-default")
    try:  # the memory plan (weights, workspace, KV pool) is checked before loading; the engine checks its pool
        model, tok = load_for_cli(a, "serve")  # sets a.max_len, a.max_batch, a.kv_memory to what the plan settled
        app = create_app(model, tok, name, maas, a.max_batch, a.max_waiting, a.max_len, a.default_max_tokens, admin_token,
                         int(a.max_body_mb * (1 << 20)), a.body_timeout, a.max_waiting_per_key,
                         parse_size(a.kv_memory) if a.kv_memory else None, a.prefill_chunk or None, kv_dtype_arg(a.kv_dtype))
    except MemoryError as e:  # refused before allocating, with the flags that fit
        print(f"glmkit serve: {e}" if not str(e).startswith("glmkit serve") else e, file=sys.stderr)
        return 1
    print(f"glmkit serve: {name} on http://{a.host}:{a.port} (auth {'off' if a.no_auth else 'on'}, ledger {ledger.path})",
          file=sys.stderr)
    try:
        serve(app, a.host, a.port, header_timeout=a.header_timeout, timeout_keep_alive=a.timeout_keep_alive)
    finally:
        maas.close()  # a clean stop frees this replica's limits at once (a killed one is reaped by the others)
    return 0
