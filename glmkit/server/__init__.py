"""The HTTP server (app.py composes routes.py, schemas.py, state.py and metering.py) and
Model-as-a-Service (maas.py: API keys, per-key limits, the usage ledger with cost and revenue).

    glmkit serve --model DIR            glmkit keys create --name alice            glmkit usage

FastAPI, uvicorn and prometheus-client are needed only here; importing `glmkit` does not import them.
"""

from .maas import KeyStore, Ledger, MaaS, Pricing


def create_app(*args, **kwargs):
    """`app.create_app`, imported on first use (FastAPI is an optional dependency)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["KeyStore", "Ledger", "MaaS", "Pricing", "create_app"]
