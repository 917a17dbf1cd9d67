"""glmkit.generate: greedy parity with transformers, batching, sampling filters against brute force,
stop conditions, logprobs, beam search, GLM blank filling on a model trained here, chat, compile, CLI.

    .venv/bin/python -m pytest tests/test_generate.py -q          # add -m slow for the inductor test

Hermetic: tiny random-init models and a BPE trained in the test. The fill test trains a ~0.1M
parameter GLM for 200 steps on blank-infilling examples of five poem lines (~10 s). The module runs
torch on one thread: these ops are tiny, and on a shared 2-core machine two threads contend with
whatever else runs (measured 4x slower per training step with 2 threads under load).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import random
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import glmkit
from glmkit import cli, fused, kernels
from glmkit import generate as G
from glmkit.config import ModelConfig
from glmkit.generate import beam_search, chat, chat_stream, decode_one, fill, generate, infill, stream
from glmkit.model import GLM
from glmkit.sampling import SamplingParams, StopText, apply_penalties, param_rows, process_logits
from tests.helpers import assert_close

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0, **kw) -> GLM:
    """A tiny random GLM; init_std 0.3 spreads the logits so greedy choices are far from ties."""
    cfg = dict(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128, init_std=0.3)
    torch.manual_seed(seed)
    return GLM(ModelConfig(**{**cfg, **kw})).eval()


VARIANTS = {
    "native_rope2d": dict(),
    "glm_learned2d": dict(position="learned_2d", norm="layernorm", mlp="gelu", qkv_bias=True, n_kv_heads=None),
    "glm4_partial": dict(position="rope_partial", qkv_bias=True, tie_embeddings=False),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15, 16], [40]]


def side_by_side(got, want, what):
    rows = "\n".join(f"    {i}: got {g}\n       want {w}" for i, (g, w) in enumerate(zip(got, want)) if g != w)
    return f"{what} differ:\n{rows}"


@torch.no_grad()
def greedy_reference(model, prompt, n, stop_ids=()):
    """Argmax of the full no-cache forward at every step."""
    ids = list(prompt)
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t in stop_ids:
            break
        ids.append(t)
    return ids[len(prompt):]


# ---- parity with transformers --------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name", ["GlmForCausalLM", "Glm4ForCausalLM"])
def test_greedy_equals_transformers(tmp_path, cls_name):
    transformers = pytest.importorskip("transformers")
    cfg_cls = {"GlmForCausalLM": transformers.GlmConfig, "Glm4ForCausalLM": transformers.Glm4Config}[cls_name]
    cfg = cfg_cls(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                  attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  initializer_range=0.2)
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = glmkit.load(str(tmp_path / "hf")).eval()
    n = 16
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([p])
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)[0, len(p):].tolist()
            want.append(out[: out.index(1)] if 1 in out else out)  # ours leaves the stop id out
    got = [c.token_ids for c in generate(ours, PROMPTS, dataclasses.replace(GREEDY, max_new_tokens=n, stop_ids=(1,)))]
    assert got == want, side_by_side(got, want, f"glmkit (batched) vs transformers {cls_name}.generate greedy tokens")


# ---- batching, determinism, sampling --------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_left_padded_equals_one_by_one(variant):
    model = tiny(**VARIANTS[variant])
    batched = [c.token_ids for c in generate(model, PROMPTS, GREEDY)]
    alone = [generate(model, [p], GREEDY)[0].token_ids for p in PROMPTS]
    ref = [greedy_reference(model, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert alone == ref, side_by_side(alone, ref, "cached greedy vs no-cache argmax")
    assert batched == alone, side_by_side(batched, alone, "batched vs one by one")


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny()
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=16, seed=1234)
    a = [c.token_ids for c in generate(model, PROMPTS, p)]
    b = [c.token_ids for c in generate(model, PROMPTS, p)]
    c = [c.token_ids for c in generate(model, PROMPTS, dataclasses.replace(p, seed=4321))]
    assert a == b, side_by_side(a, b, "same seed")
    assert a != c, f"seeds 1234 and 4321 gave the same tokens: {a}"
    # without a seed, torch's global RNG decides: torch.manual_seed reproduces a run
    p0 = dataclasses.replace(p, seed=None)
    torch.manual_seed(7)
    d = [c.token_ids for c in generate(model, PROMPTS, p0)]
    torch.manual_seed(7)
    e = [c.token_ids for c in generate(model, PROMPTS, p0)]
    assert d == e


def test_temperature_zero_is_greedy_whatever_the_seed_and_filters():
    model = tiny()
    ref = [greedy_reference(model, p, 12) for p in PROMPTS]
    for seed in (0, 1):
        p = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, seed=seed, max_new_tokens=12)
        got = [c.token_ids for c in generate(model, PROMPTS, p)]
        assert got == ref, side_by_side(got, ref, f"temperature 0, seed {seed}")


def test_max_new_tokens_and_finish_reason():
    model = tiny()
    for n in (1, 5):
        outs = generate(model, PROMPTS, SamplingParams(temperature=1.0, seed=0, max_new_tokens=n))
        assert [len(c.token_ids) for c in outs] == [n] * len(PROMPTS)
        assert {c.finish_reason for c in outs} == {"length"}


def test_stop_ids_end_each_row_and_are_left_out():
    model = tiny()
    full = [c.token_ids for c in generate(model, PROMPTS, GREEDY)]
    stop = full[0][3]  # the 4th token of row 0; other rows stop wherever they produce it
    outs = generate(model, PROMPTS, dataclasses.replace(GREEDY, stop_ids=(stop,)))
    for c, f in zip(outs, full):
        if stop in f:
            assert c.token_ids == f[: f.index(stop)] and c.finish_reason == "stop" and c.stop_reason == stop, (c, f)
        else:
            assert c.token_ids == f and c.finish_reason == "length"


def test_logprobs_are_the_models_log_softmax():
    model = tiny()
    p = SamplingParams(temperature=0.8, seed=3, max_new_tokens=6, top_logprobs=3)
    (c,) = generate(model, [PROMPTS[0]], p)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPTS[0] + c.token_ids]))[0].double(), -1)
    T = len(PROMPTS[0])
    want = torch.tensor([logp[T - 1 + i, t].item() for i, t in enumerate(c.token_ids)])
    assert_close(torch.tensor(c.logprobs), want, 1e-5, "chosen-token logprobs vs no-cache log_softmax")
    for i, top in enumerate(c.top_logprobs):
        ref_v, ref_i = logp[T - 1 + i].topk(3)
        assert list(top) == ref_i.tolist(), (i, top, ref_i.tolist())
        assert_close(torch.tensor(list(top.values())), ref_v, 1e-5, f"top-3 logprobs at step {i}")
    # the stream carries the same numbers
    chunks = list(stream(model, [PROMPTS[0]], p))
    assert [x for ch in chunks for x in ch.logprobs] == pytest.approx(c.logprobs)


# ---- the sampling filters against brute force ---------------------------------------------------------
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.1, -2.2, 1.7, 0.0, -0.3, 2.6, 1.1]])


def kept(x):
    return sorted(torch.nonzero(torch.isfinite(x[0])).flatten().tolist())


def filtered(**kw):
    """LOGITS through the whole pipeline with one filter set (temperature 1 divides by 1 exactly)."""
    return process_logits(LOGITS.clone(), param_rows([SamplingParams(**kw)]))


def test_top_k_keeps_the_k_largest():
    for k in range(1, 10):
        want = sorted(sorted(range(10), key=lambda i: -LOGITS[0, i].item())[:k])
        assert kept(filtered(top_k=k)) == want, k


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
    probs = LOGITS[0].double().softmax(-1).tolist()
    order = sorted(range(10), key=lambda i: -probs[i])
    for p in (0.05, 0.3, 0.5, 0.62, 0.8, 0.9, 0.99, 1.0):
        want, mass = [], 0.0
        for i in order:
            if mass >= p:
                break
            want.append(i)
            mass += probs[i]
        assert kept(filtered(top_p=p)) == sorted(want), (p, [round(probs[i], 4) for i in order])


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    probs = LOGITS[0].double().softmax(-1)
    for m in (0.01, 0.1, 0.3, 0.5, 1.0):
        want = [i for i in range(10) if probs[i] >= m * probs.max()]
        assert kept(filtered(min_p=m)) == want, m


def test_penalties_as_hf_and_openai_define_them():
    counts = torch.tensor([[0, 2, 1, 0, 0, 3, 0, 0, 1, 0]], dtype=torch.float)
    seen = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(LOGITS.clone(), param_rows([p]), counts, seen)
    want = []
    for i, x in enumerate(LOGITS[0].tolist()):
        if seen[0, i]:  # HF RepetitionPenaltyLogitsProcessor / CTRL
            x = x / 1.3 if x > 0 else x * 1.3
        c = counts[0, i].item()  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        x = x - c * 0.25 - (c > 0) * 0.5
        want.append(x)
    assert_close(got, torch.tensor([want]), 1e-6, "penalized logits vs the formulas")


def test_filters_match_transformers_processors():
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[0, 1, 4, 7]])
    cases = [
        (SamplingParams(top_k=4), transformers.TopKLogitsWarper(4)),
        (SamplingParams(top_p=0.7), transformers.TopPLogitsWarper(0.7)),
        (SamplingParams(min_p=0.2), transformers.MinPLogitsWarper(0.2)),
    ]
    for params, proc in cases:
        assert kept(process_logits(LOGITS.clone(), param_rows([params]))) == kept(proc(ids, LOGITS.clone())), params
    rep = transformers.RepetitionPenaltyLogitsProcessor(1.5)
    seen = torch.zeros(1, 10, dtype=torch.bool)
    seen[0, ids[0]] = True
    got = apply_penalties(LOGITS.clone(), param_rows([SamplingParams(repetition_penalty=1.5)]), None, seen)
    assert_close(got, rep(ids, LOGITS.clone()), 1e-6, "repetition penalty vs transformers")


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(min_p=-0.1), dict(min_p=2.0), dict(repetition_penalty=0.0), dict(presence_penalty=3.0),
    dict(frequency_penalty=-2.5), dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(seed=-1), dict(stop=[""]),
    dict(stop_ids=[-3]), dict(num_beams=0), dict(top_logprobs=-1), dict(no_repeat_ngram_size=-1),
    dict(stop=["x"], num_beams=2),
])
def test_sampling_params_reject_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"SamplingParams.{name}"):
        SamplingParams(**bad)


# ---- stop strings ------------------------------------------------------------------------------------
class PieceTokenizer:
    """Token i is the string pieces[i]; enough of a tokenizer for StopText."""

    def __init__(self, pieces):
        self.pieces = pieces

    def incremental_decoder(self, skip_special_tokens=False):
        tok = self

        class Dec:
            def add(self, i):
                return tok.pieces[i]

            def flush(self):
                return ""

        return Dec()


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text("ab.\n", min_size=0, max_size=4), min_size=1, max_size=12),
       stops=st.lists(st.text("ab.\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_text_cuts_exactly_and_streams_only_safe_text(pieces, stops):
    # generation stops at the first piece that completes a stop string; the cut is at the earliest
    # stop found in the text up to that piece (a longer stop that would have started earlier never completes)
    text, hits = "", []
    for piece in pieces:
        text += piece
        if hits := [text.find(s) for s in stops if s in text]:
            break
    want = text[: min(hits)] if hits else text
    st_ = StopText(PieceTokenizer(pieces), stops)
    out = ""
    for i in range(len(pieces)):
        out += st_.add(i)
        assert want.startswith(out), (out, want)  # never shows text past the cut
        if st_.matched is not None:
            break
    out += st_.close()
    assert out == want == st_.text, (out, want, pieces, stops)
    assert (st_.matched is not None) == bool(hits)


# ---- a tokenizer and a GLM trained here on blank infilling ----------------------------------------------
POEMS = ["床前 明月 光 ， 疑是 地上 霜 。", "举头 望 明月 ， 低头 思 故乡 。", "白日 依 山 尽 ， 黄河 入 海 流 。",
         "欲穷 千里 目 ， 更上 一层 楼 。", "春眠 不觉 晓 ， 处处 闻 啼鸟 。"]


@pytest.fixture(scope="module")
def tok():
    from glmkit.tokenizer import train_bpe

    return train_bpe(texts=[p.replace(" ", "") for p in POEMS] * 4, vocab_size=300, min_frequency=2)


@pytest.fixture(scope="module")
def trained(tok):
    """A GLM (native rope_2d) that memorises the five lines as blank-infilling examples.

    Examples are built the way `fill` reads a text: the unmasked stretches between blanks are
    encoded whole and each blank's words encoded whole, so Part A's tokens match what fill encodes.
    Every choice of 1-3 non-adjacent words is a blank set; mask tokens are drawn from all three
    kinds per blank, Part B orders at random; `infill.assemble` builds the layout.
    """
    from glmkit.infill import SpecialIds, assemble, collate

    sp = SpecialIds(*(tok.special(r) for r in ("mask", "smask", "gmask", "sop", "eop", "eos")), pad=tok.special("eos"))
    rng = random.Random(0)

    def example(words, chosen):
        ids, spans, run = [], [], ""
        for j, w in enumerate(words):
            if j in chosen:
                ids += tok.encode(run) if run else []
                run, start = "", len(ids)
                ids += tok.encode(w)
                spans.append((start, len(ids)))
            else:
                run += w
        ids += tok.encode(run) if run else []
        order = list(range(len(spans)))
        rng.shuffle(order)
        return assemble(ids, spans, [rng.choice([sp.mask, sp.smask, sp.gmask]) for _ in spans], order, sp)

    pool = [(p.split(), set(c)) for p in POEMS for k in (1, 2, 3) for c in itertools.combinations(range(len(p.split())), k)
            if all(b - a > 1 for a, b in zip(c, c[1:]))]
    data = collate([example(*x) for x in pool for _ in range(2)], pad_id=sp.pad)
    torch.manual_seed(0)
    model = GLM(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ix = torch.randint(0, len(data["sep"]), (32,), generator=g)
        b = {k: v[ix] for k, v in data.items()}
        logits = model(b["input_ids"], b["position_ids"], sep=b["sep"])
        loss = F.cross_entropy(logits[b["loss_mask"]], b["targets"][b["loss_mask"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"\nfill model: final training loss {loss.item():.4f}")
    return model.eval()


def test_fill_restores_the_memorised_lines(trained, tok):
    cases = {
        "床前[MASK]光，[sMASK]地上[gMASK]。": "床前明月光，疑是地上霜。",
        "举头望[MASK]，[gMASK]思故乡。": "举头望明月，低头思故乡。",
        "[gMASK]依山尽，黄河[sMASK]海流。": "白日依山尽，黄河入海流。",
        "欲穷[MASK]目，更上[sMASK]楼。": "欲穷千里目，更上一层楼。",
        "春眠[MASK]晓，[MASK]闻[gMASK]。": "春眠不觉晓，处处闻啼鸟。",
    }
    got = {t: fill(trained, tok, t, SamplingParams(temperature=0, max_new_tokens=8)) for t in cases}
    bad = {t: (r.text, [(s.mask, s.text, s.finish_reason) for s in r.spans]) for t, r in got.items() if r.text != cases[t]}
    assert not bad, "fill got vs want:\n" + "\n".join(f"  {t}: {g} vs {cases[t]}" for t, g in bad.items())
    r = got["床前[MASK]光，[sMASK]地上[gMASK]。"]
    assert [(s.mask, s.text, s.finish_reason) for s in r.spans] == [("[MASK]", "明月", "stop"), ("[sMASK]", "疑是", "stop"), ("[gMASK]", "霜", "stop")]
    assert [r.text[s.start : s.start + len(s.text)] for s in r.spans] == ["明月", "疑是", "霜"]


def test_fill_follows_the_glm_layout_exactly(tok):
    """Each filled token is the argmax of a full no-cache forward over Part A + <sop> span ... with
    GLM's positions (mask position, block positions 1, 2, ...) and sep = len(Part A): later blanks
    see earlier ones, whole (spans here end by length, so the last token must be fed too)."""
    model = tiny(vocab_size=tok.vocab_size, seed=1)
    text = "床前[MASK]光，[sMASK]地上[gMASK]。"
    res = fill(model, tok, text, SamplingParams(temperature=0, max_new_tokens=3))
    pieces = [tok.encode(t) for t in ["床前", "光，", "地上", "。"]]
    masks = [tok.special(r) for r in ("mask", "smask", "gmask")]
    a, mpos = [], []
    for piece, m in zip(pieces, masks + [None]):
        a += piece
        if m is not None:
            mpos.append(len(a))
            a.append(m)
    ids, pos, blk = list(a), list(range(len(a))), [0] * len(a)
    want = []
    for p in mpos:
        ids.append(tok.special("sop"))
        pos.append(p)
        blk.append(1)
        span = []
        for j in range(3):
            with torch.no_grad():
                logits = model(torch.tensor([ids]), torch.tensor([[pos, blk]]), sep=len(a))
            t = int(logits[0, -1].argmax())
            if t == tok.special("eop"):
                break
            span.append(t)
            ids.append(t)
            pos.append(p)
            blk.append(j + 2)
        want.append(span)
    got = [s.token_ids for s in res.spans]
    assert got == want, side_by_side(got, want, "fill spans vs no-cache GLM layout")


def test_fill_errors(tok):
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        fill(tiny(vocab_size=tok.vocab_size), tok, "床前明月光", SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="causal"):
        fill(tiny(vocab_size=tok.vocab_size, position="rope_partial"), tok, "床前[MASK]", SamplingParams(temperature=0))


def test_infill(trained, tok):
    r = infill(trained, tok, "床前", "光，疑是地上霜。", SamplingParams(temperature=0, max_new_tokens=8))
    assert (r.text, r.spans[0].text) == ("床前明月光，疑是地上霜。", "明月")
    # causal model: continues the prefix, stops where the suffix's line would begin; [MASK] in the
    # prefix stays text
    causal = tiny(vocab_size=tok.vocab_size, position="rope_partial")
    r = infill(causal, tok, "x = [MASK] + ", "\n    return x\n", SamplingParams(temperature=0, max_new_tokens=6))
    mid = r.spans[0].text
    assert r.text == "x = [MASK] + " + mid + "\n    return x\n" and "return x" not in mid
    assert G.causal_infill_stops(") + 1\n") == ("\n", ") + 1")  # the middle ends inside this line
    assert G.causal_infill_stops("\n\n    return x\n") == ("return x",)  # it runs until the next line
    assert G.causal_infill_stops("") == ()


class ScriptedGLM(GLM):
    """A real GLM (cache writes, masks and positions all run) whose logits are replaced: the token
    after position p is script[p - start] (the last one repeats). Drives the loop with known text."""

    script: list[int] = []
    start = 0

    def step(self, input_ids, position_ids, cache, slots, **kw):
        logits = super().step(input_ids, position_ids, cache, slots, **kw)
        j = (self._positions(input_ids, position_ids)[0] - self.start).clamp(0, len(self.script) - 1)[:, -logits.shape[1]:]  # (B, T) or (B, 1)
        return torch.full_like(logits, -10.0).scatter_(-1, torch.tensor(self.script)[j][..., None], 10.0)


def scripted(tok, text, prompt_len, then=()):
    torch.manual_seed(0)
    model = ScriptedGLM(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=32)).eval()
    model.script, model.start = tok.encode(text) + list(then), prompt_len - 1
    return model


# characters the BPE never saw: each is split into byte tokens, so text and tokens do not align
GOOSE = "鹅鹅鹅，曲项向天歌。白毛浮绿水"


def test_scripted_text_is_split_inside_characters(tok):
    ids = tok.encode(GOOSE)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "want byte tokens that end mid-character"


@pytest.mark.parametrize("stop", ["鹅，", "项向", "。白", "歌。", "水", "鹅", "绿水!", "zz"])
def test_stop_strings_cut_exactly_across_tokens(tok, stop):
    prompt = tok.encode("床前")
    model = scripted(tok, GOOSE, len(prompt))
    p = SamplingParams(temperature=0, max_new_tokens=len(tok.encode(GOOSE)), stop=("不在", stop))
    want = GOOSE[: GOOSE.index(stop)] if stop in GOOSE else GOOSE
    (c,) = generate(model, [prompt], p, tok)
    reason = ("stop", stop) if stop in GOOSE else ("length", None)
    assert (c.text, c.finish_reason, c.stop_reason) == (want, *reason), (c.text, want)
    chunks = [ch.text for ch in stream(model, [prompt], p, tok)]
    assert "".join(chunks) == want and not any("\ufffd" in t for t in chunks), chunks


def test_chat_renders_the_template_stops_and_streams_whole_characters(tok):
    msgs = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "床前明月光"},
            {"role": "assistant", "content": "疑是地上霜。"}, {"role": "user", "content": "咏鹅"}]
    ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
    model = scripted(tok, "\n" + GOOSE, len(ids), then=[tok.special("user")])
    p = SamplingParams(temperature=0.7, seed=0, max_new_tokens=64)
    c = chat(model, tok, msgs, p)
    assert (c.text, c.finish_reason, c.stop_reason) == (GOOSE, "stop", tok.special("user"))
    assert c.token_ids == tok.encode("\n" + GOOSE)
    pieces = list(chat_stream(model, tok, msgs, p))
    assert "".join(pieces) == GOOSE and not any("\ufffd" in t for t in pieces), pieces
    assert len(pieces) > 3  # it did stream


def test_chat_equals_generate_on_the_rendered_prompt(tok):
    model = tiny(vocab_size=tok.vocab_size, seed=5)
    msgs = [{"role": "user", "content": "床前明月光"}]
    p = SamplingParams(temperature=1.0, seed=0, max_new_tokens=24)
    ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
    (ref,) = generate(model, [ids], dataclasses.replace(p, stop_ids=tuple(tok.chat_stop_ids())), tok)
    c = chat(model, tok, msgs, p)
    assert c.token_ids == ref.token_ids
    assert c.finish_reason == "length" or c.stop_reason in tok.chat_stop_ids()


# ---- beam search ----------------------------------------------------------------------------------------
def test_beam_one_equals_greedy():
    model = tiny()
    full = [greedy_reference(model, p, 10) for p in PROMPTS]
    stop = full[1][4]
    for stop_ids in ((), (stop,)):
        p = SamplingParams(num_beams=1, max_new_tokens=10, stop_ids=stop_ids)
        got = [beam_search(model, q, p)[0].token_ids for q in PROMPTS]
        want = [greedy_reference(model, q, 10, stop_ids) for q in PROMPTS]
        assert got == want, side_by_side(got, want, f"beam 1 vs greedy, stop ids {stop_ids}")


@torch.no_grad()
def seq_logprob(model, prompt, seqs):
    """Sum of log-probabilities of each continuation in seqs (all the same length), no cache."""
    x = torch.tensor([prompt + s for s in seqs])
    logp = torch.log_softmax(model(x).double(), -1)
    T = len(prompt)
    return [sum(logp[i, T - 1 + j, t].item() for j, t in enumerate(s)) for i, s in enumerate(seqs)]


def test_beam_search_against_brute_force():
    model = tiny(vocab_size=5, seed=3, init_std=0.5)
    prompt, n = [1, 2, 3], 3
    # width 25 = 5**2 keeps every prefix alive: the best hypothesis is the best of all 125 sequences
    every = [list(s) for s in itertools.product(range(5), repeat=n)]
    scores = seq_logprob(model, prompt, every)
    best = max(range(len(every)), key=scores.__getitem__)
    (c,) = beam_search(model, prompt, SamplingParams(num_beams=25, max_new_tokens=n))
    assert c.token_ids == every[best], (c.token_ids, every[best], c.score, scores[best])
    assert c.score == pytest.approx(scores[best] / n, abs=1e-5)  # length_penalty 1: mean log-probability
    # width 2 against a plain re-statement of beam search over full forwards
    beams = [([], 0.0)]
    for _ in range(n):
        cands = [h + [t] for h, _ in beams for t in range(5)]
        beams = sorted(zip(cands, seq_logprob(model, prompt, cands)), key=lambda x: -x[1])[:2]
    got = beam_search(model, prompt, SamplingParams(num_beams=2, max_new_tokens=n), n_best=2)
    assert [g.token_ids for g in got] == [h for h, _ in beams], ([g.token_ids for g in got], beams)
    assert [g.score for g in got] == pytest.approx([s / n for _, s in beams], abs=1e-5)


def test_no_repeat_ngram():
    model = tiny(seed=4)
    for p in (SamplingParams(num_beams=3, max_new_tokens=30, no_repeat_ngram_size=2),
              SamplingParams(temperature=0, max_new_tokens=30, no_repeat_ngram_size=2)):
        for c in generate(model, PROMPTS[:2], p):
            grams = list(zip(c.token_ids, c.token_ids[1:]))
            assert len(grams) == len(set(grams)), (p.num_beams, c.token_ids)


# ---- the decode step: static shapes, compiled -------------------------------------------------------------
@torch.no_grad()
def _steps(model, step_fn, n=6):
    """Logits of n decode steps after a left-padded prefill, feeding argmax tokens."""
    ids, mask = G._left_pad(PROMPTS, "cpu")
    cache = model.new_cache(len(PROMPTS), ids.shape[1] + n)
    logits = model.prefill(ids, cache, attention_mask=mask)[:, -1]
    pos = mask.sum(-1)
    out = []
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)
        logits = step_fn(model, cache, tok, pos)
        pos = pos + 1
        out.append(logits)
    return torch.stack(out)


def _static(fn=None):
    def step(model, cache, tok, pos):
        index = torch.tensor([cache.length])
        position = torch.stack((pos, torch.zeros_like(pos)), 1)[:, :, None]  # (B, 2, 1)
        if fn is None:
            return decode_one(model, cache, tok, position, index)
        logits = fn(model, cache, tok, position, index)
        cache.length += 1
        return logits
    return step


def test_static_decode_step_equals_prefill(monkeypatch):
    """The step torch.compile sees (every slot of the cache, masked) and decode_one's eager step (the
    slots written so far) give GLM.prefill's logits (the fused step is compared in test_kernels.py)."""
    monkeypatch.setattr(fused, "decode_step", lambda *a, **k: None)
    model = tiny()
    want = _steps(model, lambda m, c, t, p: m.prefill(t, c, p[:, None])[:, -1])
    assert_close(_steps(model, _static(G._static_step)), want, 1e-5, "static step (whole cache, masked) vs prefill")
    assert_close(_steps(model, _static()), want, 1e-5, "decode_one vs prefill")


def test_compiled_decode_graph_equals_eager(monkeypatch):
    """torch.compile's graph capture of the decode step (cache writes included), without inductor's
    C++ build: aot_eager. The inductor version is the slow test below. A compiled graph calls
    F.linear, so eager does too here (native kernels off; they are compared in test_kernels.py)."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    model = tiny()
    fn = torch.compile(G._static_step, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_close(_steps(model, _static(fn)), _steps(model, _static(G._static_step)), 1e-6, "aot_eager-compiled vs eager decode")


@pytest.mark.slow
def test_compiled_decode_equals_eager_inductor(monkeypatch):
    """Inductor on CPU: ~40 s of compilation on a busy 2-core machine.

    Pitfall (torch 2.13): inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY. Kernels cached
    by a run with the machine's own dispatch (AVX-512 here), reused by a run forced to avx2, gave NaN
    logits; a fresh cache gave the right ones. So a forced dispatch gets a cache of its own."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"glmkit-inductor-{cap}"))
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    model = tiny()
    fn = torch.compile(G._static_step, fullgraph=True, dynamic=False)
    assert_close(_steps(model, _static(fn)), _steps(model, _static(G._static_step)), 1e-5, "inductor-compiled vs eager decode")
    want = [c.token_ids for c in generate(model, PROMPTS, GREEDY)]
    got = [c.token_ids for c in generate(model, PROMPTS, GREEDY, compile=True)]
    assert got == want, side_by_side(got, want, "generate(compile=True) vs eager")


# ---- command line -----------------------------------------------------------------------------------------
def test_cli_fill_and_chat(tmp_path, trained, tok, capsys):
    from glmkit.convert import write_checkpoint

    tok.save(tmp_path / "tok")
    write_checkpoint(trained, tmp_path / "m", extra_files=[tmp_path / "tok" / "tokenizer.json"])
    assert cli.fill_main(["床前[MASK]光，疑是地上霜。", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "床前明月光，疑是地上霜。"
    assert "device cpu, dtype float32" in out.err
    stdin = io.StringIO("你好\n/reset\n再见\n/exit\nnot read\n")
    stdout = io.StringIO()
    assert cli.chat_main(["--model", str(tmp_path / "m"), "--max-new-tokens", "3", "--seed", "0"], stdin, stdout) == 0
    assert "(history cleared)" in stdout.getvalue()
    assert cli.generate_main(["--model", str(tmp_path / "m"), "--prompt", "床前", "--max-new-tokens", "3"]) == 0


def test_cli_without_model_says_what_to_do(monkeypatch, tmp_path):
    import glmkit.convert

    monkeypatch.setattr(glmkit.convert, "DEFAULT_MODEL", tmp_path / "none")  # an install without the embedded model
    for main, argv in ((cli.fill_main, ["x[MASK]"]), (cli.generate_main, ["--prompt", "x"]), (cli.chat_main, [])):
        with pytest.raises(glmkit.convert.CheckpointError, match="no embedded default model .* pass --model"):
            main(argv)
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        cli.fill_main(["x[MASK]", "--top-p", "0"])
    with pytest.raises(ValueError, match="preset"):
        cli.generate_main(["--model", "debug", "--prompt", "x"])


def test_cli_preset_with_a_tokenizer(tmp_path, tok, capsys):
    tok.save(tmp_path / "tok")
    argv = ["--model", "debug", "--tokenizer", str(tmp_path / "tok"), "--prompt", "床前", "--max-new-tokens", "4", "--seed", "0"]
    assert cli.generate_main(argv) == 0
    assert "[length: 4 tokens" in capsys.readouterr().err
