"""Latent attention's low-rank projections quantized (quant["latent"]: q_a, q_b, kv_a; quantize.LATENT_TARGETS).

A tiny Glm4MoeLite built here: quantizing it sets "latent" and swaps q_a, kv_a and kv_b for int4 linears
(q_b, whose 96 inputs are no whole number of 64-column groups, stays float); its logits equal the float model's of
the dequantized weights;
a checkpoint written without "latent" (the layout before it) loads with quantize="int4" by quantizing just
those projections as they are read, giving bit for bit the model quantized from float in one go; a
different group size is refused; and the memory plan counts what the model holds.
"""

import json
from dataclasses import replace

import pytest
import torch

import glmkit
from glmkit import kernels
from glmkit.convert import read_checkpoint, write_checkpoint
from glmkit.model import GLM
from glmkit.plan import weight_bytes
from glmkit.quantize import LATENT_TARGETS, Int4Linear, quantize_int4, quantize_model, unpack_int4
from tests.helpers import assert_close, assert_equal, int4_linear_reference, uk_int4_reference

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.Glm4MoeLiteConfig(
        hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=64, q_lora_rank=96,
        qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=32, vocab_size=512, mlp_layer_types=["dense", "sparse", "sparse"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lite") / "hf"
    transformers.Glm4MoeLiteForCausalLM(cfg).eval().save_pretrained(d)
    return d


def dequantized(model: GLM) -> GLM:
    """A float copy of a quantized GLM: every int4 linear replaced by nn.Linear of its dequantized weight."""
    float_model = GLM(replace(model.cfg, quant=None))
    sd = {n: t for n, t in model.state_dict().items() if not n.endswith((".scales", ".mins"))}
    sd.update({name + ".weight": mod.dequantize(torch.float32) for name, mod in model.named_modules()
               if isinstance(mod, Int4Linear)})
    float_model.load_state_dict(sd, strict=True)
    return float_model.eval()


@torch.no_grad()
def test_latent_projections_quantized_equal_their_dequantized_model(hf_dir, monkeypatch):
    """Every int4 product through dequantized fp32 tiles (no few-row native kernel, which rounds activations):
    equal to the float model of the dequantized weights up to summation order."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    q = glmkit.load(str(hf_dir), quantize="int4").eval()
    assert q.cfg.quant["latent"] is True
    attn = q.layers[1].attn
    assert LATENT_TARGETS == ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b")
    assert all(type(m) is Int4Linear for m in (attn.q_a, attn.kv_a, attn.kv_b))
    assert type(attn.q_b) is not Int4Linear, "q_b's 96 inputs are no whole number of 64-column groups: it stays float"
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    want = dequantized(q)(ids)
    mx = assert_close(q(ids), want, 1e-4, "int4 (latent projections too) vs its dequantized float model")
    ref = read_checkpoint(hf_dir).eval()
    print(f"\nint4 with latent projections vs dequantized: max abs diff {mx:.2e}; vs the float model "
          f"{(q(ids) - ref(ids)).abs().max().item():.3f} of max |logit| {want.abs().max().item():.3f}")


@torch.no_grad()
def test_checkpoint_without_latent_loads_upgraded_bit_for_bit(hf_dir, tmp_path):
    old = quantize_model(read_checkpoint(hf_dir).eval(), 4, 64, latent=False)
    assert type(old.layers[1].attn.q_a) is not Int4Linear
    write_checkpoint(old, tmp_path / "old", fmt="glmkit")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["quant"]["latent"] is False
    upgraded = glmkit.load(str(tmp_path / "old"), quantize="int4").eval()
    direct = glmkit.load(str(hf_dir), quantize="int4").eval()
    assert upgraded.cfg.quant == direct.cfg.quant
    a, b = upgraded.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert_equal(a[n], b[n], n)
    with pytest.raises(ValueError, match="already quantized"):
        glmkit.load(str(tmp_path / "old"), quantize="int4", group_size=32)
    as_stored = glmkit.load(str(tmp_path / "old"))
    assert type(as_stored.layers[1].attn.q_a) is not Int4Linear and not as_stored.cfg.quant.get("latent")


def test_plan_counts_the_quantized_latent_projections(hf_dir):
    q = glmkit.load(str(hf_dir), quantize="int4")
    held = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    planned = sum(weight_bytes(q.cfg, torch.float32).values())
    print(f"\nplanned {planned} bytes, held {held}")
    assert planned == held


@torch.no_grad()
def test_absorbed_decode_with_int4_kv_b_equals_dequantized_einsums(hf_dir, monkeypatch):
    """A decode step in the absorbed form reads an int4 kv_b per head natively (kernels.heads_gemv_int4): the same
    logits as that step through einsums of kv_b's dequantized weight (the activations rounded to int8 steps as the
    kernels do: the value rows' by tests.helpers.int4_linear_reference, the key rows' by uk_int4_reference). The rest of
    the model stays fp32 (a fully int4 model rounds activations to int8 steps, where a 1e-7 difference upstream
    can move an output by a whole step)."""
    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    q = read_checkpoint(hf_dir).eval()
    for blk in q.layers:
        kv_b = blk.attn.kv_b
        int4 = Int4Linear(kv_b.in_features, kv_b.out_features, False, 64)
        int4.weight, int4.scales, int4.mins = quantize_int4(kv_b.weight, 64)
        blk.attn.kv_b, blk.attn.absorb = int4, True
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    calls = []
    real = kernels.heads_gemv_int4
    monkeypatch.setattr(kernels, "heads_gemv_int4", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step():
        cache = q.new_cache(2, 12)
        q.prefill(ids[:, :8], cache)
        return q.prefill(ids[:, 8:], cache, position_ids=torch.full((2, 1), 8))

    native = step()
    assert calls, "the decode step did not read kv_b through heads_gemv_int4"
    def einsums(x, packed, scales, mins, gs, H, row0, rows, trans):  # the reference: the dequantized weight in fp32
        N, K = packed.shape[0], packed.shape[1] * 2
        if trans and row0 == 0 and K % 32 == 0:  # the key rows through kernels.heads_uk_int4
            return uk_int4_reference(x, packed, scales, mins, gs, H)
        if not trans and K % 64 == 0 and gs % 64 == 0:  # the value rows as an int4 linear reads them
            per = [torch.arange(h * (N // H) + row0, h * (N // H) + row0 + rows) for h in range(H)]
            return torch.stack([int4_linear_reference(x[:, h], packed[i], scales[i], mins[i], gs)
                                for h, i in enumerate(per)], 1)
        w = unpack_int4(packed).float().view(N, K // gs, gs) * scales.float()[..., None] + mins.float()[..., None]
        w = w.view(H, N // H, K)[:, row0:row0 + rows]
        return torch.einsum("mhn,hnr->mhr" if trans else "mhr,hnr->mhn", x.float(), w)

    monkeypatch.setattr(kernels, "heads_gemv_int4", einsums)
    want = step()
    mx = assert_close(native, want, 1e-4, "absorbed decode step, int4 kv_b native vs dequantized einsums")
    print(f"\nint4 kv_b absorbed decode: native vs einsum max abs diff {mx:.2e}")


def test_float_sources_leave_memory_once_quantized(hf_dir, tmp_path, monkeypatch):
    """Loading a checkpoint written without "latent" quantizes its float latent projections as they are read,
    then drops their pages of the memory-mapped file from the process (convert.evict_mapped): each of those
    sources is evicted whole (every full page of its bytes), the model stays bit for bit the same, and a tensor
    outside a mapping of that file (an anonymous copy) is never touched."""
    from glmkit import convert

    old = quantize_model(read_checkpoint(hf_dir).eval(), 4, 64, latent=False)
    write_checkpoint(old, tmp_path / "old", fmt="glmkit")
    seen = []
    real = convert.evict_mapped
    monkeypatch.setattr(convert, "evict_mapped", lambda t, p: seen.append((t.nbytes, real(t, p))) or seen[-1][1])
    upgraded = glmkit.load(str(tmp_path / "old"), quantize="int4").eval()
    quantized_here = [n for n, m in upgraded.named_modules() if n.endswith(LATENT_TARGETS) and type(m) is Int4Linear]
    assert len(seen) == len(quantized_here) > 0, (seen, quantized_here)
    page = __import__("os").sysconf("SC_PAGE_SIZE")
    for nbytes, dropped in seen:  # whole pages inside the tensor: at least its size less two partial pages
        assert nbytes - 2 * page <= dropped <= nbytes, (nbytes, dropped)
    direct = glmkit.load(str(hf_dir), quantize="int4").eval()
    for n, t in direct.state_dict().items():
        assert_equal(upgraded.state_dict()[n], t, n)
    anon = torch.randn(1 << 16)
    keep = anon.clone()
    assert real(anon, tmp_path / "old" / "model.safetensors") == 0 and torch.equal(anon, keep)
