"""GLM-4.5's mixture of experts (Glm4MoeForCausalLM) against transformers, built from tiny random configs here.

Odd sizes; 8 experts in 4 groups of which 2 compete, so group selection changes choices; the first layer
dense; qk_norm on and off; norms, biases and the router's correction bias randomised. Checked: logits on a
left-padded batch and through the KV cache, the router's choices and weights, grouped-by-expert == per
token, quantized experts == their dequantized product, the format both ways bit for bit (MTP layer
included), and the loader's error for a missing expert.
"""

import functools
import json
from dataclasses import replace

import pytest
import torch

import glmkit
from glmkit import fused, kernels
from glmkit.config import ModelConfig
from glmkit.convert import CheckpointError, read_checkpoint, write_checkpoint
from glmkit.layers import MoE
from glmkit.model import GLM
from glmkit.plan import active_weight_bytes, weight_bytes
from glmkit.quantize import Int4Linear, Int8Linear, quantize_model
from tests.helpers import assert_close, assert_decodes_as_full_forwards
from tests.helpers import left_padded as left_padded_batch

transformers = pytest.importorskip("transformers")

V, TOL = 97, 1e-4


def hf_moe(qk_norm=True, mtp=0, seed=0, hidden_size=48, head_dim=12, moe_intermediate_size=20, intermediate_size=72):
    cfg = transformers.Glm4MoeConfig(
        vocab_size=V, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, moe_intermediate_size=moe_intermediate_size, num_experts_per_tok=3, n_routed_experts=8,
        n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, use_qk_norm=qk_norm, attention_bias=True, max_position_embeddings=64,
        num_nextn_predict_layers=mtp, pad_token_id=None, eos_token_id=None, bos_token_id=None,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init's, so routing and rotary matter; norms and biases random
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0, 0.3)
    return model


left_padded = functools.partial(left_padded_batch, V)


@pytest.mark.parametrize("qk_norm", [True, False])
@torch.no_grad()
def test_logits_and_cache_match_transformers(tmp_path, qk_norm):
    hf = hf_moe(qk_norm)
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    assert (ours.cfg.n_experts, ours.cfg.first_dense_layers, ours.cfg.qk_norm) == (8, 1, qk_norm)
    assert fused.decode_plan(ours) is None  # the native decode step refuses experts: decode runs eager
    ids, mask, pos = left_padded([11, 7, 5], 11)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    mx = assert_close(got[real], want[real], TOL, "logits at real tokens")
    print(f"\nGlm4Moe qk_norm={qk_norm} parity (fp32, left-padded): max abs diff {mx:.2e}")

    cache, P = ours.new_cache(3, 16), 6  # prefill 6 tokens (every row has begun), then one decode step per token
    steps = [ours.prefill(ids[:, :P], cache, attention_mask=mask[:, :P])]
    for t in range(P, 11):
        steps.append(ours.prefill(ids[:, t:t + 1], cache, position_ids=pos[:, t:t + 1]))
    mx = assert_close(torch.cat(steps, 1)[real], want[real], TOL, "prefill + decode steps vs transformers")
    print(f"  KV-cache path: max abs diff {mx:.2e}")


@torch.no_grad()
def test_router_choices_and_weights_match_transformers(tmp_path):
    hf = hf_moe()
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    inputs = {}
    for i in (1, 2):
        hf.model.layers[i].mlp.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, a[0]))
    hf(torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1)))
    group_mattered = 0
    for i, x in inputs.items():
        x = x.reshape(-1, 48)
        _, w_hf, id_hf = hf.model.layers[i].mlp.gate(x)
        w, ids = ours.layers[i].mlp.gate(x)
        id_hf, order = id_hf.sort(-1)  # transformers' top-k is unsorted
        ids, mine = ids.sort(-1)
        assert torch.equal(ids, id_hf), f"layer {i}: experts {ids.tolist()} vs transformers {id_hf.tolist()}"
        assert_close(w.gather(1, mine), w_hf.gather(1, order), 1e-6, f"layer {i} routing weights")
        # the test must see group selection: a plain top-k over all experts would choose otherwise somewhere
        gate = ours.layers[i].mlp.gate
        plain = ((x @ gate.weight.T).sigmoid() + gate.e_score_correction_bias).topk(3).indices.sort(-1).values
        group_mattered += int((plain != ids).any(-1).sum())
    assert group_mattered > 0, "no token's choice depended on the group selection: the config does not test it"
    # a bf16 model keeps its router in fp32, as stored (transformers keeps it so too): the same choices
    half = glmkit.load(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert half.layers[1].mlp.experts[0].up.weight.dtype == torch.bfloat16
    for i in (1, 2):
        g16, g32 = half.layers[i].mlp.gate, ours.layers[i].mlp.gate
        assert g16.weight.dtype == g16.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(g16.weight, g32.weight) and torch.equal(g16.e_score_correction_bias, g32.e_score_correction_bias)
    assert half.to(torch.bfloat16).layers[1].mlp.gate.weight.dtype == torch.float32


@torch.no_grad()
def test_grouped_batch_equals_per_token_and_reads_only_chosen_experts():
    cfg = ModelConfig(vocab_size=V, dim=40, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=56, position="rope_partial",
                      n_experts=8, n_experts_per_tok=2, n_shared_experts=1, moe_ffn_dim=24, first_dense_layers=1,
                      n_group=2, topk_group=1, routed_scaling_factor=1.7)
    torch.manual_seed(0)
    moe = GLM(cfg).layers[1].mlp
    assert isinstance(moe, MoE)
    moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(17, 40)
    batch = moe(x)
    alone = torch.cat([moe(x[t:t + 1]) for t in range(17)])
    mx = assert_close(batch, alone, 1e-5, "grouped-by-expert batch vs one token at a time")
    print(f"\ngrouped vs per-token: max abs diff {mx:.2e}")
    called = []
    for e, ex in enumerate(moe.experts):
        ex.register_forward_hook(lambda m, a, out, e=e: called.append(e))
    _, ids = moe.gate(x[:1])
    called.clear()
    moe(x[:1])
    assert sorted(called) == sorted(ids[0].tolist()), f"one token ran experts {called}, routed to {ids[0].tolist()}"


def _dequantized(model: GLM) -> GLM:
    """A float copy of a quantized GLM: every quantized linear replaced by nn.Linear of its dequantized weight."""
    float_model = GLM(replace(model.cfg, quant=None))
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            sd[name + ".weight"] = mod.weight.float() * mod.scales.float()[:, None]
        elif isinstance(mod, Int4Linear):
            sd[name + ".weight"] = mod.dequantize(torch.float32)
    rest = {n: t for n, t in model.state_dict().items() if not n.endswith((".scales", ".mins"))}
    rest.update(sd)
    float_model.load_state_dict(rest, strict=True)
    return float_model.eval()


@pytest.mark.parametrize("path", ["native", "tiled"])
@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_quantized_experts_equal_their_dequantized_product(tmp_path, bits, path, monkeypatch):
    """tiled: every product through dequantized fp32 tiles, equal to the float model within summation order.
    native: few-row products (each expert sees a few tokens) in glmkit's kernels, which round activations
    to int16 (int8 weights) or int8 (int4) steps, per linear bounded in test_quantize: a looser bound here."""
    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    if path == "tiled":
        monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    hf = hf_moe(hidden_size=64, head_dim=16, moe_intermediate_size=64, intermediate_size=128)  # int4 groups of 32 divide every width
    hf.save_pretrained(tmp_path / "hf")
    q = quantize_model(read_checkpoint(tmp_path / "hf").eval(), bits, group_size=32 if bits == 4 else 64)
    kind = Int8Linear if bits == 8 else Int4Linear
    moe = q.layers[2].mlp
    assert all(type(m) is kind for e in moe.experts for m in (e.up, e.down)), "experts not quantized"
    assert type(moe.shared.up) is kind and moe.gate.weight.dtype == torch.float32  # router stays float
    ref = _dequantized(q)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(2))
    if path == "tiled":  # the whole model, prefill and a decode step
        want = ref(ids)
        mx = assert_close(q(ids), want, 1e-4, f"int{bits} tiled model vs float model of its dequantized weights")
        cache = q.new_cache(3, 12)
        q.prefill(ids[:, :8], cache)
        step = q.prefill(ids[:, 8:], cache, position_ids=torch.full((3, 1), 8))
        mx2 = assert_close(step[:, 0], want[:, -1], 1e-4, f"int{bits} tiled decode step vs dequantized")
        print(f"\nint{bits} tiled experts vs dequantized: max abs diff {mx:.2e} (forward), {mx2:.2e} (decode step)")
    else:  # one MoE layer on a decode step's 3 rows (a whole model would compound the rounding, flip choices)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
        want = ref.layers[2].mlp(x)
        mx = assert_close(moe(x), want, 0.03 * want.abs().max().item(), f"int{bits} native MoE layer vs dequantized")
        print(f"\nint{bits} native MoE layer vs dequantized: max abs diff {mx:.2e} of {want.abs().max().item():.2f}")
    streamed = glmkit.load(str(tmp_path / "hf"), quantize=f"int{bits}", group_size=32)  # quantized as it loads
    assert type(streamed.layers[1].mlp.experts[7].down) is kind


def _add_mtp_layer(directory, seed=3):
    """The MTP layer GLM-4.5 releases ship as model.layers.{num_hidden_layers}.* (transformers saves none): a
    copy of the last layer perturbed, eh_proj, enorm, hnorm, shared_head.norm, and the embedding / head copies
    a release may carry (read as redundant)."""
    from safetensors.torch import load_file, save_file

    f = directory / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for n in [n for n in sd if n.startswith("model.layers.2.")]:
        sd[n.replace("layers.2.", "layers.3.")] = sd[n] + 0.1 * torch.randn(sd[n].shape, generator=g)
    t = "model.layers.3."
    sd[t + "eh_proj.weight"] = torch.randn(48, 96, generator=g) * 0.1
    for n in ("enorm", "hnorm", "shared_head.norm"):
        sd[t + n + ".weight"] = 1 + 0.2 * torch.randn(48, generator=g)
    sd[t + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    sd[t + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    c = json.loads((directory / "config.json").read_text())
    c["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(c))
    return sd


@torch.no_grad()
def test_round_trip_bit_identical_with_mtp_layer(tmp_path):
    from safetensors.torch import load_file

    hf = hf_moe(mtp=1)
    hf.save_pretrained(tmp_path / "hf")
    assert read_checkpoint(tmp_path / "hf").cfg.n_mtp_layers == 0  # config says 1, transformers saved none
    src = _add_mtp_layer(tmp_path / "hf")
    ours = read_checkpoint(tmp_path / "hf")
    assert ours.cfg.n_mtp_layers == 1 and isinstance(ours.mtp[0].block.mlp, MoE)
    write_checkpoint(ours, tmp_path / "back")  # default: the layout it came from
    back = load_file(tmp_path / "back" / "model.safetensors")
    redundant = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}
    assert sorted(back) == sorted(set(src) - redundant)
    for n in back:
        assert back[n].dtype == src[n].dtype and torch.equal(back[n], src[n]), n
    d = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (d["architectures"], d["num_nextn_predict_layers"], d["first_k_dense_replace"]) == (["Glm4MoeForCausalLM"], 1, 1)
    again = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 9))
    assert_close(again(ids).logits, hf(ids).logits, 0.0, "transformers on our export vs original")
    # the MTP layer drafts: logits over the vocabulary from the model's hidden states and the next tokens
    h = ours(ids, hidden_only=True)
    draft = ours.mtp_logits(h[:, :-1], ids[:, 1:])
    assert draft.shape == (2, 8, V) and torch.isfinite(draft).all()
    ours.mtp[0].eh_proj.weight.mul_(2)  # the draft depends on the MTP weights, the main logits do not
    assert not torch.allclose(ours.mtp_logits(h[:, :-1], ids[:, 1:]), draft)


def test_missing_expert_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_moe().save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        read_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("bad,msg", [
    (dict(n_group=3), "does not divide n_experts"),
    (dict(topk_group=5), "exceeds n_group"),
    (dict(n_experts_per_tok=9), "n_experts_per_tok must be in 1..n_experts=8"),
    (dict(moe_ffn_dim=None), "needs moe_ffn_dim"),
    (dict(n_experts=0), "apply only to a mixture of experts"),
    (dict(router_scoring="softmax"), "router_scoring"),
])
def test_config_errors_name_the_field(bad, msg):
    good = dict(n_experts=8, n_experts_per_tok=2, moe_ffn_dim=16, n_group=4, topk_group=2, position="rope_partial")
    ModelConfig(**good)
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{**good, **bad})


def test_plan_counts_every_expert_and_info_shows_active():
    from glmkit.cli import describe

    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, position="rope_partial",
                      rope_interleave=False, qk_norm=True, n_experts=6, n_experts_per_tok=2, n_shared_experts=1,
                      moe_ffn_dim=32, first_dense_layers=1, n_mtp_layers=1, tie_embeddings=False)
    model = GLM(cfg)
    for quant in (None, 4):
        if quant:
            quantize_model(model, 4, group_size=32)
        real = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        planned = weight_bytes(cfg, torch.float32, model.cfg.quant)
        assert sum(planned.values()) == real, (quant, planned, real)
    main = sum(t.numel() for n, t in GLM(cfg).state_dict().items() if not n.startswith("mtp."))
    assert cfg.num_params() == main
    expert = 3 * 64 * 32
    assert cfg.num_params(active=True) == main - 2 * (6 - 2) * expert  # 2 MoE layers, 4 unread experts each
    assert active_weight_bytes(cfg, torch.float32) == 4 * (main - 2 * (6 - 2) * expert)
    text = describe(cfg, "tiny")
    assert f"active:     {cfg.num_params(active=True):,} per token" in text, text


@pytest.mark.parametrize("change", [dict(qk_norm=True), dict(rope_interleave=False)])
@torch.no_grad()
def test_native_decode_refuses_what_it_does_not_compute(change):
    """decode.cpp has no q/k norms nor half-split rotary: a dense model with either must decode eager, so
    its cached steps still equal the full forward."""
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial", **change)
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    for n, p in model.named_parameters():
        if "norm" in n:
            p.copy_(1 + 0.5 * torch.randn_like(p))
    assert fused.decode_plan(model) is None
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(2, 8)
    steps = [model.prefill(ids[:, :5], cache)]
    steps += [model.prefill(ids[:, t:t + 1], cache, position_ids=torch.full((2, 1), t)) for t in range(5, 8)]
    assert_close(torch.cat(steps, 1), model(ids), 1e-4, f"{change}: cached steps vs full forward")


@torch.no_grad()
def test_generate_and_engine_decode_as_full_forwards(tmp_path):
    """A MoE model through generate (left-padded batch, contiguous cache) and the serving engine (paged
    cache, ragged steps of several requests): greedy tokens equal those of full forwards, one prompt at
    a time. The model is int8-quantized as it loads, so the experts run in the quantized kernels. Not int4: its
    kernels round activations to int8 steps, where the last-bit differences between a padded batch's and a
    single row's attention move whole steps, and greedy ties drift (on an AMX Xeon, row 0's second token flipped
    at a 0.11 logit margin, eager and native alike); int4 experts are compared by logits in test_fused_moe and
    above (test_quantized_experts_equal_their_dequantized_product)."""
    hf_moe(hidden_size=64, head_dim=16, moe_intermediate_size=64, intermediate_size=128).save_pretrained(tmp_path / "hf")
    model = glmkit.load(str(tmp_path / "hf"), quantize="int8").eval()
    assert_decodes_as_full_forwards(model, [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]], 6,
                                    {0: slice(0, 2), 2: slice(2, 3)})
