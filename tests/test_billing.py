"""Billing and connections under a hostile tenant (issue 16), over HTTP: token reservations hold a budget and a
tokens-per-minute limit against 20 concurrent requests, a refused request costs nothing, request bodies have a size
limit and a deadline (a stalled body holds no slot), request heads a deadline (glmkit.server.http), and a real
`glmkit serve` killed with SIGKILL leaves a row for every request it admitted.

In-process apps through httpx's ASGI transport, or uvicorn on a port-0 socket with raw sockets for half-sent
requests; one `glmkit serve` subprocess (port 0, its port read from its log). No sleeps as synchronisation: events,
and polls with generous upper bounds.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi")  # the `serve` extra and the test client: skipped, not failed, without them
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from glmkit.server import http as glmkit_http  # noqa: E402
from glmkit.server.maas import KeyStore, Ledger, MaaS, Pricing, usage_main  # noqa: E402
from glmkit.server.metering import FLUSH_S, MeterMiddleware  # noqa: E402
from glmkit.tokenizer import train_bpe  # noqa: E402
from tests.serving import TEXTS, make_model, poll  # noqa: E402


@pytest.fixture(scope="module")
def served():
    tok = train_bpe(texts=TEXTS, vocab_size=300)
    return tok, make_model(tok)


def keyed_app(tmp_path, served, body_limits: dict | None = None, **limits):
    """An app with auth on, one key with `limits`, prices of 1 per token; `body_limits` go to MeterMiddleware
    (set before the app builds its middleware, on its first call)."""
    from glmkit.server.app import create_app

    tok, model = served
    db = tmp_path / "maas.sqlite"
    store = KeyStore(db)
    maas = MaaS(store, Ledger(db), Pricing(per_hour=3600.0, input_per_m=1e6, output_per_m=1e6))
    raw, key = store.create("tenant", **limits)
    app = create_app(model, tok, "tiny", maas=maas)
    for m in app.user_middleware:
        if m.cls is MeterMiddleware:
            m.kwargs.update(body_limits or {})
    return app, maas, {"authorization": f"Bearer {raw}"}, key


def burst(app, headers, n: int, body: dict) -> list[httpx.Response]:
    """`n` requests at once through the ASGI app, its engine thread running."""
    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body, headers=headers) for _ in range(n)))
    return asyncio.run(run())


# ---- reservations -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [{"budget_tokens": 200}, {"tpm": 100}], ids=["budget", "tpm"])
def test_20_concurrent_requests_stay_within_the_token_limit(tmp_path, served, limit):
    """Issue 16 #3: 20 concurrent requests (40-token prompt, max_tokens 16) used 1,260 tokens against a budget of
    200 and as many against a tpm of 100. Each reserves 42 + 16 (the prompt with its [gMASK] <sop>) before it runs."""
    tok, _ = served
    app, maas, h, key = keyed_app(tmp_path, served, **limit)
    prompt = (tok.encode("The quick brown fox jumps over the lazy dog. " * 8))[:40]
    rs = burst(app, h, 20, {"prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": 1})
    rows = maas.ledger.rows(key.id)
    used = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    cap = limit.get("budget_tokens") or limit["tpm"]
    statuses = Counter(r.status_code for r in rs)
    assert used <= cap, f"{used} tokens used against a limit of {cap}; statuses {dict(statuses)}"
    assert statuses[200] >= cap // 58 and statuses[200] + statuses[429] == 20, dict(statuses)
    ok = [r.json()["usage"] for r in rs if r.status_code == 200]
    assert used == sum(u["total_tokens"] for u in ok), (used, ok)
    # each refusal says when to retry, or that retrying cannot help; it costs nothing
    refused = [r.headers for r in rs if r.status_code == 429]
    assert all(("retry-after" in x) != (x.get("x-should-retry") == "false") for x in refused), refused
    assert {(r.status, r.prompt_tokens, r.completion_tokens, r.revenue) for r in rows if r.status == 429} == {(429, 0, 0, 0.0)}
    w = maas.limiter.snapshot(key.id)
    assert (w.reserved, w.active) == (0, 0), w


# ---- refused requests cost nothing ---------------------------------------------------------------------------
def test_a_refused_request_charges_nothing(tmp_path, served):
    """Issue 16 #4: a 400 for a prompt longer than the context was billed its prompt tokens, revenue and a charge
    against the key's budget and tpm. Refused requests, before or after admission, are rows with zero tokens."""
    from fastapi.testclient import TestClient

    tok, _ = served
    app, maas, h, key = keyed_app(tmp_path, served, budget_tokens=250, tpm=250)
    max_len, a = app.state.server.engine.max_len, tok.encode("a")[0]
    with TestClient(app) as c:
        too_long = c.post("/v1/completions", json={"prompt": [a] * (max_len + 10), "max_tokens": 4}, headers=h)
        blanks = c.post("/v1/fill", json={"text": "a [MASK] " * 40, "max_tokens": 200}, headers=h)
        invalid = c.post("/v1/completions", json={"prompt": "x", "temperature": -1}, headers=h)
        unknown = c.post("/v1/completions", json={"prompt": "x", "model": "other"}, headers=h)
        # all of the budget and the minute's tokens are still there for one request that may use them all
        whole = c.post("/v1/completions", json={"prompt": [a] * 200, "max_tokens": 48, "temperature": 0}, headers=h)
    got = [(r.status_code, r.json().get("error", {}).get("code")) for r in (too_long, blanks, invalid, unknown)]
    assert got == [(400, "context_length_exceeded"), (400, "context_length_exceeded"), (400, "invalid_value"),
                   (404, "model_not_found")], got
    assert whole.status_code == 200, whole.text
    rows = maas.ledger.rows(key.id)
    billed = [(r.status, r.prompt_tokens, r.completion_tokens, r.revenue, r.cost) for r in rows[:4]]
    assert billed == [(s, 0, 0, 0.0, 0.0) for s, _ in got], billed
    assert rows[4].prompt_tokens == 202 and rows[4].status == 200, rows[4]


# ---- bodies: a size limit and a deadline, read before admission ------------------------------------------------
@contextlib.contextmanager
def listening(app, header_timeout: float = glmkit_http.HEADER_TIMEOUT_S, timeout_keep_alive: float = 5.0, **kw):
    """uvicorn with glmkit's protocol in a thread, on a socket bound to port 0 before it starts (connections wait in
    the backlog until it serves, so nothing polls); yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(glmkit_http.config(app, header_timeout=header_timeout,
                                               timeout_keep_alive=timeout_keep_alive, log_level="warning", **kw))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join()
        sock.close()


def head(path: str, headers: dict, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: t"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def until_closed(s: socket.socket, bound: float = 30.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it did (time.monotonic()); fails after
    `bound` s."""
    out = b""
    s.settimeout(bound)
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {bound} s; it sent {out[:200]!r}") from None
    except ConnectionResetError:
        pass
    return out, time.monotonic()


def one_response(s: socket.socket) -> bytes:
    """One response with a Content-Length, read from a connection that stays open."""
    s.settimeout(30)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(4096)
    while len(raw.partition(b"\r\n\r\n")[2]) < int(parse(raw)[1]["content-length"]):
        raw += s.recv(4096)
    return raw


def parse(raw: bytes) -> tuple[int, dict, bytes]:
    top, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}, body


def test_a_stalled_body_holds_no_slot_and_gets_408(tmp_path, served):
    """Issue 16 #8: a half-sent body held its request slot for good. The body is now read before admission, within
    a deadline: while one connection stalls mid-body, the key's only slot serves another request, and the stalled
    one gets a 408 (OpenAI's error shape) and its connection is closed."""
    app, maas, h, key = keyed_app(tmp_path, served, {"body_timeout": 2.0}, concurrency=1)
    arrived = threading.Event()

    async def probe(scope, receive, send):  # says when the stalled request's head reached the app
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            arrived.set()
        await app(scope, receive, send)

    with listening(probe) as port, socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(head("/v1/completions", {**h, "content-type": "application/json", "content-length": "200"})
                        + b'{"prompt": "x", ')
        assert arrived.wait(30), "the stalled request never reached the app"
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=h,
                        timeout=30)
        assert ok.status_code == 200, (ok.status_code, ok.text)  # before the fix: 429, the slot was the stalled one's
        raw, waited = until_closed(stalled)
    status, headers, body = parse(raw)
    err = json.loads(body)["error"]
    assert (status, headers.get("connection"), err["code"], err["type"]) == (
        408, "close", "request_timeout", "invalid_request_error"), raw[:300]
    assert {"message", "type", "param", "code"} == set(err) and "2 s" in err["message"], err
    rows = maas.ledger.rows(key.id)
    assert sorted((r.status, r.prompt_tokens + r.completion_tokens > 0) for r in rows) == [(200, True), (408, False)], rows


def test_a_body_over_the_limit_gets_413_and_a_closed_connection(tmp_path, served):
    """A body over the limit is refused with 413: at once when its Content-Length says so, otherwise when the
    bytes read pass the limit (a chunked body); either way before admission, and the connection is closed."""
    app, maas, h, key = keyed_app(tmp_path, served, {"max_body_bytes": 64 << 10})
    with listening(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:  # 1 GiB announced, nothing sent
            s.sendall(head("/v1/completions", {**h, "content-type": "application/json", "content-length": str(1 << 30)}))
            declared = parse(until_closed(s)[0])
        with socket.create_connection(("127.0.0.1", port)) as s:  # no length: 9 chunks of 8 KiB, one over the limit
            # (no more than that: bytes left unread when the server closes would reset the connection)
            s.sendall(head("/v1/completions", {**h, "content-type": "application/json", "transfer-encoding": "chunked"})
                      + (b"2000\r\n" + b" " * 0x2000 + b"\r\n") * 9)
            chunked = parse(until_closed(s)[0])
        small = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=h)
    for status, headers, body in (declared, chunked):
        err = json.loads(body)["error"]
        assert (status, headers.get("connection"), err["code"]) == (413, "close", "request_too_large"), (status, body)
        assert "65536 bytes" in err["message"], err
    assert small.status_code == 200, small.text
    assert [(r.status, r.prompt_tokens) for r in maas.ledger.rows(key.id)][:2] == [(413, 0), (413, 0)]


# ---- heads: a deadline (glmkit.server.http) ----------------------------------------------------------------------
async def hello(scope, receive, send):
    """A tiny ASGI app that answers without reading the request body."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"hi"})


def test_half_sent_heads_and_silent_connections_are_closed():
    """Issue 16 #8: 300 connections that sent half a request head, or nothing, stayed open. The head must now be
    complete within header_timeout of the connection (or of a keep-alive request's first byte)."""
    timeout = 0.3
    with listening(hello, header_timeout=timeout, lifespan="off") as port:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as silent, \
                socket.create_connection(("127.0.0.1", port)) as half:
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-ty")
            (got_silent, t_silent), (got_half, _) = until_closed(silent), until_closed(half)
        assert got_silent == got_half == b"", (got_silent, got_half)
        assert t_silent - t0 >= timeout, f"closed after {t_silent - t0:.3f} s, before the {timeout} s deadline"
        # keep-alive is untouched: an idle gap longer than the head deadline (shorter than keep-alive) is fine
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head("/", {}, "GET"))
            first = one_response(s)
            s.settimeout(2 * timeout)  # the scenario: idle for twice the head deadline, and the connection stays open
            with pytest.raises(socket.timeout):
                s.recv(1)
            s.sendall(head("/", {}, "GET"))
            second = one_response(s)
        assert parse(first)[::2] == parse(second)[::2] == (200, b"hi"), (first, second)


def test_a_response_sent_before_the_body_was_read_closes_the_connection():
    """A 401 or 404 is answered without reading the body; uvicorn then reads whatever the client trickles in, for as
    long as it does. glmkit's protocol closes such a connection at once (keep-alive is 60 s here)."""
    with listening(hello, timeout_keep_alive=60, lifespan="off") as port, \
            socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/anything", {"content-length": "1000"}) + b"x" * 10)
        raw, _ = until_closed(s, bound=20)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"hi"), raw


def test_deadlines_must_be_positive():
    with pytest.raises(ValueError, match="header_timeout"):
        glmkit_http.config(hello, header_timeout=0)
    with pytest.raises(ValueError, match="timeout_keep_alive"):
        glmkit_http.config(hello, timeout_keep_alive=-1)


# ---- kill -9 -------------------------------------------------------------------------------------------------------
def checkpoint(tok, directory):
    """A random-init `debug` model with a 2048-token context: greedy decoding of it never stops early, so a stream
    of 2000 tokens is still running when the server is killed."""
    from glmkit.config import get_preset
    from glmkit.convert import write_checkpoint
    from glmkit.model import GLM

    tok.save(directory / "tok")
    torch.manual_seed(0)
    m = GLM(get_preset("debug", vocab_size=tok.vocab_size, max_seq_len=2048))
    m.init_weights(seed=0)
    return write_checkpoint(m, directory / "model", extra_files=[directory / "tok" / "tokenizer.json"])


@contextlib.contextmanager
def glmkit_serve(*args):
    """`glmkit serve` in a subprocess on port 0; yields (process, base url) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", "--port", "0", "--device", "cpu", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, url = [], []
    listening_ = threading.Event()

    def read():  # the port is in uvicorn's start-up line
        for line in proc.stderr:
            log.append(line)
            if m := re.search(r"running on (http://[\d.]+:\d+)", line):
                url.append(m[1])
                listening_.set()
        listening_.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening_.wait(180) and url, "glmkit serve did not start:\n" + "".join(log[-30:])
        yield proc, url[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_leaves_a_row_for_every_admitted_request(tmp_path, served, capsys, request, backend):
    """Issue 16 #6: after kill -9, a request whose response had been received could lack its row (written after the
    response), and requests in flight left none although tokens had been streamed. Now every admitted request has a
    row: complete for every response a client received in full, open (then 'interrupted') with the tokens of its
    last flush, at most FLUSH_S behind, for the streams cut off. On SQLite (`--keys-db FILE`) and on PostgreSQL
    (`--db URL`, a throwaway cluster)."""
    tok, _ = served
    ckpt = checkpoint(tok, tmp_path)
    db = str(tmp_path / "maas.sqlite") if backend == "sqlite" else request.getfixturevalue("pg_db")
    raw = subprocess.run([sys.executable, "-m", "glmkit", "keys", "create", "--db", db, "--name", "victim"],
                         capture_output=True, text=True, check=True).stdout.strip()
    h = {"authorization": f"Bearer {raw}"}
    streams = {i: {"id": None, "got": [], "done": False} for i in range(3)}  # "got": (time, tokens so far)
    short_done: list[dict] = []  # responses received in full
    stop = threading.Event()

    def stream(i, url):
        s = streams[i]
        body = {"prompt": f"Hello {i}", "max_tokens": 2000, "temperature": 0, "stream": True}
        with contextlib.suppress(httpx.HTTPError):
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=h, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        s["done"] = True
                    elif line.startswith("data: "):
                        s["id"] = json.loads(line[6:])["id"]
                        s["got"].append((time.monotonic(), len(s["got"]) + 1))

    def shorts(url):
        with contextlib.suppress(httpx.HTTPError):
            while not stop.is_set():
                r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=h, timeout=120)
                short_done.append(r.json())

    def db_rows():
        if backend == "postgresql":
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(db, row_factory=dict_row) as c:
                return {r["request_id"]: r for r in c.execute("SELECT * FROM usage")}
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            c.row_factory = sqlite3.Row
            return {r["request_id"]: dict(r) for r in c.execute("SELECT * FROM usage")}

    with glmkit_serve("--model", str(ckpt), "--keys-db" if backend == "sqlite" else "--db", db, "--max-batch", "8") as (proc, url):
        threads = [threading.Thread(target=stream, args=(i, url)) for i in range(3)] + [
            threading.Thread(target=shorts, args=(url,))]
        for t in threads:
            t.start()
        # wait until every stream has had 20 tokens and its row shows them (the flusher's work), then kill
        poll(lambda: f"streams running with 20 tokens in their rows: tokens received "
                     f"{[len(s['got']) for s in streams.values()]}, ended {[s['done'] for s in streams.values()]}",
             lambda: all(s["id"] and not s["done"] and len(s["got"]) >= 20 and (db_rows().get(s["id"][5:]) or {}).get(
                 "completion_tokens", 0) >= 20 for s in streams.values()), timeout=60)
        # then kill at a moment that has nothing to do with the flusher's: 150 tokens later
        base = [len(s["got"]) for s in streams.values()]
        poll("150 more tokens on each stream", lambda: all(len(s["got"]) >= b + 150 for s, b in zip(streams.values(), base)))
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)

    rows = db_rows()
    cut = [s for s in streams.values() if not s["done"]]
    assert len(cut) == 3, f"the streams should still run at the kill; {3 - len(cut)} had ended"
    assert short_done, "no short request completed before the kill"
    missing = [r["id"] for r in short_done if rows.get(r["id"][5:], {}).get("status") != 200]  # "cmpl-" + row id
    assert not missing, f"{len(missing)} of {len(short_done)} responses received in full lack a complete row: {missing[:3]}"
    pairs = [(r["usage"], rows[r["id"][5:]]) for r in short_done]
    wrong = [(u, row) for u, row in pairs if (u["prompt_tokens"], u["completion_tokens"]) != (
        row["prompt_tokens"], row["completion_tokens"])]
    assert not wrong, wrong[:3]
    behind = []  # seconds between the moment the client had the row's token count and the kill
    for s in cut:
        row = rows[s["id"][5:]]
        assert row["status"] is None and row["prompt_tokens"] > 0, row
        had = next((t for t, n in s["got"] if n >= row["completion_tokens"]), t_kill)
        behind.append(t_kill - had)
    with capsys.disabled():  # the figures, with -s
        print(f"\nkill -9: {len(short_done)} complete responses with complete rows; streams cut at "
              f"{[len(s['got']) for s in cut]} tokens received, rows at {[rows[s['id'][5:]]['completion_tokens'] for s in cut]}"
              f" tokens, {[f'{b:.2f}' for b in behind]} s behind the kill (flush every {FLUSH_S} s)")
    assert max(behind) <= FLUSH_S + 2.0, behind  # + 2 s for a busy machine's event loop

    # the next server on the database marks them, and `glmkit usage` shows them
    MaaS(KeyStore(db), Ledger(db))
    marked = {r.request_id: r for r in Ledger(db).rows()}
    assert all(marked[s["id"][5:]].finish_reason == "interrupted" for s in cut)
    capsys.readouterr()
    usage_main(["--db", db, "--json"])
    (total,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    open_rows = [r for r in rows.values() if r["status"] is None]  # the streams, and a short request in flight
    assert total["unfinished"] == len(open_rows) <= 4 and total["requests"] == len(rows), total
