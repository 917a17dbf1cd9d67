"""The admin API: keys (create, list, show, change limits, revoke) and usage with margin per key, over
HTTP, so replicas sharing a database need no shared filesystem and no shell on the database's machine.

    H="Authorization: Bearer $ADMIN"           # the server's admin token, or a key created with admin=true
    curl -H "$H" localhost:8000/admin/keys --json '{"name": "alice", "rpm": 60, "budget_tokens": 1000000}'
    curl -H "$H" localhost:8000/admin/keys                      # ?include_revoked=true
    curl -H "$H" localhost:8000/admin/keys/k_0123abcd4567
    curl -H "$H" localhost:8000/admin/keys/k_0123abcd4567 -X PATCH --json '{"rpm": 120, "budget_tokens": null}'
    curl -H "$H" localhost:8000/admin/keys/k_0123abcd4567 -X DELETE          # revoke (the ledger keeps its rows)
    curl -H "$H" 'localhost:8000/admin/usage?key=k_0123abcd4567&since=24h'   # cost, revenue, margin

Everything goes through the server's MaaS (KeyStore, Ledger): what one replica writes, every replica
reads. A key is named by its id (k_...) or its displayed prefix, as `glmkit keys` does; usage totals
are `Ledger.totals`, the numbers `glmkit usage` prints (cost = compute time x machine price, revenue =
tokens x token prices, margin = revenue - cost).

The credential is `Authorization: Bearer ...` holding either the admin token (`glmkit serve
--admin-token-file`, also what /metrics needs) or an active key created with admin=true (`glmkit keys
create --admin`, or POST /admin/keys {"admin": true}). No credential, an unknown or revoked key: 401.
A tenant's key: 403. A server with neither an admin token nor keys (--no-auth without a token): 403,
saying how to configure one. An admin key is read again from the database on every call (tenant keys
are cached for a few seconds), so revoking one takes effect at once on every replica. The credential is
checked before the request body is read (`AdminRoute`). Errors are OpenAI-shaped, as elsewhere.

The handlers are plain functions and the credential check runs in a worker thread too: a database round
trip never holds the event loop that streams other requests' tokens.
"""

from __future__ import annotations

import dataclasses
import hmac
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Request as HTTPRequest
from fastapi.routing import APIRoute
from pydantic import ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .maas import KeyRecord, _when
from .schemas import APIError, NonEmpty, _Body

Limit = Annotated[int, Field(ge=1, le=2**62)] | None  # None: no limit (in PATCH: clear it)


class KeyCreate(_Body):
    """A new key; a limit left out is no limit."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: Annotated[str, Field(max_length=200)] = ""
    models: Annotated[list[NonEmpty], Field(min_length=1, max_length=100)] | None = Field(
        None, description="the models the key may use (default: every served model)")
    rpm: Limit = Field(None, description="requests per minute")
    tpm: Limit = Field(None, description="tokens (prompt + completion) per minute")
    concurrency: Limit = Field(None, description="requests in flight at once")
    budget_tokens: Limit = Field(None, description="lifetime token budget (prompt + completion)")
    admin: bool = Field(False, description="the key may use this admin API")


class KeyUpdate(_Body):
    """The limits to change; a field left out stays as it is, null clears the limit."""

    model_config = ConfigDict(strict=True, extra="forbid")
    models: Annotated[list[NonEmpty], Field(min_length=1, max_length=100)] | None = None
    rpm: Limit = None
    tpm: Limit = None
    concurrency: Limit = None
    budget_tokens: Limit = None


def authorize(request: HTTPRequest) -> str:
    """Who calls: 'admin token' or the admin key's id; APIError 401 / 403 otherwise (see the module docstring)."""
    server = request.app.state.server
    keys = server.maas.keys
    if server.admin_token is None and keys is None:
        raise APIError(403, "the admin API needs an admin credential and this server has none: start it with "
                       "--admin-token-file FILE (or GLMKIT_ADMIN_TOKEN), or with keys and an admin key "
                       "(`glmkit keys create --admin`)", "permission_error", code="admin_not_configured")
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "the admin API needs 'Authorization: Bearer ADMIN_TOKEN' (the server's admin token) or an "
                       "admin key's bearer", code="missing_admin_credential")
    if server.admin_token is not None and hmac.compare_digest(given.encode(), server.admin_token.encode()):
        return "admin token"
    key = keys.lookup(given) if keys is not None else None
    if key is not None and getattr(key, "admin", False):
        # lookups are cached for a few seconds (KeyStore.CACHE_S); admin rights are read again from the database,
        # so an admin key revoked through any replica or the CLI is refused at once everywhere
        key = keys.find(key.id)
        key = None if key.revoked else key
    if key is None:
        raise APIError(401, "incorrect admin token, or an unknown or revoked key", code="invalid_admin_credential")
    if not getattr(key, "admin", False):
        raise APIError(403, f"key {key.id} is not an admin key: the admin API needs the admin token or a key created "
                       "with admin=true", "permission_error", code="not_admin")
    return key.id


class AdminRoute(APIRoute):
    """Every admin route checks the credential before anything else, before the request body is read too
    (FastAPI reads a body before it solves dependencies): a client without one cannot make the server read
    or wait for a body. The caller ('admin token' or the admin key's id) is left in scope["glmkit.admin"]."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: HTTPRequest):
            request.scope["glmkit.admin"] = await run_in_threadpool(authorize, request)  # a database read
            return await handler(request)

        return guarded


router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute)


def _store(request: HTTPRequest):
    store = request.app.state.server.maas.keys
    if store is None:
        raise APIError(400, "this server runs with --no-auth: it has no keys to manage", code="auth_off")
    return store


def _find(store, key_id: str, param: str = "key_id") -> KeyRecord:
    """The key named by id or prefix, or 404 / 400 (a prefix shared by several keys)."""
    try:
        return store.find(key_id)
    except KeyError as e:
        raise APIError(404, e.args[0], param=param, code="key_not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="ambiguous_key") from None


def _card(rec: KeyRecord, used: int | None = None) -> dict:
    """A key as the API shows it (never its hash, nor the raw key after creation)."""
    d = {"object": "api_key", **dataclasses.asdict(rec)}
    d["models"] = list(rec.models) if rec.models is not None else None
    if used is not None:
        d["used_tokens"] = used
    return d


def _used(request: HTTPRequest) -> dict[str, int]:
    """Lifetime tokens (prompt + completion) per key id, from the ledger."""
    totals = request.app.state.server.maas.ledger.totals()
    return {t["key_id"]: int((t["prompt_tokens"] or 0) + (t["completion_tokens"] or 0)) for t in totals}


@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, request: HTTPRequest):
    """A new key. The answer holds the raw key in `key`, once: only its hash is stored."""
    limits = body.model_dump(exclude={"name", "admin"})
    try:
        raw, rec = _store(request).create(body.name, admin=body.admin, **limits)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return {**_card(rec, 0), "key": raw}


@router.get("/keys")
def list_keys(request: HTTPRequest, include_revoked: bool = False):
    """Every active key (and the revoked ones with include_revoked=true), oldest first, with tokens used."""
    used = _used(request)
    return {"object": "list", "data": [_card(k, used.get(k.id, 0)) for k in _store(request).list(include_revoked)]}


@router.get("/keys/{key_id}")
def show_key(key_id: str, request: HTTPRequest):
    """A key by id (k_...) or displayed prefix, with the tokens it used."""
    rec = _find(_store(request), key_id)
    return _card(rec, request.app.state.server.maas.ledger.used_tokens(rec.id))


@router.patch("/keys/{key_id}")
def update_key(key_id: str, body: KeyUpdate, request: HTTPRequest):
    """Change limits: fields given are set (null clears a limit), fields left out stay. Replicas read the
    new limits from the database on the key's next requests."""
    store = _store(request)
    rec = _find(store, key_id)
    changes = body.model_dump(include=body.model_fields_set)
    if not changes:
        raise APIError(400, "give at least one of models, rpm, tpm, concurrency, budget_tokens (null clears a limit)",
                       code="nothing_to_change")
    try:
        rec = store.update(rec.id, **changes)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return _card(rec, request.app.state.server.maas.ledger.used_tokens(rec.id))


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, request: HTTPRequest):
    """Revoke a key: its next request gets 401. Its ledger rows stay (usage and margin keep counting them)."""
    store = _store(request)
    rec = store.revoke(_find(store, key_id).id)
    return _card(rec, request.app.state.server.maas.ledger.used_tokens(rec.id))


@router.get("/usage")
def usage(request: HTTPRequest,
          key: Annotated[str | None, Query(description="one key, by id (k_...) or prefix")] = None,
          since: Annotated[str | None, Query(description="30m, 24h, 7d (ago) or an ISO date/time")] = None,
          until: Annotated[str | None, Query(description="as since")] = None):
    """Per key over [since, until): requests, errors, unfinished, tokens, compute seconds, cost, revenue and
    margin (`Ledger.totals`, as `glmkit usage --json` prints them), with each key's name."""
    maas = request.app.state.server.maas
    bounds = {}
    for name, text in (("since", since), ("until", until)):
        try:
            bounds[name] = _when(text)
        except ValueError as e:
            raise APIError(400, str(e), param=name, code="invalid_value") from None
    key_id = _find(maas.keys, key, "key").id if key is not None and maas.keys is not None else key
    names = {k.id: k.name for k in maas.keys.list(include_revoked=True)} if maas.keys is not None else {}
    rows = maas.ledger.totals(key_id, bounds["since"], bounds["until"])
    return {"object": "list", "since": bounds["since"], "until": bounds["until"],
            "data": [{"name": names.get(r["key_id"]), **r} for r in rows]}
