"""The HTTP server in-process: OpenAI shapes and streaming, GLM endpoints against the library functions,
errors, auth and limits, the ledger row of every request (also a client that leaves), metrics.

Apps run through FastAPI's TestClient (with the lifespan, so the engine thread runs), raw ASGI calls
(to leave in the middle of a stream), or uvicorn on a socket bound to port 0 (the official `openai`
client). A tiny random model: its text is noise, so tests compare the server with the library, and
with itself, rather than with fixed strings.
"""

import asyncio

import pytest

pytest.importorskip("fastapi")  # the `serve` extra and the test client: skipped, not failed, without them
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from glmkit.chat import FORMATS  # noqa: E402
from glmkit.engine import Request  # noqa: E402
from glmkit.finetune import ClozeTask, cloze_predict  # noqa: E402
from glmkit.generate import fill, infill  # noqa: E402
from glmkit.sampling import SamplingParams  # noqa: E402
from glmkit.server.app import create_app  # noqa: E402
from glmkit.server.maas import KeyStore, Ledger, MaaS, Pricing  # noqa: E402
from tests.serving import CHAT, assert_error, leave_after, make_model, rows, serve, sse, tok_text  # noqa: E402


@pytest.fixture(scope="module")
def filler(tok):
    """A random model whose greedy fills are not empty: the tied one's are only <sop> (empty text), and
    comparing empty with empty would prove nothing (untied head, a seed that fills every test text)."""
    return make_model(tok, tie=False, seed=2)


@pytest.fixture()
def fill_client(filler, tok):
    with TestClient(create_app(filler, tok, "tiny")) as c:
        yield c


# ---- OpenAI endpoints ------------------------------------------------------------------------------
def test_chat_stream_chunk_sequence_matches_non_streaming(client, tok):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 5}
    full = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    first, *middle, last, usage = chunks
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    for c in middle:
        (ch,) = c["choices"]
        assert set(ch["delta"]) == {"content"} and ch["delta"]["content"] and ch["finish_reason"] is None
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"] | {"prompt_tokens_details": usage["usage"]["prompt_tokens_details"]}
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null on every chunk but the last
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == full["choices"][0]["message"]["content"]
    # without include_usage: no usage chunk, no usage field
    plain = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert plain[-1]["choices"][0]["finish_reason"] and all("usage" not in c for c in plain)


def test_usage_equals_token_counts(client, tok, model):
    prompt = "The quick brown fox"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 7, "temperature": 1.0, "seed": 1, "logprobs": 0}).json()
    (ch,) = r["choices"]
    # GLM layout: prompt [gMASK] <sop>
    assert r["usage"]["prompt_tokens"] == len(tok.encode(prompt)) + 2
    assert r["usage"]["completion_tokens"] == len(ch["logprobs"]["tokens"])
    assert ch["finish_reason"] == "stop" or r["usage"]["completion_tokens"] == 7
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    c = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "temperature": 0}).json()
    ids, _ = tok.render_chat(CHAT, add_generation_prompt=True)
    assert c["usage"]["prompt_tokens"] == len(ids) and c["usage"]["completion_tokens"] <= 5
    # the same prompt again (same scope): its prefill is served from the prompt cache
    again = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "temperature": 0}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids)
    ledger = rows(client.app)
    assert [(x.prompt_tokens, x.completion_tokens, x.cached_tokens) for x in ledger] == [
        (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
        for u in (r["usage"], c["usage"], again["usage"])]
    assert all(0 < x.compute_s <= x.latency_s and x.status == 200 for x in ledger)


def test_a_cached_prompt_that_stops_at_once_is_billed_as_answered(client, monkeypatch):
    """A prompt served whole from the prompt cache whose first token is a stop id: no compute time, no output,
    yet the client is told its prompt tokens, and the ledger row must say the same (it said 0: a kill -9
    test met it by chance, the first token of a sampled reply being the stop id)."""
    server = client.app.state.server
    monkeypatch.setattr(server, "completion_stop_ids", lambda suffix=False: tuple(range(server.model.cfg.vocab_size)))
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}
    first, again = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert [r["choices"][0]["finish_reason"] for r in (first, again)] == ["stop", "stop"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] > 0
    assert again["usage"]["completion_tokens"] == 0
    assert [(x.prompt_tokens, x.completion_tokens, x.cached_tokens) for x in rows(client.app)] == [
        (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
        for u in (first["usage"], again["usage"])]


def test_n_choices_seeds_and_prompt_lists(client, tok):
    body = {"prompt": ["The quick", "Hello there"], "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    r = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["usage"]["completion_tokens"] == sum(row.completion_tokens for row in rows(client.app))
    assert r["usage"]["prompt_tokens"] == len(tok.encode("The quick")) + len(tok.encode("Hello there")) + 4  # once per prompt
    again = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]  # seeded: reproducible
    # choice k of a prompt is sampled with seed + k: the same as asking for that seed alone
    single = client.post("/v1/completions", json={**body, "prompt": "Hello there", "n": 1, "seed": 13}).json()
    assert single["choices"][0]["text"] == r["choices"][5]["text"]
    # a prompt as token ids is the same prompt
    ids = client.post("/v1/completions", json={**body, "prompt": tok.encode("Hello there"), "n": 1, "seed": 13}).json()
    assert ids["choices"][0]["text"] == single["choices"][0]["text"]


def test_stop_strings_cut_exactly_also_when_streaming(client):
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 1.0, "seed": 7}
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert len(text) >= 8, f"pick another seed: the tiny model stopped early ({text!r})"
    stop = text[4:7]
    want = text[: text.index(stop)]
    r = client.post("/v1/chat/completions", json={**body, "stop": [stop, "never-there"]}).json()
    assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stop": stop, "stream": True}).text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert rows(client.app)[-1].finish_reason == "stop"
    # usage counts the tokens up to the one that completed the stop string, whatever the engine made after
    lp = client.post("/v1/chat/completions", json={**body, "stop": stop, "logprobs": True}).json()
    assert lp["usage"]["completion_tokens"] == len(lp["choices"][0]["logprobs"]["content"]) == rows(client.app)[-1].completion_tokens
    assert tok_text(lp["choices"][0]["logprobs"]["content"]).startswith(want + stop[:1])


def test_echo_and_logprobs(client, tok):
    r = client.post("/v1/completions", json={"prompt": "Hello there", "echo": True, "max_tokens": 4, "temperature": 1.0, "seed": 2}).json()
    plain = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4, "temperature": 1.0, "seed": 2}).json()
    assert r["choices"][0]["text"] == "Hello there" + plain["choices"][0]["text"]
    assert_error(client.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1}), 400, param="echo")
    # completions: the chosen token's log-probability; greedy picks the most likely one
    lp = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2}).json()
    l = lp["choices"][0]["logprobs"]
    assert len(l["tokens"]) == len(l["token_logprobs"]) == len(l["top_logprobs"]) == len(l["text_offset"]) == 3
    for token, chosen, top in zip(l["tokens"], l["token_logprobs"], l["top_logprobs"]):
        assert len(top) == 2 and chosen <= 0 and top[token] == pytest.approx(chosen) and chosen == pytest.approx(max(top.values()))
    c = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "temperature": 1.0, "seed": 3,
                                                   "logprobs": True, "top_logprobs": 2}).json()
    content = c["choices"][0]["logprobs"]["content"]
    assert len(content) == c["usage"]["completion_tokens"]
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 2
        assert e["logprob"] <= max(t["logprob"] for t in e["top_logprobs"]) + 1e-6
    streamed = sse(client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "temperature": 1.0, "seed": 3,
                                                              "logprobs": True, "top_logprobs": 2, "stream": True}).text)
    assert [e for s in streamed for e in ((s["choices"][0]["logprobs"] or {}).get("content") or [])] == content


def test_suffix_fills_the_middle_like_generate_infill(fill_client, filler, tok):
    client, model = fill_client, filler
    prefix, suffix = "def add(a, b):\n", "\n    return a + b\n"
    body = {"prompt": prefix, "suffix": suffix, "max_tokens": 6, "temperature": 1.0, "seed": 4}
    r = client.post("/v1/completions", json=body).json()
    ref = infill(model, tok, prefix, suffix, SamplingParams(max_new_tokens=6, temperature=0))
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()
    assert ref.spans[0].text.strip(), f"the test model infills nothing: {ref.spans}"
    assert greedy["choices"][0]["text"] == ref.spans[0].text
    assert greedy["usage"]["completion_tokens"] == len(ref.spans[0].token_ids)
    assert r["usage"]["prompt_tokens"] == len(tok.encode(prefix)) + len(tok.encode(suffix)) + 2  # prefix [MASK] suffix <sop>
    streamed = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == r["choices"][0]["text"]


def test_causal_model_layouts(tok):
    causal = make_model(tok, "rope_partial")
    with TestClient(create_app(causal, tok, "glm4-tiny")) as c:
        r = c.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 3, "temperature": 0}).json()
        assert r["usage"]["prompt_tokens"] == len(tok.encode("The quick")) + 2  # [gMASK] <sop> prompt
        assert c.post("/v1/completions", json={"prompt": "x = 1", "suffix": "\ny = 2\n", "max_tokens": 3}).status_code == 200
        assert_error(c.post("/v1/fill", json={"text": "a [MASK] b"}), 400, code="unsupported_model")
        assert_error(c.post("/v1/classify", json={"text": "a", "labels": {"x": " y", "z": " w"}}), 400, code="unsupported_model")


# ---- GLM endpoints ----------------------------------------------------------------------------------
def test_fill_infill_classify(fill_client, filler, tok):
    client, model = fill_client, filler
    text = "The quick [MASK] fox [sMASK] lazy dog."
    r = client.post("/v1/fill", json={"text": text, "max_tokens": 4}).json()
    ref = fill(model, tok, text, SamplingParams(max_new_tokens=4, temperature=0))
    assert any(s.text.strip() for s in ref.spans), f"the test model fills nothing: {ref.spans}"
    assert r["object"] == "fill" and r["text"] == ref.text
    assert [(s["mask"], s["text"], s["start"], s["tokens"], s["finish_reason"]) for s in r["spans"]] == [
        (s.mask, s.text, s.start, len(s.token_ids), s.finish_reason) for s in ref.spans]
    assert r["usage"]["completion_tokens"] == sum(len(s.token_ids) for s in ref.spans)
    assert_error(client.post("/v1/fill", json={"text": "no blanks"}), 400, param="text")

    inf = client.post("/infill", json={"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "n_predict": 5, "temperature": 0}).json()
    ref = infill(model, tok, "def add(a, b):\n", "\n", SamplingParams(max_new_tokens=5, temperature=0))
    assert ref.spans[0].text.strip(), f"the test model infills nothing: {ref.spans}"
    assert inf["content"] == ref.spans[0].text and inf["tokens_predicted"] == len(ref.spans[0].token_ids)
    assert inf["stop_type"] in ("eos", "limit") and inf["stop"] is True

    labels = {"fast": " quick", "slow": " lazy"}
    c = client.post("/v1/classify", json={"text": ["The brown fox", "The dog"], "pattern": "{text} is[MASK].", "labels": labels}).json()
    task = ClozeTask("{text} is[MASK].", labels)
    pred, scores = cloze_predict(model, tok, task, [{"text": "The brown fox"}, {"text": "The dog"}])
    assert [d["label"] for d in c["data"]] == [task.labels[i] for i in pred]
    for d, s in zip(c["data"], scores):
        assert list(d["probs"]) == ["fast", "slow"] and sum(d["probs"].values()) == pytest.approx(1)
        assert [d["scores"][k] for k in task.labels] == pytest.approx(s.tolist(), abs=1e-4)
    assert_error(client.post("/v1/classify", json={"text": "a", "pattern": "{text} no blank", "labels": labels}), 400, param="pattern")
    assert [x.endpoint for x in rows(client.app)][-5:] == ["/v1/fill", "/v1/fill", "/infill", "/v1/classify", "/v1/classify"]
    assert rows(client.app)[-2].prompt_tokens > 0 and rows(client.app)[-2].compute_s > 0


# ---- errors ---------------------------------------------------------------------------------------------
def test_a_bad_sampling_parameter_is_named_by_its_type_not_its_message():
    """SamplingParams raises errors.ParameterError naming the field; the server answers with the API's name of it."""
    from glmkit.errors import ParameterError
    from glmkit.server.schemas import APIError
    from glmkit.server.state import Server

    with pytest.raises(ParameterError) as e:
        SamplingParams(max_new_tokens=0)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(APIError) as e:
        Server.params(max_new_tokens=0)
    assert (e.value.status, e.value.param, e.value.code) == (400, "max_tokens", "invalid_value"), vars(e.value)


def test_error_statuses_and_shapes(client):
    assert_error(client.post("/v1/completions", json={"prompt": "x", "temperature": 5}), 400, "invalid_request_error", param="temperature")
    assert_error(client.post("/v1/completions", json={"max_tokens": 3}), 400, param="prompt")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400, param="messages.0.role")
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"5": 1}}), 400, param="logit_bias")
    assert_error(client.post("/v1/completions", json={"prompt": [5] * 250, "max_tokens": 16}), 400, code="context_length_exceeded")
    assert_error(client.post("/v1/completions", json={"prompt": [10**6]}), 400, param="prompt")
    # one prompt of a list too long: a 400 and nothing queued (all or nothing)
    assert_error(client.post("/v1/completions", json={"prompt": [[5], [5] * 250], "max_tokens": 16}), 400, code="context_length_exceeded")
    assert_error(client.post("/v1/chat/completions", json={"messages": CHAT, "tools": [{"type": "function"}]}), 400, param="tools.0.function")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, code="model_not_found", param="model")
    assert_error(client.get("/v1/nothing-here"), 404)
    statuses = [r.status for r in rows(client.app)]
    assert statuses == [400] * 9 + [404]  # every request to a metered endpoint has its row; /v1/nothing-here is not metered
    assert all(r.error for r in rows(client.app))
    assert client.app.state.server.engine.stats["prefill_tokens"] == 0


def test_overloaded_is_503_with_retry_after(model, tok):
    app = create_app(model, tok, "tiny", max_waiting=1)
    c = TestClient(app)  # not entered: no lifespan, so no engine thread drains the queue
    app.state.server.engine.submit(Request([5, 6], SamplingParams(max_new_tokens=1)))  # fills the one waiting slot
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert_error(r, 503, "server_error", code="overloaded")
    assert r.headers["retry-after"] == "1"
    assert rows(app)[-1].status == 503


def test_engine_failure_is_500_and_the_server_keeps_serving(client, capfd):
    engine = client.app.state.server.engine
    admit, calls = engine._admit, []

    def flaky(req):
        calls.append(req)
        if len(calls) == 1:
            raise RuntimeError("simulated device error")
        return admit(req)

    engine._admit = flaky
    assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 500, "server_error", code="engine_error")
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert client.get("/health").json()["engine_failures"] == 0  # contained: only that request failed
    assert [r.status for r in rows(client.app)] == [500, 200]
    assert "simulated device error" in capfd.readouterr().err


# ---- auth, limits, ledger ------------------------------------------------------------------------------------
@pytest.fixture()
def keyed(tmp_path, model, tok):
    db = tmp_path / "maas.sqlite"
    store = KeyStore(db)
    maas = MaaS(store, Ledger(db), Pricing(per_hour=3600.0, input_per_m=1e6, output_per_m=2e6))
    return store, maas, create_app(model, tok, "tiny", maas=maas)


def test_auth_and_model_allow_list(keyed):
    store, maas, app = keyed
    raw, key = store.create("alice")
    raw_other, _ = store.create("other-models-only", models=["other"])
    with TestClient(app) as c:
        body = {"prompt": "x", "max_tokens": 2}
        assert_error(c.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=body, headers={"authorization": "Bearer glmk-nope"}), 401)
        assert_error(c.get("/v1/models"), 401)
        h = {"authorization": f"Bearer {raw}"}
        assert c.get("/v1/models", headers=h).json()["data"][0]["id"] == "tiny"
        r = c.post("/v1/completions", json=body, headers=h).json()
        ho = {"authorization": f"Bearer {raw_other}"}
        assert c.get("/v1/models", headers=ho).json()["data"] == []
        assert_error(c.post("/v1/completions", json=body, headers=ho), 404, code="model_not_found")
        assert c.get("/health").status_code == 200  # not behind auth; /metrics needs the admin token (test_server_hostile)
        store.revoke(key.id)
        assert_error(c.post("/v1/completions", json=body, headers=h), 401)
    ledger = maas.ledger.rows()
    assert [(x.key_id, x.status) for x in ledger] == [(key.id, 200), (ledger[1].key_id, 404)]  # no rows for 401s
    u = r["usage"]
    # prices: 1 per second of compute, 1 per prompt token, 2 per completion token
    assert ledger[0].cost == pytest.approx(ledger[0].compute_s)
    assert ledger[0].revenue == pytest.approx(u["prompt_tokens"] + 2 * u["completion_tokens"])


def test_rpm_limit_is_429_with_retry_after(keyed):
    store, maas, app = keyed
    raw, key = store.create("rpm", rpm=2)
    h = {"authorization": f"Bearer {raw}"}
    with TestClient(app) as c:
        for _ in range(2):
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=h).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=h)
    assert_error(r, 429, "requests", code="rate_limit_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "x-should-retry" not in r.headers
    assert [x.status for x in maas.ledger.rows(key.id)] == [200, 200, 429]


def test_token_budget_is_429_without_retry(keyed):
    store, maas, app = keyed
    raw, key = store.create("budget", budget_tokens=7)
    h = {"authorization": f"Bearer {raw}"}
    with TestClient(app) as c:  # "x" is 3 prompt tokens with [gMASK] <sop>: 3 + 4 reserved fits the budget exactly
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}, headers=h).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}, headers=h)  # 3 + 5 > what is left
    assert_error(r, 429, "insufficient_quota", code="insufficient_quota")
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers


def test_client_disconnect_cancels_the_stream_and_is_metered(keyed, tok, monkeypatch):
    store, maas, app = keyed
    raw, key = store.create("leaver")
    monkeypatch.setattr(FORMATS["glm4"], "stop_ids", lambda tok: [])  # nothing ends this stream but its length or the client
    body = {"messages": CHAT, "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True}

    async def run():
        async with app.router.lifespan_context(app):
            got = await leave_after(app, "/v1/chat/completions", body, {"authorization": f"Bearer {raw}"}, 3,
                                    asyncio.Event(), asyncio.Event())
            return got

    got = asyncio.run(run())
    assert len(got) >= 3 and not any(b"[DONE]" in g for g in got)
    (row,) = maas.ledger.rows(key.id)  # written before the app returned, once the engine had let go
    assert (row.status, row.finish_reason, row.key_id) == (499, "cancelled", key.id)
    assert 2 <= row.completion_tokens < 200 and row.compute_s > 0 and row.prompt_tokens > 0
    assert app.state.server.runner.inflight == {}  # the engine finished it (cancelled: far fewer than 200 tokens)


def test_concurrency_limit_holds_while_a_request_is_in_flight(keyed):
    store, maas, app = keyed
    raw, key = store.create("one-at-a-time", concurrency=1)
    h = {"authorization": f"Bearer {raw}"}
    server = app.state.server

    async def run():
        # no engine thread yet: the first request waits in the engine's queue, holding its slot
        arrived, leave = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(leave_after(app, "/v1/chat/completions", {"messages": CHAT, "stream": True},
                                                h, 10**9, arrived, leave))
        await arrived.wait()  # the role chunk is out: the request is admitted and submitted
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            second = await c.post("/v1/chat/completions", json={"messages": CHAT}, headers=h)
        leave.set()  # the first client leaves; the engine, started now, drops its cancelled request
        server.runner.start()
        try:
            await first
        finally:
            server.runner.stop()
        return second

    second = asyncio.run(run())
    assert_error(second, 429, "requests", code="rate_limit_exceeded")
    assert second.headers["retry-after"] == "1"
    assert sorted(x.status for x in maas.ledger.rows(key.id)) == [429, 499]


def test_non_streaming_client_that_leaves_is_cancelled(model, tok):
    app = create_app(model, tok, "tiny")
    server = app.state.server
    submit = server.engine.submit

    async def run():
        submitted, leave = asyncio.Event(), asyncio.Event()
        server.engine.submit = lambda req: (submit(req), submitted.set())[0]
        task = asyncio.create_task(leave_after(app, "/v1/completions", {"prompt": "x", "max_tokens": 50}, {},
                                               10**9, asyncio.Event(), leave))
        await submitted.wait()  # queued in the engine, which is not running yet
        leave.set()
        server.runner.start()
        try:
            await task
        finally:
            server.runner.stop()

    asyncio.run(run())
    (row,) = rows(app)
    assert (row.status, row.finish_reason, row.completion_tokens) == (499, "cancelled", 0)


# ---- service endpoints ------------------------------------------------------------------------------------------
def test_metrics_health_openapi(client):
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    client.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for line in ("glmkit_requests_running 0.0", "glmkit_requests_waiting 0.0", "glmkit_time_to_first_token_seconds_count 1.0",
                 "glmkit_inter_token_latency_seconds_count 2.0", "glmkit_e2e_request_latency_seconds_count 2.0",
                 'glmkit_requests_total{endpoint="/v1/completions",status="200"} 1.0',
                 'glmkit_requests_total{endpoint="/v1/completions",status="400"} 1.0'):
        assert line in text, f"{line!r} not in /metrics"
    row = rows(client.app)[0]
    assert f"glmkit_prompt_tokens_total {float(row.prompt_tokens)}" in text
    assert f"glmkit_generation_tokens_total {float(row.completion_tokens)}" in text
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/fill", "/infill", "/v1/classify", "/v1/models"} <= set(spec["paths"])
    assert {"CompletionRequest", "ChatRequest", "FillRequest", "InfillRequest", "ClassifyRequest"} <= set(spec["components"]["schemas"])


def test_health_is_503_without_the_engine_thread(model, tok):
    assert TestClient(create_app(model, tok, "tiny")).get("/health").status_code == 503


# ---- the official client over a real socket ----------------------------------------------------------------------


def test_openai_client_chat_and_stream(keyed):
    import openai

    store, maas, app = keyed
    raw, key = store.create("sdk")
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=raw, max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=9)
        assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0
        stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=9,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=CHAT)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="glmk-wrong", max_retries=0).models.list()
    # rows are written once each exchange is over, which the client does not wait for: read them after the server stopped
    ledger = maas.ledger.rows()
    assert [(x.endpoint, x.status) for x in ledger] == [
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 200), ("/v1/chat/completions", 404)]
    assert ledger[0].completion_tokens == ledger[1].completion_tokens == r.usage.completion_tokens


def test_playground_and_usage_view(client):
    """The playground page is served at / and the endpoints it calls answer in the shape it reads."""
    page = client.get("/")
    assert page.status_code == 200 and "glmkit playground" in page.text
    for call in ("/v1/fill", "/v1/chat/completions", "/v1/usage", "/v1/models"):
        assert call in page.text
    assert '"default"' not in page.text  # the chat asks /v1/models for the served name
    r = client.post("/v1/fill", json={"text": "a[MASK]b", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and {"text", "spans"} <= set(r.json()) and "mask" in r.json()["spans"][0]
    usage = client.get("/v1/usage").json()
    assert usage["object"] == "usage" and sum(d["requests"] for d in usage["data"]) >= 1
