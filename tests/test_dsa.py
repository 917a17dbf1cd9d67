"""GLM-5 (transformers' GlmMoeDsaForCausalLM): latent attention, experts and the sparse attention indexer,
against transformers' class built here from tiny random configs.

index_topk (4) is smaller than the sequences (up to 12 tokens), so most queries attend to a subset of the
keys their mask shows; indexer_types all "full" and "full, shared, full" (a layer reusing the previous
layer's choice). Checked: logits on a left-padded batch (expanded and absorbed attention), that the choice
matters (all keys instead changes the logits), the cache path and the serving engine (prefill + decode ==
full forward), the cache's width and the plan's counts, the format both ways bit for bit with an MTP layer.
"""

import functools

import pytest
import torch

import glmkit
from glmkit import fused, plan
from glmkit.config import ModelConfig
from glmkit.convert import CheckpointError, ConfigError, _dsa_from_dict, write_checkpoint
from glmkit.model import GLM
from tests.helpers import assert_close, assert_decodes_as_full_forwards, mtp_round_trip, randomize_moe, set_absorb
from tests.helpers import left_padded as left_padded_batch

transformers = pytest.importorskip("transformers")

V, TOL, TOPK = 89, 1e-4, 4
PATTERNS = {"all-full": None, "full-shared-full": ["full", "shared", "full"]}


def hf_dsa(indexer_types=None, seed=0, layers=3):
    cfg = transformers.GlmMoeDsaConfig(
        vocab_size=V, hidden_size=44, intermediate_size=60, num_hidden_layers=layers, num_attention_heads=3,
        num_key_value_heads=3, q_lora_rank=26, kv_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6,
        v_head_dim=14, moe_intermediate_size=22, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.3, first_k_dense_replace=1, index_n_heads=5, index_head_dim=10,
        index_topk=TOPK, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=None, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
        **({"indexer_types": indexer_types} if indexer_types else {}),
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the grouped-matmul default needs 16-byte strides; our sizes are odd
    torch.manual_seed(seed)
    model = transformers.GlmMoeDsaForCausalLM(cfg).eval()
    return randomize_moe(model)  # larger than the init's, so routing, rotary and the indexer's choice matter


left_padded = functools.partial(left_padded_batch, V)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name, types in PATTERNS.items():
        out[name] = tmp_path_factory.mktemp("dsa") / name
        hf_dsa(types).save_pretrained(out[name])
    return out


@pytest.mark.parametrize("pattern", list(PATTERNS))
@torch.no_grad()
def test_logits_match_transformers_and_the_choice_matters(hf_dirs, pattern):
    hf = hf_dsa(PATTERNS[pattern])
    ours = glmkit.load(str(hf_dirs[pattern])).eval()
    c = ours.cfg
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.n_experts, c.first_dense_layers) == (5, 10, TOPK, 8, 1)
    assert c.index_pattern == (None if pattern == "all-full" else "FSF")
    assert hasattr(ours.layers[1].attn, "indexer") == (pattern == "all-full")
    ids, mask, pos = left_padded([12, 9, 6], 12)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    for absorb in (False, True):
        set_absorb(ours, absorb)
        mx = assert_close(ours(ids, attention_mask=mask)[real], want[real], TOL, f"{pattern} absorb={absorb}")
        print(f"\nGlmMoeDsa {pattern} absorb={absorb} (fp32, left-padded): max abs diff {mx:.2e}")
    chosen = ours.layers[0].attn.choice[0]  # (B, T, S) of the last forward
    assert chosen.sum(-1).max() == TOPK
    # the indexer drops keys: attending to every visible key instead moves the logits far off
    indexers = [b.attn.indexer for b in ours.layers if hasattr(b.attn, "indexer")]
    for ix in indexers:
        ix.topk = 1000
    dense = ours(ids, attention_mask=mask)
    for ix in indexers:
        ix.topk = TOPK
    gap = (dense[real] - want[real]).abs().max().item()
    print(f"all keys instead of the top {TOPK}: max abs diff {gap:.2e}")
    assert gap > 100 * TOL


@pytest.mark.parametrize("pattern", list(PATTERNS))
@torch.no_grad()
def test_cache_path_equals_full_forward(hf_dirs, pattern):
    """Prefill 7 tokens of a left-padded batch into the latent cache (index keys included), then decode one
    token at a time: transformers' full-forward logits."""
    hf = hf_dsa(PATTERNS[pattern])
    ours = glmkit.load(str(hf_dirs[pattern])).eval()
    ids, mask, pos = left_padded([12, 8, 5], 12, seed=1)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    cache = ours.new_cache(3, 16)
    got = [ours.prefill(ids[:, :7], cache, attention_mask=mask[:, :7])]
    for t in range(7, 12):
        got.append(ours.prefill(ids[:, t:t + 1], cache, position_ids=pos[:, t:t + 1]))
    real = mask.bool()
    mx = assert_close(torch.cat(got, 1)[real], want[real], TOL, "prefill + decode vs transformers")
    print(f"\nGlmMoeDsa {pattern} cache path: max abs diff {mx:.2e}")


@torch.no_grad()
def test_engine_and_generate_decode_as_full_forwards(hf_dirs):
    """generate and the serving engine (paged pool, ragged steps of staggered requests: each part's own
    indexer choice) give the greedy tokens of full forwards; the native decode step declines the model."""
    model = glmkit.load(str(hf_dirs["full-shared-full"])).eval()
    assert fused.decode_plan(model) is None
    assert_decodes_as_full_forwards(model, [[5, 6, 7, 8, 9, 10], [9, 10], [11, 12, 13, 14, 15, 16, 17]], 6,
                                    {0: slice(0, 1), 2: slice(1, 3)})


def test_cache_width_and_plan_count_the_index_key():
    """Per token and layer the cache holds [c ; k_pe ; index key]: kv_lora_rank + qk_rope_head_dim +
    index_head_dim (GLM-5's defaults: 512 + 64 + 128); the config and the plan count the indexer weights."""
    glm5 = _dsa_from_dict({"architectures": ["GlmMoeDsaForCausalLM"]})
    assert glm5.kv_layout == (1, 704, 0) and glm5.n_layers == 78 and glm5.first_dense_layers == 3
    cfg = ModelConfig(vocab_size=V, dim=44, n_layers=3, n_heads=3, position="rope_partial", attention="mla",
                      q_lora_rank=26, kv_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14,
                      index_n_heads=5, index_head_dim=10, index_topk=TOPK, index_pattern="FSF")
    model = GLM(cfg)
    cache = model.new_cache(2, 16)
    stored = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    assert stored == 2 * 16 * 3 * (18 + 6 + 10) * 4
    assert plan.kv_cache_bytes(cfg, 2, 16, torch.float32) == stored + cache.valid.numel() + 8 * 2
    params = dict(model.named_parameters())
    assert cfg.num_params() == sum(p.numel() for p in params.values())
    assert plan.weight_bytes(cfg, torch.float32)["layers"] == 4 * sum(
        p.numel() for n, p in params.items() if n.startswith("layers."))
    assert sum("indexer" in n for n in params) == 2 * 5  # layers 0 and 2: wq_b, wk, k_norm (2), weights_proj


@torch.no_grad()
def test_round_trip_bit_identical_with_mtp_layer(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    hf_dir = hf_dirs["full-shared-full"]
    sd = load_file(hf_dir / "model.safetensors")
    assert "model.layers.2.self_attn.indexer.wq_b.weight" in sd and not any(".1.self_attn.indexer" in n for n in sd)
    d, ours = mtp_round_trip(hf_dir, tmp_path, sd, 2, 44)  # the MTP layer: a full layer, indexer included
    assert d["indexer_types"] == ["full", "shared", "full"] and d["index_topk"] == TOPK
    again = transformers.GlmMoeDsaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 9))
    assert_close(again(ids).logits, hf_dsa(PATTERNS["full-shared-full"])(ids).logits, 0.0, "transformers on our export")
    draft = ours.mtp_logits(ours(ids, hidden_only=True)[:, :-1], ids[:, 1:])  # its block runs its own indexer
    assert draft.shape == (2, 8, V) and torch.isfinite(draft).all()
    with pytest.raises(CheckpointError, match="index_n_heads=5"):
        write_checkpoint(ours, tmp_path / "lite", "glm4_moe_lite_hf")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="indexer_types"):
        _dsa_from_dict({"num_hidden_layers": 2, "indexer_types": ["shared", "full"]})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        _dsa_from_dict({"q_lora_rank": None})
    base = dict(vocab_size=V, dim=44, n_layers=2, n_heads=3, position="rope_partial", attention="mla", q_lora_rank=26,
                kv_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14)
    for change, match in (({"index_n_heads": 2, "index_head_dim": 4, "index_topk": 8}, "index_head_dim=4"),
                          ({"index_n_heads": 2, "index_head_dim": 8}, "index_topk"),
                          ({"index_topk": 8}, "index_topk apply only"),
                          ({"index_n_heads": 2, "index_head_dim": 8, "index_topk": 8, "index_pattern": "SF"}, "index_pattern")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**base, **change})
