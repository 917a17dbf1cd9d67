"""Native decode kernels (glmkit/kernels.py, csrc/gemv.cpp, csrc/decode.cpp) against float64 references,
the fused decode step against the eager PyTorch step on the same cache, and a decoding model with them
against the same model through PyTorch alone."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glmkit import fused, kernels
from glmkit.config import get_preset
from glmkit.generate import generate
from glmkit.model import GLM
from glmkit.quantize import Int4Linear, quantize_int4, quantize_int8, quantize_model, unpack_int4
from glmkit.sampling import SamplingParams

from .helpers import assert_close, assert_equal, int4_act_bound, int4_linear_reference, int16_act_bound, scaled

X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_native = pytest.mark.skipif(not (X86_AVX2 and (shutil.which("c++") or shutil.which("g++"))),
                                  reason="native kernels need an x86-64 CPU with AVX2 and a C++ compiler")


@needs_native
def test_builds_on_this_machine():
    # CI machines have a compiler and AVX2: the kernels must be there, not silently replaced
    assert kernels.available(), kernels.why_unavailable()


@needs_native
@pytest.mark.parametrize("wtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K", [64, 72])  # 72: the scalar tail after the 16-wide loop
def test_dense_matches_reference(wtype, M, K):
    g = torch.Generator().manual_seed(M * 100 + K)
    N = 37
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    with torch.no_grad():
        if wtype == "int8":
            q, s = quantize_int8(w)
            y = kernels.linear(x, q, b, s)
            deq = q.double() * s.double()[:, None]
            ref = x.double() @ deq.T + b.double()
            extra = int16_act_bound(x, deq)
        else:
            wd = w.to(torch.bfloat16) if wtype == "bf16" else w
            y = kernels.linear(x, wd, b)
            ref = x.double() @ wd.double().T + b.double()
            extra = 0.0
    assert y.shape == (M, N) and y.dtype == torch.float32
    # fp32 sums of 64-72 products against float64 (outputs up to ~45; measured 4.5e-6 there)
    assert_close(y.double(), ref, atol=scaled(2e-6, ref) + extra, what=f"{wtype} M={M} K={K}")


@needs_native
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 16])  # every block of activation rows, and blocks after a full one
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_int4_matches_reference(group, M, sdtype):
    # N = 24: M = 1 takes the 4-weight-rows-at-once path (groups >= 64); N = 22 the one-row path.
    # K = 9 groups of 64 or more: the mins' dot product over groups runs 8 at a time and then a tail
    for N in (24, 22):
        g = torch.Generator().manual_seed(group + M + N)
        K = 9 * max(group, 64)
        w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
        q, s, m = quantize_int4(w, group)
        s, m = s.to(sdtype), m.to(sdtype)  # bf16 scales / mins are read as stored, not widened
        deq = (unpack_int4(q).double().reshape(N, -1, group) * s.double()[..., None] + m.double()[..., None]).reshape(N, K)
        with torch.no_grad():
            y = kernels.linear_int4(x, q, s, m, group)
        bound = int4_act_bound(x, unpack_int4(q), s, group)
        assert_close(y.double(), x.double() @ deq.T, atol=1e-4 + bound, what=f"int4 g{group} M={M} N={N} {sdtype}")


@needs_native
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_int4_products_of_one_input_in_one_call(group, M, sdtype):
    """glmkit_gemv_int4_many (latent attention's q_a and kv_a in one parallel region, csrc/decode.cpp): each
    output the same bits as its own glmkit_gemv_int4 call, for matrices whose rows all come in 4s (M = 1: the
    4-row tiles across both) and for one that does not (22 rows: one row at a time); then a refused group size."""
    import ctypes

    lib, K = kernels._lib, 4 * max(group, 64)

    def arr(ts):
        return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    g = torch.Generator().manual_seed(group + M)
    x = torch.randn(M, K, generator=g)
    for Ns in ((24, 12), (24, 22), (16, 8, 20)):
        mats = [quantize_int4(torch.randn(N, K, generator=g), group) for N in Ns]
        mats = [(q, s.to(sdtype), m.to(sdtype)) for q, s, m in mats]
        want = [kernels.linear_int4(x, q, s, m, group) for q, s, m in mats]
        ys = [torch.full((M, N), float("nan")) for N in Ns]
        J = len(Ns)
        code = 0 if sdtype == torch.float32 else 1
        rc = lib.glmkit_gemv_int4_many(x.data_ptr(), M, K, code, group, J, arr([q for q, _, _ in mats]),
                                       arr([s for _, s, _ in mats]), arr([m for _, _, m in mats]),
                                       (ctypes.c_int64 * J)(*Ns), arr(ys), torch.get_num_threads())
        assert rc == 0
        for j, (got, ref) in enumerate(zip(ys, want)):
            assert_equal(got, ref, f"int4 g{group} M={M} {sdtype} rows {Ns}: matrix {j}")
    q, s, m = mats[0]
    assert lib.glmkit_gemv_int4_many(x.data_ptr(), M, K, 0, 48, 1, arr([q]), arr([s]), arr([m]),
                                     (ctypes.c_int64 * 1)(Ns[0]), arr(ys[:1]), 1) == 1


@pytest.mark.parametrize("K, group, M, seed", [(96, 32, 1, 0), (192, 96, 2, 1)])
def test_int4_shapes_the_native_kernel_refuses_use_pytorch(K, group, M, seed):
    """The native kernel reads 64 columns at a time: 96 inputs (groups of 32), or groups of 96 (ending in the
    middle of its 64-column chunks), go through PyTorch, and the kernel itself refuses them."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(16, K, generator=g), torch.randn(M, K, generator=g)
    q, s, m = quantize_int4(w, group)
    layer = Int4Linear(K, 16, bias=False, group_size=group)
    layer.weight.copy_(q), layer.scales.copy_(s), layer.mins.copy_(m)
    assert not kernels.int4_supported(K, group)
    assert kernels.int4_supported(128, 32) and kernels.int4_supported(192, 64) and kernels.int4_supported(192, 32)
    with torch.no_grad():
        want = x @ layer.dequantize().T  # outputs up to ~25: the two fp32 GEMMs differ by an fp32 step or two
        assert_close(layer(x), want, atol=scaled(2e-6, want), what=f"int4 K={K} g{group}: the PyTorch path")
        if kernels.available():
            with pytest.raises(ValueError, match="do not fit"):
                kernels.linear_int4(x, q, s, m, group)


@needs_native
def test_bf16_input_and_batched_shape():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 32, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        y = kernels.linear(x, w)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    want = F.linear(x.float(), w.float())
    # the output rounded to bf16: at most half a bf16 step, 2^-8 of the value
    assert_close(y.float(), want, atol=2 ** -8 * want.abs().max().item() + 1e-5, what="bf16 (2, 3, K)")


def test_used_only_for_few_row_inference():
    w = torch.randn(8, 16, requires_grad=True)
    assert not kernels.usable(torch.randn(1, 16), w), "autograd through a weight that needs grad must use PyTorch"
    with torch.no_grad():
        assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 16), w), "prefill-sized inputs go to PyTorch's GEMM"
        assert not kernels.usable(torch.randn(1, 16, dtype=torch.float16), w)
        assert kernels.usable(torch.randn(2, 16), w) == kernels.available()
    # training through kernels.Linear: gradients exist and equal F.linear's
    lin = kernels.Linear(16, 8)
    x = torch.randn(1, 16)
    lin(x).sum().backward()
    assert_close(lin.weight.grad, x.expand(8, 16), atol=1e-6, what="dL/dW of a sum")


@needs_native
@pytest.mark.skipif(kernels.variant() != "avx512vnni", reason="no AVX-512 VNNI on this CPU: only the AVX2 build runs")
def test_vnni_and_avx2_builds_give_the_same_bits(monkeypatch):
    """Both builds' integer dot products are exact and the rest is the same code, so the AVX-512 VNNI build
    (up to 8 activation rows per pass) and the AVX2 one (4) agree bit for bit: int8 and int4 (groups of 32
    to 256, fp32 and bf16 scales), every row count, 4-row and 1-row weight blocks (N = 24, 22)."""
    assert kernels.available(), kernels.why_unavailable()
    libs = {"avx512vnni": kernels._lib, "avx2": kernels._open("avx2")}
    assert [lib.glmkit_gemv_vnni() for lib in libs.values()] == [1, 0]
    g = torch.Generator().manual_seed(0)
    K = 2304  # 9 groups of 256, 72 of 32
    products = {}
    for N in (24, 22):
        w = torch.randn(N, K, generator=g)
        q8, s8 = quantize_int8(w)
        int4 = {group: quantize_int4(w, group) for group in (32, 64, 128, 256)}
        for M in (1, 2, 3, 4, 5, 8, 9, 16):
            x = torch.randn(M, K, generator=g)
            products[f"int8 N={N} M={M}"] = (kernels.linear, x, q8, None, s8)
            for group, (q, s, m) in int4.items():
                for sd in (torch.float32, torch.bfloat16):
                    products[f"int4 g{group} N={N} M={M} {sd}"] = (kernels.linear_int4, x, q, s.to(sd), m.to(sd), group)
    for what, (f, *args) in products.items():
        out = {}
        for name, lib in libs.items():
            monkeypatch.setattr(kernels, "_lib", lib)
            with torch.no_grad():
                out[name] = f(*args)
        assert_equal(out["avx512vnni"], out["avx2"], what)


@needs_native
def test_bad_shapes_are_clear_errors():
    with torch.no_grad():
        with pytest.raises(ValueError, match="features"):
            kernels.linear(torch.randn(1, 20), torch.randn(8, 16))
        with pytest.raises(ValueError, match="do not fit"):
            kernels.linear_int4(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1), 48)


def test_build_failure_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_why", None)
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))  # nothing cached: it must try to compile
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    if X86_AVX2:
        with pytest.warns(UserWarning, match="unavailable"):
            assert not kernels.available()
        assert "did not build" in kernels.why_unavailable()
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.no_grad():
        assert_close(kernels.linear(x, w), F.linear(x, w), atol=0, what="fallback is F.linear")


# ---- the library cache: private, checked before loading, written atomically --------------------------------
PLANTED = b"planted: not a library, and never to be loaded\n"


def fresh_cache(monkeypatch, tmp_path, compiler=False):
    """An empty GLMKIT_CACHE and nothing loaded yet; without `compiler` no C++ compiler either, so that a
    refusal cannot be mistaken for a failed build."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_why", None)
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "cache"))
    if not compiler:
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    return tmp_path / "cache" / "kernels"


def test_cache_directory_is_created_private(monkeypatch, tmp_path):
    cache = fresh_cache(monkeypatch, tmp_path)
    assert kernels._private_dir() == cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700, f"{stat.S_IMODE(cache.stat().st_mode):o}"
    cache.chmod(0o755)  # an older glmkit made it 0755: ours and not writable by others, so kept and closed
    kernels._private_dir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700, f"{stat.S_IMODE(cache.stat().st_mode):o}"


@pytest.mark.parametrize("case", ["foreign-dir", "group-writable-dir", "world-writable-dir", "writable-library",
                                  "foreign-library", "symlinked-library"])
def test_unsafe_cache_is_refused_and_never_loaded(case, monkeypatch, tmp_path):
    """A file planted at the library's predictable path, in a cache someone else could have written, is
    never dlopen-ed: the kernels fall back to PyTorch with a warning that says why and what to do."""
    cache = fresh_cache(monkeypatch, tmp_path)
    cache.mkdir(parents=True, mode=0o700)
    lib = cache / kernels._library_name()
    lib.write_bytes(PLANTED)
    lib.chmod(0o755)
    if case == "foreign-dir":  # seen by a process of another uid (chown would need root, and tests may not have it)
        monkeypatch.setattr(kernels.os, "geteuid", lambda real=os.geteuid(): real + 1)  # noqa: B008 (the real uid, read once)
        why = "owned by uid"
    elif case.endswith("writable-dir"):
        cache.chmod(0o770 if case.startswith("group") else 0o1777)  # world-writable even with /tmp's sticky bit
        why = "group- or world-writable"
    elif case == "writable-library":
        lib.chmod(0o775)
        why = "group- or world-writable"
    elif case == "foreign-library":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(lib, 4242, 4242)
        why = "owned by uid 4242"
    else:  # a symlink at the library's path, pointing at a file of ours
        target = tmp_path / "elsewhere.so"
        lib.rename(target)
        lib.symlink_to(target)
        why = "cannot be opened safely"
    loads = []
    monkeypatch.setattr(kernels.ctypes, "CDLL", lambda *a, **k: loads.append(a))  # the sentinel: no dlopen at all
    with pytest.raises(kernels._UnsafeCache, match=why):
        kernels._build()
    if X86_AVX2:  # where the library would be used: refused, warned about, PyTorch's path instead
        with pytest.warns(UserWarning, match="refused to load from the kernel cache") as warned:
            assert not kernels.available()
        message = str(warned[0].message)
        assert why in message and ("GLMKIT_CACHE" in message or "remove" in message), message
        x, w = torch.randn(2, 16), torch.randn(8, 16)
        with torch.no_grad():
            assert_close(kernels.linear(x, w), F.linear(x, w), atol=0, what="fallback is F.linear")
    assert loads == [], f"the planted file was loaded: {loads}"
    assert lib.read_bytes() == PLANTED  # left for its owner to inspect; not replaced by a build either


def fake_compiler(tmp_path, body: str):
    """A CXX that records its -o target in `outputs` and then runs `body` (sh) with $out set to it."""
    script = tmp_path / "fake-cxx"
    script.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nout="$2"\n'
                      f'echo "$out" >> "{tmp_path / "outputs"}"\n{body}\n')
    script.chmod(0o755)
    return script


def test_a_failed_or_killed_build_leaves_no_library(monkeypatch, tmp_path):
    """The compiler writes a temporary name in the cache; only a finished build is renamed to the
    library's name. A failing compiler and a process killed mid-build both leave nothing to load."""
    cache = fresh_cache(monkeypatch, tmp_path)
    lib = cache / kernels._library_name()
    half = 'printf "\\177ELF half a libr" > "$out"'
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, half + "\nexit 1")))
    with pytest.raises(RuntimeError, match="failed"):
        kernels._build()
    written = Path((tmp_path / "outputs").read_text().split()[0])
    assert written.parent == cache and written != lib, written
    assert sorted(p.name for p in cache.iterdir()) == [], "a failed build left files behind"

    # SIGKILL of the building process while the compiler writes: no cleanup runs at all
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, half + '\nkill -9 "$PPID"\nexit 1')))
    r = subprocess.run([sys.executable, "-c", "from glmkit import kernels; kernels._build()"], capture_output=True)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr.decode()[-500:])
    assert not lib.exists(), "a killed build left a library under the final name"
    assert [p.suffix for p in cache.iterdir()] == [".tmp"]  # its half-written output, under a name never loaded

    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, 'printf "whole" > "$out"\nchmod 775 "$out"')))
    fd, path = kernels._build()  # the next build writes its own temporary name and renames it
    os.close(fd)
    assert path == lib and lib.read_bytes() == b"whole"
    assert stat.S_IMODE(lib.stat().st_mode) == 0o755  # a umask of 002 must not make our own library refused


@needs_native
def test_fresh_build_is_private_and_loads(monkeypatch, tmp_path):
    cache = fresh_cache(monkeypatch, tmp_path, compiler=True)
    assert kernels.available(), kernels.why_unavailable()
    names = [p.name for p in cache.iterdir()]
    assert names == [kernels._library_name()], names  # no temporary files left
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache / names[0]).stat().st_mode) & 0o022 == 0


@needs_native
@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "int4", "int4-g64-b1", "fp32-random"])
def test_decode_equals_pytorch_linear(variant, monkeypatch, repeat3_model):
    """Greedy decoding with the native kernels (the fused step, and the few-row linears of the prefill)
    and through PyTorch alone both give the known tokens of a model that repeats a prompt's last three
    (so a wrong position, cache slot, padding flag or attention changes them), batch 3 with left
    padding (int4-g64-b1: one prompt, groups of 64, so the fused step takes the int4 kernel's
    four-weight-rows path). fp32-random: an untied random model, each of whose tokens depends on all
    the context (the prefill's causal mask included), against plain full forwards without a cache."""
    prompts = [[5, 9, 13, 2, 7], [3, 4, 6], [11, 12, 13, 14, 15, 16, 17]][: 1 if variant.endswith("b1") else 3]
    want = [[p[-3:][i % 3] for i in range(12)] for p in prompts]
    model = repeat3_model()
    if variant == "fp32-random":
        model = GLM(get_preset("debug", tie_embeddings=False, init_std=0.2)).eval()
        model.init_weights(seed=0)
    elif variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant != "fp32":
        quantize_model(model, 8 if variant == "int8" else 4, 64 if "g64" in variant else 32)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)
    native = generate(model, prompts, params)
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)  # every call through PyTorch
    reference = generate(model, prompts, params)
    if variant == "fp32-random":
        with torch.no_grad():
            for n, p in enumerate(prompts):
                ids = torch.tensor([p])
                for _ in range(12):
                    ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
                want[n] = ids[0, len(p):].tolist()
    for n, (a, b) in enumerate(zip(native, reference)):
        assert a.token_ids == b.token_ids == want[n], f"{variant} prompt {n}: native {a.token_ids}, PyTorch {b.token_ids}"
        # int8: 14-bit activations; int4: 8-bit activations per group (see gemv.cpp); measured 8.6e-4
        tol = {"bf16": 2e-2, "int8": 2e-3}.get(variant, 1e-2 if "int4" in variant else 1e-4)
        want_lp = torch.tensor(b.logprobs)
        assert_close(torch.tensor(a.logprobs), want_lp, atol=scaled(tol, want_lp), what=f"{variant} prompt {n} logprobs")


# ---- the fused decode step (csrc/decode.cpp) ------------------------------------------------------------
# Every switch of ModelConfig the step implements, each against the eager step on the same cache.
FUSED_VARIANTS = {
    "glm4": dict(position="rope_partial", n_kv_heads=2, qkv_bias=True, tie_embeddings=False),
    "chatglm": dict(position="rope_2d", residual="deepnorm", mlp="gelu", norm="layernorm", qkv_bias=True,
                    out_bias=True, mlp_bias=True),
    "glm": dict(position="learned_2d", norm="layernorm", mlp="gelu"),
    "glm4-0414": dict(position="rope_partial", sandwich_norm=True, n_kv_heads=1),
    # the published codes' variants: original GLM's erf GELU; ChatGLM-6B's fp16 frequencies and alpha
    # sqrt(2 * 28); and scaled RoPE (yarn scales cos and sin too; longrope's long factors, max_seq_len 256 > 64)
    "glm-erf": dict(position="learned_2d", norm="layernorm", mlp="gelu_exact"),
    "chatglm6b": dict(position="rope_2d", residual="deepnorm", deepnorm_layers=28, rope_fp16=True, mlp="gelu",
                      norm="layernorm", qkv_bias=True, out_bias=True, mlp_bias=True,
                      rope_scaling={"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 64,
                                    "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 2.0, 4.0, 8.0]}),
    "glm4-yarn": dict(position="rope_partial", n_kv_heads=2, qkv_bias=True, rope_theta=500.0,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
}


def fused_model(variant: str, dtype=torch.float32, quant: int | None = None) -> GLM:
    import dataclasses

    model = GLM(dataclasses.replace(get_preset("debug"), **FUSED_VARIANTS[variant]))
    model.init_weights(seed=3)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong scale or missing bias shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.eval()
    if quant:
        quantize_model(model, quant, 32)
    return model.to(dtype) if dtype != torch.float32 else model


def prefilled(model, prompts, sep):
    """A cache holding left-padded prompts (GLM Part A of `sep` tokens each when sep > 0)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    cache = model.new_cache(len(prompts), T + 8)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model.prefill(ids, cache, position_ids=torch.stack((pos, torch.zeros_like(pos)), 1), attention_mask=mask,
                  sep=torch.tensor([T - len(p) + sep for p in prompts]) if sep else None)
    return cache, pos[:, -1]


def eager_step(model, *args, **kw):
    """GLM.step with the fused step out of the way: the eager layers."""
    real, fused.decode_step = fused.decode_step, lambda *a, **k: None
    try:
        return model.step(*args, **kw)
    finally:
        fused.decode_step = real


@needs_native
@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
def test_fused_step_equals_eager_step(variant, kind):
    """Five decode steps through fused.decode_step and through GLM.step's eager layers (static shapes,
    as compiled), each on its own copy of the same prefilled cache: same logits, same cache writes.
    Batch 3, left-padded, GLM positions (block positions counting up) after a Part A."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    model = fused_model(variant, dtype, {"int8": 8, "int4": 4}.get(kind))
    with torch.inference_mode():
        cache, last = prefilled(model, [[5, 9, 13, 21, 7], [3, 4], [8, 8, 30, 31, 32, 33]], sep=2)
        ref = model.new_cache(3, cache.max_len)
        ref.copy_rows(slice(None), cache, slice(None), cache.max_len)
        plan = fused.decode_plan(model)
        assert plan is not None, fused._plans.get(model)
        token = torch.tensor([[11], [12], [13]])
        # fp32: summation order only (measured ~2e-7); bf16: the fused step keeps fp32 where the eager one
        # rounds to bf16 (~5e-3 on logits below 1.1); int8: 14-bit activations (~5e-5); int4: activations
        # rounded to int8 steps per group, where a float-rounding difference between the two paths can
        # move a value by one step (~1/127 of the group's range; measured up to 1.6e-2 with sandwich norms)
        tol = {"fp32": 1e-5, "bf16": 2e-2, "int8": 1e-3, "int4": 3e-2}[kind]
        for step in range(5):
            index = torch.tensor([cache.max_len - 8 + step])
            position = torch.stack((last + 1, torch.full_like(last, step + 1)), 1)[:, :, None]  # (3, 2, 1)
            got = fused.decode_step(model, cache, token[:, 0], position[:, 0, 0], position[:, 1, 0], index.expand(3), plan)
            want = eager_step(model, token, position, ref, index.expand(3, 1))[:, -1].float()
            assert got is not None and got.shape == want.shape == (3, model.cfg.vocab_size)
            what = f"{variant} {kind} step {step}"
            assert_close(got, want, atol=scaled(tol, want), what=f"{what} logits")
            assert torch.equal(cache.valid, ref.valid)
            assert_close(cache.k.float(), ref.k.float(), atol=scaled(tol, ref.k), what=f"{what} cached keys")
            assert_close(cache.v.float(), ref.v.float(), atol=scaled(tol, ref.v), what=f"{what} cached values")
            token = want.argmax(-1, keepdim=True)


@needs_native
def test_fused_step_exact_gelu():
    """mlp="gelu_exact" (the original GLM) runs the erf GELU in the native step too. At the debug init the
    MLP inputs are too small for the two GELU forms to differ beyond rounding, so they are scaled up 30x:
    the forms then differ by ~5e-5 on the logits, and the fused step must equal the eager erf step."""
    from tests.helpers import assert_differs

    model = fused_model("glm-erf")
    with torch.no_grad():
        for blk in model.layers:
            blk.mlp.up.weight.mul_(30.0)
    prompts = [[5, 9, 13, 21, 7], [3, 4]]
    with torch.inference_mode():
        cache, last = prefilled(model, prompts, sep=2)
        ref = model.new_cache(2, cache.max_len)
        ref.copy_rows(slice(None), cache, slice(None), cache.max_len)
        idx = torch.tensor([cache.max_len - 8]).expand(2)
        pos = torch.stack((last + 1, torch.ones_like(last)), 1)[:, :, None]  # (2, 2, 1)
        tok = torch.tensor([[11], [12]])
        got = fused.decode_step(model, cache, tok[:, 0], pos[:, 0, 0], pos[:, 1, 0], idx)
        want = eager_step(model, tok, pos, ref, idx[:, None])[:, -1]
        for blk in model.layers:  # the same weights with the tanh form, eagerly, from the same prompts
            blk.mlp.gelu = "tanh"
        tanh_cache, _ = prefilled(model, prompts, sep=2)
        tanh = eager_step(model, tok, pos, tanh_cache, idx[:, None])[:, -1]
    mx = assert_close(got, want, atol=scaled(1e-5, want), what="fused vs eager, erf GELU")
    assert_differs(want, tanh, 2e-5, "erf vs tanh GELU (the test's sensitivity)")
    print(f"\nfused vs eager erf GELU: max abs diff {mx:.2e}; erf vs tanh {(want - tanh).abs().max():.2e}")


@needs_native
@pytest.mark.parametrize("variant", ["glm4", "chatglm"])
def test_fused_step_rows_at_different_lengths(variant):
    """The serving engine's step: each row writes its own slot (rows of different lengths, one whose
    Part A is its whole prompt), as the eager step attending up to the longest row computes it."""
    model = fused_model(variant)
    with torch.inference_mode():
        cache = model.new_cache(4, 16)
        for b, (n, sep) in enumerate([(3, 0), (7, 2), (5, 5)]):  # row 3 of the cache is unused
            one = model.new_cache(1, 16)
            model.prefill(torch.arange(2, 2 + n)[None] + b, one, sep=sep)
            cache.copy_rows(b, one, 0, 16)
        ref = model.new_cache(4, 16)
        ref.copy_rows(slice(None), cache, slice(None), 16)
        idx, tokens = torch.tensor([3, 7, 5]), torch.tensor([[9], [10], [11]])
        pos = torch.stack((idx, torch.zeros_like(idx)), 1)
        got = fused.decode_step(model, cache, tokens[:, 0], pos[:, 0], pos[:, 1], idx)
        want = eager_step(model, tokens, pos[:, :, None], ref, idx[:, None], extent=8)[:, -1]
    assert_close(got, want, atol=scaled(1e-4, want), what="per-row slots: logits")
    assert_close(cache.k, ref.k, atol=scaled(1e-5, ref.k), what="per-row slots: cached keys")
    assert torch.equal(cache.valid, ref.valid)


@needs_native
def test_fused_step_follows_the_model(monkeypatch):
    """The plan is rebuilt when the model changes (in-place weight update, dtype change), and the
    fused step steps aside for models it does not describe (LoRA wrappers, subclasses, training)."""
    from glmkit.lora import LoRAConfig, apply_lora

    model = fused_model("glm4")
    p1 = fused.decode_plan(model)
    assert p1 is not None and fused.decode_plan(model) is p1  # cached while the model is unchanged
    with torch.no_grad():
        model.layers[0].norm1.weight.mul_(2.0)  # read through an fp32 copy: must not go stale
    p2 = fused.decode_plan(model)
    assert p2 is not p1
    model.to(torch.bfloat16)
    assert fused.decode_plan(model) is not p2 and fused.decode_plan(model).model.head.kind == 1  # bf16
    apply_lora(model.float(), LoRAConfig(rank=2))
    assert fused.decode_plan(model) is None and "LoRALinear" in fused._plans[model]
    cache = model.new_cache(1, 4)
    one = torch.tensor([1])
    assert fused.decode_step(model, cache, one, one, one, one) is None
    trained = fused_model("glm4").train()  # parameters need grad and grad mode is on: autograd's job
    c = trained.new_cache(1, 4)
    assert fused.decode_step(trained, c, one, one, one, one) is None

    class Sub(GLM):  # may change what a step computes: GLM.step keeps it on the eager layers
        pass

    calls = []
    monkeypatch.setattr(fused, "decode_step", lambda *a, **k: calls.append(a))
    with torch.inference_mode():
        sub = Sub(get_preset("debug")).eval()
        sub.step(one[None], one[None], sub.new_cache(1, 4), one[None])
        model.step(one[None], one[None], model.new_cache(1, 4), one[None])
    assert len(calls) == 1 and calls[0][0] is model


@needs_native
def test_fused_step_rejects_bad_slots_without_writing():
    model = fused_model("glm4")
    cache = model.new_cache(2, 8)
    before = cache.valid.clone()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="decode step rejected"):
        fused.decode_step(model, cache, torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 0]),
                          torch.tensor([0, 8]))  # slot 8 of an 8-slot cache
    assert torch.equal(cache.valid, before)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_products_through_fp32_match_pytorch(monkeypatch, autocast):
    # on CPUs without bf16 instructions glmkit's Linear does bf16 products as fp32 ones; forced on here
    # so that the test runs (and means the same) on every CPU
    monkeypatch.setattr(kernels, "_BF16_EMULATED", True)
    g = torch.Generator().manual_seed(0)
    lin = kernels.Linear(96, 40)
    ref = nn.Linear(96, 40)
    if not autocast:
        lin, ref = lin.bfloat16(), ref.bfloat16()
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 20, 96, generator=g, dtype=torch.float32 if autocast else torch.bfloat16)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for m, xi in zip((lin, ref), xs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        (y.float().square() * torch.linspace(0, 1, 40)).sum().backward()
        outs.append(y)
    assert type(outs[0].grad_fn).__name__ == "_Bf16LinearBackward"
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    # the same bf16 products summed in fp32 in another order: outputs within a bf16 rounding
    assert_close(outs[0].float(), outs[1].float(), atol=2 ** -7 * outs[1].float().abs().max().item(), what="bf16 linear via fp32")
    for a, b, what in ((xs[0].grad, xs[1].grad, "dx"), (lin.weight.grad, ref.weight.grad, "dW"), (lin.bias.grad, ref.bias.grad, "db")):
        assert a.dtype == b.dtype, what
        assert_close(a.float(), b.float(), atol=2e-2 * b.float().abs().max().item(), what=what)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_bf16_attention_through_fp32_matches_sdpa(monkeypatch, autocast, masked):
    # CPU bf16 attention runs as fp32 SDPA of the bf16 inputs (PyTorch's CPU flash-attention backward in
    # bf16 took 46% of a bf16 training step); same result as SDPA in bf16 within bf16 roundings, forward
    # and backward, grouped-query heads and an explicit prefix mask included
    monkeypatch.setattr(kernels, "_BF16_EMULATED", True)
    g = torch.Generator().manual_seed(1)
    B, H, K, T, D = 2, 4, 2, 24, 16
    dt = torch.float32 if autocast else torch.bfloat16
    qkv = [torch.randn(B, n, T, D, generator=g).to(dt) for n in (H, K, K)]
    mask = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    mask = (mask | (torch.arange(T) < 7)[None, :])[None, None] if masked else None
    leaves, outs = [], []
    for fn in (lambda q, k, v: kernels.attention(q, k, v, mask, enable_gqa=True),
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)):
        xs = [t.clone().requires_grad_() for t in qkv]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(*xs)
        (y.float().square() * torch.linspace(0, 1, D)).sum().backward()
        leaves.append(xs)
        outs.append(y)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert_close(outs[0].float(), outs[1].float(), atol=2 ** -6 * outs[1].float().abs().max().item(), what="bf16 attention via fp32")
    for a, b, what in zip(leaves[0], leaves[1], ("dq", "dk", "dv")):
        assert a.grad.dtype == b.grad.dtype, what
        assert_close(a.grad.float(), b.grad.float(), atol=3e-2 * b.grad.float().abs().max().item(), what=what)


def test_bf16_attention_in_training_runs_in_fp32_even_with_bf16_instructions(monkeypatch):
    # with bf16 instructions (AVX-512 BF16 / AMX) PyTorch's CPU flash-attention backward is slower in bf16 than
    # in fp32, so attention whose backward will run goes through fp32; inference (no grad) stays in bf16
    monkeypatch.setattr(kernels, "_BF16_EMULATED", False)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 9, 16, generator=g).bfloat16() for n in (4, 2, 2))
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).bfloat16()
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.equal(fp32, bf16)  # else this test could not tell the paths apart
    trained = kernels.attention(q.clone().requires_grad_(), k, v, None, enable_gqa=True)
    assert torch.equal(trained.detach(), fp32) and trained.dtype == torch.bfloat16 and trained.grad_fn is not None
    assert torch.equal(kernels.attention(q, k, v, None, enable_gqa=True), bf16)
    with torch.no_grad():
        assert torch.equal(kernels.attention(q.clone().requires_grad_(), k, v, None, enable_gqa=True), bf16)


def test_bf16_via_fp32_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(kernels, "_BF16_EMULATED", True)
    xb, wb, xf, wf = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2, 4), torch.zeros(3, 4)
    assert kernels.bf16_via_fp32(xb, wb) and not kernels.bf16_via_fp32(xf, wf) and not kernels.bf16_via_fp32(xb, wf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.bf16_via_fp32(xf, wf)
    monkeypatch.setattr(kernels, "_BF16_EMULATED", False)  # a CPU with bf16 instructions: PyTorch's bf16 GEMM
    assert not kernels.bf16_via_fp32(xb, wb)
    monkeypatch.setattr(kernels, "_BF16_EMULATED", None)
    monkeypatch.setenv("GLMKIT_BF16_GEMM", "native")
    assert not kernels.cpu_bf16_emulated()


@needs_native
@pytest.mark.parametrize("K,gs", [(128, 64), (128, 32), (256, 128), (96, 32)])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_heads_gemv_int4_equals_dequantized_einsum(K, gs, sdtype, monkeypatch):
    """kernels.heads_gemv_int4 (latent attention's absorbed products on an int4 kv_b) against the fp32 einsum of the
    dequantized weight, both ways (trans: kv_b's key rows, a product over the rows; the value rows), odd head
    blocks (3 heads of 13 key + 7 value rows), 1..6 input rows, groups inside a 64-column block (32), one per block
    (64) and spanning two (128); the key rows through heads_uk_int4 (tests.helpers.uk_int4_reference); K a multiple
    of 64 reads the value rows where they lie (in groups of 64 or 128 as an int4 linear: activations rounded to int8
    steps, tests.helpers.int4_linear_reference), K = 96 dequantizes each value row first. This CPU's build and the
    AVX2 one."""
    from glmkit.quantize import quantize_int4, unpack_int4

    from .helpers import uk_int4_reference

    g = torch.Generator().manual_seed(K + gs)
    H, Dn, Dv = 3, 13, 7
    packed, scales, mins = quantize_int4(torch.randn(H * (Dn + Dv), K, generator=g), gs)
    scales, mins = scales.to(sdtype), mins.to(sdtype)
    deq = (unpack_int4(packed).float().reshape(H * (Dn + Dv), K // gs, gs) * scales.float()[..., None]
           + mins.float()[..., None]).reshape(H, Dn + Dv, K)
    builds = ["this"] + (["avx2"] if kernels.variant() == "avx512vnni" else [])
    for M in (1, 2, 5, 6):
        xk, xv = torch.randn(M, H, Dn, generator=g), torch.randn(M, H, K, generator=g)
        value = torch.einsum("mhr,hvr->mhv", xv, deq[:, Dn:])
        if K % 64 == 0 and gs % 64 == 0:  # as an int4 linear: activations rounded to int8 steps per group
            rows = [h * (Dn + Dv) + Dn + v for h in range(H) for v in range(Dv)]
            value = torch.stack([int4_linear_reference(xv[:, h], packed[rows[h * Dv:(h + 1) * Dv]],
                                                       scales[rows[h * Dv:(h + 1) * Dv]],
                                                       mins[rows[h * Dv:(h + 1) * Dv]], gs) for h in range(H)], 1)
        key = torch.einsum("mhn,hnr->mhr", xk, deq[:, :Dn])
        if K % 32 == 0:  # heads_uk_int4: each group's activations x_n s_ng rounded to int8 steps per 64 rows
            key = uk_int4_reference(xk, packed, scales, mins, gs, H)
        cases = {"trans (key rows)": (xk, 0, Dn, True, key), "value rows": (xv, Dn, Dv, False, value)}
        for build in builds:
            if build == "avx2":
                monkeypatch.setattr(kernels, "_lib", kernels._open("avx2"))
            for what, (x, row0, rows, trans, want) in cases.items():
                got = kernels.heads_gemv_int4(x, packed, scales, mins, gs, H, row0, rows, trans)
                assert_close(got, want, 2e-5 * want.abs().max().item(), f"heads_gemv_int4 {what} M={M} K={K} gs={gs} "
                             f"{sdtype} ({build} build)")
            monkeypatch.undo()


@needs_native
@pytest.mark.parametrize("K,gs", [(128, 32), (128, 64), (256, 128), (96, 32)])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_heads_uk_int4_rounds_as_its_reference(K, gs, sdtype, monkeypatch):
    """kernels.heads_uk_int4 (kv_b's key rows regrouped by heads_uk_codes, integer dot products) against
    tests.helpers.uk_int4_reference (the same activation rounding, fp32 sums: 1e-5 of the largest output) and
    against the fp32 einsum of the dequantized weight, output by output within half a step of each rounded
    activation times its code's distance from 7.5 (the rounding's sum is put back at the codes' mean). Odd heads
    (3 of 13 key rows, or 5 of 70: two 64-row steps, the last one partial; neither a multiple of the 8 rows the
    codes are padded to), 1..9 input rows, groups of 32 (one per 32 outputs) to 128 (4 groups: fewer than a
    vector's 8); the AVX2 build gives the same bits as this CPU's."""
    from glmkit.quantize import quantize_int4, unpack_int4

    from .helpers import uk_int4_reference

    assert kernels.available(), kernels.why_unavailable()
    g = torch.Generator().manual_seed(K + gs)
    builds = {"this": kernels._lib} | ({"avx2": kernels._open("avx2")} if kernels.variant() == "avx512vnni" else {})
    for H, Dn, Dv in ((3, 13, 7), (5, 70, 6)):
        packed, scales, mins = quantize_int4(torch.randn(H * (Dn + Dv), K, generator=g), gs)
        scales, mins = scales.to(sdtype), mins.to(sdtype)
        rows = [h * (Dn + Dv) + n for h in range(H) for n in range(Dn)]
        q = unpack_int4(packed[rows]).float().reshape(H, Dn, K)
        deq = (q.reshape(H, Dn, K // gs, gs) * scales[rows].float().reshape(H, Dn, -1, 1)
               + mins[rows].float().reshape(H, Dn, -1, 1)).reshape(H, Dn, K)
        codes = kernels.heads_uk_codes(packed, H, Dn)
        assert codes.shape == (H, K // 32, -(-Dn // 8) * 2, 64) and codes.numel() == H * -(-Dn // 8) * 8 * K // 2
        for M in (1, 2, 5, 9):
            x = torch.randn(M, H, Dn, generator=g) * torch.linspace(0.1, 3, Dn)  # rows of different sizes
            ref = uk_int4_reference(x, packed, scales, mins, gs, H)
            # the dequantized product, within half a step of every rounded activation x_n s_ng times its code
            a = x[..., None] * scales[rows].float().reshape(H, Dn, -1)  # (M, H, Dn, G)
            a = torch.nn.functional.pad(a, (0, 0, 0, -Dn % 64)).reshape(M, H, -1, 64, K // gs)
            step = (a.abs().amax(3, keepdim=True) / 127).expand(a.shape).reshape(M, H, -1, K // gs)[:, :, :Dn]
            bound = torch.einsum("mhng,hngj->mhgj", step / 2, (q - 7.5).abs().reshape(H, Dn, K // gs, gs)).reshape(M, H, K)
            exact = torch.einsum("mhn,hnk->mhk", x, deq)
            if K % 64 == 0:  # the fp32 form that reads the rows in place (C only now; bench/kv_b_heads.py's reference)
                sc, mn, code = kernels.int4_scales(scales, mins)
                fp32 = torch.empty(M, H, K)
                assert kernels._lib.glmkit_heads_gemv_int4(x.contiguous().data_ptr(), M, H, packed.data_ptr(),
                                                           sc.data_ptr(), mn.data_ptr(), code, gs, Dn, K, Dn + Dv, 1,
                                                           fp32.data_ptr(), 1) == 0
                assert_close(fp32, exact, 2e-5 * exact.abs().max().item(), f"fp32 W_UK H={H} M={M} K={K} gs={gs}")
            out = {}
            for build, lib in builds.items():
                monkeypatch.setattr(kernels, "_lib", lib)
                out[build] = got = kernels.heads_uk_int4(x, codes, scales, mins, gs)
                what = f"heads_uk_int4 H={H} N={Dn} M={M} K={K} gs={gs} {sdtype} ({build} build)"
                assert_close(got, ref, 1e-5 * ref.abs().max().item(), what + " vs its rounding reference")
                over = (got - exact).abs() - bound - 1e-5 * exact.abs().max()
                assert over.max() <= 0, (f"{what}: {over.max().item():.3e} past the rounding bound; got, exact, bound: "
                                         f"{got.flatten()[:4].tolist()}, {exact.flatten()[:4].tolist()}, "
                                         f"{bound.flatten()[:4].tolist()}")
                monkeypatch.undo()
            if "avx2" in out:
                assert_equal(out["this"], out["avx2"], f"heads_uk_int4 H={H} M={M} K={K} gs={gs}: the two builds")
            threads = torch.get_num_threads()
            try:  # each thread rounds the activations of its own heads: any split of the items, the same bits
                for T in (1, 3, 16):
                    torch.set_num_threads(T)
                    assert_equal(kernels.heads_uk_int4(x, codes, scales, mins, gs), out["this"],
                                 f"heads_uk_int4 H={H} M={M} K={K} gs={gs}: {T} threads")
            finally:
                torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.heads_uk_int4(torch.randn(1, H, Dn + 4), codes, scales, mins, gs)


@needs_native
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_heads_gemv_equals_einsum_both_ways(wdtype, monkeypatch):
    """kernels.heads_gemv (latent attention's absorbed per-head products) on strided views of one weight, as
    LatentAttention takes kv_b's key rows (trans: a product over the rows) and value rows, odd sizes (3 heads,
    rows 13 + 7, K 37, 1..6 input rows): against the fp32 einsum, in this CPU's build and the AVX2 one (fp32 sums in
    another order where the AVX-512 build vectorizes the tail: close, not bit for bit)."""
    g = torch.Generator().manual_seed(0)
    H, Dn, Dv, R = 3, 13, 7, 37
    w = torch.randn(H, Dn + Dv, R, generator=g).to(wdtype)
    for M in (1, 2, 5, 6):
        xk = torch.randn(M, H, Dn, generator=g)
        xv = torch.randn(M, H, R, generator=g)
        cases = {"trans (key rows)": (xk, w[:, :Dn], True, torch.einsum("mhn,hnr->mhr", xk, w[:, :Dn].float())),
                 "value rows": (xv, w[:, Dn:], False, torch.einsum("mhr,hvr->mhv", xv, w[:, Dn:].float()))}
        for what, (x, wv, trans, want) in cases.items():
            got = kernels.heads_gemv(x, wv, trans)
            mx = assert_close(got, want, 1e-5 * want.abs().max().item(), f"heads_gemv {what} M={M} {wdtype}")
            if kernels.variant() == "avx512vnni":
                monkeypatch.setattr(kernels, "_lib", kernels._open("avx2"))
                assert_close(kernels.heads_gemv(x, wv, trans), want, 1e-5 * want.abs().max().item(),
                             f"heads_gemv {what} M={M}, AVX2 build")
                monkeypatch.undo()
    print(f"\nheads_gemv {wdtype}: last max abs diff {mx:.2e}")
    with pytest.raises(ValueError, match="do not fit"):
        kernels.heads_gemv(torch.randn(1, H, Dn), w[:, :Dn].transpose(1, 2), False)
