"""The server against a hostile tenant: one request's faults stay in its row, preparation never stalls
the event loop, inputs that used to give a 500 or freeze the server are 400s, /metrics needs the
admin token, the spec says what the server answers, an impossible KV cache is refused at start.

Each test is the regression test of a defect found by a hostile run (issue 16). Synchronisation is by
events; timeouts only bound how long a failure takes to show.
"""

import json
import threading

import pytest

pytest.importorskip("fastapi")  # the `serve` extra and the test client: skipped, not failed, without them
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from glmkit.sampling import Sampler  # noqa: E402
from glmkit.server.app import create_app  # noqa: E402
from glmkit.server.maas import KeyStore, Ledger, MaaS  # noqa: E402
from tests.serving import CHAT, assert_error, rows, serve, sse  # noqa: E402


def keyed_app(tmp_path, model, tok, **kw):
    db = tmp_path / "maas.sqlite"
    store = KeyStore(db)
    return store, create_app(model, tok, "tiny", maas=MaaS(store, Ledger(db)), **kw)


# ---- 1. one tenant's fault never ends another's generation ---------------------------------------------------
def test_a_poisoned_request_fails_alone_amid_another_keys_streams(tmp_path, model, tok, monkeypatch):
    store, app = keyed_app(tmp_path, model, tok)
    victim, _ = store.create("victim")
    attacker, _ = store.create("attacker")
    engine = app.state.server.engine
    # whatever makes a row's numbers go bad (a value past validation, a kernel fault): here, NaN logits
    # for the attacker's rows, which carry seed 666
    real = Sampler.__call__

    def poisoned(self, logits, banned=None):
        bad = torch.tensor([p.seed == 666 for p in self.params], device=logits.device)[:, None]
        return real(self, logits.masked_fill(bad, float("nan")), banned)

    monkeypatch.setattr(Sampler, "__call__", poisoned)
    # hold the engine until every request is queued, so all of them share the first batch
    gate, step = threading.Event(), engine.step
    monkeypatch.setattr(engine, "step", lambda: (gate.wait(60), step())[1])
    results = {}

    def post(name, key, body):
        with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {key}"}) as c:
            results[name] = c.post("/v1/completions", json=body)

    with serve(app) as url:
        threads = [threading.Thread(target=post, args=(f"victim{i}", victim, {
            "prompt": f"Hello {i}", "max_tokens": 24, "temperature": 1.0, "seed": i, "stream": True})) for i in range(4)]
        threads.append(threading.Thread(target=post, args=("attacker", attacker, {
            "prompt": "boom", "max_tokens": 24, "temperature": 1.0, "seed": 666})))
        for t in threads:
            t.start()
        for _ in range(6000):  # bounded wait for the five requests to reach the queue
            if engine.num_waiting == 5:
                break
            threading.Event().wait(0.01)
        assert engine.num_waiting == 5, engine.num_waiting
        gate.set()
        for t in threads:
            t.join(60)
        # the hostile values of the report: a vanishing temperature is greedy, an overflowing penalty a 400
        with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {attacker}"}) as c:
            tiny_t = c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 4, "temperature": 1e-300})
            greedy = c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 4, "temperature": 0})
            bad_rp = c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 4, "repetition_penalty": 1e-308})
    assert_error(results["attacker"], 500, "server_error", code="engine_error")
    assert "not finite" in results["attacker"].json()["error"]["message"]
    for i in range(4):
        r = results[f"victim{i}"]
        assert r.status_code == 200, r.text
        events = sse(r.text)
        assert not any("error" in e for e in events), events[-1]
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop"), events[-1]
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert_error(bad_rp, 400, param="repetition_penalty")


# ---- 2. preparation off the event loop; inputs that froze the server ------------------------------------------
def test_health_is_served_while_a_prompt_is_being_tokenized(model, tok, monkeypatch):
    app = create_app(model, tok, "tiny")
    started, release = threading.Event(), threading.Event()
    encode = tok.encode

    def slow_encode(text, allow_special=False):
        if text.startswith("HUGE"):
            started.set()
            release.wait(60)  # the tokenizer is busy with this prompt until the test lets go
        return encode(text, allow_special)

    monkeypatch.setattr(tok, "encode", slow_encode)
    out = {}
    with serve(app) as url:
        t = threading.Thread(target=lambda: out.setdefault("r", httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": "HUGE prompt", "max_tokens": 2})))
        t.start()
        assert started.wait(60)
        try:  # the loop must answer while the tokenizer holds this prompt (it blocked here before)
            health = httpx.get(url + "/health", timeout=20)
        finally:
            release.set()
        t.join(60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert out["r"].status_code == 200, out["r"].text


def test_text_that_can_never_fit_is_refused_before_tokenizing(client, tok, monkeypatch):
    server = client.app.state.server
    assert server.max_text_chars == server.engine.max_len * tok.max_token_chars
    calls = []
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(a) or [])
    big = "a" * (server.max_text_chars + 1)
    for path, body in (("/v1/completions", {"prompt": big}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
                       ("/v1/fill", {"text": big + "[MASK]"}), ("/infill", {"input_prefix": big}),
                       ("/v1/classify", {"text": big, "labels": {"a": "x", "b": "y"}})):
        assert_error(client.post(path, json=body), 400, code="context_length_exceeded")
    assert calls == []
    assert all(r.prompt_tokens == 0 and r.completion_tokens == 0 for r in rows(client.app))


def test_a_tokenizer_panic_is_a_400(client, tok, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises from a Rust panic
        pass

    def panic(*a, **k):
        raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    monkeypatch.setattr(tok.tok, "encode_batch", panic)
    r = client.post("/v1/completions", json={"prompt": "   ", "max_tokens": 2})
    assert_error(r, 400, "invalid_request_error", param="prompt")
    assert "retry-limit" in r.json()["error"]["message"]


def test_classify_patterns_take_plain_text_fields_only(client):
    labels = {"x": "y", "z": "w"}
    for pattern in ("{text}{text:a>10000000}[MASK]", "{text!r}[MASK]", "{0}[MASK]", "{text.__class__}[MASK]",
                    "{text[0]}[MASK]", "{text}{other}[MASK]", "{text[MASK]", "[MASK]"):
        r = client.post("/v1/classify", json={"text": "a", "pattern": pattern, "labels": labels})
        assert_error(r, 400, param="pattern")
    ok = client.post("/v1/classify", json={"text": "a", "pattern": "{{literal}} {text} {text}[MASK]", "labels": labels})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a\ud800b"}),
    ("/v1/completions", {"prompt": "a", "stop": ["\ud800"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}),
    ("/v1/fill", {"text": "x\ud800[MASK]"}),
    ("/infill", {"input_prefix": "\ud800"}),
    ("/v1/classify", {"text": "a", "labels": {"\ud800": "x", "b": "y"}}),
])
def test_lone_surrogates_are_400(client, path, body):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # "\ud800" escaped: valid JSON
    assert_error(r, 400, "invalid_request_error")
    assert "unicode" in r.json()["error"]["message"].lower(), r.json()


def test_chat_without_max_tokens_stops_at_the_server_default(model, tok):
    with TestClient(create_app(model, tok, "tiny", default_max_tokens=3)) as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 1.0, "seed": 1}).json()
        inf = c.post("/infill", json={"input_prefix": "def f(", "temperature": 1.0, "seed": 1}).json()
    assert r["usage"]["completion_tokens"] <= 3 and inf["tokens_predicted"] <= 3, (r["usage"], inf)


# ---- /metrics and the spec -----------------------------------------------------------------------------------
def test_metrics_need_the_admin_token_when_auth_is_on(tmp_path, model, tok):
    store, app = keyed_app(tmp_path, model, tok, admin_token="s3cret-admin-token-0123")
    raw, _ = store.create("tenant")
    with TestClient(app) as c:
        assert_error(c.get("/metrics"), 401, code="invalid_admin_token")
        assert_error(c.get("/metrics", headers={"authorization": f"Bearer {raw}"}), 401)  # a tenant's key is not enough
        m = c.get("/metrics", headers={"authorization": "Bearer s3cret-admin-token-0123"})
        assert m.status_code == 200 and "glmkit_requests_running" in m.text
    store2, unset = keyed_app(tmp_path / "b", model, tok)
    with TestClient(unset) as c:
        assert_error(c.get("/metrics", headers={"authorization": "Bearer anything"}), 403, code="admin_token_not_configured")


def test_the_spec_says_what_the_server_answers(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            if path.startswith("/admin/"):  # the admin API (keys, usage): its credential's answers
                assert {"400", "401", "403"} <= set(op["responses"]), (method, path, op["responses"])
            elif method == "post":
                for status in ("400", "401", "404", "413", "429", "503"):
                    assert status in op["responses"], (method, path, status)
                assert op["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/plain; version=0.0.4; charset=utf-8" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    cls = spec["components"]["schemas"]["ClassifyRequest"]["properties"]
    assert cls["labels"]["minProperties"] == 2 and cls["labels"]["maxProperties"] == 32
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["repetition_penalty"]["minimum"] == 0.01
    # and the server does answer 400 for a schema violation
    assert_error(client.post("/v1/classify", json={"text": "a", "labels": {"only": "one"}}), 400, param="labels")


# ---- start-up ---------------------------------------------------------------------------------------------------
def test_a_kv_cache_that_cannot_fit_is_refused_at_start(model, tok, capsys):
    with pytest.raises(MemoryError, match=r"--max-len \d+ \(at --max-batch 8\)"):
        create_app(model, tok, "tiny", max_len=1 << 40)
    from glmkit.server.app import main

    assert main(["--no-auth", "--max-len", str(1 << 40), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "KV pool" in err and "Try --max-len" in err and "Traceback" not in err, err


# ---- the shared queue ----------------------------------------------------------------------------------------
def test_one_key_cannot_fill_the_queue_and_a_503_bills_nothing(tmp_path, model, tok, monkeypatch):
    """A key gets a share of the waiting queue (here 2 of 8): more is 429 for that key alone, and the other
    keys still queue. A request refused for a full queue (503) is billed nothing, prompt tokens included."""
    store, app = keyed_app(tmp_path, model, tok, max_waiting=8, max_batch=1)
    flood, _ = store.create("flood")
    other, other_rec = store.create("other", budget_tokens=10_000)
    engine = app.state.server.engine
    gate, step = threading.Event(), engine.step
    monkeypatch.setattr(engine, "step", lambda: (gate.wait(60), step())[1])  # nothing leaves the queue until the gate opens
    results = {}

    def post(name, key, body):
        with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {key}"}) as c:
            results[name] = c.post("/v1/completions", json=body)

    with serve(app) as url:
        held = threading.Thread(target=post, args=("held", flood, {"prompt": ["a", "b"], "max_tokens": 2}))
        held.start()
        for _ in range(6000):
            if engine.num_waiting == 2:
                break
            threading.Event().wait(0.01)
        post("more", flood, {"prompt": "c", "max_tokens": 2})
        post("too_many", flood, {"prompt": ["a", "b", "c"], "max_tokens": 2})
        ok = threading.Thread(target=post, args=("other", other, {"prompt": "d", "max_tokens": 2}))
        ok.start()
        for _ in range(6000):
            if engine.num_waiting == 3:
                break
            threading.Event().wait(0.01)
        engine.max_waiting = 3  # the queue is now full: the next request, of any key, is a 503
        post("overloaded", other, {"prompt": "e e e e e e", "max_tokens": 2})
        gate.set()
        held.join(60), ok.join(60)
    assert_error(results["more"], 429, "requests", code="rate_limit_exceeded")
    assert "share of the waiting queue" in results["more"].json()["error"]["message"]
    assert_error(results["too_many"], 400, param="n")
    assert results["held"].status_code == 200 and results["other"].status_code == 200, (results["held"].text, results["other"].text)
    assert_error(results["overloaded"], 503, code="overloaded")
    refused = [r for r in rows(app) if r.status in (429, 400, 503)]
    assert len(refused) == 3 and all(r.prompt_tokens == r.completion_tokens == 0 and r.revenue == 0 for r in refused), refused
    used = app.state.server.maas.limiter.snapshot(other_rec.id).used
    assert used == sum(r.prompt_tokens + r.completion_tokens for r in rows(app) if r.key_id == other_rec.id and r.status == 200)
