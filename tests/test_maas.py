"""MaaS without HTTP: hashed keys and their CLI, limits on a fake clock, pricing, ledger totals, `glmkit usage`."""

import hashlib
import json
import sqlite3
import time

import pytest

from glmkit.server.maas import (AuthError, KeyStore, Ledger, Limiter, LimitError, MaaS, Pricing, UsageRow, _when,
                                keys_main, usage_main)


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


def test_keys_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "k.sqlite")
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


def test_limiter_rpm_tpm_concurrency_budget():
    store, ledger, clock = KeyStore(":memory:"), Ledger(":memory:"), Clock()
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


def test_pricing_arithmetic():
    p = Pricing(per_hour=3.6, input_per_m=2.0, cached_input_per_m=0.5, output_per_m=8.0)
    assert p.cost(10.0) == pytest.approx(0.01)  # 10 s at 3.6 / hour
    # 1000 prompt tokens of which 400 cached, 500 completion: (600 * 2 + 400 * 0.5 + 500 * 8) / 1e6
    assert p.revenue(1000, 400, 500) == pytest.approx(5.4e-3)
    assert Pricing(input_per_m=2.0).revenue(1000, 400, 0) == pytest.approx(2e-3)  # cached price defaults to input
    with pytest.raises(ValueError, match="per_hour"):
        Pricing(per_hour=-1)


def test_ledger_totals_and_usage_cli(tmp_path, capsys):
    db = str(tmp_path / "m.sqlite")
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
