"""Constrained decoding (glmkit.constrain over llguidance): the sampler's masks, generate, the engine.

The tiny random model of tests.serving samples at temperature 1, so whatever it writes comes from the
mask alone: every output must parse and validate (`jsonschema_rs` is the reference for JSON
schemas, Python's `re` for regular expressions)."""

import json
import re

import jsonschema_rs
import pytest
import torch

from glmkit.constrain import Constraint, ConstraintVocab
from glmkit.engine import Engine, Request
from glmkit.errors import ParameterError
from glmkit.generate import generate
from glmkit.sampling import Sampler, SamplingParams
from tests.serving import CHAT, assert_error, make_model, serve

# bounded, so a random model always reaches the end within max_new_tokens
SCHEMAS = {
    "enum_and_range": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                                       "n": {"type": "integer", "minimum": -5, "maximum": 120}},
                       "required": ["colour", "n"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                   "ok": {"type": "boolean"}},
                  "required": ["x", "ok"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["point", "tags"], "additionalProperties": False},
    "strings": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
                                                 "after": {"enum": ["x"]}},
                "required": ["name", "code", "after"], "additionalProperties": False},
}


def run(model, tok, constraint, seeds=(0, 1), rows=4, max_new_tokens=60, finished=True, **kw):
    """Texts of `rows` sampled sequences per seed (one generate batch each), all of which must have stopped
    (`finished`; else only those that did)."""
    ids = tok.encode("Hello there")
    texts = []
    for seed in seeds:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, constraint=constraint, **kw)
        for c in generate(model, [ids] * rows, params, tok):
            assert c.finish_reason == "stop" or (not finished and c.finish_reason == "length"), (c.finish_reason, c.text, c.error)
            if c.finish_reason == "stop":
                texts.append(c.text)
    return texts


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_json_validates_against_its_schema(model, tok, name):
    schema = SCHEMAS[name]
    texts = run(model, tok, Constraint.json_schema(schema), seeds=(0,), rows=6)
    for text in texts:
        jsonschema_rs.validate(schema, json.loads(text))  # raises, naming the fault
    # properties come out in the schema's order (as OpenAI's strict mode writes them), not sorted
    assert all(t.startswith('{"' + next(iter(schema["properties"])) + '": ') for t in texts), texts


def test_json_object_regex_and_choice_outputs_match(model, tok):
    # any JSON object: nothing bounds its strings, so a random model may run to max_new_tokens; those that end parse
    texts = run(model, tok, Constraint.json_object(), seeds=(0,), max_new_tokens=30, finished=False)
    for p in ("The quick", "def add", "床前明月光"):  # and greedy, which the random model ends quickly
        (c,) = generate(model, [tok.encode(p)], SamplingParams(max_new_tokens=30, temperature=0,
                                                                 constraint=Constraint.json_object()), tok)
        texts += [c.text] if c.finish_reason == "stop" else []
    assert len(texts) >= 2, texts
    for text in texts:
        assert isinstance(json.loads(text), dict), text
    pattern = r"[0-9]{2,4}-(ab|cd)"
    for text in run(model, tok, Constraint.regex(pattern)):
        assert re.fullmatch(pattern, text), text
    options = ["positive", "negative", "neutral"]
    texts = run(model, tok, Constraint.choice(options), seeds=(0, 1))
    assert set(texts) <= set(options) and len(set(texts)) > 1, texts  # sampled, and only ever a choice


@pytest.fixture(scope="module")
def vocab(model, tok):
    return ConstraintVocab.of(tok, model.cfg.vocab_size)


def test_a_forbidden_token_is_never_drawn_however_the_logits_prefer_it(tok, vocab):
    """Logits that put all their mass on one token the grammar forbids (and on a padded id past the
    tokenizer's vocabulary): greedy and sampled rows draw allowed tokens only, the logprobs are those of
    the masked logits, and the row follows the grammar to its end, then to its stop ids and nothing else."""
    V = vocab.n_vocab + 20  # a model whose embedding is padded past the tokenizer
    vocab = ConstraintVocab.of(tok, V)
    digit = tok.encode("7")[0]
    letter = tok.encode("x")[0]
    stops = (tok.special("eos"), tok.special("user"), tok.special("observation"))  # a chat format's several
    c = Constraint.regex("[0-9]{3}")
    s = Sampler(2, V, "cpu", vocab)
    s.join(SamplingParams(temperature=0, constraint=c, stop_ids=stops, logprobs=True), [1], 0)
    s.join(SamplingParams(temperature=1.0, constraint=c, stop_ids=stops, logprobs=True), [1], 0)
    for step in range(4):
        logits = torch.zeros(2, V)
        logits[:, letter] = 50.0  # what the model "wants"
        logits[:, V - 1] = 60.0  # a padded id no tokenizer token stands for
        logits[:, digit] = 1.0
        masked = s._constrain(logits)  # what the draw sees (the matchers are only read)
        drawn, lp, _, finite = s(logits)
        assert finite.all()
        want = torch.log_softmax(masked, -1).gather(-1, drawn[:, None])[:, 0]
        torch.testing.assert_close(lp, want)  # the masked model's log-probabilities, before temperature
        if step < 3:
            assert all(tok.decode([t]).isdigit() for t in drawn.tolist()), (step, drawn.tolist())
            assert drawn[0] == digit  # greedy: the best allowed token
        else:  # three digits written: only the stop ids remain
            for row in masked:
                assert set(torch.isfinite(row).nonzero().flatten().tolist()) == set(stops), row
            assert set(drawn.tolist()) <= set(stops)
        s.update(drawn)
    # the same logits without a constraint draw the forbidden letter: the mask is what kept it out
    free = Sampler(1, V, "cpu")
    free.join(SamplingParams(temperature=0), [1], 0)
    logits = torch.zeros(1, V)
    logits[:, letter] = 50.0
    assert free(logits).tokens.tolist() == [letter]


def test_constrained_and_unconstrained_rows_in_one_engine_batch(model, tok, vocab):
    """A constrained row beside an unconstrained one: the constrained tokens equal generate()'s (greedy and
    seeded), and the unconstrained row's equal what it draws alone."""
    ids, other = tok.encode("Hello there"), tok.encode("The quick brown")
    schema = SCHEMAS["enum_and_range"]
    eos = (tok.special("eos"),)
    cons = [SamplingParams(max_new_tokens=40, temperature=t, seed=5, constraint=Constraint.json_schema(schema), stop_ids=eos)
            for t in (0.0, 1.0)]
    free = SamplingParams(max_new_tokens=12, temperature=1.0, seed=9)
    alone = generate(model, [other], free)[0].token_ids
    expect = [generate(model, [ids], p, tok)[0].token_ids for p in cons]
    eng = Engine(model, max_batch=4, constraint_vocab=vocab)
    reqs = [eng.submit(Request(ids, cons[0])), eng.submit(Request(other, free)), eng.submit(Request(ids, cons[1]))]
    while eng.has_work():
        eng.step()
    assert [r.finish_reason for r in reqs] == ["stop", "length", "stop"], [(r.finish_reason, r.error) for r in reqs]
    assert reqs[1].output_ids == alone
    for r, want in zip((reqs[0], reqs[2]), expect):
        assert r.output_ids == want, (tok.decode(r.output_ids), tok.decode(want))
        jsonschema_rs.validate(schema, json.loads(tok.decode(r.output_ids)))


def test_a_row_from_the_prompt_cache_is_constrained_too(model, tok, vocab):
    """The second request's prompt is served whole from the prompt cache (its logits kept from the first
    prefill): its first token is masked all the same, and the cached logits are not written over."""
    ids = tok.encode("Hello there")
    p = SamplingParams(max_new_tokens=30, temperature=0, constraint=Constraint.choice(["yes", "no"]),
                       stop_ids=(tok.special("eos"),))
    eng = Engine(model, max_batch=2, constraint_vocab=vocab)
    first = eng.submit(Request(ids, p, cache_scope="k"))
    while eng.has_work():
        eng.step()
    second = eng.submit(Request(ids, p, cache_scope="k"))
    while eng.has_work():
        eng.step()
    assert second.cached_tokens == len(ids)
    assert tok.decode(first.output_ids) in ("yes", "no") and second.output_ids == first.output_ids
    free = eng.submit(Request(ids, SamplingParams(max_new_tokens=1, temperature=0), cache_scope="k"))
    while eng.has_work():
        eng.step()
    assert free.output_ids == generate(model, [ids], SamplingParams(max_new_tokens=1, temperature=0))[0].token_ids


def test_max_tokens_cuts_a_constrained_sequence_with_length(model, tok):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 20, "maxLength": 30}}, "required": ["s"]}
    (c,) = generate(model, [tok.encode("Hi")], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0,
                                                              constraint=Constraint.json_schema(schema)), tok)
    assert c.finish_reason == "length" and len(c.token_ids) == 4 and c.text.startswith('{"s"'), c


def test_a_failed_matcher_ends_its_row_alone_with_error(model, tok, vocab):
    ids = tok.encode("Hello there")
    eos = (tok.special("eos"),)
    eng = Engine(model, max_batch=2, constraint_vocab=vocab)
    bad = eng.submit(Request(ids, SamplingParams(max_new_tokens=20, temperature=0, constraint=Constraint.regex("[a-z]+"),
                                                 stop_ids=eos)))
    good = eng.submit(Request(ids, SamplingParams(max_new_tokens=8, temperature=0)))
    eng.step()
    eng.step()
    eng.sampler.matchers[0].consume_token(tok.encode("7")[0])  # a digit the grammar forbids: llguidance's error state
    while eng.has_work():
        eng.step()
    assert bad.finish_reason == "error" and "constraint" in bad.error and "7" in bad.error, (bad.finish_reason, bad.error)
    assert good.finish_reason == "length" and len(good.output_ids) == 8


def test_refusals_name_what_is_wrong(model, tok, vocab):
    c = Constraint.json_object()
    with pytest.raises(ParameterError, match="beam search") as e:
        SamplingParams(num_beams=2, constraint=c)
    assert e.value.param == "constraint"
    with pytest.raises(ParameterError, match="Constraint"):
        SamplingParams(constraint={"type": "object"})
    ids = [tok.encode("Hi")]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, SamplingParams(constraint=c))
    with pytest.raises(ValueError, match="invalid regex constraint"):
        generate(model, ids, SamplingParams(constraint=Constraint.regex("(unclosed")), tok)
    with pytest.raises(ValueError, match="invalid lark constraint"):
        generate(model, ids, SamplingParams(constraint=Constraint.lark("start: undefined_rule")), tok)
    with pytest.raises(ValueError, match="constraint_vocab"):
        Engine(model, max_batch=1).submit(Request(ids[0], SamplingParams(constraint=c, stop_ids=(0,))))
    with pytest.raises(ValueError, match="stop_ids"):
        Engine(model, max_batch=1, constraint_vocab=vocab).submit(Request(ids[0], SamplingParams(constraint=c)))


# ---- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal(tok):
    return make_model(tok, "rope_partial")  # GLM-4's layout: completions read [gMASK] <sop> prompt, chat its template


@pytest.fixture()
def causal_client(causal, tok):
    from fastapi.testclient import TestClient

    from glmkit.server.app import create_app

    with TestClient(create_app(causal, tok, "glm4-tiny")) as c:
        yield c


def test_server_constraints_equal_generate_and_hold_per_choice(causal_client, causal, tok):
    c, eos = causal_client, (tok.special("eos"),)
    schema = SCHEMAS["enum_and_range"]
    # greedy: the server's text is generate()'s on the same layout (the engine's equality is tested above)
    r = c.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 40, "temperature": 0, "guided_json": schema}).json()
    (want,) = generate(causal, [[tok.special("gmask"), tok.special("sop")] + tok.encode("Hello there")],
                       SamplingParams(max_new_tokens=40, temperature=0, stop_ids=eos, constraint=Constraint.json_schema(schema)), tok)
    assert r["choices"][0]["text"] == want.text and r["choices"][0]["finish_reason"] == "stop", (r, want.text)
    jsonschema_rs.validate(schema, json.loads(want.text))
    chat = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 40, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}}}).json()
    want = chat_reply(causal, tok, CHAT, SamplingParams(max_new_tokens=40, temperature=0, constraint=Constraint.json_schema(schema)))
    assert chat["choices"][0]["message"]["content"] == want.text, (chat, want.text)
    # sampled: each of n choices and each prompt of a batch has its own matcher
    pattern = r"[0-9]{2,4}-(ab|cd)"
    r = c.post("/v1/completions", json={"prompt": ["Hi", "The quick"], "n": 3, "max_tokens": 20, "temperature": 1.0,
                                        "seed": 4, "guided_regex": pattern}).json()
    assert len(r["choices"]) == 6 and all(re.fullmatch(pattern, ch["text"]) for ch in r["choices"]), r["choices"]
    options = ["alpha", "beta", "gamma"]
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "n": 4, "max_tokens": 10, "seed": 1,
                                             "structured_outputs": {"choice": options}}).json()
    assert all(ch["message"]["content"] in options and ch["finish_reason"] == "stop" for ch in r["choices"]), r
    r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10, "guided_grammar": 'start: ("yes" | "no") "!"'}).json()
    assert r["choices"][0]["text"] in ("yes!", "no!"), r
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 30, "temperature": 0,
                                             "response_format": {"type": "json_object"}}).json()
    assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict), r
    # a constraint cut by max_tokens ends "length", as OpenAI's does
    r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "guided_json": {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 10}}, "required": ["s"]}}).json()
    assert r["choices"][0]["finish_reason"] == "length", r


def chat_reply(model, tok, messages, params):
    from glmkit.generate import chat

    return chat(model, tok, messages, params)


def test_server_refuses_bad_or_several_constraints_before_any_work(causal_client, monkeypatch):
    c = causal_client
    chat = lambda **kw: c.post("/v1/chat/completions", json={"messages": CHAT, **kw})
    done = lambda **kw: c.post("/v1/completions", json={"prompt": "Hi", **kw})
    monkeypatch.setattr(c.app.state.server.tok, "encode", lambda *a, **k: pytest.fail("tokenized a refused request"))
    err = assert_error(done(guided_json={"type": "foo"}), 400, param="guided_json")
    assert "Invalid type: foo" in err["message"], err
    err = assert_error(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}), 400, param="response_format")
    assert "minimum" in err["message"], err
    assert_error(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "string", "format": "made-up"}}}), 400, param="response_format")  # strict: an unknown format is refused
    assert "regex" in assert_error(done(guided_regex="(unclosed"), 400, param="guided_regex")["message"]
    assert "undefined_rule" in assert_error(done(guided_grammar="start: undefined_rule"), 400, param="guided_grammar")["message"]
    assert "undefined_rule" in assert_error(done(structured_outputs={"grammar": "start: undefined_rule"}), 400,
                                            param="structured_outputs.grammar")["message"]
    err = assert_error(chat(response_format={"type": "json_object"}, guided_regex="a+"), 400, param="guided_regex")
    assert "response_format" in err["message"] and "guided_regex" in err["message"], err
    err = assert_error(done(guided_choice=["a"], structured_outputs={"regex": "b"}), 400)
    assert "guided_choice" in err["message"] and "structured_outputs.regex" in err["message"], err
    assert_error(done(structured_outputs={}), 400, param="structured_outputs")
    assert_error(chat(response_format={"type": "json_schema"}), 400, param="response_format")
    assert_error(chat(response_format={"type": "xml"}), 400)
    # what only the vocabulary shows: a pattern no token can begin (an empty language)
    err = assert_error(done(guided_regex=r"[^\s\S]"), 400, param="guided_regex")
    assert "constraint" in err["message"], err
    assert_error(done(guided_json=False), 400, param="guided_json")  # the schema false admits nothing


def test_the_schema_true_admits_any_json_value(causal_client):
    r = causal_client.post("/v1/completions", json={"prompt": "Hi", "guided_json": True, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    (ch,) = r.json()["choices"]
    if ch["finish_reason"] == "stop":
        json.loads(ch["text"])


def test_official_openai_client_structured_output(causal, tok):
    import openai

    from glmkit.server.app import create_app

    schema = SCHEMAS["nested"]
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": schema, "strict": True}}
    with serve(create_app(causal, tok, "glm4-tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="glm4-tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=3, n=2,
                                           response_format=fmt)
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch
            jsonschema_rs.validate(schema, json.loads(ch.message.content))
        stream = client.chat.completions.create(model="glm4-tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=3,
                                                response_format=fmt, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == r.choices[0].message.content  # choice 0 of the same seed, streamed
        r = client.completions.create(model="glm4-tiny", prompt="Hi", max_tokens=10, extra_body={"guided_choice": ["on", "off"]})
        assert r.choices[0].text in ("on", "off")
        with pytest.raises(openai.BadRequestError, match="guided_regex"):
            client.completions.create(model="glm4-tiny", prompt="Hi", extra_body={"guided_regex": "("})


def sentencepiece(kind: str):
    """A SentencePiece model trained here (byte fallback, as ChatGLM2/3's BPE), read by glmkit, with an end of text."""
    import io

    import sentencepiece as spm

    from glmkit.tokenizer import Tokenizer
    from tests.serving import TEXTS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS + ['{"temp": 21} 12 34'] * 5), model_writer=buf, vocab_size=400,
                                   model_type=kind, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return Tokenizer.from_sentencepiece(buf.getvalue(), extra_specials=("<|endoftext|>",))


def test_sentencepiece_vocabularies_bpe_constrained_unigram_refused_clearly():
    """ChatGLM2/3's SentencePiece BPE (spaces as "▁", byte fallback) is read by the grammar engine: a
    constrained draw from random logits decodes to the pattern. A unigram model's decoder (original GLM's,
    ChatGLM-6B's) is not: refused with a ValueError that says so, before any row starts."""
    from glmkit.sampling import check_constrainable

    tok = sentencepiece("bpe")
    V, eos = tok.vocab_size, tok.special("eos")
    s = Sampler(1, V, "cpu", ConstraintVocab.of(tok, V))
    pattern = r"[a-z]+ [0-9]{2}"
    s.join(SamplingParams(temperature=1.0, constraint=Constraint.regex(pattern), stop_ids=(eos,)), [1], 0)
    out, g = [], torch.Generator().manual_seed(0)
    for _ in range(40):
        t = s(torch.randn(1, V, generator=g) * 3).tokens
        if t.item() == eos:
            break
        out.append(t.item())
        s.update(t)
    assert t.item() == eos and re.fullmatch(pattern, tok.decode(out)), (out, tok.decode(out))
    uni = sentencepiece("unigram")
    params = SamplingParams(constraint=Constraint.json_object(), stop_ids=(uni.special("eos"),))
    with pytest.raises(ValueError, match="cannot read this tokenizer"):
        check_constrainable(params, ConstraintVocab.of(uni, uni.vocab_size))


def test_a_chat_reply_may_open_with_its_template_newline(causal_client, tok, vocab, monkeypatch):
    """GLM-4's replies start with "\\n" after <|assistant|> (the chat layer drops it): a constraint in a
    chat keeps that newline allowed, once, before the match; compact JSON allows no other whitespace."""
    nl, brace = tok.encode("\n")[0], tok.encode("{")[0]
    eos = (tok.special("eos"),)
    V = vocab.n_vocab
    drawn = {}
    for c in (Constraint.json_object(), Constraint.json_object().after_newline()):
        s = Sampler(1, V, "cpu", vocab)
        s.join(SamplingParams(temperature=0, constraint=c, stop_ids=eos), [1], 0)
        out = []
        for _ in range(2):
            logits = torch.zeros(1, V)
            logits[0, nl], logits[0, brace] = 9.0, 1.0  # the model wants its newline, every time
            out.append(s(logits).tokens.item())
            s.update(torch.tensor(out[-1:]))
        drawn[c.newline_first] = out
    assert drawn[True] == [nl, brace] and drawn[False][0] == brace and nl not in drawn[False], drawn
    seen = []  # the chat route asks for the newline-first form of the request's constraint; completions do not
    engine = causal_client.app.state.server.engine
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda req: seen.append(req.params.constraint) or submit(req))
    causal_client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "guided_regex": "[0-9]+"})
    causal_client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "guided_regex": "[0-9]+"})
    assert [c.newline_first for c in seen] == [True, False], seen


def test_a_regex_digit_is_an_ascii_digit(tok):
    """\\d admits 0-9 only: llguidance's bare regexes take every Unicode digit, whose tables are newer than
    Python's (a random GLM-4-sized model drew U+1E5F8 for \\d, which `re` does not call a digit)."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from glmkit.tokenizer import Tokenizer

    t = Tokenizer(HFTokenizer.from_str(tok.tok.to_str()))  # a copy: the session tokenizer is shared
    others = ["١٢", "٣", "１", "𞗸"]  # Arabic-Indic, fullwidth, Nag Mundari digits
    t.tok.add_tokens(others)
    ids = [t.token_id(o) for o in others]
    v = ConstraintVocab(t, t.vocab_size)
    m = v.matcher(Constraint.regex(r"\d+"))
    mask = torch.zeros(1, v.words, dtype=torch.int32)
    v.fill([m], mask)
    words = mask.numpy().view(np.uint32)[0]
    allowed = [i for i in range(t.vocab_size) if (words[i // 32] >> (i % 32)) & 1]
    assert allowed and not set(ids) & set(allowed), [t.tok.id_to_token(i) for i in set(ids) & set(allowed)]
    assert all(t.decode([i]).isascii() and t.decode([i]).isdigit() for i in allowed), [t.decode([i]) for i in allowed][:20]
