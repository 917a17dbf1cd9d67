"""Two `glmkit serve` replicas of a tiny checkpoint on one PostgreSQL database, HAProxy in front with the
configuration `glmkit lb-config` writes (tests/replicas.py starts them). Checked: a key's requests stay on one
replica (the x-glmkit-replica header says which); limits hold across replicas (a 200-token budget under 40
concurrent requests split over both, RPM 5 across both); the admin API of either replica manages keys for both (no
shared filesystem); after kill -9 of a replica, its clients in flight get
a retryable 502 from the load balancer, the next requests go to the other replica, every 200 has exactly one
ledger row and no request is billed twice (no POST is replayed on the other replica).
Skipped, saying why, where HAProxy or PostgreSQL cannot start. Slow: three servers start (about 20-40 s).
Fast: the configuration HAProxy's own parser accepts (`haproxy -c`), its error bodies, bad --replicas."""

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from glmkit.server.maas import KeyStore, Ledger  # noqa: E402
from glmkit.server.replicas import main as lb_config_main  # noqa: E402
from glmkit.server.replicas import parse_replicas  # noqa: E402
from glmkit.tokenizer import train_bpe  # noqa: E402
from tests.replicas import LoadBalancerError, haproxy_missing, load_balancer, replica  # noqa: E402
from tests.serving import TEXTS, poll  # noqa: E402
from tests.test_billing import checkpoint  # noqa: E402

ADMIN_TOKEN = "admin-token-of-the-replicas-0123"


def test_lb_config_is_what_haproxy_accepts(tmp_path, capsys):
    assert lb_config_main(["--replicas", "127.0.0.1:8001,[::1]:8002,replica-3.internal:9000", "--port", "8000",
                           "--stats-port", "8404"]) == 0
    cfg = capsys.readouterr().out
    servers = re.findall(r"^\s+server (\S+) (\S+) check$", cfg, re.M)
    assert servers == [("r1", "127.0.0.1:8001"), ("r2", "[::1]:8002"), ("r3", "replica-3.internal:9000")], servers
    bodies = {int(code): json.loads(body) for code, body in re.findall(r"http-error status (\d+) .* string '(.*?)'", cfg)}
    assert set(bodies) == {502, 503, 504} and all(set(b["error"]) == {"message", "type", "param", "code"}
                                                  for b in bodies.values()), bodies
    if not haproxy_missing():  # HAProxy's own parser
        (tmp_path / "haproxy.cfg").write_text(cfg.replace("replica-3.internal", "127.0.0.3"))  # no DNS in a test
        r = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    for bad, why in (("127.0.0.1", "not HOST:PORT"), ("127.0.0.1:0", "not HOST:PORT"), ("a:1,a:1", "twice"),
                     ("127.0.0.1:8001,", "not HOST:PORT")):
        with pytest.raises(ValueError, match=why):
            parse_replicas(bad)
    assert lb_config_main(["--replicas", "localhost"]) == 2 and "HOST:PORT" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_cluster):
    """(database URL, [replica A, replica B], load balancer URL), shared by the module's tests (the kill test last)."""
    if why := haproxy_missing():
        pytest.skip(why)
    url = pg_cluster.create_database()
    tmp = tmp_path_factory.mktemp("replicas")
    ckpt = checkpoint(train_bpe(texts=TEXTS, vocab_size=300), tmp)
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    args = ("--model", str(ckpt), "--db", url, "--max-batch", "8", "--admin-token-file", str(tmp / "admin.token"))
    with replica(*args) as a, replica(*args) as b, contextlib.ExitStack() as stack:
        try:
            lb = stack.enter_context(load_balancer([a, b], tmp))
        except LoadBalancerError as e:
            pytest.skip(f"haproxy could not start: {e}")
        yield url, [a, b], lb


def keys_on_each_replica(db, lb, replicas, want: int = 1) -> list[list[str]]:
    """Keys made until each replica has `want` of them as HAProxy routes them: [[raw keys of A], [of B]]."""
    store, found = KeyStore(db), [[] for _ in replicas]
    for _ in range(64):
        raw, _ = store.create("tenant")
        r = httpx.get(lb + "/v1/models", headers={"authorization": f"Bearer {raw}"}, timeout=30)
        assert r.status_code == 200, r.text
        (i,) = [i for i, rep in enumerate(replicas) if rep.answered(r)]
        found[i].append(raw)
        if all(len(f) >= want for f in found):
            return found
    raise AssertionError(f"64 keys hashed to replicas {[len(f) for f in found]}: consistent hashing does not spread keys")


@pytest.mark.slow
def test_a_keys_requests_stay_on_one_replica(cluster):
    db, replicas, lb = cluster
    per_replica = keys_on_each_replica(db, lb, replicas, want=3)
    for i, raws in enumerate(per_replica):
        for raw in raws:
            h = {"authorization": f"Bearer {raw}"}
            answers = [httpx.post(lb + "/v1/completions", json={"prompt": f"Hi {k}", "max_tokens": 2}, headers=h,
                                  timeout=60) for k in range(3)] + [httpx.get(lb + "/v1/models", headers=h, timeout=30)]
            where = [[j for j, rep in enumerate(replicas) if rep.answered(r)] for r in answers]
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            assert where == [[i]] * 4, f"key {raw[:12]} was routed to replica {i} first, then to {where}"


@pytest.mark.slow
def test_the_admin_api_of_one_replica_serves_all(cluster):
    """No shared filesystem: a key made through one replica's admin API works on the other at once; revoked
    through the other, it stops on the first within the key cache's few seconds; both report the same usage."""
    _, (a, b), lb = cluster
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    made = httpx.post(a.url + "/admin/keys", json={"name": "via-a"}, headers=admin, timeout=30)
    assert made.status_code == 201, made.text
    h = {"authorization": f"Bearer {made.json()['key']}"}
    r = httpx.post(b.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(a.url + "/v1/models", headers=h, timeout=30).status_code == 200  # cached on A from here
    usage = [httpx.get(rep.url + f"/admin/usage?key={made.json()['id']}", headers=admin, timeout=30).json()["data"]
             for rep in (a, b)]
    assert usage[0] == usage[1] and usage[0][0]["requests"] == 1, usage
    assert httpx.delete(b.url + f"/admin/keys/{made.json()['id']}", headers=admin, timeout=30).status_code == 200
    assert httpx.get(b.url + "/v1/models", headers=h, timeout=30).status_code == 401  # at once where revoked
    poll("the key revoked through B refused by A", lambda: httpx.get(a.url + "/v1/models", headers=h,
                                                                     timeout=30).status_code == 401, timeout=10)


def spread(replicas, h: dict, n: int, body: dict) -> list:
    """n concurrent requests of one key, alternately straight to each replica (the load balancer would send them
    all to one): what only a limit held in the database can bound."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: httpx.post(replicas[i % len(replicas)].url + "/v1/completions", json=body,
                                                  headers=h, timeout=120), range(n)))


@pytest.mark.slow
def test_a_budget_holds_across_replicas(cluster):
    db, replicas, _ = cluster
    raw, key = KeyStore(db).create("budget", budget_tokens=200)
    answers = spread(replicas, {"authorization": f"Bearer {raw}"}, 40, {"prompt": "Hello there", "max_tokens": 12})
    codes = Counter(r.status_code for r in answers)
    used = sum(r.prompt_tokens + r.completion_tokens for r in Ledger(db).rows(key.id))
    served = sum(r.json()["usage"]["total_tokens"] for r in answers if r.status_code == 200)
    print(f"budget 200: {dict(codes)}; ledger {used} tokens, responses {served}")
    assert set(codes) <= {200, 429} and codes[200] > 0, codes
    assert used == served <= 200, (used, served, codes)


@pytest.mark.slow
def test_rpm_5_admits_exactly_5_across_replicas(cluster):
    db, replicas, _ = cluster
    raw, key = KeyStore(db).create("rpm", rpm=5)
    answers = spread(replicas, {"authorization": f"Bearer {raw}"}, 12, {"prompt": "Hi", "max_tokens": 1})
    codes = Counter(r.status_code for r in answers)
    assert codes == {200: 5, 429: 7}, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)


@pytest.mark.slow
def test_kill_9_of_a_replica(cluster):
    db, (a, b), lb = cluster
    (on_a, *_), (on_b, *_) = keys_on_each_replica(db, lb, [a, b])
    store = KeyStore(db)
    kid_a, kid_b = store.lookup(on_a).id, store.lookup(on_b).id
    answers: list[tuple[str, httpx.Response | Exception]] = []  # (key id, answer) of every request sent
    stop = threading.Event()

    def client(raw, kid, max_tokens):
        h = {"authorization": f"Bearer {raw}"}
        while not stop.is_set():
            try:
                r = httpx.post(lb + "/v1/completions", json={"prompt": "Hello", "max_tokens": max_tokens,
                                                             "temperature": 0}, headers=h, timeout=120)
            except httpx.HTTPError as e:
                r = e
            answers.append((kid, r))

    threads = [threading.Thread(target=client, args=(raw, kid, n)) for raw, kid in ((on_a, kid_a), (on_b, kid_b))
               for n in (400, 400, 3)]
    for t in threads:
        t.start()
    try:
        # kill A while it has requests in flight: rows open in the ledger (admitted, not finished)
        poll("two requests in flight on replica A", lambda: sum(r.status is None for r in Ledger(db).rows(kid_a)) >= 2,
             timeout=60)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(30)
        sent_before = len(answers)
        poll("six answers after the kill", lambda: len(answers) >= sent_before + 6, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    ok = [(k, r) for k, r in answers if isinstance(r, httpx.Response) and r.status_code == 200]
    failed = [(k, r) for k, r in answers if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    # retryable: the load balancer's 502 (503 while no replica is up) in OpenAI's shape; or, for a response whose
    # head had gone out when the replica died (the head goes before the ledger row is committed and the body sent),
    # a connection cut mid-response, which OpenAI's clients retry as a connection error
    def retryable(r):
        if isinstance(r, httpx.Response):
            return r.status_code in (502, 503) and r.json()["error"]["type"] == "server_error"
        return isinstance(r, (httpx.RemoteProtocolError, httpx.ReadError))

    assert all(retryable(r) for _, r in failed), [r if isinstance(r, Exception) else (r.status_code, r.text) for _, r in failed]
    assert any(k == kid_a and isinstance(r, httpx.Response) and r.status_code == 502 for k, r in failed), (
        "no request in flight on the killed replica got a 502: they were replayed on the other (or it was not killed)")
    after = [r for k, r in answers[sent_before:] if k == kid_a and not isinstance(r, Exception)]
    assert after and all(b.answered(r) for r in after if r.status_code == 200), "key A did not move to replica B"
    assert any(r.status_code == 200 for r in after)

    rows = {kid: Ledger(db).rows(kid) for kid in (kid_a, kid_b)}
    ids = Counter(r.request_id for rs in rows.values() for r in rs)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]  # no request billed twice
    by_id = {r.request_id: r for rs in rows.values() for r in rs}
    for kid, r in ok:  # every 200 has its row, complete, with the usage the client saw
        row = by_id.get(r.json()["id"].removeprefix("cmpl-"))
        assert row is not None and row.status == 200 and row.key_id == kid, (r.json(), row)
        assert (row.prompt_tokens, row.completion_tokens) == (r.json()["usage"]["prompt_tokens"],
                                                              r.json()["usage"]["completion_tokens"])
    # no POST replayed on B: each key has at most one row per request sent
    for kid in (kid_a, kid_b):
        sent = sum(k == kid for k, _ in answers)
        assert len(rows[kid]) <= sent, f"{len(rows[kid])} ledger rows for {sent} requests of key {kid}"
    print(f"kill -9: {len(ok)} answers 200, {len(failed)} errors ({Counter(getattr(r, 'status_code', type(r).__name__) for _, r in failed)}), "
          f"{sum(len(v) for v in rows.values())} ledger rows")
