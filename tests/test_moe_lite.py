"""Glm4MoeLiteForCausalLM (GLM-4.7-Flash) with its experts: latent attention plus GLM-4.5's mixture of
experts, against transformers' class built here from a tiny random config.

Odd sizes; 8 experts in 4 groups of which 2 compete, top-3; the first layer dense; router bias, norms and
biases randomised. Checked: logits on a left-padded batch (expanded and absorbed attention), the cache
path (prefill + decode steps == full forward), and the format both ways bit for bit with an MTP layer.
"""

import functools

import pytest
import torch

import glmkit
from glmkit.convert import read_checkpoint
from glmkit.layers import MoE
from tests.helpers import assert_close, mtp_round_trip, randomize_moe
from tests.helpers import left_padded as left_padded_batch

transformers = pytest.importorskip("transformers")

V, TOL = 89, 1e-4


def hf_lite(seed=0, layers=3):
    cfg = transformers.Glm4MoeLiteConfig(
        vocab_size=V, hidden_size=44, intermediate_size=60, num_hidden_layers=layers, num_attention_heads=3,
        num_key_value_heads=3, q_lora_rank=26, kv_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6,
        v_head_dim=14, moe_intermediate_size=22, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.3, norm_topk_prob=True, attention_bias=True,
        mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=None, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-matmul default needs 16-byte strides; our sizes are odd
    torch.manual_seed(seed)
    model = transformers.Glm4MoeLiteForCausalLM(cfg).eval()
    return randomize_moe(model)  # larger than the init's, so routing and rotary matter


left_padded = functools.partial(left_padded_batch, V)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lite") / "hf"
    hf_lite().save_pretrained(d)
    return d


@torch.no_grad()
def test_logits_and_cache_match_transformers(hf_dir):
    hf = hf_lite()
    ours = glmkit.load(str(hf_dir)).eval()
    c = ours.cfg
    assert (c.attention, c.n_experts, c.n_experts_per_tok, c.n_group, c.topk_group, c.first_dense_layers) == (
        "mla", 8, 3, 4, 2, 1)
    assert isinstance(ours.layers[1].mlp, MoE) and not isinstance(ours.layers[0].mlp, MoE)
    ids, mask, pos = left_padded([11, 7, 5], 11)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    for absorb in (False, True):
        for layer in ours.layers:
            layer.attn.absorb = absorb
        mx = assert_close(ours(ids, attention_mask=mask)[real], want[real], TOL, f"logits absorb={absorb}")
        print(f"\nGlm4MoeLite with experts absorb={absorb} (fp32, left-padded): max abs diff {mx:.2e}")
    for layer in ours.layers:
        layer.attn.absorb = None
    # the cache path: prefill 6 (the last row all padding), then one token at a time, == the full forward
    cache = ours.new_cache(3, 16)
    got = [ours.prefill(ids[:, :6], cache, attention_mask=mask[:, :6])]
    for t in range(6, 11):
        got.append(ours.prefill(ids[:, t:t + 1], cache, position_ids=pos[:, t:t + 1]))
    mx = assert_close(torch.cat(got, 1)[real], want[real], TOL, "prefill + decode vs transformers")
    print(f"cache path: max abs diff {mx:.2e}")


@torch.no_grad()
def test_round_trip_bit_identical_with_mtp_layer(hf_dir, tmp_path):
    """Per-expert tensor names as transformers saves them (model.layers.N.mlp.experts.E.gate_proj.weight),
    plus an MTP layer at index num_hidden_layers as the release ships it (transformers saves none)."""
    from safetensors.torch import load_file

    sd = load_file(hf_dir / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in sd  # per-expert names on disk
    d, ours = mtp_round_trip(hf_dir, tmp_path, sd, 2, 44)
    assert d["mlp_layer_types"] == ["dense", "sparse", "sparse"] and d["n_routed_experts"] == 8
    again = transformers.Glm4MoeLiteForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager",
                                                                    experts_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 9))
    assert_close(again(ids).logits, hf_lite()(ids).logits, 0.0, "transformers on our export vs original")
    assert read_checkpoint(hf_dir).cfg.n_mtp_layers == 0
