"""The public API and the CLI: glmkit.load, load_tokenizer, `glmkit info`, `glmkit convert`."""

import json
import subprocess
import sys

import pytest
import torch

import glmkit
from glmkit.cli import main
from glmkit.convert import write_checkpoint


def test_load_preset_and_forward_shape():
    model = glmkit.load("debug", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert model(ids).shape == (2, 7, model.cfg.vocab_size)
        # 2D positions and a per-sample sep are accepted by the same call
        pos = torch.stack((torch.arange(7).expand(2, 7), torch.zeros(2, 7, dtype=torch.long)), 1)
        assert model(ids, pos, sep=torch.tensor([3, 0])).shape == (2, 7, model.cfg.vocab_size)


def test_unknown_preset_error():
    with pytest.raises(glmkit.CheckpointError, match="glm-huge does not exist .*known presets: debug, glm-tiny"):
        glmkit.load("glm-huge")


def test_info_preset_and_checkpoint(tmp_path, capsys):
    assert main(["info", "glm-4-9b-0414"]) == 0
    out = capsys.readouterr().out
    assert "sandwich_norm: True" in out and "bf16" in out and "KV cache" in out
    write_checkpoint(glmkit.load("debug"), tmp_path / "ck", "glm_hf")
    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "format glm_hf" in out and f"{glmkit.load('debug').cfg.num_params():,}" in out


def test_info_prints_the_memory_plan_for_this_machine(monkeypatch, capsys):
    import glmkit.plan

    monkeypatch.setattr(glmkit.plan, "available_bytes", lambda device: 22 << 30)
    assert main(["info", "glm-4-9b", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fp32 35.02 GiB, bf16 17.51 GiB, int8 9.34 GiB, int4 5.76 GiB" in out, out
    assert "40.0 MiB per 1K tokens in bf16" in out, out
    assert "dtype auto: bf16, because fp32 needs" in out and "fits: context per request 8,192 tokens, " in out, out
    assert "prefill workspace (512 tokens over 8,192)" in out and "KV pool (bf16): " in out, out
    assert "22.00 GiB available here, 90% of it usable: fits" in out, out
    assert "memory plan for `glmkit generate / chat` (4,096 tokens of context)" in out, out
    monkeypatch.setattr(glmkit.plan, "available_bytes", lambda device: 12 << 30)
    assert main(["info", "glm-4-9b", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "does not fit: this needs" in out and "fits with: --quantize int8; --quantize int4" in out, out
    assert main(["info", "glm-4-9b", "--device", "cpu", "--quantize", "int4", "--max-len", "131072"]) == 0
    out = capsys.readouterr().out  # serve's flags: on 12 GiB int4 holds ~98K tokens, less than one 128K request
    assert "--max-len 131,072" in out and "context per request: " in out and "what the KV pool holds" in out, out
    monkeypatch.setattr(glmkit.plan, "available_bytes", lambda device: 24 << 30)
    assert main(["info", "glm-4-9b", "--device", "cpu", "--quantize", "int4", "--max-len", "131072"]) == 0
    assert "fits: context per request 131,072 tokens" in capsys.readouterr().out
    assert main(["info", "--device", "cpu"]) == 0  # the embedded model: fp32
    assert "dtype auto: fp32 (needs" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1
    assert "error: " in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_convert_cli_subprocess(tmp_path):
    """The console entry point end to end: glmkit -> GlmForCausalLM layout -> glmkit, bf16."""
    write_checkpoint(glmkit.load("debug"), tmp_path / "a")
    run = lambda *a: subprocess.run([sys.executable, "-m", "glmkit.cli", *a], capture_output=True, text=True)
    r = run("convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "glm_hf", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "-> " in r.stdout and "torch.bfloat16" in r.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    r = run("convert", str(tmp_path / "missing"), str(tmp_path / "c"))
    assert r.returncode == 1 and "missing does not exist" in r.stderr and "Traceback" not in r.stderr


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["床前明月光，疑是地上霜。", "hello world, hello glm"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=list(glmkit.tokenizer.SPECIAL_TOKENS)))
    tok.save(str(tmp_path / "tokenizer.json"))
    t = glmkit.load_tokenizer(tmp_path)
    text = "床前明月光, hello"
    assert t.decode(t.encode(text)) == text
    assert t.token_id("[gMASK]") == tok.token_to_id("[gMASK]")
    with pytest.raises(KeyError, match="no token '<nope>'"):
        t.token_id("<nope>")
    with pytest.raises(FileNotFoundError, match="nothing does not exist"):
        glmkit.load_tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no tokenizer.json"):
        glmkit.load_tokenizer(tmp_path / "empty")
