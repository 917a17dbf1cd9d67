"""GGUF import (glmkit.ggufio): tiny random GLM-4-shaped models written with the `gguf` package's writer, the
way llama.cpp's converter writes the chatglm and glm4 architectures, read back through glmkit.load,
load_tokenizer, `glmkit convert`, chat and serve.

References: the source model itself (F32: bit-identical logits); the same model holding the file's weights as
gguf.quants dequantizes them (F16, BF16, Q8_0: bit-identical; Q4_0, which lands as int4, within the int4
kernels' summation order); the source tokenizer (a byte-level BPE trained here) and a SentencePiece model
trained here, on the same text."""

import inspect
import io
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from glmkit import ggufio  # noqa: E402
from glmkit.config import ModelConfig  # noqa: E402
from glmkit.convert import CheckpointError, load, quantize_checkpoint  # noqa: E402
from glmkit.model import GLM  # noqa: E402
from glmkit.quantize import Int4Linear, quantize_model, unpack_int4  # noqa: E402
from glmkit.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from tests.helpers import assert_close, assert_equal  # noqa: E402
from tests.serving import TEXTS  # noqa: E402

Q = gguf.GGMLQuantizationType
MIXED = ("Hello WORLD, it's 12345 apples; I'M here & THEY'LL go.\n\n  def f(x):\n\treturn x**2  # 🙂\n"
         "床前明月光，疑是地上霜。举头望明月 2024年 ¿qué? naïve café")


@pytest.fixture(scope="module")
def bpe():
    # a frequent "34" is merged before "12" / "123": digit runs split 3 at a time (the pre-tokenizer's rule) and
    # unsplit ones then tokenize differently, so the test sees the rule
    return train_bpe(texts=TEXTS + ["34 34 34 34 34 34 34 34 It's 123 456 1234567"] * 10, vocab_size=320)


def source_model(tok, sandwich=False, tie=False, seed=0) -> GLM:
    """GLM-4's shape in miniature: partial interleaved rope, GQA, q/k/v bias, SwiGLU; widths multiples of 64
    so the int4 kernel takes Q4_0's groups of 32."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=256, position="rope_partial", rope_fraction=0.5, rope_theta=50000.0, norm="rmsnorm",
                      norm_eps=1.5625e-07, mlp="swiglu", qkv_bias=True, sandwich_norm=sandwich, tie_embeddings=tie,
                      source="glm4_hf" if sandwich else "glm_hf")
    torch.manual_seed(seed)
    m = GLM(cfg).eval()
    m.init_weights(seed=seed)
    with torch.no_grad():  # norms away from 1, biases away from 0: a swapped tensor shows
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return m


def gpt2_vocab(tok):
    """(tokens, types, merges) in the form llama.cpp's converter writes a GLM-4 vocabulary."""
    d = json.loads(tok.tok.to_str())
    vocab, added = d["model"]["vocab"], {a["id"] for a in d["added_tokens"] if a["special"]}
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return tokens, types, merges


def encode(w: np.ndarray, qtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor: floats as they are, the rest through gguf.quants."""
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(path, model, tok, linear=Q.F32, embed=None, head=None, fused=True, arch=None, pre="chatglm-bpe",
               vocab=None, skip=(), extra=()):
    """`model` as a GGUF file, as llama.cpp's converter lays it out: `linear` for the layer linears, `embed` /
    `head` for token_embd / output (default `linear`), norms and biases F32; q/k/v fused (attn_qkv, from the
    ChatGLM remote-code layout) or separate (attn_q/k/v, from GlmForCausalLM). Returns {name: (data, type)}."""
    cfg = model.cfg
    arch = arch or ("glm4" if cfg.sandwich_norm else "chatglm")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if arch == "glm4":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_add_bos_token(False)
    tokens, types, merges = vocab or gpt2_vocab(tok)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.special("eos"))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {"token_embd.weight": (sd["embed.weight"], embed or linear), "output_norm.weight": (sd["norm.weight"], Q.F32)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (sd["head.weight"], head or linear)
    for i in range(cfg.n_layers):
        o, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = (sd[o + "norm1.weight"], Q.F32)
        for kind, qt in (("weight", linear), ("bias", Q.F32)):
            qkv = sd[o + f"attn.qkv.{kind}"]
            if fused:
                out[b + f"attn_qkv.{kind}"] = (qkv, qt)
            else:
                for p, part in zip("qkv", np.split(qkv, [H * D, H * D + K * D])):
                    out[b + f"attn_{p}.{kind}"] = (part, qt)
        out[b + "attn_output.weight"] = (sd[o + "attn.out.weight"], linear)
        out[b + "ffn_norm.weight"] = (sd[o + "norm2.weight"], Q.F32)
        out[b + "ffn_up.weight"] = (sd[o + "mlp.up.weight"], linear)
        out[b + "ffn_down.weight"] = (sd[o + "mlp.down.weight"], linear)
        if cfg.sandwich_norm:
            out[b + "post_attention_norm.weight"] = (sd[o + "post_attn_norm.weight"], Q.F32)
            out[b + "post_ffw_norm.weight"] = (sd[o + "post_mlp_norm.weight"], Q.F32)
    out.update(extra)
    written = {}
    for name, (x, qt) in out.items():
        if name in skip:
            continue
        data, raw = encode(x, qt) if not isinstance(qt, tuple) else qt
        w.add_tensor(name, data, raw_dtype=raw)
        written[name] = (data, raw or (Q.F16 if data.dtype == np.float16 else Q.F32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def as_stored(model: GLM, written: dict) -> GLM:
    """`model` with every weight replaced by what the file holds, dequantized by gguf.quants (the reference
    for quantized and 16-bit files)."""
    ref = GLM(model.cfg).eval()
    sd = {}
    deq = {n: torch.from_numpy(gguf.quants.dequantize(d, t).astype(np.float32)) for n, (d, t) in written.items()}
    for name, t in model.state_dict().items():
        sd[name] = t
    sd["embed.weight"] = deq["token_embd.weight"]
    sd["norm.weight"] = deq["output_norm.weight"]
    if "output.weight" in deq:
        sd["head.weight"] = deq["output.weight"]
    for i in range(model.cfg.n_layers):
        o, b = f"layers.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            sd[o + f"attn.qkv.{kind}"] = deq[b + f"attn_qkv.{kind}"] if b + f"attn_qkv.{kind}" in deq else \
                torch.cat([deq[b + f"attn_{p}.{kind}"] for p in "qkv"])
        for ours, theirs in (("norm1", "attn_norm"), ("attn.out", "attn_output"), ("norm2", "ffn_norm"),
                             ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down"), ("post_attn_norm", "post_attention_norm"),
                             ("post_mlp_norm", "post_ffw_norm")):
            if b + theirs + ".weight" in deq:
                sd[o + ours + ".weight"] = deq[b + theirs + ".weight"]
    ref.load_state_dict(sd)
    return ref


def ids_of(tok, text=MIXED):
    return torch.tensor([tok.encode(text)])


@torch.no_grad()
def test_f32_reads_bit_identical_with_its_vocabulary(bpe, tmp_path):
    """F32, fused q/k/v (the ChatGLM remote-code converter): the config, every weight and the logits equal the
    source's exactly; the GGUF vocabulary encodes and decodes like the source tokenizer."""
    src = source_model(bpe)
    f = tmp_path / "m.gguf"
    write_gguf(f, src, bpe)
    m = load(str(f))
    want = {k: v for k, v in src.cfg.to_dict().items() if k != "max_seq_len"}
    got = {k: v for k, v in m.cfg.to_dict().items() if k != "max_seq_len"}
    assert got == want and m.cfg.max_seq_len == src.cfg.max_seq_len, (got, want)
    for name, t in src.state_dict().items():
        assert_equal(m.state_dict()[name], t, name)
    x = ids_of(bpe)
    assert_equal(m(x), src(x), "logits, F32 GGUF vs source")

    g = load_tokenizer(f)
    for text in (MIXED, *TEXTS[:4], "[gMASK]<sop><|user|>\nhi"):
        assert g.encode(text) == bpe.encode(text), text
        assert g.encode(text, allow_special=True) == bpe.encode(text, allow_special=True), text
        assert g.decode(bpe.encode(text)) == text
    assert g.vocab_size == bpe.vocab_size
    for role in ("eos", "gmask", "sop", "user", "assistant"):
        assert g.special(role) == bpe.special(role), role


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0], ids=lambda q: q.name)
@torch.no_grad()
def test_float_and_dequantized_types_read_exactly(bpe, tmp_path, qtype):
    """F16 (q/k/v separate, as from GlmForCausalLM, tied head), BF16 (glm4 with sandwich norms) and Q8_0
    (dequantized: glmkit's int8 has one scale per row, Q8_0 one per 32 weights) read into float tensors
    equal to gguf.quants' dequantization, so the logits are bit-identical to the source holding those weights."""
    glm4 = qtype == Q.BF16
    src = source_model(bpe, sandwich=glm4, tie=qtype == Q.F16)
    f = tmp_path / "m.gguf"
    written = write_gguf(f, src, bpe, linear=qtype, fused=qtype != Q.F16)
    m = load(str(f), dtype=torch.float32)
    assert m.cfg.quant is None and m.cfg.sandwich_norm == glm4 and m.cfg.tie_embeddings == (qtype == Q.F16)
    ref = as_stored(src, written)
    for name, t in ref.state_dict().items():
        assert_equal(m.state_dict()[name], t, f"{name} ({qtype.name})")
    x = ids_of(bpe)
    assert_equal(m(x), ref(x), f"logits, {qtype.name} GGUF vs the source with its dequantized weights")
    d = (m(x) - src(x)).abs().max().item()
    print(f"{qtype.name}: max |logit - source's float logit| = {d:.3e}")
    assert 0 < d < 0.5  # the file really is rounded, and only rounded


def file_nibbles(data: np.ndarray, N: int, K: int):
    """The Q4_0 bytes decoded on their own, byte by byte: (q (N, K) in 0..15, d (N, K/32))."""
    blocks = data.reshape(N, K // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.zeros((N, K), dtype=np.uint8)
    for j in range(16):
        q[:, j::32] = blocks[..., 2 + j] & 0xF
        q[:, j + 16::32] = blocks[..., 2 + j] >> 4
    return torch.from_numpy(q), torch.from_numpy(d)


@torch.no_grad()
def test_q4_0_lands_as_int4_as_stored(bpe, tmp_path):
    """Every layer linear and the head Q4_0: the model is int4 with groups of 32 whose nibbles and scales are
    the file's bytes (no float round trip: min = -8 scale), dequantizing bit for bit to gguf.quants' values;
    its logits match the source holding those dequantized weights (the int4 kernels sum in another order)."""
    src = source_model(bpe)
    f = tmp_path / "m.gguf"
    written = write_gguf(f, src, bpe, linear=Q.Q4_0)  # token_embd and output Q4_0 too
    m = load(str(f))
    assert m.cfg.quant == {"bits": 4, "group_size": 32, "head": True}, m.cfg.quant
    layer = m.layers[1]
    checks = [(layer.attn.qkv, "blk.1.attn_qkv.weight"), (layer.mlp.down, "blk.1.ffn_down.weight"), (m.head, "output.weight")]
    for mod, name in checks:
        assert isinstance(mod, Int4Linear) and mod.group_size == 32, (name, type(mod))
        q, d = file_nibbles(written[name][0], mod.out_features, mod.in_features)
        assert_equal(unpack_int4(mod.weight), q, f"{name} nibbles")
        assert_equal(mod.scales, d, f"{name} scales")
        assert_equal(mod.mins, -8 * d, f"{name} mins")
        deq = torch.from_numpy(gguf.quants.dequantize(*written[name]))
        assert_equal(mod.dequantize(), deq, f"{name} dequantized")
    ref = as_stored(src, written)
    x = ids_of(bpe)
    d = assert_close(m(x), ref(x), 2e-4, "logits, Q4_0 GGUF (int4) vs the source with its dequantized weights")
    print(f"Q4_0 -> int4: max |logit diff| vs dequantized float = {d:.3e}")
    # a cached step of few rows takes the native int4 kernel at group 32, which rounds activations to int8 per
    # group by design (kernels.py): close, not equal; a misread group would be off by the logits' own size
    want = ref(x[:, :5])[:, -1]
    step = m.prefill(x[:, :5], m.new_cache(1, 64))[:, -1]
    d = assert_close(step, want, 0.1 * want.abs().max().item(), "cached prefill logits (native int4 kernel)")
    print(f"native int4 kernel: max |logit diff| = {d:.3e} of max |logit| {want.abs().max().item():.3e}")


@torch.no_grad()
def test_mixed_q4_0_file_dequantizes_and_quantize_as_read(bpe, tmp_path):
    """A file whose layer linears are not all Q4_0 (here the down projections are Q8_0) reads as float, exactly
    the dequantized weights; quantize="int4" on a float file equals quantize_model on the loaded model; a
    Q4_0 file refuses a second quantization."""
    src = source_model(bpe)
    f = tmp_path / "mixed.gguf"
    extra = {f"blk.{i}.ffn_down.weight": (src.state_dict()[f"layers.{i}.mlp.down.weight"].numpy(), Q.Q8_0) for i in range(2)}
    written = write_gguf(f, src, bpe, linear=Q.Q4_0, head=Q.F16, extra=extra)
    m = load(str(f))
    assert m.cfg.quant is None
    ref = as_stored(src, written)
    assert_equal(m(ids_of(bpe)), ref(ids_of(bpe)), "logits, mixed Q4_0/Q8_0 GGUF read as float")

    q = load(str(f), quantize="int4", group_size=32)
    want = quantize_model(load(str(f)), 4, 32)
    quantize_checkpoint(f, tmp_path / "q4", 4, 32, torch.float32)  # `glmkit quantize x.gguf DIR`
    q_dir = load(str(tmp_path / "q4"))
    for name, t in want.state_dict().items():
        assert_equal(q.state_dict()[name], t, name)
        assert_equal(q_dir.state_dict()[name], t, f"{name} (glmkit quantize)")
    assert load_tokenizer(tmp_path / "q4").encode(MIXED) == bpe.encode(MIXED)
    f4 = tmp_path / "q4.gguf"
    write_gguf(f4, src, bpe, linear=Q.Q4_0, head=Q.F16)
    assert load(str(f4)).cfg.quant == {"bits": 4, "group_size": 32, "head": False}
    with pytest.raises(ValueError, match="already quantized"):
        load(str(f4), quantize="int8")


def test_convert_writes_a_checkpoint_that_loads_the_same(bpe, tmp_path):
    """`glmkit convert x.gguf DIR`: a glmkit checkpoint (int4 kept) with the vocabulary as tokenizer.json."""
    from glmkit.convert import main

    src = source_model(bpe, sandwich=True)
    f = tmp_path / "m.gguf"
    write_gguf(f, src, bpe, linear=Q.Q4_0, embed=Q.F16)
    main([str(f), str(tmp_path / "out")])
    a, b = load(str(f)), load(str(tmp_path / "out"))
    assert a.cfg == b.cfg and b.cfg.quant["group_size"] == 32
    for name, t in a.state_dict().items():
        assert_equal(b.state_dict()[name], t, name)
    assert load_tokenizer(tmp_path / "out").encode(MIXED) == bpe.encode(MIXED)
    with pytest.raises(CheckpointError, match="glmkit layout"):
        main([str(f), str(tmp_path / "out2"), "--to", "glm4_hf"])


def test_sentencepiece_vocabulary(tmp_path):
    """A `llama` vocabulary (ChatGLM3: pieces, scores, types, as the converter writes them from a SentencePiece
    BPE model) encodes like that SentencePiece model itself."""
    spm = pytest.importorskip("sentencepiece")
    from glmkit.tokenizer import Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 3), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["[gMASK]", "sop"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    f = tmp_path / "m.gguf"
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i) else
             gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.USER_DEFINED if tokens[i] in ("[gMASK]", "sop")
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    w = gguf.GGUFWriter(str(f), "chatglm")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("chatglm-spm")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proto = ggufio.read_vocab(f)
    assert isinstance(proto, bytes)
    rebuilt = spm.SentencePieceProcessor(model_proto=proto)
    text = "The quick brown fox, 床前明月光 and ñ unseen ✓ [gMASK]sop hi"
    assert rebuilt.encode(text) == sp.encode(text)
    first = next(iter(inspect.signature(Tokenizer.from_sentencepiece).parameters.values()))
    if "bytes" not in str(first.annotation):
        pytest.skip("Tokenizer.from_sentencepiece(path) reads no bytes yet: the GGUF branch of load_tokenizer needs its "
                    "from_sentencepiece to take a model's bytes, for SentencePiece (BPE) models")
    tok = load_tokenizer(f)
    plain = text.replace(" [gMASK]sop", "")  # user-defined pieces beside spaces: the converter's own business
    assert tok.encode(plain) == sp.encode(plain), plain
    assert [tok.token_id(t) for t in ("[gMASK]", "sop")] == [sp.piece_to_id(t) for t in ("[gMASK]", "sop")]
    (tmp_path / "ckpt").mkdir()  # what `glmkit convert` puts beside the weights: tokenizer.model
    assert [p.name for p in ggufio.vocab_files(f, tmp_path / "ckpt")] == ["tokenizer.model"]
    assert load_tokenizer(tmp_path / "ckpt").encode(plain) == sp.encode(plain)


def test_bad_files_are_refused_clearly(bpe, tmp_path):
    src = source_model(bpe)
    good = tmp_path / "good.gguf"
    write_gguf(good, src, bpe)
    cases = {
        "arch.gguf": (dict(arch="llama"), "architecture 'llama'"),
        "q81.gguf": (dict(extra={"blk.0.ffn_down.weight": (None, (np.zeros((64, 128 // 32 * 40), np.uint8), Q.Q8_1))}),
                     "has type Q8_1, which glmkit does not read"),
        "missing.gguf": (dict(skip=("blk.1.ffn_up.weight",)), r"missing 1 tensor\(s\), e.g. \['blk.1.ffn_up.weight'\]"),
        "extra.gguf": (dict(extra={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)}), "rope_freqs.weight"),
    }
    for name, (kw, msg) in cases.items():
        write_gguf(tmp_path / name, src, bpe, **kw)
        with pytest.raises(CheckpointError, match=msg):
            load(str(tmp_path / name))
    data = good.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a GGUF file"):
        load(str(tmp_path / "short.gguf"))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(CheckpointError, match="cannot be read as GGUF"):
        load(str(tmp_path / "text.gguf"))
    write_gguf(tmp_path / "pre.gguf", src, bpe, pre="qwen2")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'qwen2'"):
        load_tokenizer(tmp_path / "pre.gguf")
    from glmkit.cli import main

    assert main(["info", str(tmp_path / "arch.gguf")]) == 1  # one line, no traceback


def test_info_chat_and_serve_take_a_gguf(bpe, tmp_path, monkeypatch, capsys):
    """`glmkit info / chat / serve --model x.gguf`, no other flag: the file's config, weights and vocabulary."""
    from glmkit.cli import chat_main, main

    f = tmp_path / "m.gguf"
    write_gguf(f, source_model(bpe), bpe, linear=Q.Q4_0)
    assert main(["info", "--verify", str(f)]) == 0
    out = capsys.readouterr().out
    assert "int4" in out and "verified:" in out and "Q4_0" in out, out
    stdout = io.StringIO()
    assert chat_main(["--model", str(f), "--max-new-tokens", "3", "--temperature", "0"], stdin=io.StringIO("hello\n"),
                     stdout=stdout) == 0
    assert stdout.getvalue().endswith("\n") and len(stdout.getvalue()) > 1, stdout.getvalue()

    pytest.importorskip("fastapi")  # the serve extra
    from fastapi.testclient import TestClient

    import glmkit.server.app as app_module

    replies = []

    def fake_serve(app, *args, **kwargs):  # instead of uvicorn on a port: one request in process
        with TestClient(app) as c:
            replies.append(c.post("/v1/chat/completions", json={"model": "m.gguf", "max_tokens": 3,
                                                                "messages": [{"role": "user", "content": "hi"}]}))

    monkeypatch.setattr(app_module, "serve", fake_serve)
    assert app_module.main(["--model", str(f), "--no-auth", "--keys-db", str(tmp_path / "k.db")]) == 0
    assert replies[0].status_code == 200, replies[0].text
    assert replies[0].json()["usage"]["completion_tokens"] >= 1
