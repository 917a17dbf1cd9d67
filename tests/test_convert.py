"""Conversion and parity: glmkit equals its references on converted weights.

References, all built in-process from tiny random-init configs:
- transformers GlmForCausalLM and Glm4ForCausalLM (GQA, partial interleaved rotary, q/k/v bias,
  Glm4's sandwich norms), on a left-padded batch;
- the original GLM backbone = GPT2LMHeadModel + a block-position table fed through inputs_embeds,
  with GLM's prefix mask as a 4-D additive float mask;
- ChatGLM-6B, which has no offline reference: an independent transcription of its forward pass
  in its own layout (per-head fused q/k/v, [position | block] rotary halves, alpha residual).
"""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import glmkit
from glmkit.config import ModelConfig, get_preset
from glmkit.convert import CheckpointError, read_checkpoint, write_checkpoint
from glmkit.model import GLM
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def left_padded_batch(vocab, lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
        ids[b, : T - n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def hf_tiny(cls_name, **kw):
    cfg_cls = {"GlmForCausalLM": transformers.GlmConfig, "Glm4ForCausalLM": transformers.Glm4Config}[cls_name]
    cfg = cfg_cls(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
        attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False, **kw,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so the test sees them
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("cls_name", ["GlmForCausalLM", "Glm4ForCausalLM"])
@torch.no_grad()
def test_hf_parity_left_padded(tmp_path, cls_name):
    hf = hf_tiny(cls_name)
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    assert ours.cfg.sandwich_norm == (cls_name == "Glm4ForCausalLM")
    ids, mask, pos = left_padded_batch(101, [12, 7, 3], 12)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    mx = assert_close(got[real], want[real], TOL, f"{cls_name} logits at real tokens")
    print(f"\n{cls_name} parity (fp32, left-padded): max abs diff {mx:.2e}")


@pytest.mark.parametrize("cls_name", ["GlmForCausalLM", "Glm4ForCausalLM"])
@torch.no_grad()
def test_hf_round_trip_identical_tensors(tmp_path, cls_name):
    from safetensors.torch import load_file

    hf = hf_tiny(cls_name)
    hf.save_pretrained(tmp_path / "hf")
    ours = read_checkpoint(tmp_path / "hf")
    write_checkpoint(ours, tmp_path / "back")  # default: the layout it came from
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    again = getattr(transformers, cls_name).from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = torch.randint(0, 101, (2, 9))
    assert_close(again(ids).logits, hf(ids).logits, 0.0, "transformers on our export vs original")


@torch.no_grad()
def test_native_rope2d_exports_to_hf_exactly(tmp_path):
    """A native model (rope_2d) written as GlmForCausalLM gives the same causal logits in transformers,
    and reading the export back restores the native model bit for bit."""
    torch.manual_seed(0)
    model = GLM(get_preset("debug")).eval()
    model.init_weights(seed=1)
    write_checkpoint(model, tmp_path / "hf", "glm_hf")
    hf = transformers.GlmForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (2, 20))
    mx = assert_close(hf(ids).logits, model(ids), TOL, "transformers on exported native model")
    print(f"\nnative rope_2d -> GlmForCausalLM: max abs diff {mx:.2e}")
    back = read_checkpoint(tmp_path / "hf")
    assert back.cfg == model.cfg
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


# ---- scaled RoPE: every rope_type transformers' GLM classes accept, against transformers ----------------
# hf_tiny: head_dim 16, partial_rotary_factor 0.5 -> 4 rotary pairs at theta 1e4 (wavelengths 6.3 .. 6283),
# max_position_embeddings 128. Each config reaches every branch of its type: llama3's kept, blended and
# slowed bands; yarn's ramp over pairs 0..3 (and its attention scaling); longrope's short set (128 <= 128)
# and long set (trained on 8, run on 12 positions, as transformers switches at that length).
ROPE_TYPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 128},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "longrope-short": {"rope_type": "longrope", "original_max_position_embeddings": 128,
                       "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.0, 3.0, 9.0, 27.0]},
    "longrope-long": {"rope_type": "longrope", "original_max_position_embeddings": 8,
                      "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.0, 3.0, 9.0, 27.0]},
    "proportional": {"rope_type": "proportional", "factor": 2.0},
}


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
@torch.no_grad()
def test_hf_parity_scaled_rope(tmp_path, rope):
    """A tiny GlmForCausalLM with a scaled RoPE, read by glmkit: the same logits; the frequencies differ
    from unscaled ones (so the parity is not vacuous), and a write-back restores the same config."""
    from glmkit.layers import rope_frequencies

    hf = hf_tiny("GlmForCausalLM", rope_parameters={"rope_theta": 10000.0, **ROPE_TYPES[rope]})
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    assert ours.cfg.rope_scaling["rope_type"] == ROPE_TYPES[rope]["rope_type"]
    ids, mask, pos = left_padded_batch(101, [12, 7, 3], 12)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    mx = assert_close(got[real], want[real], TOL, f"{rope} logits at real tokens")
    inv, scale = rope_frequencies(ours.cfg)
    plain, _ = rope_frequencies(replace(ours.cfg, rope_scaling=None))
    assert (inv - plain).abs().max() > 1e-3 or scale != 1.0, (inv, plain, scale)
    print(f"\n{rope}: inv_freq {[f'{x:.4g}' for x in inv.tolist()]}, scale {scale:.4f}; max abs diff vs HF {mx:.2e}")
    write_checkpoint(ours, tmp_path / "back")
    assert read_checkpoint(tmp_path / "back").cfg == ours.cfg


@torch.no_grad()
def test_hf_legacy_rope_scaling_spelling(tmp_path):
    """Configs written before transformers 5 carry `rope_scaling` ({"type": ...}) and top-level rope_theta /
    partial_rotary_factor: read as the same model."""
    hf = hf_tiny("GlmForCausalLM", rope_parameters={"rope_theta": 10000.0, **ROPE_TYPES["llama3"]})
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    d = json.loads(path.read_text())
    rp = d.pop("rope_parameters")
    d.update(rope_theta=rp.pop("rope_theta"), partial_rotary_factor=rp.pop("partial_rotary_factor"),
             rope_scaling={"type": rp.pop("rope_type"), **rp})
    path.write_text(json.dumps(d))
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 101, (2, 9))
    mx = assert_close(ours(ids), hf(ids).logits, TOL, "legacy rope_scaling spelling")
    print(f"\nllama3 as legacy rope_scaling: max abs diff {mx:.2e}")


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"field 'rope_parameters': rope_type 'dynamic'.*KV cache"),
    ({"rope_type": "ntk", "factor": 2.0}, r"field 'rope_parameters': rope_type must be one of .*'ntk'"),
    ({"rope_type": "linear"}, r"field 'rope_parameters' of rope_type 'linear': missing \['factor'\]"),
    ({"rope_type": "linear", "factor": 2.0, "fator": 3}, r"unknown keys \['fator'\]"),
    ({"rope_type": "linear", "factor": -2.0}, r"field 'rope_parameters'\['factor'\] must be a positive number"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 8, "short_factor": [1.0, 2.0],
      "long_factor": [1.0, 2.0, 3.0, 4.0]}, r"\['short_factor'\] must be a list of 4 positive numbers"),
])
def test_bad_rope_config_is_refused_naming_the_field(tmp_path, rope, match):
    hf_tiny("GlmForCausalLM").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    d = json.loads(path.read_text())
    d["rope_parameters"] = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **rope}
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=match):
        glmkit.load(str(tmp_path / "hf"))


def test_export_refuses_what_hf_cannot_express(tmp_path):
    model = GLM(ModelConfig(position="learned_2d", norm="layernorm", mlp="gelu", n_layers=1))
    with pytest.raises(CheckpointError, match="cannot be written as glm_hf: position=learned_2d"):
        write_checkpoint(model, tmp_path / "x", "glm_hf")


# ---- original GLM vs GPT-2 + block positions ------------------------------------------------------
def random_glm_checkpoint(path, C=48, L=2, H=4, V=97, P=64, prefix="glm.", rows=None):
    """A tiny checkpoint in the released layout: max_sequence_length P, position tables of P + 1 rows
    (`rows` overrides it, for a wrong one)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    rows = P + 1 if rows is None else rows
    sd = {"word_embeddings.weight": r(V, C), "transformer.position_embeddings.weight": r(rows, C),
          "transformer.block_position_embeddings.weight": r(rows, C),
          "transformer.final_layernorm.weight": 1 + r(C), "transformer.final_layernorm.bias": r(C)}
    for i in range(L):
        t = f"transformer.layers.{i}."
        for name, shape in (("input_layernorm", (C,)), ("post_attention_layernorm", (C,))):
            sd[t + name + ".weight"], sd[t + name + ".bias"] = 1 + r(*shape), r(*shape)
        for name, (o, n) in (("attention.query_key_value", (3 * C, C)), ("attention.dense", (C, C)),
                             ("mlp.dense_h_to_4h", (4 * C, C)), ("mlp.dense_4h_to_h", (C, 4 * C))):
            sd[t + name + ".weight"], sd[t + name + ".bias"] = r(o, n), r(o)
    sd = {prefix + k: v for k, v in sd.items()}
    path.mkdir(parents=True)
    cfg = {"architectures": ["GLMForConditionalGeneration"], "model_type": "glm", "vocab_size": V, "hidden_size": C,
           "num_layers": L, "num_attention_heads": H, "max_sequence_length": P, "block_position_encoding": True,
           "relative_encoding": False}
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "pytorch_model.bin")
    return sd, cfg


def gpt2_from_glm(sd, cfg, prefix="glm."):
    C, L = cfg["hidden_size"], cfg["num_layers"]
    # the published modeling_glm.py: tables of max_sequence_length + 1 rows, exact (erf) GELU
    gc = transformers.GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["max_sequence_length"] + 1, n_embd=C,
                                 n_layer=L, n_head=cfg["num_attention_heads"], activation_function="gelu",
                                 layer_norm_epsilon=1e-5, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                 resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    g = transformers.GPT2LMHeadModel(gc).eval()
    s = {k[len(prefix):]: v for k, v in sd.items()}
    new = {"transformer.wte.weight": s["word_embeddings.weight"], "transformer.wpe.weight": s["transformer.position_embeddings.weight"],
           "transformer.ln_f.weight": s["transformer.final_layernorm.weight"], "transformer.ln_f.bias": s["transformer.final_layernorm.bias"],
           "lm_head.weight": s["word_embeddings.weight"]}
    for i in range(L):
        t, h = f"transformer.layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            new[h + b + ".weight"], new[h + b + ".bias"] = s[t + a + ".weight"], s[t + a + ".bias"]
        for a, b in (("attention.query_key_value", "attn.c_attn"), ("attention.dense", "attn.c_proj"),
                     ("mlp.dense_h_to_4h", "mlp.c_fc"), ("mlp.dense_4h_to_h", "mlp.c_proj")):
            new[h + b + ".weight"], new[h + b + ".bias"] = s[t + a + ".weight"].T.contiguous(), s[t + a + ".bias"]  # Conv1D is (in, out)
    g.load_state_dict(new, strict=False)
    return g, s["transformer.block_position_embeddings.weight"]


@pytest.mark.parametrize("prefix", ["glm.", ""])
@torch.no_grad()
def test_original_glm_equals_gpt2_with_block_positions(tmp_path, prefix):
    sd, cfg = random_glm_checkpoint(tmp_path / "glm", prefix=prefix)
    ours = glmkit.load(str(tmp_path / "glm")).eval()
    gpt2, block_table = gpt2_from_glm(sd, cfg, prefix)
    # one blank-infilling sample: Part A of 6 tokens with a [MASK] at 2, Part B "<sop> x x" at pos 2
    ids = torch.randint(0, 97, (2, 9))
    # row 1 ends at position 64 = max_sequence_length: the extra row of the released tables
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 2, 2], [56, 57, 58, 59, 60, 61, 62, 63, 64]])
    block = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    sep = torch.tensor([6, 4])
    T = ids.shape[1]
    k, q = torch.arange(T), torch.arange(T)[:, None]
    allowed = (k[None, None] < sep[:, None, None]) | (k[None, None] <= q[None])  # (B, T, T)
    additive = torch.zeros(2, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    embeds = gpt2.transformer.wte(ids) + F.embedding(block, block_table)
    want = gpt2(inputs_embeds=embeds, position_ids=pos, attention_mask=additive).logits
    got = ours(ids, torch.stack((pos, block), 1), sep=sep)
    mx = assert_close(got, want, TOL, "original GLM vs GPT-2 + block positions")
    print(f"\noriginal GLM (prefix {prefix!r}) vs GPT2LMHeadModel + block table: max abs diff {mx:.2e}")
    assert ours.cfg.max_seq_len == cfg["max_sequence_length"] + 1 and ours.cfg.mlp == "gelu_exact"


def test_original_glm_wrong_table_size_names_the_tensor(tmp_path):
    """A checkpoint whose tables have max_sequence_length rows (not the released + 1) is refused, naming
    the tensor and both shapes."""
    random_glm_checkpoint(tmp_path / "g", P=64, rows=64)
    with pytest.raises(CheckpointError, match=r"transformer\.position_embeddings\.weight.*\(64, 48\).*\(65, 48\)"):
        read_checkpoint(tmp_path / "g")


# ---- ChatGLM-6B: an independent transcription of its forward -------------------------------------
def chatglm6b_inv_freq(d: int) -> torch.Tensor:
    """modeling_chatglm.py's RotaryEmbedding(d): 1 / 10000^(2i/d) in fp32, then `.half()`; used in fp32."""
    return (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).half().float()


def chatglm_reference(sd, cfg, ids, pos, block, sep, alpha=None):
    """ChatGLM-6B's forward written from its published design, in its own tensor layout:
    q/k/v fused per head as (T, H, 3*D); first half of each head rotated by position, second half
    by block position, each with (x[:d/2], x[d/2:]) pairs; query-key scaling; alpha residual on the
    normed input; GELU (tanh); final LayerNorm; separate lm_head. As its published code computes it: the
    rotary inverse frequencies rounded to fp16 (`chatglm6b_inv_freq`), alpha = sqrt(2 * 28) at any depth
    (GLMBlock's default num_layers, which ChatGLMModel does not pass)."""
    C, H, L, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_layers"], cfg["layernorm_epsilon"]
    D = C // H
    alpha = (2 * 28) ** 0.5 if alpha is None else alpha
    B, T = ids.shape
    sd = {k: v.float() for k, v in sd.items()}
    x = sd["transformer.word_embeddings.weight"][ids]

    def rot(v, p):  # v (B, T, H, d) rotated by positions p (B, T)
        d = v.shape[-1]
        f = p[..., None].float() * chatglm6b_inv_freq(d)
        emb = torch.cat((f, f), -1)[:, :, None]
        cos, sin = emb.cos(), emb.sin()
        v1, v2 = v[..., : d // 2], v[..., d // 2 :]
        return v * cos + torch.cat((-v2, v1), -1) * sin

    allowed = torch.ones(B, T, T).tril().bool()
    for b in range(B):
        allowed[b, :, : sep[b]] = True
    for i in range(L):
        t = f"transformer.layers.{i}."
        ln = lambda z, n: F.layer_norm(z, (C,), sd[t + n + ".weight"], sd[t + n + ".bias"], eps)
        h = ln(x, "input_layernorm")
        mixed = F.linear(h, sd[t + "attention.query_key_value.weight"], sd[t + "attention.query_key_value.bias"])
        q, k, v = mixed.view(B, T, H, 3 * D).split(D, dim=-1)
        q = torch.cat((rot(q[..., : D // 2], pos), rot(q[..., D // 2 :], block)), -1)
        k = torch.cat((rot(k[..., : D // 2], pos), rot(k[..., D // 2 :], block)), -1)
        coeff = float(i + 1)  # query_key_layer_scaling: divide, then multiply back before softmax
        scores = torch.einsum("bqhd,bkhd->bhqk", q / (math.sqrt(D) * coeff), k) * coeff
        scores = scores.masked_fill(~allowed[:, None], -10000.0)
        a = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, C)
        a = F.linear(a, sd[t + "attention.dense.weight"], sd[t + "attention.dense.bias"])
        x = h * alpha + a
        h = ln(x, "post_attention_layernorm")
        m = F.gelu(F.linear(h, sd[t + "mlp.dense_h_to_4h.weight"], sd[t + "mlp.dense_h_to_4h.bias"]), approximate="tanh")
        x = h * alpha + F.linear(m, sd[t + "mlp.dense_4h_to_h.weight"], sd[t + "mlp.dense_4h_to_h.bias"])
    x = F.layer_norm(x, (C,), sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"], eps)
    return F.linear(x, sd["lm_head.weight"])


def random_chatglm_checkpoint(path, C=64, L=2, H=4, F_=160, V=103, shards=1):
    """A tiny checkpoint in the released layout: fp16 tensors with lm_head.weight and each layer's
    rotary inv_freq buffer (wrong values here: the published code ignores them), in `shards` .bin
    files with an index (as chatglm-6b ships 8), or one safetensors file."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).half()
    sd = {"transformer.word_embeddings.weight": r(V, C), "lm_head.weight": r(V, C),
          "transformer.final_layernorm.weight": 1 + r(C), "transformer.final_layernorm.bias": r(C)}
    for i in range(L):
        t = f"transformer.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[t + n + ".weight"], sd[t + n + ".bias"] = 1 + r(C), r(C)
        for n, (o, m) in (("attention.query_key_value", (3 * C, C)), ("attention.dense", (C, C)),
                          ("mlp.dense_h_to_4h", (F_, C)), ("mlp.dense_4h_to_h", (C, F_))):
            sd[t + n + ".weight"], sd[t + n + ".bias"] = r(o, m), r(o)
        sd[t + "attention.rotary_emb.inv_freq"] = torch.ones(C // H // 4, dtype=torch.float16)
    cfg = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": V, "hidden_size": C,
           "inner_hidden_size": F_, "num_layers": L, "num_attention_heads": H, "max_sequence_length": 128,
           "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "quantization_bit": 0,
           "tie_word_embeddings": False}  # real ChatGLM-6B ties (HF default); the untied head is tested here
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        from safetensors.torch import save_file

        save_file(sd, path / "model.safetensors")
        return sd, cfg
    names, weight_map = list(sd), {}
    for k in range(shards):
        part = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        mine = names[k::shards]
        torch.save({n: sd[n] for n in mine}, path / part)
        weight_map.update(dict.fromkeys(mine, part))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd, cfg


@torch.no_grad()
def test_chatglm6b_equals_transcribed_reference(tmp_path):
    sd, cfg = random_chatglm_checkpoint(tmp_path / "c", shards=3)
    ours = glmkit.load(str(tmp_path / "c")).eval()
    assert ours.cfg.residual == "deepnorm" and ours.cfg.position == "rope_2d"
    assert (ours.cfg.rope_fp16, ours.cfg.deepnorm_layers, ours.cfg.residual_alpha) == (True, 28, math.sqrt(56))
    ids = torch.randint(0, 103, (3, 10))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6, 6, 6], [0, 1, 2, 3, 4, 5, 6, 7, 7, 7], list(range(95, 105))])
    block = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2], [0] * 10])
    sep = torch.tensor([7, 8, 0])
    want = chatglm_reference(sd, cfg, ids, pos, block, sep)
    got = ours(ids, torch.stack((pos, block), 1), sep=sep)
    mx = assert_close(got, want, TOL, "ChatGLM-6B vs transcribed reference")
    print(f"\nChatGLM-6B layout (fp16 shards) vs transcribed reference: max abs diff {mx:.2e}")


def test_chatglm6b_rotary_frequencies_are_the_published_fp16_ones():
    """modeling_chatglm.py rounds its inverse frequencies to fp16: chatglm-6b (head 128: two rotary tables
    of 64 channels) uses exactly those. The rounding matters: it turns the angles at position 2047 by
    up to ~0.3 rad against the exact fp32 frequencies."""
    from glmkit.layers import rope_frequencies

    inv, scale = rope_frequencies(get_preset("chatglm-6b"))
    want = chatglm6b_inv_freq(64)
    assert scale == 1.0 and torch.equal(inv, want), (inv - want).abs().max()
    exact = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    drift = ((inv.double() - exact.double()) * 2047).abs().max().item()
    assert drift > 0.1, drift
    print(f"\nChatGLM-6B fp16 frequencies: angle at position 2047 moved by up to {drift:.3f} rad vs exact fp32")


@torch.no_grad()
def test_chatglm6b_alpha_is_fixed_at_28_layers(tmp_path):
    """The published GLMBlock takes num_layers=28 by default and ChatGLMModel does not pass it: a 3-layer
    checkpoint runs with alpha sqrt(56), not sqrt(6). Ours equals the reference with sqrt(56) and is far
    from the one with sqrt(6)."""
    from tests.helpers import assert_differs

    sd, cfg = random_chatglm_checkpoint(tmp_path / "c", L=3)
    ours = glmkit.load(str(tmp_path / "c")).eval()
    ids = torch.randint(0, 103, (2, 8))
    pos, block = torch.arange(8).expand(2, 8), torch.zeros(2, 8, dtype=torch.long)
    got = ours(ids, torch.stack((pos, block), 1))
    mx = assert_close(got, chatglm_reference(sd, cfg, ids, pos, block, torch.tensor([0, 0])), TOL, "alpha sqrt(56)")
    assert_differs(got, chatglm_reference(sd, cfg, ids, pos, block, torch.tensor([0, 0]), alpha=6 ** 0.5), 1e-3,
                   "alpha sqrt(2 x 3)")
    print(f"\n3-layer ChatGLM-6B with alpha sqrt(2 x 28): max abs diff {mx:.2e}")


def test_chatglm_writer_refuses_what_the_published_code_would_run_differently(tmp_path):
    model = GLM(get_preset("chatglm-6b", vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, rope_fp16=False))
    with pytest.raises(CheckpointError, match=r"cannot be written as chatglm.*rope_fp16=False \(it computes True\)"):
        write_checkpoint(model, tmp_path / "x", "chatglm")


def test_chatglm_and_glm_round_trip(tmp_path):
    from safetensors.torch import load_file

    sd, cfg = random_chatglm_checkpoint(tmp_path / "c")
    write_checkpoint(read_checkpoint(tmp_path / "c", dtype=torch.float16), tmp_path / "c2")
    back = load_file(tmp_path / "c2" / "model.safetensors")
    for n, t in back.items():
        assert torch.equal(t, sd[n]), n
    assert set(sd) - set(back) == {f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(2)}
    written = json.loads((tmp_path / "c2" / "config.json").read_text())
    assert {k: written.get(k) for k in cfg if k != "quantization_bit"} == {k: v for k, v in cfg.items() if k != "quantization_bit"}

    # what we write is the released layout the published code reads: max_sequence_length and P + 1 rows
    sd, cfg = random_glm_checkpoint(tmp_path / "g", prefix="")
    write_checkpoint(read_checkpoint(tmp_path / "g"), tmp_path / "g2")
    back = load_file(tmp_path / "g2" / "model.safetensors")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[n], sd[n]) for n in sd)
    written = json.loads((tmp_path / "g2" / "config.json").read_text())
    assert written["max_sequence_length"] == cfg["max_sequence_length"] == back["transformer.position_embeddings.weight"].shape[0] - 1


# ---- loading never fails silently -----------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    hf_tiny("GlmForCausalLM").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensors need \d+ bytes, file has \d+; re-download"):
        glmkit.load(str(hf_dir))
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated safetensors file .* no header"):
        glmkit.load(str(hf_dir))


def test_corrupt_bin(tmp_path):
    random_glm_checkpoint(tmp_path / "g")
    f = tmp_path / "g" / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read as a PyTorch checkpoint .* truncated or corrupt"):
        glmkit.load(str(tmp_path / "g"))


def test_missing_tensor(hf_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\), e\.g\. \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        glmkit.load(str(hf_dir))


def test_unexpected_tensor(hf_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.2.mlp.down_proj.weight"] = torch.zeros(1)
    save_file(sd, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\), e\.g\. \['model\.layers\.2\.mlp\.down_proj\.weight'\] in model\.safetensors"):
        glmkit.load(str(hf_dir))


def test_wrong_shape(hf_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(sd, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 95\), but config\.json implies \(64, 96\) for layers\.0\.mlp\.down\.weight"):
        glmkit.load(str(hf_dir))


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    hf = hf_tiny("Glm4ForCausalLM")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert_close(glmkit.load(str(tmp_path / "hf"))(ids), hf(ids).logits, TOL, "sharded load")
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are not in .*{shards[-1].name}"):
        glmkit.load(str(tmp_path / "hf"))


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_model_maps_each_file_once_and_drops_copied_sources(tmp_path, monkeypatch):
    """A loaded model's tensors are views of one memory map per safetensors file, not one map per tensor (a 30B
    MoE in int4 would hold ~20,000 maps, and the file pages near each tensor's ends would be resident in two of
    them). A tensor read into a copy (bf16 stored, loaded in fp32) has its whole pages dropped from the process
    (convert.evict_mapped), as its own map's would have been when it was freed; the weights are the same."""
    from glmkit import convert

    hf = hf_tiny("Glm4ForCausalLM").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2

    def maps():  # shard -> address ranges of its maps
        out = {f: [] for f in shards}
        for line in open("/proc/self/maps"):
            for f in shards:
                if line.rstrip().endswith(str(f.resolve())):
                    out[f].append(tuple(int(a, 16) for a in line.split()[0].split("-")))
        return out

    stored = glmkit.load(str(tmp_path / "hf"))
    assert stored.embed.weight.dtype == torch.bfloat16
    m = maps()
    assert all(len(r) <= 1 for r in m.values()), m  # was one per tensor kept where it lies
    held = [sum(1 for t in stored.state_dict().values() if any(a <= t.data_ptr() < b for a, b in r)) for r in m.values()]
    assert max(held) >= 2, held  # a file whose several tensors the model keeps in its one map
    seen = []
    real = convert.evict_mapped
    monkeypatch.setattr(convert, "evict_mapped", lambda t, p: seen.append((t.nbytes, real(t, p))) or seen[-1][1])
    up = glmkit.load(str(tmp_path / "hf"), dtype=torch.float32)
    from safetensors import safe_open

    stored_tensors = 0
    for f in shards:
        with safe_open(f, framework="pt") as st:
            stored_tensors += len(list(st.keys()))
    assert len(seen) == stored_tensors, (len(seen), stored_tensors)  # every stored (bf16) tensor was copied: dropped
    floats = {n: t for n, t in stored.state_dict().items() if t.is_floating_point()}
    page = __import__("os").sysconf("SC_PAGE_SIZE")
    for nbytes, dropped in seen:  # the whole pages inside each source
        assert max(nbytes - 2 * page, 0) <= dropped <= nbytes, (nbytes, dropped)
    assert sum(d for _, d in seen) > 0
    for n, t in up.state_dict().items():
        assert t.dtype == (torch.float32 if t.is_floating_point() else t.dtype) and torch.equal(t, floats[n].float()), n
    with torch.no_grad():
        ids = torch.randint(0, 101, (1, 6))
        assert_close(up(ids), stored.float()(ids), 0.0, "fp32 load == bf16 load upcast")


def test_unknown_architecture_and_missing_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        glmkit.load(str(tmp_path / "x"))
    (tmp_path / "x" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"unknown architecture \['LlamaForCausalLM'\]"):
        glmkit.load(str(tmp_path / "x"))
    (tmp_path / "x" / "config.json").write_text(json.dumps({"architectures": ["ChatGLMModel"], "model_type": "chatglm",
                                                              "multi_query_attention": True}))
    with pytest.raises(CheckpointError, match="has no field 'num_attention_heads'.*ChatGLM2/3 / GLM-4 remote-code"):
        glmkit.load(str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="nope does not exist"):
        glmkit.load(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="file is not a directory"):
        glmkit.load(str(tmp_path / "file"))


@torch.no_grad()
def test_glmkit_checkpoint_round_trip_and_dtype(tmp_path):
    model = glmkit.load("debug")
    write_checkpoint(model, tmp_path / "ck")
    back = glmkit.load(str(tmp_path / "ck"))
    assert back.cfg == model.cfg
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(back(ids), model(ids))
    bf = glmkit.load(str(tmp_path / "ck"), dtype=torch.bfloat16)
    assert bf.embed.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        write_checkpoint(model, tmp_path / "ck")


@torch.no_grad()
def test_chatglm_ties_head_like_hf_by_default(tmp_path):
    """ChatGLM-6B's config.json has no tie_word_embeddings; HF then ties lm_head to the embeddings."""
    sd, cfg = random_chatglm_checkpoint(tmp_path / "c")
    del cfg["tie_word_embeddings"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    ours = glmkit.load(str(tmp_path / "c")).eval()
    assert ours.cfg.tie_embeddings and not hasattr(ours, "head")
    ids = torch.randint(0, 103, (1, 6))
    sd = {**sd, "lm_head.weight": sd["transformer.word_embeddings.weight"]}
    pos, block = torch.arange(6)[None], torch.zeros(1, 6, dtype=torch.long)
    want = chatglm_reference(sd, cfg, ids, pos, block, torch.tensor([0]))
    assert_close(ours(ids), want, TOL, "tied ChatGLM-6B")
