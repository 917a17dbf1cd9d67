"""Streaming quantization and quantize-on-load against the in-memory reference (quantize_model on the
model loaded in fp32), bit for bit, from the glmkit layout and from layouts with joined tensors."""

import json
import struct

import pytest
import torch

import glmkit
from glmkit import quantize
from glmkit.cli import main
from glmkit.config import get_preset
from glmkit.convert import CheckpointError, WeightFiles, quantize_checkpoint, read_checkpoint, write_checkpoint
from glmkit.model import GLM
from glmkit.quantize import cast_floats, quantize_model
from tests.helpers import assert_equal, debug_checkpoint

TINY = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
SOURCES = {  # layout -> (preset, overrides, stored dtype)
    "glmkit": ("debug", dict(n_kv_heads=2, ffn_dim=128), torch.float32),  # tied: the head is a quantized embedding copy
    "glm_hf": ("glm-4-9b", dict(n_kv_heads=2, head_dim=16, ffn_dim=96), torch.bfloat16),  # q/k/v joined, untied head
    "chatglm": ("chatglm-6b", dict(ffn_dim=128), torch.float32),  # per-head qkv rows reordered, biases everywhere
}


def source(tmp_path, layout):
    preset, over, dtype = SOURCES[layout]
    torch.manual_seed(0)
    model = GLM(get_preset(preset, **TINY, **over)).to(dtype)
    return write_checkpoint(model, tmp_path / f"src-{layout}", layout)


def in_memory(src, bits, dtype):
    """What `glmkit quantize` computed before it streamed: the whole model in fp32, quantize_model, cast."""
    return cast_floats(quantize_model(read_checkpoint(src, dtype=torch.float32), bits, group_size=32), dtype).eval()


def stored(path):
    files = WeightFiles(path)
    return {n: files.get(n) for n in files.where}


def assert_same_state(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), f"{what}: names differ: {sorted(set(got) ^ set(want))[:6]}"
    for n in want:
        assert got[n].dtype == want[n].dtype, f"{what}: {n} is {got[n].dtype}, expected {want[n].dtype}"
        assert_equal(got[n], want[n], f"{what}: {n}")


IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])


@pytest.mark.parametrize("layout", list(SOURCES))
@pytest.mark.parametrize("bits", [8, 4])
def test_streaming_quantize_equals_in_memory(tmp_path, monkeypatch, layout, bits):
    # a few rows per quantization block and ~16 KiB shards, so both the blocks and the shards are exercised
    monkeypatch.setattr(quantize, "ROW_BLOCK_BYTES", 4 * 64 * 3)
    src = source(tmp_path, layout)
    read, written = quantize_checkpoint(src, tmp_path / "q", bits, group_size=32, dtype=torch.bfloat16, shard_bytes=16 << 10)
    ref = in_memory(src, bits, torch.bfloat16)
    want = ref.state_dict()
    assert_same_state(stored(tmp_path / "q"), want, f"{layout} int{bits} streamed vs in memory")
    assert written == sum(t.numel() * t.element_size() for t in want.values()) and read > written
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and sorted(index["weight_map"]) == sorted(want)
    back = glmkit.load(str(tmp_path / "q")).eval()
    assert back.cfg.quant == ref.cfg.quant == {"bits": bits, "group_size": 32 if bits == 4 else None, "head": True,
                                                  "latent": True}
    with torch.no_grad():
        assert_equal(back(IDS), ref(IDS), f"{layout} int{bits}: logits of the streamed checkpoint vs in memory")


@pytest.mark.parametrize("layout", ["glmkit", "glm_hf"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_load_equals_quantize_then_load(tmp_path, layout, bits, dtype):
    src = source(tmp_path, layout)
    got = glmkit.load(str(src), dtype=dtype, quantize=f"int{bits}", group_size=32).eval()
    quantize_checkpoint(src, tmp_path / "q", bits, group_size=32, dtype=dtype)
    want = glmkit.load(str(tmp_path / "q"), dtype=dtype).eval()
    assert got.cfg == want.cfg
    assert_same_state(got.state_dict(), want.state_dict(), f"{layout} int{bits} {dtype}: on load vs quantize then load")
    with torch.no_grad():
        assert_equal(got(IDS), want(IDS), f"{layout} int{bits} {dtype}: logits")


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    src = source(tmp_path, "glm_hf")
    real, calls = quantize.quantize_weight, []

    def interrupted(*args, **kw):  # Ctrl-C on the 5th linear, after the first shards are on disk
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(quantize, "quantize_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "q", 4, group_size=32, shard_bytes=4 << 10)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name], "a partial output was left behind"
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        quantize_checkpoint(src, tmp_path / "q", 8)
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["mine.txt"]


def test_quantize_cli_streams_and_refuses_bad_values(tmp_path, capsys):
    src = source(tmp_path, "glmkit")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), str(tmp_path / "q"), "--bits", "5"])
    assert e.value.code == 2 and "invalid choice: 5" in capsys.readouterr().err
    for flags, msg in ((["--bits", "4", "--group-size", "48"], "--group-size 48: choose 32, 64, 128 or 256"),
                       (["--bits", "4", "--group-size", "256"], "int4 group size 256 does not divide the input width 64"),
                       (["--bits", "8", "--shard-mib", "0"], "--shard-mib 0: must be >= 1")):
        assert main(["quantize", str(src), str(tmp_path / "q"), *flags]) == 1
        err = capsys.readouterr().err
        assert msg in err, err
        assert not (tmp_path / "q").exists()
    assert main(["quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--group-size", "32", "--dtype", "fp32"]) == 0
    assert "MiB ->" in capsys.readouterr().out
    assert_same_state(stored(tmp_path / "q"), in_memory(src, 4, torch.float32).state_dict(), "glmkit quantize --dtype fp32")
    with pytest.raises(ValueError, match="already quantized"):
        glmkit.load(str(tmp_path / "q"), quantize="int8")
    with pytest.raises(ValueError, match="quantize='int3': choose int8 or int4"):
        glmkit.load(str(src), quantize="int3")


def test_generate_quantize_flag_equals_quantized_checkpoint(tmp_path, tok, capsys):
    from glmkit.cli import generate_main

    src = debug_checkpoint(tok, tmp_path)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--dtype", "fp32"]) == 0  # groups of 64, as on load
    capsys.readouterr()
    flags = ["--prompt", "hello", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "fp32"]
    assert generate_main(["--model", str(src), "--quantize", "int4", *flags]) == 0
    on_load = capsys.readouterr().out
    assert generate_main(["--model", str(tmp_path / "q"), *flags]) == 0
    assert capsys.readouterr().out == on_load and on_load.strip()


def test_shard_writer_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from glmkit.convert import _write_safetensors, check_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {  # odd byte counts before wider dtypes: the writer must still align them
        "a.u8": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g), "b.bf16": torch.randn(7, generator=g).bfloat16(),
        "c.f32": torch.randn(2, 3, generator=g), "d.i8": torch.randint(-127, 127, (9,), dtype=torch.int8, generator=g),
        "e.scalar": torch.tensor(2.5), "f.empty": torch.empty(0, 4), "g.i64": torch.arange(3),
    }
    _write_safetensors(tmp_path / "x.safetensors", tensors, {"written_by": "glmkit"})
    assert sorted(check_safetensors(tmp_path / "x.safetensors")) == sorted(tensors)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"written_by": "glmkit"}
        for n, t in tensors.items():
            assert f.get_tensor(n).dtype == t.dtype
            assert_equal(f.get_tensor(n), t, n)
    (n,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8:8 + n])
    for name, t in tensors.items():
        assert (8 + n + header[name]["data_offsets"][0]) % t.element_size() == 0, f"{name} misaligned: {header[name]}"


def test_preset_quantize_on_load_and_serve_flag(capsys):
    from glmkit.quantize import Int4Linear

    m = glmkit.load("debug", dtype=torch.bfloat16, quantize="int4", group_size=32)
    assert m.cfg.quant == {"bits": 4, "group_size": 32, "head": True, "latent": True} and isinstance(m.head, Int4Linear)
    assert m.embed.weight.dtype == m.head.scales.dtype == torch.bfloat16 and m.head.weight.dtype == torch.uint8
    pytest.importorskip("fastapi")
    from glmkit.server.app import main as serve_main

    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0 and "--quantize {int8,int4}" in capsys.readouterr().out
