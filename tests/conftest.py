"""Fixtures shared across test modules. A module that defines a fixture of the same name uses its own.
The server's packages (fastapi, the `serve` extra) are imported only by the fixtures that need them,
so the rest of the suite runs without them.

Tests marked `slow` (several processes, a served subprocess) are skipped unless pytest runs with
`--slow`, as the README's test command and .ci/run do."""

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
