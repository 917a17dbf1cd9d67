"""Multi-head latent attention (ModelConfig.attention "mla", Glm4MoeLiteForCausalLM / GLM-4.7-Flash).

References: transformers' Glm4MoeLiteForCausalLM built in the test (tiny, odd sizes, every layer dense:
the mixture-of-experts layers are another module's), read through glmkit.load; the full forward without
a cache for the cache paths; the expanded form for the absorbed one.
"""

import functools
import json

import pytest
import torch

import glmkit
from glmkit import fused, plan
from glmkit.config import ModelConfig
from glmkit.convert import CheckpointError, read_checkpoint, write_checkpoint
from glmkit.model import GLM, BlockPool
from tests.helpers import assert_close, assert_decodes_as_full_forwards, set_absorb
from tests.helpers import left_padded as _left_padded

transformers = pytest.importorskip("transformers")

TOL = 1e-4
V = 101
# (q_lora_rank, rope_interleave, rope_parameters beyond rope_theta)
VARIANTS = {
    "q_lora-interleaved": (24, True, {}),
    "no_q_lora-halves": (None, False, {}),
    # yarn with mscale_all_dim: the softmax scale gains mscale(factor, mscale_all_dim)^2
    "yarn-mscale": (24, True, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                               "mscale": 0.7, "mscale_all_dim": 1.0}),
}


def hf_tiny(q_lora=24, interleave=True, rope=None, layers=2):
    cfg = transformers.Glm4MoeLiteConfig(
        vocab_size=V, hidden_size=40, intermediate_size=56, num_hidden_layers=layers, num_attention_heads=3,
        num_key_value_heads=3, q_lora_rank=q_lora, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6,
        v_head_dim=14, mlp_layer_types=["dense"] * layers, max_position_embeddings=128, rope_interleave=interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})},
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Glm4MoeLiteForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1 and linears at std 0.02: randomise so every weight shows
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mla") / "hf"
    hf_tiny().save_pretrained(d)
    return d


left_padded_batch = functools.partial(_left_padded, V, pad_id=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_hf_parity_left_padded(tmp_path, variant):
    q_lora, interleave, rope = VARIANTS[variant]
    hf = hf_tiny(q_lora, interleave, rope)
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    assert (ours.cfg.attention, ours.cfg.q_lora_rank, ours.cfg.rope_interleave) == ("mla", q_lora, interleave)
    ids, mask, pos = left_padded_batch([11, 6, 2], 11)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    for absorb in (False, True):
        set_absorb(ours, absorb)
        mx = assert_close(ours(ids, attention_mask=mask)[real], want[real], TOL, f"{variant} absorb={absorb} logits")
        print(f"\nGlm4MoeLite {variant} absorb={absorb} (fp32, left-padded): max abs diff {mx:.2e}")


@torch.no_grad()
def test_cache_path_equals_full_forward(hf_dir):
    """Expanded prefill of a left-padded batch into the latent cache, then absorbed decode steps reading
    it: the logits of the full forward over the whole sequence."""
    model = glmkit.load(str(hf_dir)).eval()
    ids, mask, pos = left_padded_batch([12, 8, 5], 12, seed=1)
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(3, 16)
    set_absorb(model, False)
    got = [model.prefill(ids[:, :7], cache, attention_mask=mask[:, :7])]
    set_absorb(model, True)
    for t in range(7, 12):
        got.append(model.prefill(ids[:, t:t + 1], cache, position_ids=pos[:, t:t + 1]))
    real = mask.bool()
    mx = assert_close(torch.cat(got, 1)[real], full[real], 1e-5, "prefill + decode vs full forward")
    print(f"\nlatent cache path: max abs diff {mx:.2e}")


@torch.no_grad()
def test_absorbed_decode_equals_expanded(hf_dir, monkeypatch):
    """One decode step over a filled latent cache, absorbed and expanded, from the same cache (the eager
    layers: the native step, absorbed too, is tests/test_fused_moe.py's)."""
    monkeypatch.setattr(fused, "decode_step", lambda *a, **k: None)
    model = glmkit.load(str(hf_dir)).eval()
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2, 16)
    model.prefill(ids[:, :9], cache)
    k = cache.k.clone()
    out = {}
    for absorb in (True, False):
        set_absorb(model, absorb)
        cache.k.copy_(k)
        cache.length = 9
        out[absorb] = model.prefill(ids[:, 9:], cache, position_ids=torch.full((2, 1), 9))
    assert not torch.equal(out[True], out[False])  # two different computations...
    mx = assert_close(out[True], out[False], 1e-5, "absorbed vs expanded decode step")  # ...of one result
    print(f"\nabsorbed vs expanded decode: max abs diff {mx:.2e}")
    # by default a decode step is absorbed (kv_b's weight read, the module not run on the cache) and a
    # whole sequence without a cache expanded
    set_absorb(model, None)
    expanded = []
    hooks = [layer.attn.kv_b.register_forward_hook(lambda *a: expanded.append(1)) for layer in model.layers]
    cache.length = 9
    model.prefill(ids[:, 9:], cache, position_ids=torch.full((2, 1), 9))
    assert not expanded
    model(ids)
    assert len(expanded) == len(model.layers)
    for h in hooks:
        h.remove()


def test_cache_bytes_per_token_are_the_compressed_width():
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values, in new_cache, the
    block pool and the plan; for GLM-4.7-Flash's sizes (transformers' defaults) that is 576."""
    from glmkit.convert import _lite_from_dict

    flash = _lite_from_dict({"num_hidden_layers": 47, "mlp_layer_types": ["dense"] * 47})
    assert flash.kv_layout == (1, 576, 0)
    assert plan.kv_cache_bytes(flash, 1, 1000, torch.bfloat16) == 1000 * (47 * 576 * 2 + 1) + 8
    cfg = ModelConfig(vocab_size=V, dim=40, n_layers=3, n_heads=3, position="rope_partial", attention="mla",
                      q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14)
    for dtype in (torch.float32, torch.bfloat16):
        model = GLM(cfg).to(dtype)
        cache = model.new_cache(2, 16)
        stored = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
        assert stored == 2 * 16 * cfg.n_layers * (20 + 6) * dtype.itemsize
        assert plan.kv_cache_bytes(cfg, 2, 16, dtype) == stored + cache.valid.numel() + 8 * 2
        pool = BlockPool.for_model(model, n_blocks=4, block=8)
        per_block = sum(t.numel() * t.element_size() for t in (pool.k, pool.v)) // 5 + 8
        assert per_block == BlockPool.block_bytes(cfg, 8, dtype) == plan.kv_pool_bytes(cfg, 4, dtype, 8) // 5
    for q_lora, bias in ((24, False), (None, True), (24, True)):  # the sizes the config and the plan count
        c = ModelConfig(**{**cfg.to_dict(), "q_lora_rank": q_lora, "qkv_bias": bias, "out_bias": bias})
        params = dict(GLM(c).named_parameters())
        assert c.num_params() == sum(p.numel() for p in params.values()), (q_lora, bias)
        assert plan.weight_bytes(c, torch.float32)["layers"] == 4 * sum(
            p.numel() for n, p in params.items() if n.startswith("layers.")), (q_lora, bias)
    with pytest.raises(ValueError, match="int8 KV block pool is not available for latent attention"):
        BlockPool.for_model(GLM(cfg), n_blocks=4, block=8, dtype=torch.int8)


@torch.no_grad()
def test_engine_on_the_paged_latent_pool_equals_full_forwards(hf_dir):
    """The serving engine (paged latent pool, ragged steps of staggered requests) and generate give the
    tokens of full forwards, through the native decode step (it takes latent attention) where it applies."""
    model = glmkit.load(str(hf_dir)).eval()
    assert fused.decode_plan(model) is not None, fused._plans.get(model)
    assert_decodes_as_full_forwards(model, [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]], 8,
                                    {0: slice(0, 1), 2: slice(1, 3)})


@torch.no_grad()
def test_round_trip_bit_identical(hf_dir, tmp_path):
    from safetensors.torch import load_file

    ours = read_checkpoint(hf_dir)
    assert ours.cfg.source == "glm4_moe_lite_hf"
    write_checkpoint(ours, tmp_path / "back")  # default: the layout it came from
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert read_checkpoint(tmp_path / "back").cfg == ours.cfg
    again = transformers.Glm4MoeLiteForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 9))
    assert_close(again(ids).logits, hf_tiny()(ids).logits, 0.0, "transformers on our export vs original")
    write_checkpoint(ours, tmp_path / "native", "glmkit")
    assert read_checkpoint(tmp_path / "native").cfg == ours.cfg
    with pytest.raises(CheckpointError, match="attention=mla"):
        write_checkpoint(ours, tmp_path / "glm", "glm_hf")


def test_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        read_checkpoint(d)


def test_config_checks_and_serialization(tmp_path):
    base = dict(vocab_size=V, dim=40, n_layers=2, n_heads=3, position="rope_partial", attention="mla",
                kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14)
    cfg = ModelConfig(**base)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rotary_dim) == (3, 16, 6)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    bad = {"v_head_dim": None}, {"head_dim": 12}, {"position": "rope_2d"}, {"qk_rope_head_dim": 5}, {"n_kv_heads": 1}
    for change, match in zip(bad, ("needs \\['v_head_dim'\\]", "head_dim=12", "rope_partial", "even", "n_kv_heads=1")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**base, **change})
    with pytest.raises(ValueError, match="kv_lora_rank applies only to attention='mla'"):
        ModelConfig(vocab_size=V, kv_lora_rank=20)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["attention"] == "mla" and hf["q_lora_rank"] is None
    from glmkit.convert import _lite_from_dict
    # transformers' defaults: every layer after the first has GLM-4.7-Flash's experts
    c = _lite_from_dict({"num_hidden_layers": 3})
    assert (c.n_experts, c.n_experts_per_tok, c.moe_ffn_dim, c.first_dense_layers, c.routed_scaling_factor) == (
        64, 4, 1536, 1, 1.8)
