"""Fixtures shared across test modules. A module that defines a fixture of the same name uses its own.
The server's packages (fastapi, the `serve` extra) are imported only by the fixtures that need them,
so the rest of the suite runs without them.

Tests marked `slow` (several processes, a served subprocess) are skipped unless pytest runs with
`--slow`, as the README's test command and .ci/run do.

PostgreSQL: `pg_url` starts one throwaway cluster per session (tests/pg.py) and `pg_db` gives each test
a fresh database on it; both skip, saying what failed, where the cluster cannot be started."""

import subprocess

import pytest

from glmkit.tokenizer import train_bpe
from tests.helpers import eval_texts, make_shards
from tests.serving import TEXTS, make_model


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the README's test command does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="marked slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session (tests/pg.py), or a skip that says why not."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'glmkit[serve]')")
    from tests.pg import Cluster, ClusterError

    try:
        cluster = Cluster.start()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no PostgreSQL for this test: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster):
    """The URL of the session's PostgreSQL cluster (its `postgres` database); tests that write use `pg_db`."""
    return pg_cluster.url


@pytest.fixture()
def pg_db(pg_cluster):
    """A fresh, empty PostgreSQL database for one test (`CREATE DATABASE t_<random>`), dropped after it."""
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The toy pretraining corpus as token shards (tests.helpers.make_shards), built once per session."""
    return make_shards(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE trained once per session on tests.serving.TEXTS. Shared: never modify it
    (monkeypatch, which undoes itself, is fine)."""
    return train_bpe(texts=TEXTS, vocab_size=300)


@pytest.fixture(scope="session")
def eval_tok():
    """A byte-level BPE trained once per session on the evaluation fixtures (tests.helpers.eval_texts)."""
    return train_bpe(texts=eval_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture()
def client(model, tok):
    """The app on `model` through FastAPI's TestClient, lifespan (the engine thread) included."""
    from fastapi.testclient import TestClient

    from glmkit.server.app import create_app

    with TestClient(create_app(model, tok, "tiny")) as c:
        yield c


@pytest.fixture(scope="session")
def repeat3_model():
    """A builder of a hand-set GLM (the `debug` shape with 32 tokens, an untied head and q/k biases)
    that continues any prompt by repeating its last three tokens: [5, 9, 13, 2, 7] -> 13, 2, 7, 13, ...
    One attention head of layer 0 per key/value head reads the token two positions back (a rotary
    pattern sharp at that distance) and writes it where the head reads; everything else adds nothing.
    So its greedy tokens are known without running it, are decided by margins no rounding or
    quantization of these tests reaches, and change when a position, a cache slot, a padding flag or
    the attention is wrong (the untrained `debug` preset repeats the last token whatever they are).
    Each call builds a fresh fp32 model."""
    import torch

    from glmkit.config import get_preset
    from glmkit.model import GLM

    def build():
        cfg = get_preset("debug", vocab_size=32, tie_embeddings=False, qkv_bias=True)
        model = GLM(cfg).eval()
        H, K, D, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rotary_dim
        codes = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0]  # orthonormal
        theta = cfg.rope_theta ** (-torch.arange(0, r, 2) / r)  # the rotary frequencies of the position half
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.zero_()
            model.embed.weight[:, :32] = codes  # token codes in dims 0..31; the copy goes to 32..63
            qkv, out = model.layers[0].attn.qkv, model.layers[0].attn.out
            for kh in range(K):  # query head kh * H/K reads kv head kh: score ~ sum_i cos(theta_i (q - k - 2))
                h = kh * H // K
                qkv.bias[h * D : h * D + r] = 17 * torch.cat(((2 * theta).cos(), -(2 * theta).sin()))
                qkv.bias[H * D + kh * D : H * D + kh * D + r // 2] = 17
                v = (H + K) * D + kh * D
                qkv.weight[v : v + D, kh * D : kh * D + D] = torch.eye(D)  # values: the code, 16 dims per kv head
                out.weight[32 + kh * D : 32 + kh * D + D, h * D : h * D + D] = torch.eye(D)
            model.head.weight[:, 32:] = codes * 0.8
        return model

    return build
