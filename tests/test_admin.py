"""The admin API (glmkit/server/admin.py) in-process: who may call it (no credential, a wrong token, a
tenant's key, a revoked admin key, the admin token, an admin key), the life of a key made over HTTP (its
raw key works once created, its limits change what the limiter admits, revoking it ends its access), and
usage totals equal to what `glmkit usage --json` prints from the same ledger. Each runs on SQLite and,
where a PostgreSQL server can start, on PostgreSQL."""

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from glmkit.server.app import create_app
from glmkit.server.maas import KeyStore, Ledger, MaaS, Pricing, usage_main
from tests.serving import assert_error, serve

ADMIN_TOKEN = "admin-token-0123456789"
PRICES = Pricing(per_hour=3600.0, input_per_m=1e6, output_per_m=2e6)  # cost = compute s, revenue = prompt + 2 x completion


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """Where keys and the ledger live: a SQLite file, or a fresh PostgreSQL database (pg_db)."""
    if request.param == "sqlite":
        return str(tmp_path / "maas.sqlite")
    return request.getfixturevalue("pg_db")


@pytest.fixture()
def admin(db, model, tok):
    """(client, store): the app on the tiny model with keys in `db` and the admin token set."""
    store = KeyStore(db)
    app = create_app(model, tok, "tiny", maas=MaaS(store, Ledger(db), PRICES), admin_token=ADMIN_TOKEN)
    with TestClient(app) as c:
        yield c, store


def bearer(raw: str) -> dict:
    return {"authorization": f"Bearer {raw}"}


def test_who_may_use_the_admin_api(admin, db, model, tok):
    c, store = admin
    tenant, _ = store.create("tenant")
    boss, boss_rec = store.create("boss", admin=True)
    assert_error(c.get("/admin/keys"), 401, code="missing_admin_credential")
    assert_error(c.get("/admin/keys", headers={"authorization": "Basic " + ADMIN_TOKEN}), 401)
    assert_error(c.get("/admin/keys", headers=bearer(ADMIN_TOKEN + "x")), 401, code="invalid_admin_credential")
    err = assert_error(c.get("/admin/keys", headers=bearer(tenant)), 403, "permission_error", "not_admin")
    assert "admin" in err["message"]
    assert_error(c.post("/admin/keys", json={"name": "x"}, headers=bearer(tenant)), 403, code="not_admin")
    r = c.get("/v1/models", headers=bearer(tenant))  # the tenant's key works where it should
    assert r.status_code == 200 and r.headers["x-glmkit-replica"] == f"{socket.gethostname()}:80", r.headers
    for h in (bearer(ADMIN_TOKEN), bearer(boss)):
        r = c.get("/admin/keys", headers=h)
        assert r.status_code == 200, r.text
        assert {k["name"] for k in r.json()["data"]} == {"tenant", "boss"}
    KeyStore(db).revoke(boss_rec.id)  # through another connection (a replica, the CLI): effective here at once
    assert_error(c.get("/admin/keys", headers=bearer(boss)), 401, code="invalid_admin_credential")
    assert_error(c.get("/admin/usage", headers=bearer(boss)), 401)
    # a server with neither an admin token nor keys cannot have an admin: it says how to configure one
    with TestClient(create_app(model, tok, "tiny")) as local:
        assert_error(local.get("/admin/usage", headers=bearer(ADMIN_TOKEN)), 403, code="admin_not_configured")


def test_a_key_made_over_http_lives_and_dies_by_the_api(admin):
    c, store = admin
    h = bearer(ADMIN_TOKEN)
    r = c.post("/admin/keys", json={"name": "alice", "models": ["tiny"], "rpm": 1}, headers=h)
    assert r.status_code == 201, r.text
    made = r.json()
    raw, kid = made.pop("key"), made["id"]
    assert raw.startswith("glmk-") and made["prefix"] == raw[:12] and made["rpm"] == 1 and made["admin"] is False
    assert store.lookup(raw).id == kid  # what the API made is what the database holds
    listed = c.get("/admin/keys", headers=h).json()["data"]
    assert [k["id"] for k in listed] == [kid] and all("key" not in k and "hash" not in k for k in listed)
    assert raw not in json.dumps(listed)
    assert c.get(f"/admin/keys/{raw[:12]}", headers=h).json()["id"] == kid  # by prefix too

    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    assert c.post("/v1/completions", json=body, headers=bearer(raw)).status_code == 200
    assert_error(c.post("/v1/completions", json=body, headers=bearer(raw)), 429)  # rpm 1, as created
    r = c.patch(f"/admin/keys/{kid}", json={"rpm": None, "budget_tokens": 10_000}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["rpm"], r.json()["budget_tokens"], r.json()["models"]) == (None, 10_000, ["tiny"])
    assert r.json()["used_tokens"] > 0
    ok = c.post("/v1/completions", json=body, headers=bearer(raw))
    assert ok.status_code == 200, ok.text  # the limit cleared reaches the limiter
    shown = c.get(f"/admin/keys/{kid}", headers=h).json()
    ledger = [x for x in c.get("/admin/usage", headers=h).json()["data"] if x["key_id"] == kid][0]
    assert shown["used_tokens"] == ledger["prompt_tokens"] + ledger["completion_tokens"] > 0

    assert_error(c.patch(f"/admin/keys/{kid}", json={"rpm": 0}, headers=h), 400, param="rpm")
    assert_error(c.patch(f"/admin/keys/{kid}", json={"rmp": 5}, headers=h), 400, param="rmp")
    assert_error(c.patch(f"/admin/keys/{kid}", json={}, headers=h), 400, code="nothing_to_change")
    assert_error(c.post("/admin/keys", json={"budget_tokens": 1.5}, headers=h), 400, param="budget_tokens")
    assert_error(c.get("/admin/keys/k_nosuchkey", headers=h), 404, code="key_not_found")

    r = c.delete(f"/admin/keys/{kid}", headers=h)
    assert r.status_code == 200 and r.json()["revoked"] is not None, r.text
    assert_error(c.get("/v1/models", headers=bearer(raw)), 401, code="invalid_api_key")
    assert c.get("/admin/keys", headers=h).json()["data"] == []
    assert [k["id"] for k in c.get("/admin/keys?include_revoked=true", headers=h).json()["data"]] == [kid]


def test_usage_and_margin_are_the_ledgers_as_the_cli_prints_them(admin, db, capsys):
    c, store = admin
    h = bearer(ADMIN_TOKEN)
    a, a_rec = store.create("alice")
    b, b_rec = store.create("bob")
    sent = {a_rec.id: [], b_rec.id: []}
    for raw, rec, n in ((a, a_rec, 3), (b, b_rec, 1)):
        for i in range(n):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": f"Hello {i}", "max_tokens": 3 + i},
                       headers=bearer(raw))
            assert r.status_code == 200, r.text
            sent[rec.id].append(r.json()["usage"])
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=bearer(b)).status_code == 404

    got = c.get("/admin/usage", headers=h).json()
    assert got["object"] == "list" and got["since"] is None
    by_key = {r["key_id"]: r for r in got["data"]}
    assert usage_main(["--db", db, "--json"]) == 0
    cli = {r["key_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert cli == {k: {f: v for f, v in r.items() if f != "name"} for k, r in by_key.items()}, (cli, by_key)
    for kid, usages in sent.items():
        row, prompt = by_key[kid], sum(u["prompt_tokens"] for u in usages)
        completion = sum(u["completion_tokens"] for u in usages)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion), (row, usages)
        assert row["revenue"] == pytest.approx(prompt + 2 * completion)  # 1 and 2 per token
        assert row["margin"] == pytest.approx(row["revenue"] - row["cost"]) and row["cost"] > 0
    assert (by_key[a_rec.id]["name"], by_key[a_rec.id]["requests"]) == ("alice", 3)
    assert (by_key[b_rec.id]["requests"], by_key[b_rec.id]["errors"]) == (2, 1)

    one = c.get(f"/admin/usage?key={a[:12]}&since=1h", headers=h).json()
    assert [r["key_id"] for r in one["data"]] == [a_rec.id] and one["since"] == pytest.approx(time.time() - 3600, abs=60)
    assert c.get("/admin/usage?since=2999-01-01", headers=h).json()["data"] == []
    assert_error(c.get("/admin/usage?since=yesterday", headers=h), 400, param="since")
    assert_error(c.get("/admin/usage?key=k_nosuchkey", headers=h), 404, code="key_not_found")


def test_no_body_is_read_before_the_credential(model, tok, db):
    """A client without an admin credential announces a 1 GB body and sends none: it gets its 401 at once (the
    server neither reads nor waits for the body); with the admin token, the same route reads its body."""
    app = create_app(model, tok, "tiny", maas=MaaS(KeyStore(db), Ledger(db), PRICES), admin_token=ADMIN_TOKEN)
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for auth in ("", "Authorization: Bearer glmk-not-a-key\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"POST /admin/keys HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                          "Content-Length: 1000000000\r\n\r\n".encode())
                head = s.recv(4096)  # a timeout here: the server waits for the body
                assert head.startswith(b"HTTP/1.1 401 "), head[:200]
        import httpx

        r = httpx.post(url + "/admin/keys", json={"name": "ok"}, headers=bearer(ADMIN_TOKEN), timeout=30)
        assert r.status_code == 201 and r.json()["name"] == "ok", r.text
