"""The memory plan: its arithmetic against the tensors real models, quantized models and KV caches allocate;
refusals before loading that name flags which do fit; dtype auto; --kv-memory."""

import argparse

import pytest
import torch

import glmkit.plan as plan_mod
from glmkit import fused, kernels
from glmkit.cli import load_for_cli, main, memory_plan
from glmkit.config import ModelConfig, get_preset
from glmkit.convert import stored_dtype, write_checkpoint
from glmkit.model import GLM
from glmkit.plan import GiB, Plan, kernel_copies_bytes, kv_cache_bytes, parse_size, quant_spec, weight_bytes
from glmkit.quantize import Int4Linear, quantize_model

CONFIGS = {  # every layout switch the weight arithmetic reads
    "debug (rope_2d, tied)": get_preset("debug"),
    "glm-4 shape (untied, qkv bias, GQA)": ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                        head_dim=32, ffn_dim=128, position="rope_partial", qkv_bias=True,
                                                        tie_embeddings=False, max_seq_len=128),
    "glm-4-0414 shape (sandwich norms)": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=1,
                                                      ffn_dim=128, position="rope_partial", sandwich_norm=True,
                                                      tie_embeddings=False, max_seq_len=64),
    "original GLM (learned 2D, layernorm, gelu, biases)": ModelConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=96, position="learned_2d", norm="layernorm",
        mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True),
}
QUANTS = [None, "int8", "int4"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", QUANTS)
def test_planned_weights_are_the_bytes_the_model_holds(name, dtype, quant):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GLM(cfg).to(dtype)
    if quant:
        spec = quant_spec(quant, group_size=32)
        quantize_model(model, spec["bits"], 32)
    real = _bytes(model.state_dict().values())
    planned = weight_bytes(cfg, dtype, quant_spec(quant, group_size=32))
    assert sum(planned.values()) == real, f"{name} {dtype} {quant}: planned {planned} = {sum(planned.values())}, real {real}"
    p = Plan(cfg, dtype, quant=quant_spec(quant, group_size=32), available=GiB)
    assert p.lines[0][1] == real, (p.lines[0], real)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,positions", [(1, 7), (3, 64), (8, 256)])
def test_planned_kv_cache_is_what_new_cache_allocates(dtype, rows, positions):
    for name, cfg in CONFIGS.items():
        cache = GLM(cfg).to(dtype).new_cache(rows, positions)
        real = cache.k.untyped_storage().nbytes() + cache.valid.nbytes + cache.sep.nbytes  # k and v share one tensor
        assert cache.v.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()
        assert kv_cache_bytes(cfg, rows, positions, dtype) == real, (name, kv_cache_bytes(cfg, rows, positions, dtype), real)


@pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.why_unavailable()}")
@pytest.mark.parametrize("quant", QUANTS)
def test_planned_kernel_copies_are_what_the_cpu_kernels_keep(quant):
    """The native decode step's copies (fused.decode_plan) and int4's many-row layout, built by a prefill."""
    cfg = CONFIGS["glm-4 shape (untied, qkv bias, GQA)"]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = GLM(cfg).to(dtype).eval()
    if quant:
        quantize_model(model, quant_spec(quant)["bits"], 32)
    with torch.no_grad():
        model.prefill(torch.randint(0, cfg.vocab_size, (1, 40)), model.new_cache(1, 48), last_only=True)
    dp = fused.decode_plan(model)
    assert dp is not None, fused._plans.get(model)
    planned = kernel_copies_bytes(cfg, dtype, quant_spec(quant, group_size=32))
    assert planned["decode copies"] == _bytes(dp.keep), (planned, _bytes(dp.keep))
    packed = [t for m in model.modules() if isinstance(m, Int4Linear) and m._packed is not None for t in m._packed]
    assert planned["int4 prefill layout"] == _bytes(packed), (planned, _bytes(packed))
    assert planned["int4 prefill layout"] == 0  # with the native library, many rows take the dequantized tiles: no copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [128, 1024])
def test_the_prefill_estimate_covers_a_measured_prefill(dtype, T):
    """The peak a real prefill allocates (the profiler's per-op allocations and frees, summed in order) stays
    under the plan's workspace estimate, which is not wildly above it either."""
    from torch.profiler import ProfilerActivity, profile

    cfg = ModelConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
                      position="rope_partial", tie_embeddings=False, max_seq_len=2048)
    model = GLM(cfg).to(dtype).eval()
    cache = model.new_cache(1, T)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.prefill(ids, cache, last_only=True)
    level = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    planned = plan_mod.prefill_bytes(cfg, dtype, 1, T, T, "cpu")
    assert 0 < peak <= planned <= 4 * peak, f"measured peak {peak}, planned {planned} ({planned / max(peak, 1):.2f}x)"


# ---- refusals -------------------------------------------------------------------------------------------------
def _checkpoint(tok, directory, dtype, **cfg):
    torch.manual_seed(0)
    model = GLM(get_preset("debug", vocab_size=tok.vocab_size, **cfg)).to(dtype)
    tok.save(directory / "tok")
    return write_checkpoint(model, directory / "model", extra_files=[directory / "tok" / "tokenizer.json"])


def _never_loaded(monkeypatch):
    import glmkit.convert

    def refuse(*a, **k):
        raise AssertionError("the checkpoint was loaded although the plan does not fit")

    monkeypatch.setattr(glmkit.convert, "read_checkpoint", refuse)


def _flags(text: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for f in ("--dtype", "--quantize", "--max-len", "--max-batch", "--kv-memory"):
        p.add_argument(f, type=int if f in ("--max-len", "--max-batch") else str)
    a = p.parse_args(text.split())
    a.dtype = a.dtype or "fp32"
    return a


def test_glm4_9b_shape_is_refused_with_flags_that_fit():
    """A GLM-4-9B-shaped plan (the preset; no weights) in fp32 on 22 GiB: each suggestion, parsed as flags
    and planned again through the command line's own planner, fits."""
    cfg = get_preset("glm-4-9b")
    for avail in (22 * GiB, 12 * GiB):
        p = Plan(cfg, torch.float32, rows=8, max_len=8192, admission=True, available=avail)
        with pytest.raises(MemoryError) as err:
            p.check("glmkit serve")
        tips = p.suggestions()
        assert tips, str(err.value)
        for text, _ in tips:
            assert text in str(err.value)
            a = _flags(text)
            a.max_batch = a.max_batch or (None if a.kv_memory else 8)
            a.max_len = a.max_len or (None if a.kv_memory else 8192)
            q, _ = memory_plan(a, "serve", cfg, torch.bfloat16, torch.device("cpu"))
            q = q.with_(available=avail)
            assert q.fits, f"{avail / GiB} GiB: `{text}` does not fit when planned again:\n{q.table()}"
    tips = [t for t, _ in Plan(cfg, torch.float32, rows=8, max_len=8192, admission=True, available=22 * GiB).suggestions()]
    assert any("--dtype bf16" in t for t in tips) and any("--max-len" in t for t in tips) and any("--kv-memory" in t for t in tips), tips
    assert "--quantize int8" in tips, tips


def test_generate_and_serve_refuse_before_loading(tok, tmp_path, monkeypatch, capsys):
    from glmkit.server.app import main as serve_main

    ck = _checkpoint(tok, tmp_path, torch.float32)
    cfg = get_preset("debug", vocab_size=tok.vocab_size)
    fp32, bf16 = (Plan(cfg, dt, rows=1, max_len=cfg.max_seq_len, available=1 << 50).total for dt in (torch.float32, torch.bfloat16))
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: int((fp32 + bf16) / 2 / plan_mod.HEADROOM))
    _never_loaded(monkeypatch)
    assert main(["generate", "--model", str(ck), "--prompt", "hi", "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "glmkit generate: this needs" in err and "Try --dtype bf16" in err and "Traceback" not in err, err
    assert serve_main(["--no-auth", "--model", str(ck), "--port", "0", "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "glmkit serve: this needs" in err and "--dtype bf16" in err and "Traceback" not in err, err


def test_serve_shrinks_its_default_context_to_what_fits_and_honours_explicit_flags(tok, tmp_path, monkeypatch, capsys):
    ck = _checkpoint(tok, tmp_path, torch.float32, max_seq_len=2048)
    cfg = get_preset("debug", vocab_size=tok.vocab_size, max_seq_len=2048)
    full = Plan(cfg, torch.float32, rows=8, max_len=cfg.max_seq_len, admission=True, available=1 << 50)
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: int(full.total * 0.95))  # 90% of it is usable
    a = argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="fp32", max_batch=None, max_len=None, kv_memory=None)
    model, _ = load_for_cli(a, "serve")
    assert 0 < a.max_len < cfg.max_seq_len and a.max_batch == 8, a
    assert "--max-len auto" in capsys.readouterr().err
    fit = Plan(cfg, torch.float32, rows=8, max_len=a.max_len, admission=True, available=int(full.total * 0.95))
    assert fit.fits and not fit.with_(max_len=a.max_len + 256).fits
    _never_loaded(monkeypatch)  # an explicit --max-len is refused, not shrunk
    a = argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="fp32", max_batch=None,
                           max_len=cfg.max_seq_len, kv_memory=None)
    with pytest.raises(MemoryError, match="--max-len"):
        load_for_cli(a, "serve")


def test_kv_memory_sizes_the_contiguous_cache(monkeypatch):
    cfg = get_preset("glm-4-9b")
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1 << 50)
    cpu = torch.device("cpu")
    a = argparse.Namespace(dtype="bf16", max_batch=None, max_len=None, kv_memory="2GiB")
    p, _ = memory_plan(a, "serve", cfg, torch.bfloat16, cpu)
    assert p.rows == 8 and kv_cache_bytes(cfg, 8, p.max_len, torch.bfloat16) <= 2 * GiB < kv_cache_bytes(cfg, 8, p.max_len + 1, torch.bfloat16), p
    a = argparse.Namespace(dtype="bf16", max_batch=None, max_len=8192, kv_memory="2GiB")
    p, _ = memory_plan(a, "serve", cfg, torch.bfloat16, cpu)
    assert (p.rows, p.max_len) == (6, 8192), p  # 6 x 8192 x 40 KiB = 1.9 GiB
    a = argparse.Namespace(dtype="bf16", max_batch=8, max_len=8192, kv_memory="512MiB")
    with pytest.raises(ValueError, match="holds 1638 positions per row at --max-batch 8, or 1 rows at --max-len 8192"):
        memory_plan(a, "serve", cfg, torch.bfloat16, cpu)
    assert parse_size("512MiB") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("4GB") == 4 * 10**9
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


# ---- dtype auto -------------------------------------------------------------------------------------------------
def test_dtype_auto_keeps_bf16_when_fp32_would_not_fit_comfortably(tok, tmp_path, monkeypatch, capsys):
    ck = _checkpoint(tok, tmp_path / "bf16", torch.bfloat16)
    assert stored_dtype(ck) == torch.bfloat16
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()  # the same weights as a pytorch_model.bin
    (tmp_path / "bin" / "config.json").write_bytes((ck / "config.json").read_bytes())
    torch.save(load_file(ck / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    assert stored_dtype(str(tmp_path / "bin")) == torch.bfloat16
    cfg = get_preset("debug", vocab_size=tok.vocab_size)
    fp32 = Plan(cfg, torch.float32, rows=1, max_len=cfg.max_seq_len, available=1 << 50).total
    for avail, want in ((int(fp32 / 0.8), torch.bfloat16), (int(fp32 / 0.6), torch.float32)):
        monkeypatch.setattr(plan_mod, "available_bytes", lambda device: avail)
        a = argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="auto", num_beams=1)
        model, _ = load_for_cli(a, "generate")
        err = capsys.readouterr().err
        assert model.embed.weight.dtype == want, (avail, fp32, err)
        assert (f"dtype auto: bf16, because fp32 needs {plan_mod.show(fp32)}" in err) == (want == torch.bfloat16), err
    # fp32 stored: stays fp32 however tight (a refusal then names --dtype bf16)
    ck32 = _checkpoint(tok, tmp_path / "fp32", torch.float32)
    assert stored_dtype(ck32) == torch.float32
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: int(fp32 / 0.8))
    model, _ = load_for_cli(argparse.Namespace(model=str(ck32), tokenizer=None, device="cpu", dtype="auto", num_beams=1),
                            "generate")
    assert model.embed.weight.dtype == torch.float32


def test_dtype_auto_for_the_9b_shape_and_the_embedded_model(monkeypatch):
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 22 * GiB)
    cpu = torch.device("cpu")
    p, why = memory_plan(argparse.Namespace(dtype="auto"), "serve", get_preset("glm-4-9b"), torch.bfloat16, cpu)
    assert p.dtype == torch.bfloat16 and why.startswith("dtype auto: bf16, because fp32 needs"), why
    assert p.fits, p.table()  # and serve's default context shrank to what fits
    p, why = memory_plan(argparse.Namespace(dtype="auto"), "serve", get_preset("glm-tiny"), torch.bfloat16, cpu)
    assert p.dtype == torch.float32 and why.startswith("dtype auto: fp32"), why


@pytest.mark.parametrize("preset", ["glm-4-9b", "glm-4-9b-0414", "chatglm-6b", "glm-10b-chinese"])
@pytest.mark.parametrize("quant", QUANTS)
def test_real_shapes_plan_the_bytes_of_their_meta_models(preset, quant):
    """At real size, on the meta device (no memory): the model `load` fills, quantized linears swapped in as
    loading a quantized checkpoint does, float tensors counted in bf16, integer ones as they are."""
    from glmkit.convert import _meta_model

    cfg = get_preset(preset)
    if quant:
        cfg.quant = quant_spec(quant)
    real = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in _meta_model(cfg).state_dict().values())
    planned = sum(weight_bytes(cfg, torch.bfloat16).values())
    assert planned == real, f"{preset} {quant}: planned {planned}, meta model {real}"


def test_kv_memory_reaches_the_engine(tok, tmp_path, monkeypatch):
    """serve's flags through load_for_cli into the engine: the cache it allocates is within --kv-memory."""
    from glmkit.engine import Engine

    ck = _checkpoint(tok, tmp_path, torch.float32, max_seq_len=2048)
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1 << 40)
    a = argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="fp32", max_batch=None, max_len=None,
                           kv_memory="1MiB")
    model, _ = load_for_cli(a, "serve")
    engine = Engine(model, max_batch=a.max_batch, max_len=a.max_len, kv_memory=parse_size(a.kv_memory))
    pool = engine.pool  # the paged cache's blocks: keys, values, valid flags
    real = pool.k.untyped_storage().nbytes() + pool.v.untyped_storage().nbytes() + pool.valid.nbytes
    assert (a.max_batch, a.max_len) == (8, 255) and real <= 1 << 20, (a, real)  # 8 rows x 513 bytes per position
