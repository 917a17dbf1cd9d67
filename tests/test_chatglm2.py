"""The later ChatGLM remote-code layout (ChatGLM2/3, CodeGeeX2/4, GLM-4-9B as first released).

References, built in-process:
- transformers GlmForCausalLM: GLM-4 is the same network, so its weights rearranged by hand here into
  the remote-code names (q/k/v fused into query_key_value, gate/up into dense_h_to_4h; per head
  [q_h; k_h; v_h] rows without multi-query attention) must read back to the same logits;
- what transformers cannot express (no final norm, LayerNorm, biases on every linear) is checked as
  layout equality: the same weights read from the remote-code layout and from glmkit's own.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit.config import ModelConfig
from glmkit.convert import CheckpointError, read_checkpoint, write_checkpoint
from glmkit.model import GLM
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

TOL = 1e-5
REMOTE = Path(__file__).parent / "fixtures" / "chatglm_remote"


def remote_config(**kw) -> dict:
    """A tiny config.json as the remote code writes it (released configs have no vocab_size / num_hidden_layers)."""
    d = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "padded_vocab_size": 101, "hidden_size": 64,
         "ffn_hidden_size": 96, "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
         "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 128, "rope_ratio": 1,
         "original_rope": True, "rmsnorm": True, "layernorm_epsilon": 1e-5, "post_layer_norm": True,
         "apply_residual_connection_post_layernorm": False, "add_bias_linear": False, "add_qkv_bias": True,
         "tie_word_embeddings": False, "torch_dtype": "float32"}
    d.update(kw)
    return d


def hf_glm(kv_heads: int, qkv_bias: bool, rope_theta: float):
    cfg = transformers.GlmConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
        attention_bias=qkv_bias, partial_rotary_factor=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=rope_theta,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so the test sees them
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def remote_state_from_hf(hf, multi_query: bool) -> dict:
    """GlmForCausalLM's weights under the remote code's names, transcribed independently of glmkit."""
    sd, out, H, D = hf.state_dict(), {}, 4, 16
    out["transformer.embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    # the releases ship this buffer (1/10000^(2i/n), half precision); the forward never reads it
    out["transformer.rotary_pos_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)).half()
    for i in range(2):
        h, r = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            if h + f"self_attn.q_proj.{kind}" not in sd:
                continue
            q, k, v = (sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            if multi_query:
                fused = torch.cat((q, k, v))
            else:  # rows per head: q_h, k_h, v_h
                rows = [t.reshape(H, D, *t.shape[1:]) for t in (q, k, v)]
                fused = torch.stack(rows, 1).reshape(3 * H * D, *q.shape[1:])
            out[r + f"self_attention.query_key_value.{kind}"] = fused
        out[r + "self_attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[r + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[r + "post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[r + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.gate_up_proj.weight"]  # [gate; up] in both
        out[r + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.down_proj.weight"]
    return {n: t.contiguous() for n, t in out.items()}


def write_remote(path, config: dict, state: dict):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("multi_query,qkv_bias,rope_ratio", [(True, True, 500), (False, True, 1), (True, False, 1)],
                         ids=["mqa-bias-ratio500", "full-heads", "mqa-no-bias"])
@torch.no_grad()
def test_remote_layout_equals_transformers_glm(tmp_path, multi_query, qkv_bias, rope_ratio):
    kv = 2 if multi_query else 4
    hf = hf_glm(kv, qkv_bias, 10000.0 * rope_ratio)
    cfg = remote_config(multi_query_attention=multi_query, add_qkv_bias=qkv_bias, rope_ratio=rope_ratio)
    write_remote(tmp_path / "remote", cfg, remote_state_from_hf(hf, multi_query))
    ours = glmkit.load(str(tmp_path / "remote")).eval()
    assert (ours.cfg.source, ours.cfg.n_kv_heads, ours.cfg.head_dim, ours.cfg.rope_theta) == (
        "chatglm2", kv, 16, 10000.0 * rope_ratio)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    want = hf(input_ids=ids).logits
    mx = assert_close(ours(ids), want, TOL, "remote-code layout vs GlmForCausalLM logits")
    print(f"\nchatglm2 layout ({'multi-query' if multi_query else 'full heads'}) vs GlmForCausalLM: max abs diff {mx:.2e}")
    # the -hf layout of the same weights reads to the same model bit for bit
    hf.save_pretrained(tmp_path / "hf")
    same = glmkit.load(str(tmp_path / "hf")).eval()
    for (n, p), (_, q) in zip(ours.state_dict().items(), same.state_dict().items()):
        assert torch.equal(p, q), n
    assert torch.equal(ours(ids), same(ids))


@pytest.mark.parametrize("variant", [
    {"post_layer_norm": False}, {"rmsnorm": False}, {"add_bias_linear": True}, {"multi_query_attention": False},
    {"apply_residual_connection_post_layernorm": True},
])
@torch.no_grad()
def test_round_trip_and_layout_equality(tmp_path, variant):
    """glmkit -> chatglm2 layout -> glmkit is bit for bit, and what transformers cannot express (no final norm,
    LayerNorm, biases on all four linears) reads to the same network as the weights in glmkit's own layout."""
    cfg = ModelConfig.from_dict({**config_of_dict(remote_config(**variant)).to_dict()})
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    model.init_weights(seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    write_checkpoint(model, tmp_path / "remote", "chatglm2")
    stored = load_file(tmp_path / "remote" / "model.safetensors")
    assert all(n.startswith("transformer.") for n in stored)
    assert ("transformer.encoder.final_layernorm.weight" in stored) == variant.get("post_layer_norm", True)
    written = json.loads((tmp_path / "remote" / "config.json").read_text())
    for key, value in variant.items():
        assert written[key] == value, key
    back = read_checkpoint(tmp_path / "remote")
    assert back.cfg == model.cfg
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n
    write_checkpoint(back, tmp_path / "again")  # default: the layout it came from
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(stored) and all(torch.equal(again[n], stored[n]) for n in stored)
    ids = torch.randint(0, 101, (2, 17))
    assert torch.equal(back(ids), model(ids))


def config_of_dict(d: dict) -> ModelConfig:
    from glmkit.convert import detect_format

    return detect_format(d, "config.json").config_from_hf(d)


# the released config.json files, verbatim (tests/fixtures/chatglm_remote/released_configs/SOURCES.md says where
# each comes from), and what they must read as
RELEASED = {
    "chatglm2-6b": dict(vocab_size=65024, n_layers=28, n_kv_heads=2, rope_theta=1e4, max_seq_len=32768, norm_eps=1e-5),
    "chatglm3-6b": dict(vocab_size=65024, n_layers=28, n_kv_heads=2, rope_theta=1e4, max_seq_len=8192, norm_eps=1e-5),
    "codegeex2-6b": dict(vocab_size=65024, n_layers=28, n_kv_heads=2, rope_theta=1e4, max_seq_len=8192, norm_eps=1e-5),
    "glm-4-9b-chat": dict(vocab_size=151552, n_layers=40, n_kv_heads=2, rope_theta=5e6, max_seq_len=131072,
                          norm_eps=1.5625e-07),
    "glm-4-9b-chat-1m": dict(vocab_size=151552, n_layers=40, n_kv_heads=4, rope_theta=1e8, max_seq_len=1048576,
                             norm_eps=1.5625e-07),
}


@pytest.mark.parametrize("release", sorted(RELEASED))
def test_released_configs(release):
    d = json.loads((REMOTE / "released_configs" / f"{release}.json").read_text())
    cfg = config_of_dict(d)
    for k, v in RELEASED[release].items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_dim, cfg.rotary_dim) == (4096, 32, 128, 13696, 64)
    assert not cfg.tie_embeddings and cfg.qkv_bias and not cfg.out_bias and cfg.final_norm
    assert (cfg.source, cfg.position, cfg.norm, cfg.mlp) == ("chatglm2", "rope_partial", "rmsnorm", "swiglu")
    preset = {"chatglm2-6b": "chatglm3-6b", "codegeex2-6b": "chatglm3-6b"}.get(release, release)
    from glmkit.config import get_preset

    want = replace(get_preset(preset), max_seq_len=cfg.max_seq_len, chat_format=cfg.chat_format)
    assert cfg == want, (cfg, want)  # the preset is the release's network


def test_refusals_name_the_problem(tmp_path):
    for extra, match in [({"quantization_bit": 4}, "quantization_bit=4"), ({"pre_seq_len": 128}, "pre_seq_len"),
                         ({"rope_ratio": "big"}, "rope_ratio")]:
        with pytest.raises(CheckpointError, match=match):
            config_of_dict(remote_config(**extra))
    d = remote_config()
    del d["padded_vocab_size"]
    with pytest.raises(CheckpointError, match="vocab_size"):
        config_of_dict(d)
    hf = hf_glm(2, True, 1e4)
    state = remote_state_from_hf(hf, True)
    state.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight")
    write_remote(tmp_path / "m", remote_config(), state)
    with pytest.raises(CheckpointError, match="missing 1 tensor.*layers.1.mlp.dense_4h_to_h.weight"):
        glmkit.load(str(tmp_path / "m"))
    model = GLM(ModelConfig(position="rope_2d", n_layers=1))
    with pytest.raises(CheckpointError, match="cannot be written as chatglm2: position=rope_2d"):
        write_checkpoint(model, tmp_path / "x", "chatglm2")



@torch.no_grad()
def test_convert_streams_into_shards_keeping_the_stored_dtype(tmp_path, capsys):
    """`glmkit convert` reads one tensor at a time and writes shards as they fill (a release's -hf
    checkpoint into the remote-code layout and back), keeping the stored fp16 instead of widening it."""
    from glmkit.convert import main

    hf = hf_glm(2, True, 5e6).half()
    hf.save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "remote"), "--to", "chatglm2"])
    assert "chatglm2" in capsys.readouterr().out
    stored = load_file(tmp_path / "remote" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    model = read_checkpoint(tmp_path / "remote", dtype=torch.float32)
    write_checkpoint(model, tmp_path / "sharded", "chatglm2", shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(stored)
    back = read_checkpoint(tmp_path / "sharded", dtype=torch.float32)
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n
    main([str(tmp_path / "sharded"), str(tmp_path / "hf2"), "--to", "glm_hf", "--dtype", "fp16"])
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


# ---- against the published remote code itself ------------------------------------------------------
# tests/fixtures/chatglm_remote/<name>: tiny random models saved by THUDM's published ChatGLM2 / ChatGLM3 /
# GLM-4 modeling_chatglm.py (transformers 4.41, fp32 compute) in the released layout and dtype, with the logits
# that code computed: one forward over 16 tokens, 12 tokens then 4 cached steps, 8 then a chunk of 8.
REMOTE_FIXTURES = sorted(p.name for p in REMOTE.iterdir() if (p / "logits.safetensors").is_file())


@pytest.mark.parametrize("name", REMOTE_FIXTURES)
@torch.no_grad()
def test_equals_the_published_remote_code(name):
    ref = load_file(REMOTE / name / "logits.safetensors")
    model = glmkit.load(str(REMOTE / name), dtype=torch.float32).eval()
    ids = ref["input_ids"]
    mx = assert_close(model(ids), ref["logits_full"], 1e-4, f"{name}: full forward vs the published code")
    for key, start in (("logits_decode", 12), ("logits_chunk", 8)):
        cache = model.new_cache(1, 16)
        model.prefill(ids[:, :start], cache)
        if key == "logits_decode":
            got = torch.cat([model.prefill(ids[:, t:t + 1], cache, position_ids=torch.tensor([[t]]))
                             for t in range(start, 16)], 1)
        else:
            got = model.prefill(ids[:, start:], cache, position_ids=torch.arange(start, 16)[None])
        mx = max(mx, assert_close(got, ref[key], 1e-4, f"{name}: {key} (cached) vs the published code"))
    print(f"\n{name}: glmkit vs the published remote code, max abs logit diff {mx:.2e}")


def test_chat_format_from_the_release_files(tmp_path):
    """ChatGLM2 / ChatGLM3 / CodeGeeX2 share config.json's fields: the release name decides, else the
    tokenizer_config.json beside it (its added tokens or chat template), else the tokenizer itself."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from glmkit.chat import chat_format
    from glmkit.convert import config_of
    from glmkit.tokenizer import Tokenizer

    hf = hf_glm(2, True, 1e4)
    state = remote_state_from_hf(hf, True)
    write_remote(tmp_path / "c3", remote_config(_name_or_path="THUDM/chatglm3-6b"), state)
    assert config_of(tmp_path / "c3")[1].chat_format == "chatglm3"
    write_remote(tmp_path / "local", remote_config(_name_or_path="/data/my-finetune"), state)
    assert config_of(tmp_path / "local")[1].chat_format is None
    (tmp_path / "local" / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"64795": {"content": "<|user|>", "special": True}}}))
    assert config_of(tmp_path / "local")[1].chat_format == "chatglm3"
    (tmp_path / "local" / "tokenizer_config.json").write_text("{not json")
    cfg = config_of(tmp_path / "local")[1]
    assert cfg.chat_format is None
    tok2 = Tokenizer(HFTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok2.tok.add_special_tokens(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"])
    assert chat_format(cfg, tok2).name == "chatglm2"
    tok2.tok.add_special_tokens(["<|user|>"])
    assert chat_format(cfg, tok2).name == "chatglm3"
    assert chat_format(cfg).name == "glm4"
