"""The memory plan: its arithmetic against the tensors real models, quantized models, KV caches and the
serving engine's KV pool allocate; prefill and decode workspace against measured peaks; serve's pool sized
from what is left (GLM-4-9B on 24 and 16 GiB); refusals before loading that name flags which do fit;
dtype auto; --kv-memory."""

import argparse
import dataclasses
import inspect
import re

import pytest
import torch

import glmkit.plan as plan_mod
from glmkit import fused, kernels
from glmkit.cli import load_for_cli, main, memory_plan
from glmkit.config import ModelConfig, get_preset
from glmkit.convert import stored_dtype, write_checkpoint
from glmkit.engine import Engine
from glmkit.model import GLM, BlockPool, PagedKVCache
from glmkit.plan import (
    KV_BLOCK,
    MIN_LEN,
    PREFILL_CHUNK,
    GiB,
    Plan,
    kernel_copies_bytes,
    kv_cache_bytes,
    kv_pool_bytes,
    parse_size,
    quant_spec,
    serve_prefill,
    weight_bytes,
)
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


def _pool_bytes(pool: BlockPool) -> int:
    return pool.k.untyped_storage().nbytes() + pool.v.untyped_storage().nbytes() + pool.valid.untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_pool_is_what_the_engine_allocates(dtype, monkeypatch):
    """Serve's KV figure is the engine's pool: the pool sized from what is left (half the cap here) or capped
    at every row at full length, passed as kv_memory as serve does; and the engine's own default (every
    row at full length) where memory is not measured."""
    assert KV_BLOCK == inspect.signature(Engine).parameters["block_size"].default
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: None)
    for name, cfg in CONFIGS.items():
        model = GLM(cfg).to(dtype).eval()
        big = Plan(cfg, dtype, rows=3, pool=True, available=1 << 50)
        rest = big.total - big.kv_bytes
        full = 3 * -(-cfg.max_seq_len // KV_BLOCK)
        tight = int((rest + kv_pool_bytes(cfg, full // 2, dtype) + 100) / plan_mod.HEADROOM)
        for avail, blocks in ((1 << 50, full), (tight, full // 2)):  # half: still one request at full length
            p = Plan(cfg, dtype, rows=3, pool=True, available=avail)
            engine = Engine(model, max_batch=p.rows, max_len=p.context, kv_memory=p.kv_bytes)
            real = _pool_bytes(engine.pool)
            assert p.lines[-1][1] == p.kv_bytes == real, f"{name} {dtype}: planned {p.kv_bytes}, engine's pool {real}"
            assert engine.pool.n_blocks == p.kv_blocks == blocks and p.kv_tokens == blocks * engine.pool.block, (name, p)
            assert p.fits and p.total <= p.budget, p.table()
        p = Plan(cfg, dtype, rows=3, max_len=cfg.max_seq_len - 5, pool=True)  # not measured here
        real = _pool_bytes(Engine(model, max_batch=3, max_len=cfg.max_seq_len - 5).pool)
        assert p.kv_bytes == real, f"{name} {dtype}: planned {p.kv_bytes}, the engine's default pool {real}"


def _peak(fn) -> int:
    """The highest level of CPU memory allocated while fn runs: the profiler's allocations and frees, in order."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


# many KV heads, short chunks: the keys and values gathered from the pool are most of a chunk's workspace
POOL_CFG = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256,
                       position="rope_partial", tie_embeddings=False, max_seq_len=4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefill_estimate_covers_a_measured_chunk_from_the_pool(dtype):
    """The last chunk of a long prompt prefilled into the engine's paged pool (T = 64 tokens over S = 4096):
    its measured peak stays under the plan's estimate, which is not wildly above it."""
    cfg, T, S = POOL_CFG, 64, POOL_CFG.max_seq_len
    torch.manual_seed(0)
    model = GLM(cfg).to(dtype).eval()
    cache = PagedKVCache(BlockPool.for_model(model, S // KV_BLOCK), 1, S)
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    with torch.no_grad():
        model.prefill(ids[:, : S - T], cache, last_only=True)
    pos = torch.arange(S - T, S)[None]
    peak = _peak(lambda: model.prefill(ids[:, S - T:], cache, position_ids=pos, last_only=True))
    planned = plan_mod.prefill_bytes(cfg, dtype, 1, T, S, "cpu", paged=True)
    assert 0 < peak <= planned <= 4 * peak, f"measured peak {peak}, planned {planned} ({planned / max(peak, 1):.2f}x)"
    workspace = max(planned, plan_mod.decode_bytes(cfg, dtype, 4, S, "cpu"))
    assert Plan(cfg, dtype, rows=4, prefill=T, pool=True, available=GiB).lines[-2][1] == workspace


def test_the_decode_estimate_covers_a_measured_eager_step_from_the_pool():
    """More rows than the native step takes (kernels.MAX_ROWS): the eager step gathers every row's keys
    through its block table; its measured peak stays under the plan's decode estimate."""
    cfg, rows, S = POOL_CFG, kernels.MAX_ROWS + 1, 1024
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    cache = PagedKVCache(BlockPool.for_model(model, rows * S // KV_BLOCK), rows, S)
    with torch.no_grad():
        model.prefill(torch.randint(0, cfg.vocab_size, (rows, S - 1)), cache, last_only=True)
    tokens, slots = torch.randint(0, cfg.vocab_size, (rows, 1)), torch.full((rows, 1), S - 1)
    peak = _peak(lambda: model.step(tokens, slots, cache, slots, extent=S))
    planned = plan_mod.decode_bytes(cfg, torch.float32, rows, S, "cpu")
    assert 0 < peak <= planned <= 4 * peak, f"measured peak {peak}, planned {planned} ({planned / max(peak, 1):.2f}x)"
    assert plan_mod.decode_bytes(cfg, torch.float32, kernels.MAX_ROWS, S, "cpu") < planned / 10 or not kernels.available()


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
    for f in ("--dtype", "--quantize", "--max-len", "--max-batch", "--kv-memory", "--prefill-chunk"):
        p.add_argument(f, type=int if f in ("--max-len", "--max-batch") else str)
    a = p.parse_args(text.split())
    a.dtype = a.dtype or "fp32"
    return a


def _replanned(text: str, cfg, avail: int, **defaults):
    """A suggestion, parsed as flags and planned again through the command line's own planner."""
    a = _flags(text)
    for k, v in defaults.items():
        setattr(a, k, getattr(a, k) or v)
    q, _ = memory_plan(a, "serve", cfg, torch.bfloat16, torch.device("cpu"))
    return q.with_(available=avail)


def test_glm4_9b_shape_is_refused_with_flags_that_fit():
    """A GLM-4-9B-shaped serve plan (the preset; no weights) in fp32 on 22 and 12 GiB: each suggestion,
    parsed as flags and planned again through the command line's own planner, fits."""
    cfg = get_preset("glm-4-9b")
    for avail in (22 * GiB, 12 * GiB):
        p = Plan(cfg, torch.float32, rows=8, prefill=PREFILL_CHUNK, pool=True, available=avail)
        with pytest.raises(MemoryError) as err:
            p.check("glmkit serve")
        tips = p.suggestions()
        assert tips, str(err.value)
        for text, _ in tips:
            assert text in str(err.value)
            q = _replanned(text, cfg, avail)
            assert q.fits, f"{avail / GiB} GiB: `{text}` does not fit when planned again:\n{q.table()}"
    tips = [t for t, _ in Plan(cfg, torch.float32, rows=8, prefill=PREFILL_CHUNK, pool=True, available=22 * GiB).suggestions()]
    assert tips[:3] == ["--dtype bf16", "--quantize int8", "--dtype bf16 --quantize int8"], tips
    # a --kv-memory larger than what is left: the suggestion is the pool that is left
    p = Plan(cfg, torch.bfloat16, rows=8, prefill=PREFILL_CHUNK, pool=True, kv_memory=8 * GiB, available=22 * GiB)
    tips = [t for t, _ in p.suggestions()]
    assert any(t.startswith("--kv-memory ") for t in tips) and "--quantize int8" in tips, tips
    # whole prompts prefilled at once (--prefill-chunk 0) over the 128K context: chunks fit
    long = dataclasses.replace(cfg, max_seq_len=131072)
    p = Plan(long, torch.bfloat16, rows=8, quant="int4", pool=True, available=24 * GiB)
    assert not p.fits and "--prefill-chunk 512" in [t for t, _ in p.suggestions()], p.table()


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


def _glm4(monkeypatch, avail_gib: int):
    """The issue's machine: native kernels, bf16 instructions, `avail_gib` GiB available."""
    monkeypatch.setattr(plan_mod, "_bf16_emulated", lambda: False)
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: avail_gib * GiB)


def _serve_plan(cfg, **flags):
    a = argparse.Namespace(**{"dtype": "bf16", "quantize": None, "max_batch": None, "max_len": None, "kv_memory": None, **flags})
    return memory_plan(a, "serve", cfg, torch.bfloat16, torch.device("cpu"))


def test_glm4_9b_serves_its_context_from_a_pool_of_what_is_left(monkeypatch):
    """GLM-4-9B (the preset's shape; GLM-4-9B-chat's 128K context) on 24 GiB: bf16 and int4 keep the
    context per request (bf16 as far as its pool holds) and size the KV pool from what the weights, the
    kernels' copies and one prefill chunk's workspace leave; bf16 on 16 GiB is refused, naming --quantize int4."""
    _glm4(monkeypatch, 24)
    cfg = dataclasses.replace(get_preset("glm-4-9b"), max_seq_len=131072)
    per_token = kv_cache_bytes(cfg, 1, 1, torch.bfloat16) - 8  # 40 KiB of keys and values, and a valid flag
    plans = {}
    for q in (None, "int4"):
        p, why = plans[q] = _serve_plan(cfg, quantize=q)
        rest = p.total - p.kv_bytes
        print(f"24 GiB, {q or 'bf16'}: {p!r}\n{why}\n{p.table()}")
        assert p.fits and p.max_len == 131072 and p.rows == 8, p.table()
        assert p.prefill == PREFILL_CHUNK and f"prefill workspace ({PREFILL_CHUNK} tokens over 131,072)" in p.table()
        assert 0 <= p.budget - p.total < KV_BLOCK * per_token, p.table()  # the pool takes what is left, to a block
        assert p.kv_tokens == (int(p.budget - rest) // (KV_BLOCK * per_token) - 1) * KV_BLOCK
    bf16, int4 = plans[None][0], plans["int4"][0]
    # bf16: 17.5 GiB of weights leave 3.5 GiB of KV, ~91K tokens in flight; one 128K request needs 5 GiB
    assert 88_000 < bf16.kv_tokens < 131072 and bf16.context == bf16.kv_tokens, bf16.table()
    assert "context per request: " in plans[None][1] and "131,072 would take 5.00 GiB of KV" in plans[None][1]
    # int4: 5.8 GiB of weights; the pool holds the full context for almost three requests at once
    assert int4.context == 131072 and int4.kv_tokens > 2.9 * 131072, int4.table()
    assert "context per request" not in plans["int4"][1]
    # the base model's own context (8K): every row at full context, the pool capped there
    p, _ = _serve_plan(get_preset("glm-4-9b"))
    assert p.fits and p.context == 8192 and p.kv_tokens == 8 * 8192 and p.total < p.budget, p.table()
    # 16 GiB: bf16 weights alone exceed the 14.4 GiB usable; int8 and int4 fit
    _glm4(monkeypatch, 16)
    p, _ = _serve_plan(cfg)
    with pytest.raises(MemoryError, match="Try --quantize int8; or --quantize int4") as err:
        p.check("glmkit serve")
    print(err.value)
    q = _replanned("--dtype bf16 --quantize int4", cfg, 16 * GiB)  # as dtype auto would load this checkpoint
    assert q.fits and q.context == 131072 and q.kv_tokens > 1.4 * 131072, q.table()


def test_serve_keeps_its_context_and_refuses_only_when_one_request_cannot_fit(tok, tmp_path, monkeypatch):
    """Through load_for_cli: serve plans the model's whole context per request and hands the engine the
    pool the plan sized (its bytes are the plan's KV figure); when the pool left cannot hold one request of
    the context (at most SERVE_MIN_LEN), it refuses before loading, naming a --max-len that fits."""
    ck = _checkpoint(tok, tmp_path, torch.float32, max_seq_len=2048)
    cfg = get_preset("debug", vocab_size=tok.vocab_size, max_seq_len=2048)
    rest = Plan(cfg, torch.float32, rows=8, pool=True, available=1 << 50)
    rest = rest.total - rest.kv_bytes
    serve = lambda: argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="fp32", max_batch=None,
                                       max_len=None, kv_memory=None)
    for blocks in (300, 200):  # both hold one request of the whole context (128 blocks)
        avail = int((rest + kv_pool_bytes(cfg, blocks, torch.float32) + 100) / plan_mod.HEADROOM)
        monkeypatch.setattr(plan_mod, "available_bytes", lambda device: avail)
        a = serve()
        model, _ = load_for_cli(a, "serve")
        assert (a.max_len, a.max_batch, a.kv_memory) == (2048, 8, kv_pool_bytes(cfg, blocks, torch.float32)), a
        engine = Engine(model, max_batch=a.max_batch, max_len=a.max_len, kv_memory=parse_size(a.kv_memory))
        assert _pool_bytes(engine.pool) == a.kv_memory and engine.pool.n_blocks == blocks
    _never_loaded(monkeypatch)
    avail = int((rest + kv_pool_bytes(cfg, 100, torch.float32) + 100) / plan_mod.HEADROOM)  # 1600 tokens
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: avail)
    with pytest.raises(MemoryError, match="one request of 2,048 tokens") as err:
        load_for_cli(serve(), "serve")
    n = int(re.search(r"Try --max-len (\d+)", str(err.value)).group(1))  # a shorter context: less workspace too
    q = _replanned(f"--max-len {n}", cfg, avail)
    assert 0 < n < 2048 and q.fits and q.context == n and not _replanned(f"--max-len {n + MIN_LEN}", cfg, avail).fits, q.table()


def test_kv_memory_sizes_the_pool(monkeypatch):
    cfg = get_preset("glm-4-9b")
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1 << 50)
    p, _ = _serve_plan(cfg, kv_memory="2GiB")
    block = BlockPool.block_bytes(cfg, KV_BLOCK, torch.bfloat16)
    assert (p.rows, p.max_len, p.kv_blocks) == (8, 8192, 2 * GiB // block - 1), p  # Engine(kv_memory=)'s arithmetic
    assert p.kv_bytes <= 2 * GiB < p.kv_bytes + block and p.context == 8192 and "--kv-memory 2.00 GiB" in p.table()
    p, _ = _serve_plan(cfg, kv_memory="100MiB", max_len=2048)  # 158 blocks: one request of 2048 fits
    assert p.fits and p.context == 2048 and p.kv_tokens == 2528, p.table()
    p, _ = _serve_plan(cfg, kv_memory="100MiB")  # not one request of 4096
    with pytest.raises(MemoryError, match="--kv-memory 100.0 MiB holds 2,528 tokens, fewer than one request of 4,096"):
        p.check("glmkit serve")
    assert parse_size("512MiB") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("4GB") == 4 * 10**9
    assert parse_size(p.kv_bytes) == p.kv_bytes  # serve hands the planned bytes on as --kv-memory
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert serve_prefill(cfg, 8192) == serve_prefill(cfg, 8192, "auto") == PREFILL_CHUNK
    assert (serve_prefill(cfg, 8192, 0), serve_prefill(cfg, 300, 512), serve_prefill(cfg, 8192, 100)) == (8192, 300, 100)
    assert serve_prefill(get_preset("glm-tiny"), 1024, 256) == 1024  # a GLM Part A is prefilled whole


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
    """serve's flags through load_for_cli into the engine: the pool it allocates is --kv-memory's, as planned."""
    ck = _checkpoint(tok, tmp_path, torch.float32, max_seq_len=2048)
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1 << 40)
    a = argparse.Namespace(model=str(ck), tokenizer=None, device="cpu", dtype="fp32", max_batch=None, max_len=None,
                           kv_memory="2MiB")
    model, _ = load_for_cli(a, "serve")
    engine = Engine(model, max_batch=a.max_batch, max_len=a.max_len, kv_memory=parse_size(a.kv_memory))
    real = _pool_bytes(engine.pool)  # the paged cache's blocks: keys, values, valid flags
    assert (a.max_batch, a.max_len) == (8, 2048) and real == a.kv_memory <= 2 << 20, (a, real)  # 513 bytes per position
    assert engine.pool.n_blocks == (2 << 20) // (KV_BLOCK * 513) - 1
