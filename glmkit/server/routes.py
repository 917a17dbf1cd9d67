"""The routes: module-level handlers on one APIRouter, each given the app's `state.Server`
(`request.app.state.server`) as the dependency `server: ServerDep`. A handler translates: it checks
what the schema cannot, lays the prompt out for the engine through the server's helpers, and shapes
the answer (JSON, or server-sent events for "stream": true).

    app.include_router(router)                             # app.create_app does this
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .. import tools
from ..constrain import Constraint
from ..engine import Request
from ..generate import MASK_STRINGS, causal_infill_stops
from ..sampling import StopText
from .schemas import APIError, ChatRequest, ClassifyRequest, CompletionRequest, FillRequest, InfillRequest
from .state import Choice, Server

router = APIRouter()


async def _server(request: HTTPRequest) -> Server:  # async: a plain def would run in a worker thread
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]  # a handler's `server: ServerDep` is the app's Server


def _completion_logprobs(tok, entries) -> dict:
    """OpenAI's completion logprobs of (token id, logprob, top {id: logprob}, text offset) entries."""
    return {"tokens": [tok.decode([t]) for t, *_ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": [{tok.decode([i]): v for i, v in top.items()} if top else None for _, _, top, _ in entries],
            "text_offset": [o for *_, o in entries]}


def _chat_logprobs(tok, entries) -> dict:
    """OpenAI's chat logprobs of the same entries."""
    def one(t, lp):
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in (top or {}).items()]}
                        for t, lp, top, _ in entries]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# a stream that fails mid-way ends with an error event (the status line is already sent)
def _sse_engine_error(req: Request) -> str:
    return _sse({"error": {"message": f"the engine failed on this request ({req.error or 'see the server log'})",
                           "type": "server_error", "param": None, "code": "engine_error"}})


def _sse_end(base: dict, call, include_usage: bool) -> list[str]:
    """The end of an OpenAI stream: the usage chunk when asked for (no choices), then [DONE]."""
    return ([_sse({**base, "choices": [], "usage": call.usage()})] if include_usage else []) + ["data: [DONE]\n\n"]


# ---- service ----
@router.get("/", include_in_schema=False)
async def playground():
    """The playground: fill the blanks, chat, and this key's usage (plain HTML and JS)."""
    return HTMLResponse((Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8"))


@router.get("/v1/usage")
async def usage(request: HTTPRequest, server: ServerDep):
    """The calling key's totals from the ledger (all keys' when auth is off, for local use)."""
    key = request.scope.get("glmkit.key")
    rows = server.maas.ledger.totals(key_id=key.id if key is not None else None)
    return {"object": "usage", "data": rows}


@router.get("/health")
async def health(server: ServerDep):
    ok = server.runner.alive
    body = {"status": "ok" if ok else "unavailable", "model": server.name, "running": server.engine.num_running,
            "waiting": server.engine.num_waiting, "engine_failures": server.runner.failures}
    return JSONResponse(body, status_code=200 if ok else 503)


error_json = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format 0.0.4",
          "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}},
    401: {"description": "missing or wrong admin token", "content": error_json},
    403: {"description": "auth is on and no admin token is configured", "content": error_json}})
async def metrics(request: HTTPRequest, server: ServerDep):
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


def model_card(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": server.created, "owned_by": "glmkit",
            "max_model_len": server.engine.max_len}


@router.get("/v1/models")
async def list_models(request: HTTPRequest, server: ServerDep):
    key = request.scope.get("glmkit.key")
    data = [model_card(server)] if key is None or key.allows(server.name) else []
    return {"object": "list", "data": data}


@router.get("/v1/models/{name}")
async def get_model(name: str, request: HTTPRequest, server: ServerDep):
    key = request.scope.get("glmkit.key")
    if name != server.name or (key is not None and not key.allows(name)):
        raise APIError(404, f"the model {name!r} does not exist or you do not have access to it", param="model",
                       code="model_not_found")
    return model_card(server)


# ---- OpenAI completions ----
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: HTTPRequest, server: ServerDep):
    call = server.check_model(request, body.model)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt scoring) is not served: the engine does not score prompts; "
                       "use /v1/classify or `glmkit lm-eval`", param="echo", code="unsupported_parameter")
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if len(prompts) * body.n > server.max_sequences(call):
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} sequences; this server takes at most "
                       f"{server.max_sequences(call)} in one request", param="n")
    lp = body.logprobs is not None

    def build() -> list[Choice]:  # in a worker thread
        constraint = server.constraint(body)  # first: a bad one is refused before any tokenizing
        stops = server.stops(body.stop)
        stop_ids = server.completion_stop_ids(body.suffix is not None)
        suffix_ids = server.encode(body.suffix, "suffix") if body.suffix is not None else None
        if body.suffix is not None and not server.sees_suffix:
            stops += causal_infill_stops(body.suffix)
        choices = []
        for g, prompt in enumerate(prompts):
            ids = server.encode_prompt(prompt, "prompt")
            echo = (prompt if isinstance(prompt, str) else server.tok.decode(ids)) if body.echo else ""
            for k in range(body.n):
                params = server.sampling(body, body.max_tokens, stop_ids, k, lp, body.logprobs or 0, stops, constraint)
                req = server.completion_request(ids, suffix_ids, params)
                choices.append(Choice(len(choices), g, req, StopText(server.tok, stops), prefix=echo))
        return choices

    choices = await server.prepare(build)
    call.prompt_tokens = sum(len(c.req.prompt_ids) for c in choices if c.index % body.n == 0)
    server.submit_all(call, choices, body.max_tokens)
    cid, created = "cmpl-" + call.id, int(time.time())

    def choice_obj(ch, text, entries, finish):
        return {"index": ch.index, "text": text, "logprobs": _completion_logprobs(server.tok, entries) if lp else None,
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
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: HTTPRequest, server: ServerDep):
    call = server.check_model(request, body.model)
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
        if m.tool_calls:
            messages[-1]["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    calling = _tool_calling(server, body)  # None, or what renders, forces and parses the calls
    if calling is None and server.chat.tools in tools.GLM45:  # the parser keeps the thinking block out of the content
        calling = _ToolCalling(server.chat.tools, [], "auto", body.parallel_tool_calls)
    server.check_chars(sum(len(m["content"]) + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))
                           for m in messages) + (len(json.dumps(calling.fns)) if calling else 0), "messages")
    lp, top = body.logprobs, body.top_logprobs or 0

    def build() -> list[Choice]:  # in a worker thread
        constraint = server.constraint(body)  # first: a bad one is refused before any rendering
        fmt = server.chat
        try:
            ids, _ = tools.render(fmt, server.tok, messages, calling.fns if calling else [], add_generation_prompt=True)
            stop_ids = tuple(fmt.stop_ids(server.tok))
        except KeyError as e:
            raise APIError(400, f"this model's tokenizer lacks the {fmt.name} chat format's tokens ({e}); "
                           "use /v1/completions") from None
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if constraint is not None:  # the reply's own first newline stays allowed (emit drops it); GLM-4.7: after </think>
            constraint = fmt.reply_constraint(constraint)
        stops = server.stops(body.stop)
        max_tokens = body.max_completion_tokens or body.max_tokens or server.rest_of_context(len(ids))
        if calling and calling.constraint is not None and constraint is not None:
            raise APIError(400, "a forced tool call (tool_choice 'required' or a named function) already constrains the "
                           "reply to the function's arguments; drop response_format / the guided fields, or use "
                           "tool_choice 'auto'", param="tool_choice")
        params = [server.sampling(body, max_tokens, stop_ids, k, lp, top, stops, constraint) for k in range(body.n)]
        if calling:  # the reply goes to the call parser whole: "<|assistant|>" (the next call) kept, no newline cut
            return [Choice(k, 0, server.chat_request(ids, calling.force(p)), StopText(server.tok, stops, skip_special_tokens=False))
                    for k, p in enumerate(params)]
        return [Choice(k, 0, server.chat_request(ids, p), StopText(server.tok, stops), strip_newline=fmt.strip_newline)
                for k, p in enumerate(params)]

    choices = await server.prepare(build)
    call.prompt_tokens = len(choices[0].req.prompt_ids)
    server.submit_all(call, choices, choices[0].req.params.max_new_tokens)
    cid, created = "chatcmpl-" + call.id, int(time.time())

    if not body.stream:
        await server.collect(request, call, choices)

        def answer(c):  # (message, finish_reason)
            if calling is None:
                return {"role": "assistant", "content": c.text}, c.finish_reason
            content, calls = calling.parse(c.text)
            return ({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})},
                    "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason)
        return {"id": cid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": c.index, "message": msg, "logprobs": _chat_logprobs(server.tok, c.entries) if lp else None,
                             "finish_reason": finish} for c in choices for msg, finish in [answer(c)]],
                "usage": call.usage()}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream():
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.name}
        if include_usage:
            base["usage"] = None

        def chunk(i, delta, entries=None, finish=None):
            logprobs = _chat_logprobs(server.tok, entries) if lp and entries else None
            return _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        for ch in choices:
            yield chunk(ch.index, {"role": "assistant", "content": ""})
        held: dict[int, list] = {c.index: [] for c in choices}  # logprob entries of tokens whose text is held back
        parsers = {c.index: calling.parser() for c in choices} if calling else {}
        async for ch, piece, entries, done in server.events(call, choices):
            if done and ch.finish_reason == "error":
                yield _sse_engine_error(ch.req)
                return
            held[ch.index] += entries
            if calling:  # the text goes through the call parser: content and tool_calls deltas
                p = parsers[ch.index]
                for delta in (p.feed(piece) if piece else []) + (p.finish() if done else []):
                    yield chunk(ch.index, delta, held[ch.index])
                    held[ch.index] = []
                if done:
                    yield chunk(ch.index, {}, held[ch.index], "tool_calls" if p.ok and ch.finish_reason == "stop"
                                else ch.finish_reason)
                continue
            if piece:
                yield chunk(ch.index, {"content": piece}, held[ch.index])
                held[ch.index] = []
            if done:
                yield chunk(ch.index, {}, held[ch.index], ch.finish_reason)
        for event in _sse_end(base, call, include_usage):
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


class _ToolCalling:
    """A chat request's tools as the route uses them: the functions shown, the constraint that forces a
    call (tool_choice "required" / a named function), the parser of the reply."""

    def __init__(self, syntax: str, fns: list[dict], choice: str, parallel: bool):
        self.syntax, self.fns, self.choice, self.parallel = syntax, fns, choice, parallel
        self.names = [f["name"] for f in fns]
        self.constraint = None
        if choice != "auto":
            name = None if choice == "required" else choice
            try:
                self.constraint = Constraint.lark(tools.forced_grammar(syntax, fns, name, parallel))
                self.constraint.check()
            except ValueError as e:
                raise APIError(400, f"tools: the call cannot be forced ({e})", param="tools") from None

    def force(self, params):
        return dataclasses.replace(params, constraint=self.constraint) if self.constraint else params

    def parser(self):
        return tools.make_parser(self.syntax, self.names, self.parallel, fns=self.fns)

    def parse(self, text: str):
        return tools.parse_reply(text, self.syntax, self.names, self.parallel, fns=self.fns)


def _tool_calling(server: Server, body: ChatRequest) -> _ToolCalling | None:
    """400 for tools the model's chat format cannot take, or a tool_choice that does not fit them; None
    when no tool reaches the prompt: none sent, or tool_choice "none", where the tools are not shown (as
    vLLM and GLM-4's own OpenAI server do; shown, they would invite a call the answer could not return)."""
    raw = [t.model_dump(exclude_unset=True) for t in body.tools or []]
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    try:
        fns = tools.check_tools(raw)
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None
    try:
        choice = tools.check_choice(choice, fns)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    if not fns:
        return None
    try:
        syntax = tools.tool_syntax(server.chat)
    except ValueError as e:
        raise APIError(400, str(e), param="tools", code="unsupported_parameter") from None
    return None if choice is None else _ToolCalling(syntax, fns, choice, body.parallel_tool_calls)


# ---- GLM-native ----
@router.post("/v1/fill")
async def fill_blanks(body: FillRequest, request: HTTPRequest, server: ServerDep):
    """GLM blank filling through the engine: blank j is one engine request (`Server.fill_request`) whose prompt
    is Part A and the spans filled before it, so blanks run one after the other while other requests share
    the batch. Billed once: prompt tokens are blank 0's prompt (Part A and its <sop>), as /v1/completions counts
    a blank's prompt; cached tokens the fewest any blank had from the prompt cache (all blanks are one prompt
    group: blank 0's, as the later ones reuse at least that); completion tokens the spans. The later blanks'
    re-reads of earlier spans (Part A comes from the prompt cache) count in compute_s only."""
    from ..generate import blank_params
    from ..infill import blank_prompt

    call = server.check_model(request, body.model)
    if server.causal:
        raise APIError(400, "/v1/fill needs a model trained with GLM's blank-infilling objective; this one is causal "
                       "(GLM-4 family): use /v1/completions", param="model", code="unsupported_model")
    parts = re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", body.text)
    texts, marks = parts[0::2], parts[1::2]  # at least one mark: the schema's pattern
    mask_ids, sop = [server.special(MASK_STRINGS[m]) for m in marks], server.special("sop")
    server.special("eop")

    def build():  # in a worker thread: tokenizing, compiling the blanks' grammars
        blanks = server.typed_blanks(body.blanks, len(marks))
        return blank_prompt([server.encode(t, "text") if t else [] for t in texts], mask_ids, sop), blanks

    prompt, blanks = await server.prepare(build)
    base = server.sampling(body, body.max_tokens, (), 0, stops=server.stops(body.stop))
    params = [blank_params(server.tok, base, b, j) for j, b in enumerate(blanks)]
    need = prompt.sep + sum(p.max_new_tokens + 1 for p in params)
    if need > server.engine.max_len:
        raise APIError(400, f"the text ({prompt.sep} tokens) plus {len(marks)} blanks of up to "
                       f"{'/'.join(str(p.max_new_tokens) for p in params)} tokens need {need} positions; the context is "
                       f"{server.engine.max_len}", param="text", code="context_length_exceeded")
    call.prompt_tokens = len(prompt.ids)
    filled, reserve = [], sum(p.max_new_tokens for p in params)
    for j, p in enumerate(params):  # one choice in flight at a time on the call's queue
        ch = Choice(0, 0, server.fill_request(prompt, j, filled, p), StopText(server.tok, p.stop))
        server.submit_all(call, [ch], reserve if j == 0 else None)
        await server.collect(request, call, [ch])
        if ch.finish_reason == "cancelled":
            raise APIError(503, f"the fill was cancelled at blank {j} (the client left or the server is stopping)",
                           "server_error", code="cancelled")
        ids = [t for t, *_ in ch.entries]
        filled.append(ids[:-1] if ch.matched else ids)  # as `fill` holds a span: not the token that completed a stop
    out, spans = texts[0], []
    for ch, mark, t in zip(call.choices, marks, texts[1:]):
        spans.append({"mask": mark, "text": ch.text, "start": len(out), "tokens": len(ch.entries),
                      "finish_reason": ch.finish_reason})
        out += ch.text + t
    return {"id": "fill-" + call.id, "object": "fill", "created": int(time.time()), "model": server.name,
            "text": out, "spans": spans, "usage": call.usage()}


@router.post("/infill")
async def infill(body: InfillRequest, request: HTTPRequest, server: ServerDep):
    call = server.check_model(request, body.model)
    pre, suf = await server.prepare(lambda: (server.encode(body.input_prefix, "input_prefix"),
                                             server.encode(body.input_suffix, "input_suffix")))
    stops = server.stops(body.stop)
    if not server.sees_suffix:
        stops += causal_infill_stops(body.input_suffix)
    # the layout first ([gMASK] <sop> prefix, prefix [MASK] suffix <sop>, or the format's infilling
    # prompt): a request that names no n_predict gets the rest of the context after it
    req = server.completion_request(pre, suf, server.params())
    n = body.n_predict if body.n_predict > 0 else server.rest_of_context(len(req.prompt_ids))
    req.params = server.params(max_new_tokens=n, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                               min_p=body.min_p, repetition_penalty=body.repeat_penalty,
                               seed=None if body.seed < 0 else body.seed, stop=stops,
                               stop_ids=server.completion_stop_ids(suffix=True))
    ch = Choice(0, 0, req, StopText(server.tok, stops))
    call.prompt_tokens = len(req.prompt_ids)
    server.submit_all(call, [ch], n)
    await server.collect(request, call, [ch])
    stop_type = "word" if ch.matched else {"stop": "eos", "length": "limit"}.get(ch.finish_reason, ch.finish_reason)
    return {"content": ch.text, "model": server.name, "stop": True, "stop_type": stop_type,
            "stopping_word": ch.stop.matched or "", "tokens_predicted": len(req.output_ids),
            "tokens_evaluated": len(req.prompt_ids), "truncated": False}


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: HTTPRequest, server: ServerDep):
    from ..finetune import ClozeTask, candidate_scores
    from ..infill import special_ids

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
