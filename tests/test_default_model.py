"""The embedded default model: it loads with no arguments, matches its tokenizer, and fills blanks."""

import pytest
import torch

import glmkit
from glmkit.cli import main
from glmkit.convert import DEFAULT_MODEL
from glmkit.generate import fill
from glmkit.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="this checkout ships no default model")


def test_default_model_loads_and_fills():
    model = glmkit.load().eval()
    tok = glmkit.load_tokenizer(DEFAULT_MODEL)
    assert model.cfg.vocab_size == tok.vocab_size and model.embed.weight.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) < 30e6  # small enough to ship (< 60 MB in bf16)
    res = fill(model.float(), tok, "床前明月光，[MASK]。举头望明月，[sMASK]", SamplingParams(max_new_tokens=8, temperature=0))
    assert len(res.spans) == 2 and "[MASK]" not in res.text and "[sMASK]" not in res.text
    assert res.text.startswith("床前明月光，") and "举头望明月，" in res.text


def test_info_shows_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "assets/default" in out and "8,4" in out  # 8.4M parameters
