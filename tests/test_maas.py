"""MaaS without HTTP: hashed keys and their CLI, limits on a fake clock, token reservations, pricing, the ledger
row's life (open, flushed, completed, interrupted), what a call bills, ledger totals, `glmkit usage`; the tests
taking `db` run on a SQLite file and on a throwaway PostgreSQL database (tests/pg.py; replicas: test_maas_replicas.py).
Then with it, on a live server: 32 concurrent streams each metered once, a client that hangs up mid-stream.
(Billing over HTTP, kill -9, and body and head deadlines: test_billing.py.)"""

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest

from glmkit.chat import FORMATS
from glmkit.server.maas import AuthError, KeyStore, Ledger, Limiter, LimitError, MaaS, Pricing, UsageRow, _when, keys_main, usage_main


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """Where keys, limits and the ledger live: a SQLite file, or a fresh PostgreSQL database (skipped, saying
    why, where no PostgreSQL server can be started)."""
    return str(tmp_path / "maas.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_db")


def test_update_changes_limits_and_admin_keys(db, capsys):
    store = KeyStore(db)
    raw, rec = store.create("carol", models=["tiny"], rpm=5, budget_tokens=100)
    _, adm = store.create("ops", admin=True)
    assert (rec.admin, adm.admin, store.lookup(raw).admin) == (False, True, False)
    new = store.update(rec.prefix, rpm=None, tpm=50, models=["tiny", "big"])
    want = (("tiny", "big"), None, 50, None, 100, False)
    assert (new.models, new.rpm, new.tpm, new.concurrency, new.budget_tokens, new.admin) == want, new
    got = store.lookup(raw)  # the cached record is dropped by a change made through this store
    assert (got.models, got.rpm, got.tpm, got.concurrency, got.budget_tokens, got.admin) == want, got
    assert store.update(rec.id, budget_tokens=None).budget_tokens is None
    for bad, match in (({"rpm": 0}, "positive integer"), ({"tpm": True}, "positive integer"), ({"models": []}, "at least one"),
                       ({"admin": True}, "not a key limit"), ({"hash": "x"}, "not a key limit")):
        with pytest.raises(ValueError, match=match):
            store.update(rec.id, **bad)
    assert store.find(rec.id).tpm == 50  # a refused change changes nothing
    with pytest.raises(KeyError, match="no key"):
        store.update("k_nope", rpm=1)
    # the CLI: create --admin, update, clear
    assert keys_main(["create", "--db", db, "--name", "root", "--admin"]) == 0
    assert "admin key" in capsys.readouterr().err
    assert keys_main(["update", rec.id, "--db", db, "--rpm", "7", "--clear", "tpm"]) == 0
    assert "rpm 7, tpm None" in capsys.readouterr().out
    assert (store.find(rec.id).rpm, store.find(rec.id).tpm) == (7, None)
    keys_main(["list", "--db", db])
    assert sum("active admin" in line for line in capsys.readouterr().out.splitlines()) == 2


def test_keys_are_stored_hashed_and_shown_by_prefix(tmp_path):
    db = tmp_path / "maas.sqlite"
    store = KeyStore(db)
    raw, rec = store.create("alice", models=["tiny"], rpm=10)
    assert raw.startswith("glmk-") and len(raw) >= 40  # 256 random bits, url-safe
    assert rec.prefix == raw[:12] and rec.id.startswith("k_")
    row = sqlite3.connect(db).execute("SELECT hash, prefix FROM keys").fetchone()
    assert row == (hashlib.sha256(raw.encode()).hexdigest(), raw[:12])
    del store
    # the raw key is nowhere on disk (database, WAL, shared memory), only its hash and prefix
    secret = raw[12:].encode()
    for f in tmp_path.iterdir():
        assert secret not in f.read_bytes(), f"the raw key is stored in {f.name}"
    store = KeyStore(db)
    assert store.lookup(raw).name == "alice" and store.lookup(raw + "x") is None
    assert store.lookup(raw).allows("tiny") and not store.lookup(raw).allows("other")
    store.revoke(rec.prefix)
    assert store.lookup(raw) is None
    assert [k.id for k in store.list()] == [] and [k.id for k in store.list(include_revoked=True)] == [rec.id]
    with pytest.raises(ValueError, match="positive integer"):
        store.create("bad", rpm=0)


def test_keys_cli_create_list_revoke(db, capsys):
    assert keys_main(["create", "--db", db, "--name", "bob", "--models", "tiny,other", "--tpm", "1000",
                      "--concurrency", "2", "--budget-tokens", "5000"]) == 0
    out = capsys.readouterr()
    raw = out.out.strip()
    assert raw.startswith("glmk-") and "cannot be shown again" in out.err
    rec = KeyStore(db).lookup(raw)
    assert (rec.name, rec.models, rec.tpm, rec.concurrency, rec.budget_tokens, rec.rpm) == ("bob", ("tiny", "other"), 1000, 2, 5000, None)
    keys_main(["--db", db, "list"])
    listing = capsys.readouterr().out
    assert rec.id in listing and raw[:12] in listing and raw not in listing and "active" in listing
    keys_main(["revoke", rec.id, "--db", db])
    assert "revoked" in capsys.readouterr().out
    keys_main(["list", "--db", db])
    assert rec.id not in capsys.readouterr().out
    keys_main(["list", "--all", "--db", db])
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(KeyError, match="no key"):
        keys_main(["revoke", "k_nope", "--db", db])


def test_authenticate():
    store = KeyStore(":memory:")
    raw, rec = store.create("a")
    maas = MaaS(store, Ledger(":memory:"))
    assert maas.authenticate(f"Bearer {raw}").id == rec.id
    for header in (None, "", "Bearer ", f"Basic {raw}", "Bearer glmk-wrong"):
        with pytest.raises(AuthError):
            maas.authenticate(header)
    assert MaaS.local().authenticate(None) is None  # auth off
    with pytest.raises(ValueError, match="no-auth"):
        MaaS(None, Ledger(":memory:"))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_limiter_rpm_tpm_concurrency_budget(db):
    store, ledger, clock = KeyStore(db), Ledger(db), Clock()
    lim = Limiter(ledger, clock)
    _, k = store.create("rpm", rpm=2)
    lim.admit(k), lim.release(k, 0)
    clock.t += 10
    lim.admit(k), lim.release(k, 0)
    with pytest.raises(LimitError) as e:
        lim.admit(k)
    assert (e.value.type, e.value.code, e.value.retry_after, e.value.should_retry) == ("requests", "rate_limit_exceeded", 50, True)
    clock.t += 50  # the first request leaves the window
    lim.admit(k)

    _, k = store.create("tpm", tpm=100)
    lim.admit(k), lim.release(k, 60)
    clock.t += 20
    lim.admit(k), lim.release(k, 50)  # admitted under the limit; now 110 in the window
    with pytest.raises(LimitError) as e:
        lim.admit(k)
    assert (e.value.type, e.value.retry_after) == ("tokens", 40)  # until the 60-token request leaves
    clock.t += 40
    lim.admit(k)

    _, k = store.create("conc", concurrency=2)
    lim.admit(k), lim.admit(k)
    assert lim.snapshot(k.id).active == 2
    with pytest.raises(LimitError, match="in flight") as e:
        lim.admit(k)
    assert e.value.retry_after == 1
    lim.release(k, 0)
    lim.admit(k)

    _, k = store.create("budget", budget_tokens=100)
    ledger.record(UsageRow(time.time(), "r1", k.id, "/v1/completions", prompt_tokens=30, completion_tokens=40))
    lim.admit(k)  # 70 used (read from the ledger)
    lim.release(k, 30)  # 100 used
    with pytest.raises(LimitError) as e:
        lim.admit(k)
    assert (e.value.type, e.value.code, e.value.retry_after, e.value.should_retry) == ("insufficient_quota", "insufficient_quota", None, False)


def test_reservations_hold_budget_and_tpm_when_everyone_is_admitted_at_once(db):
    """Issue 16 #3: 20 requests (prompt 40, max_tokens 16) admitted at once against a budget of 200 used 1,260
    tokens, and as many against a tpm of 100: admission looked at tokens already used. Each request now reserves
    the most it may use before it runs, and settles to what it used."""
    store, ledger, clock = KeyStore(db), Ledger(db), Clock()
    lim = Limiter(ledger, clock)

    def burst(key, need=56, n=20):
        for i in range(n):  # every one admitted before any reserves: the race of the issue, in order
            lim.admit(key, f"{key.id}-{i}")
        ran, refused = [], []
        for i in range(n):
            try:
                lim.reserve(key, need, f"{key.id}-{i}")
                ran.append(i)
            except LimitError as e:
                refused.append(e)
        for i in range(n):  # the worst case: each used all it reserved
            lim.release(key, need if i in ran else 0, f"{key.id}-{i}")
        return ran, refused

    _, k = store.create("budget", budget_tokens=200)
    ran, refused = burst(k)
    w = lim.snapshot(k.id)
    assert (len(ran), w.used, w.reserved, w.active) == (3, 168, 0, 0), (len(ran), w)
    # they waited for requests in flight: retrying helps
    assert {(e.type, e.retry_after, e.should_retry) for e in refused} == {("tokens", 1, True)}, refused[0]
    with pytest.raises(LimitError, match="32 of its budget of 200 left") as e:
        lim.reserve(k, 56, "late")  # now it cannot fit at all: waiting will not help
    assert (e.value.type, e.value.code, e.value.retry_after, e.value.should_retry) == (
        "insufficient_quota", "insufficient_quota", None, False)
    lim.admit(k, "exact"), lim.reserve(k, 32, "exact"), lim.release(k, 20, "exact")  # settles to what it used
    w = lim.snapshot(k.id)
    assert (w.used, w.reserved) == (188, 0), w

    _, k = store.create("tpm", tpm=100)
    ran, refused = burst(k)
    w = lim.snapshot(k.id)
    assert (len(ran), w.tokens, w.reserved) == (1, 56, 0), (len(ran), w)
    assert {(e.type, e.retry_after, e.should_retry) for e in refused} == {("tokens", 1, True)}, refused[0]
    lim.admit(k, "next")
    with pytest.raises(LimitError) as e:
        lim.reserve(k, 56, "next")  # 56 settled + 56 > 100: until the first leaves the window
    assert e.value.retry_after == 60, str(e.value)
    clock.t += 60
    lim.reserve(k, 56, "next")
    with pytest.raises(LimitError, match="can never pass") as e:
        lim.reserve(k, 101, "huge")
    assert (e.value.retry_after, e.value.should_retry) == (None, False)

    # and with threads: the reservation is atomic in the database
    _, k = store.create("threads", budget_tokens=200)
    go = threading.Barrier(20)

    def one(i):
        lim.admit(k, f"t{i}")
        go.wait()
        try:
            lim.reserve(k, 56, f"t{i}")
        except LimitError:
            return lim.release(k, 0, f"t{i}")
        lim.release(k, 56, f"t{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = lim.snapshot(k.id)
    assert w.used <= 200 and (w.reserved, w.active) == (0, 0), w


def test_ledger_row_lives_open_flushed_completed_or_interrupted(db, capsys):
    """Issue 16 #6: the row is written at admission (status NULL), flushed while the request runs, completed at
    the end; a server that dies leaves it open, and the next one on the database marks it interrupted."""
    store = KeyStore(db)
    _, k = store.create("a", budget_tokens=1000)
    maas = MaaS(store, Ledger(db), Pricing(input_per_m=1e6, output_per_m=2e6))  # 1 per prompt, 2 per completion token
    t = time.time()

    def row(rid, status=None, completion=0, **kw):
        return UsageRow(t, rid, k.id, "/v1/completions", status=status, prompt_tokens=10, completion_tokens=completion, **kw)

    for rid in ("done", "cut"):
        maas.limiter.admit(k, rid)
        maas.open(UsageRow(t, rid, k.id, "/v1/completions", status=None))
    maas.flush([row("done", completion=3), row("cut", completion=5)])
    maas.record(row("done", 200, 8, finish_reason="length"), k)
    maas.flush([row("done", completion=4)])  # a flush that lost the race never reopens a completed row
    rows = {r.request_id: r for r in maas.ledger.rows()}
    assert (rows["done"].status, rows["done"].completion_tokens, rows["done"].revenue) == (200, 8, pytest.approx(26)), rows
    assert (rows["cut"].status, rows["cut"].completion_tokens, rows["cut"].revenue) == (None, 5, pytest.approx(20)), rows
    assert maas.interrupted == 0 and capsys.readouterr().err == ""

    del maas  # the server is killed here; the next one finds the open row
    again = MaaS(KeyStore(db), Ledger(db))  # its limiter is gone from this process: that replica is dead
    assert again.interrupted == 1 and "interrupted" in capsys.readouterr().err
    assert again.limiter.snapshot(k.id).active == 0  # the slot of the request cut off is free
    cut = {r.request_id: r for r in again.ledger.rows()}["cut"]
    assert (cut.status, cut.finish_reason, cut.completion_tokens) == (None, "interrupted", 5), cut
    assert MaaS(KeyStore(db), Ledger(db)).interrupted == 0  # marked once
    with pytest.raises(LimitError, match="967 of its budget"):  # its tokens count: 18 + 15 used
        again.limiter.reserve(k, 968, "r")
    usage_main(["--db", str(db), "--json"])
    (total,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (total["requests"], total["errors"], total["unfinished"], total["completion_tokens"]) == (2, 0, 1, 13), total
    usage_main(["--db", str(db)])
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[2:5] == ["requests", "errors", "unfinished"] and line.split()[2:5] == ["2", "0", "1"], (header, line)


def test_a_call_bills_only_work_done(db):
    """Issue 16 #4: a request refused before it ran (a 400 for a prompt longer than the context) was billed its
    prompt tokens, revenue and a charge against the key's limits. Now only work done is billed."""
    from glmkit.engine import Request
    from glmkit.server.metering import Call

    store = KeyStore(db)
    _, k = store.create("a", budget_tokens=1000, tpm=1000)
    maas = MaaS(store, Ledger(db), Pricing(input_per_m=1e6, output_per_m=1e6))
    server = SimpleNamespace(maas=maas)

    async def calls():
        return [Call(server, k, "/v1/completions") for _ in range(5)]

    refused, queued, prefilled, own, own_done = asyncio.run(calls())
    for c in (refused, queued, prefilled, own, own_done):
        maas.limiter.admit(k, c.id)
        c.prompt_tokens, c.status = 40, 200
    refused.status = 400  # the handler set prompt_tokens, then the context check failed
    refused.reserve(50)  # (a reservation, to see it released)
    for c in (queued, prefilled):  # an engine request: cancelled while queued, or prefilled
        req = Request([1] * 40)
        c.jobs.append((0, req))
        c.choices.append(SimpleNamespace(matched=False, entries=[], req=req, finish_reason="cancelled"))
        c.started = True
    prefilled.jobs[0][1].compute_s, prefilled.jobs[0][1].output_ids = 0.01, [7, 8]
    own.start()  # fill / classify: their own work started
    own_done.compute_s = 0.5  # a handler that did not say so, but did the work
    billed = {name: (r.status, r.prompt_tokens, r.completion_tokens, r.revenue) for name, c in
              [("refused", refused), ("queued", queued), ("prefilled", prefilled), ("own", own), ("own_done", own_done)]
              for r in [maas.record(c.row(), k)]}
    assert billed == {"refused": (400, 0, 0, 0.0), "queued": (200, 0, 0, 0.0), "prefilled": (200, 40, 2, pytest.approx(42)),
                      "own": (200, 40, 0, pytest.approx(40)), "own_done": (200, 40, 0, pytest.approx(40))}, billed
    w = maas.limiter.snapshot(k.id)
    assert (w.used, w.tokens, w.reserved, w.active) == (122, 122, 0, 0), w


def test_pricing_arithmetic():
    p = Pricing(per_hour=3.6, input_per_m=2.0, cached_input_per_m=0.5, output_per_m=8.0)
    assert p.cost(10.0) == pytest.approx(0.01)  # 10 s at 3.6 / hour
    # 1000 prompt tokens of which 400 cached, 500 completion: (600 * 2 + 400 * 0.5 + 500 * 8) / 1e6
    assert p.revenue(1000, 400, 500) == pytest.approx(5.4e-3)
    assert Pricing(input_per_m=2.0).revenue(1000, 400, 0) == pytest.approx(2e-3)  # cached price defaults to input
    with pytest.raises(ValueError, match="per_hour"):
        Pricing(per_hour=-1)


def test_ledger_totals_and_usage_cli(db, capsys):
    store = KeyStore(db)
    _, a = store.create("alice")
    _, b = store.create("bob")
    maas = MaaS(store, Ledger(db), Pricing(per_hour=36.0, input_per_m=1.0, output_per_m=2.0))
    old = time.time() - 3 * 86400
    maas.record(UsageRow(old, "r0", a.id, "/v1/completions", prompt_tokens=1000, completion_tokens=1000, compute_s=100.0), a)
    maas.record(UsageRow(time.time(), "r1", a.id, "/v1/completions", prompt_tokens=100, completion_tokens=50, compute_s=1.0), a)
    maas.record(UsageRow(time.time(), "r2", a.id, "/v1/chat/completions", status=499, prompt_tokens=10, completion_tokens=5, compute_s=0.5), a)
    maas.record(UsageRow(time.time(), "r3", b.id, "/v1/fill", status=400), b)
    rows = maas.ledger.rows(a.id)
    assert [r.request_id for r in rows] == ["r0", "r1", "r2"]
    assert rows[1].cost == pytest.approx(0.01) and rows[1].revenue == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
    t = {d["key_id"]: d for d in maas.ledger.totals(since=time.time() - 86400)}
    assert t[a.id]["requests"] == 2 and t[a.id]["errors"] == 1 and t[b.id]["errors"] == 1
    assert t[a.id]["compute_s"] == pytest.approx(1.5) and t[a.id]["cost"] == pytest.approx(0.015)
    assert t[a.id]["margin"] == pytest.approx(t[a.id]["revenue"] - 0.015)
    assert usage_main(["--db", db, "--since", "1d", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {d["key_id"]: d["requests"] for d in lines} == {a.id: 2, b.id: 1}
    usage_main(["--db", db, "--key", a.id])
    table = capsys.readouterr().out
    assert "alice" in table and "3" in table.splitlines()[1] and "bob" not in table
    usage_main(["--db", db])
    assert "total" in capsys.readouterr().out


def test_since_parsing():
    now = time.time()
    assert _when("24h") == pytest.approx(now - 86400, abs=5)
    assert _when("30m") == pytest.approx(now - 1800, abs=5)
    assert _when("2026-01-31") > 0
    with pytest.raises(ValueError, match="ISO date"):
        _when("yesterday")


# ---- a live server: concurrent metered streams, a client that hangs up ------------------------------------------
# uvicorn on a port-0 socket and the official `openai` client, as in test_server.py; the model is its tiny random one.
@pytest.fixture(scope="module")
def served():
    for extra in ("fastapi", "uvicorn", "httpx", "openai"):  # the live server and its client: skipped without them
        pytest.importorskip(extra)
    from glmkit.tokenizer import train_bpe
    from tests.serving import TEXTS, make_model

    tok = train_bpe(texts=TEXTS, vocab_size=300)
    return tok, make_model(tok)


def live_app(tmp_path, served, n_keys: int, max_batch: int = 8, max_waiting: int = 64, **limits):
    from glmkit.server.app import create_app

    tok, model = served
    store = KeyStore(tmp_path / "maas.sqlite")
    maas = MaaS(store, Ledger(tmp_path / "maas.sqlite"))
    keys = [store.create(f"key{i}", **limits) for i in range(n_keys)]
    return maas, keys, create_app(model, tok, "tiny", maas=maas, max_batch=max_batch, max_waiting=max_waiting)


def test_32_concurrent_streams_are_each_metered_once(tmp_path, served, monkeypatch):
    import openai

    from tests.serving import serve

    tok, _ = served
    # nothing ends a stream but max_tokens, so every request's completion_tokens is known in advance
    monkeypatch.setattr(FORMATS["glm4"], "stop_ids", lambda tok: [])
    N, K = 32, 4
    # back-pressure: submit() answers 503 once max_waiting requests wait for one of the max_batch rows. All 32
    # may arrive before the engine thread admits any, so max_waiting=32 admits every one; max_batch stays 8,
    # so most of them wait their turn and the ledger has to follow requests that were queued, not only run.
    maas, keys, app = live_app(tmp_path, served, K, max_batch=8, max_waiting=N)
    msgs = [[{"role": "user", "content": "Hello there" + " fox" * (i % 5) + f" #{i}"}] for i in range(N)]
    want_prompt = [len(tok.render_chat(m, add_generation_prompt=True)[0]) for m in msgs]
    want_completion = [3 + i % 6 for i in range(N)]  # 3..8: a usage swapped between requests shows

    async def one(client, i):
        stream = await client.chat.completions.create(
            model="tiny", messages=msgs[i], max_tokens=want_completion[i], temperature=1.0, seed=i, logprobs=True,
            stream=True, stream_options={"include_usage": True})
        return [c async for c in stream]

    async def run(url):
        clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=raw, max_retries=0, timeout=60) for raw, _ in keys]
        try:
            # one request alone first: the non-streaming usage is the reference for prompt_tokens, and the
            # server is accepting before 32 connections arrive at once
            ref = await clients[0].chat.completions.create(model="tiny", messages=msgs[0], max_tokens=want_completion[0])
            return ref, await asyncio.gather(*(one(clients[i % K], i) for i in range(N)), return_exceptions=True)
        finally:
            for c in clients:
                await c.close()

    with serve(app) as url:
        ref, results = asyncio.run(run(url))
        errors = [(i, repr(r)) for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of {N} streams failed: {errors[:4]}"
        assert (ref.usage.prompt_tokens, ref.usage.completion_tokens) == (want_prompt[0], want_completion[0]), ref.usage
        # no waiting: a row is complete before the last byte of its response goes out
        rows = maas.ledger.rows()
    assert len(rows) == N + 1 and all(r.status is not None for r in rows), [(r.request_id, r.status) for r in rows]

    got, bad = {}, []
    for i, chunks in enumerate(results):
        usage = chunks[-1].usage
        streamed = sum(len(c.choices[0].logprobs.content or []) for c in chunks if c.choices and c.choices[0].logprobs)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        line = (i, want_prompt[i], usage and usage.prompt_tokens, want_completion[i], usage and usage.completion_tokens,
                streamed, finish)
        if chunks[-1].choices or usage is None or (usage.prompt_tokens, usage.completion_tokens, streamed, finish) != (
                want_prompt[i], want_completion[i], want_completion[i], ["length"]):
            bad.append(line)
        else:
            got[chunks[0].id.removeprefix("chatcmpl-")] = (keys[i % K][1].id, usage.prompt_tokens,
                                                          usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)
    assert not bad, ("(request, prompt wanted, prompt in usage, completion wanted, completion in usage, tokens "
                     f"streamed, finish reasons) of the {len(bad)} wrong ones:\n" + "\n".join(map(str, bad)))
    # the ledger: exactly one row per stream (request_id is the chunk id's suffix), with the usage the client saw
    ref_row = [r for r in rows if r.request_id == ref.id.removeprefix("chatcmpl-")]
    assert [(r.prompt_tokens, r.completion_tokens) for r in ref_row] == [(want_prompt[0], want_completion[0])], ref_row
    streamed_rows = {r.request_id: r for r in rows if r not in ref_row}
    assert len(streamed_rows) == N and set(streamed_rows) == set(got), (sorted(streamed_rows), sorted(got))
    diff = [(rid, want, (r.key_id, r.prompt_tokens, r.cached_tokens, r.completion_tokens), r.status, r.finish_reason)
            for rid, want in got.items() if ((r := streamed_rows[rid]).key_id, r.prompt_tokens, r.cached_tokens,
                                               r.completion_tokens) != want or (r.status, r.finish_reason) != (200, "length")]
    assert not diff, "(request id, client's (key, prompt, cached, completion), ledger's, status, finish):\n" + "\n".join(
        map(str, diff))
    assert all(r.compute_s > 0 for r in rows), [r.compute_s for r in rows]
    assert {t["key_id"]: t["requests"] for t in maas.ledger.totals()} == {
        k.id: N // K + (k.id == keys[0][1].id) for _, k in keys}
    assert all(maas.limiter.snapshot(k.id).active == 0 for _, k in keys), [maas.limiter.snapshot(k.id) for _, k in keys]


def test_client_that_hangs_up_mid_stream_is_metered_and_frees_its_slot(tmp_path, served, monkeypatch):
    """Over a real socket (test_server.py covers the same at the ASGI level): the client reads a couple of
    chunks and closes the connection; uvicorn reports the disconnect, the engine drops the request, and the
    row says 499. The key allows one request at a time, so the next one is admitted only if the slot came back."""
    import httpx

    from tests.serving import CHAT, poll, serve

    tok, _ = served
    monkeypatch.setattr(FORMATS["glm4"], "stop_ids", lambda tok: [])  # only max_tokens or the client ends this stream
    maas, [(raw, key)], app = live_app(tmp_path, served, 1, concurrency=1)
    engine = app.state.server.engine
    h = {"authorization": f"Bearer {raw}"}
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True}
    with serve(app) as url, httpx.Client(base_url=url, headers=h, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            data = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data.append(line)
                    if len(data) == 3:  # the role chunk and two tokens
                        break
            assert len(data) == 3 and "[DONE]" not in data[-1], data
        # leaving the block closes the unfinished response's connection
        (row,) = poll("the ledger row of the stream that was left completed",
                      lambda: [r for r in maas.ledger.rows(key.id) if r.status is not None])
        poll(lambda: f"the engine to let go (running {engine.num_running}, waiting {engine.num_waiting}, "
                     f"tracked {len(app.state.server.runner.inflight)})",
             lambda: engine.num_running == engine.num_waiting == 0 and not app.state.server.runner.inflight)
        assert (row.status, row.finish_reason) == (499, "cancelled"), (row.status, row.finish_reason)
        assert 2 <= row.completion_tokens < 200 and row.prompt_tokens > 0 and row.compute_s > 0, row
        w = maas.limiter.snapshot(key.id)
        assert (w.active, w.reserved, maas.limiter.reservations) == (0, 0, {}), (w, maas.limiter.reservations)
        after = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert after.status_code == 200, (after.status_code, after.text)
    assert [r.status for r in maas.ledger.rows(key.id)] == [499, 200]
