"""Fixtures shared across test modules. A module that defines a fixture of the same name uses its own."""

import pytest
from fastapi.testclient import TestClient

from glmkit.server.app import create_app
from glmkit.tokenizer import train_bpe
from tests.serving import TEXTS, make_model


@pytest.fixture(scope="module")
def tok():
    """The server tests' byte-level BPE, trained in-process on TEXTS."""
    return train_bpe(texts=TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture()
def client(model, tok):
    with TestClient(create_app(model, tok, "tiny")) as c:
        yield c
