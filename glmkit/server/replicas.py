"""Past one machine: several `glmkit serve` replicas on one PostgreSQL, behind HAProxy.

    glmkit lb-config --replicas 10.0.0.1:8000,10.0.0.2:8000 --port 8000 > haproxy.cfg
    haproxy -f haproxy.cfg                    # Debian: apt-get install haproxy
    app.add_middleware(ReplicaHeader)         # app.create_app does this: x-glmkit-replica on every answer

The replicas share keys, limits and the ledger through the database (`glmkit serve --db postgresql://...`),
so any replica can answer any key; the load balancer only decides which one does. The config it writes:
- a key's requests go to one replica while it is up: the hash of the Authorization header (a key is a
  bearer token), consistent hashing, so its prompts meet the same prompt cache; when a replica goes down
  or comes back, only the keys hashed to it move;
- around a dead replica: an active health check (GET /health every second, down after 2 failures, up
  after 2 passes) and a passive one (a refused connection marks the replica down at once);
- retries only for requests that never reached a replica: `retry-on conn-failure` with `option
  redispatch 1` (the next try goes to another replica). A request that reached a replica that then died
  may have run and been billed: it is never replayed; its client gets a 502 (or a cut stream) and
  retries itself (OpenAI's clients retry 502, 503 and 504 by default);
- one server connection per request (`option http-server-close`): a request never goes out on an
  idle connection that the replica is closing (uvicorn closes idle ones after --timeout-keep-alive),
  which would fail it after it was sent;
- the load balancer's own errors in OpenAI's shape (JSON, `{"error": {...}}`);
- long timeouts for streams (a completion of thousands of tokens), short ones for connecting.

Why HAProxy rather than nginx: both hash a header consistently (nginx: `hash $http_authorization
consistent`) and neither passes a POST already sent to another server (nginx's proxy_next_upstream
leaves out non-idempotent requests unless told `non_idempotent`); but the free nginx checks health only
passively, by real requests failing (active `health_check` is nginx Plus), while HAProxy's active checks
come with the Debian package.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys

REPLICA_HEADER = "x-glmkit-replica"

# what HAProxy answers itself, in OpenAI's error shape; 502/503/504 are retryable for OpenAI's clients
LB_ERRORS = {
    502: ("the replica serving this request stopped before it answered; the request may have run: retry it",
          "replica_failed"),
    503: ("no replica is up to take this request; retry shortly", "no_replica"),
    504: ("the replica did not answer in time; the request may have run: retry it", "replica_timeout"),
}


class ReplicaHeader:
    """Pure ASGI middleware: every answer carries `x-glmkit-replica: HOST:PORT`, the replica that
    served it (the listening address, so replicas behind one load balancer tell themselves apart)."""

    def __init__(self, app, name: str | None = None):
        self.app, self.name, self.host = app, name, socket.gethostname()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = scope.get("server") or ("", 0)
        value = (self.name or f"{self.host}:{server[1]}").encode("latin-1", "replace")

        async def tx(m):
            if m["type"] == "http.response.start":
                m = {**m, "headers": [*m.get("headers", []), (REPLICA_HEADER.encode(), value)]}
            await send(m)

        return await self.app(scope, receive, tx)


def parse_replicas(text: str) -> list[tuple[str, int]]:
    """'HOST:PORT,HOST:PORT' -> [(host, port)]; ValueError naming the entry that is wrong."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", item)
        if not m or not 0 < int(m[2]) < 65536:
            raise ValueError(f"--replicas: {item!r} is not HOST:PORT (e.g. 127.0.0.1:8001, [::1]:8001); give the "
                             "replicas as a comma-separated list")
        out.append((m[1], int(m[2])))
    if len(set(out)) != len(out):
        raise ValueError(f"--replicas: {text!r} names a replica twice")
    return out


def lb_config(replicas: list[tuple[str, int]], port: int = 8000, bind: str = "127.0.0.1", health: str = "/health",
              stats_port: int | None = None) -> str:
    """The HAProxy configuration (text) for `replicas` [(host, port)], listening on bind:port."""
    if not replicas:
        raise ValueError("lb_config: give at least one replica (HOST, PORT); two or more to survive one dying")
    if not health.startswith("/") or any(c.isspace() for c in health):
        raise ValueError(f"health={health!r}: give a path such as /health")
    errors = "\n".join(
        f"    http-error status {code} content-type application/json string "
        f"'{{\"error\":{{\"message\":\"{msg}\",\"type\":\"server_error\",\"param\":null,\"code\":\"{c}\"}}}}'"
        + (" hdr retry-after 1" if code == 503 else "")
        for code, (msg, c) in LB_ERRORS.items())
    servers = "\n".join(f"    server r{i} {h}:{p} check" for i, (h, p) in enumerate(replicas, 1))
    stats = "" if stats_port is None else f"""
# the replicas' state as HAProxy sees it (up, down, sessions): http://{bind}:{stats_port}/
frontend stats
    bind {bind}:{stats_port}
    stats enable
    stats uri /
"""
    return f"""# HAProxy in front of {len(replicas)} `glmkit serve` replicas sharing one database (`glmkit serve --db postgresql://...`).
# Written by `glmkit lb-config`; what each part does and why: glmkit/server/replicas.py. Run: haproxy -f THIS_FILE
global
    maxconn 4096

defaults
    mode http
    timeout connect 2s          # a replica that does not accept within 2 s is treated as down for this request
    timeout client 10m          # streams of thousands of tokens
    timeout server 10m
    timeout http-request 10s    # a client has 10 s to send its request head
    timeout queue 30s
    option http-server-close    # one server connection per request: never sent on an idle one being closed
    retries 3
    retry-on conn-failure       # retry only requests that never reached a replica: one that did may have run
    option redispatch 1         # ... and retry them on another replica
{errors}

frontend glmkit
    bind {bind}:{port}
    default_backend replicas

backend replicas
    # a key's requests (the hash of its bearer token) go to the same replica while it is up (its prompt cache);
    # consistent hashing moves only the keys of a replica that goes down or comes back
    balance hdr(Authorization)
    hash-type consistent
    # a few very busy keys can load one replica more than the others; to cap any replica at 1.5x the average
    # load (a busy key's extra requests then go elsewhere, without its prompt cache), uncomment:
    # hash-balance-factor 150
    # active check: GET {health} every second; down after 2 failures, up again after 2 passes
    option httpchk
    http-check send meth GET uri {health}
    http-check expect status 200
    # passive check: a refused connection marks the replica down at once, before the next active check
    default-server inter 1s fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
{servers}
{stats}"""


def main(argv=None) -> int:
    """`glmkit lb-config`: print the HAProxy configuration for a set of replicas."""
    p = argparse.ArgumentParser(prog="glmkit lb-config", description="Print an HAProxy configuration for several "
                                "`glmkit serve` replicas sharing one database (see glmkit/server/replicas.py).")
    p.add_argument("--replicas", required=True, help="comma-separated HOST:PORT of the replicas")
    p.add_argument("--port", type=int, default=8000, help="the port clients connect to (default 8000)")
    p.add_argument("--bind", default="127.0.0.1", help="the address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--health", default="/health", help="the replicas' health check path (default /health)")
    p.add_argument("--stats-port", type=int, default=None, help="also serve HAProxy's status page on this port")
    a = p.parse_args(argv)
    try:
        print(lb_config(parse_replicas(a.replicas), a.port, a.bind, a.health, a.stats_port), end="")
    except ValueError as e:
        print(f"glmkit lb-config: {e}", file=sys.stderr)
        return 2
    return 0
