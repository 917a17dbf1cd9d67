"""Tool calling (glmkit.tools and the chat route): prompts rendered token for token as GLM-4's chat template
and ChatGLM3's tokenizer render them, replies parsed whole and streamed (every split of the text), the
grammars that force a call checked with llguidance's matcher, and the server through the official client.

The expected prompts are written out here as the published formats print them (the Chinese preamble, the
function JSON with indent 4, the metadata line), then tokenized with the reference encoders (the BPE with
its special tokens recognized; SentencePiece called once per piece, as ChatGLM3's remote code calls it).
"""

import dataclasses
import json
import re

import pytest

from glmkit import tools
from glmkit.chat import FORMATS
from glmkit.constrain import JSON_OPTIONS
from tests.test_chat_formats import CHATGLM3_SPECIALS, show, sp_model, sp_tokenizer  # noqa: F401 (sp_model: a fixture)

WEATHER = {"name": "get_weather", "description": "查询天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                           "additionalProperties": False}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
NAMES = ["get_weather", "get_time"]
# the function objects as `tojson(indent=4)` prints them (non-ASCII kept), written out by hand
WEATHER_JSON = """{
    "name": "get_weather",
    "description": "查询天气",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {
                "type": "string",
                "maxLength": 8
            },
            "days": {
                "type": "integer",
                "minimum": 1,
                "maximum": 7
            }
        },
        "required": [
            "city"
        ],
        "additionalProperties": false
    }
}"""
TIME_JSON = """{
    "name": "get_time",
    "parameters": {
        "type": "object",
        "properties": {
            "tz": {
                "enum": [
                    "UTC",
                    "CET"
                ]
            }
        },
        "additionalProperties": false
    }
}"""
NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
GLM4_TOOLS_TURN = ("<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
                   f"\n\n## get_weather\n\n{WEATHER_JSON}{NOTE}\n\n## get_time\n\n{TIME_JSON}{NOTE}")
# a conversation with a system prompt, two parallel calls, their two results, and a question after them
CONV = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "北京和上海的天气?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海", "days": 2}'}}]},
        {"role": "observation", "content": '{"temp": 21}'}, {"role": "observation", "content": '{"temp": 25}'}]


def counter():
    n = iter(range(10**6))
    return lambda: f"call_{next(n)}"


# ---- rendering ------------------------------------------------------------------------------------------
def test_glm4_tools_prompt_is_the_published_template(tok):
    """GLM-4-9B-chat's chat_template: the tools' system turn (preamble, "# 可用工具", "## name", the function
    JSON, the closing sentence per function), the client's system prompt as its own turn, each call its own
    `<|assistant|>name\\n{arguments}` turn, each result its own `<|observation|>\\n` turn."""
    fmt = FORMATS["glm4"]
    ids, mask = tools.render(fmt, tok, CONV, tools.check_tools(TOOLS), add_generation_prompt=True)
    text = ("[gMASK]<sop>" + GLM4_TOOLS_TURN + "<|system|>\n简短回答<|user|>\n北京和上海的天气?"
            '<|assistant|>get_weather\n{"city": "北京"}<|assistant|>get_weather\n{"city": "上海", "days": 2}'
            '<|observation|>\n{"temp": 21}<|observation|>\n{"temp": 25}<|assistant|>')
    want = tok.encode(text, allow_special=True)
    assert ids == want, show(ids, want)
    # the calls are learned (SFT) as assistant replies, each ended by the next role token
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == 'get_weather\n{"city": "北京"}<|assistant|>get_weather\n{"city": "上海", "days": 2}<|observation|>'
    # text before the calls is its own plain turn; a conversation without tools renders as before
    said = [CONV[1], {**CONV[2], "content": "我查一下"}]
    ids, _ = tools.render(fmt, tok, said, [], add_generation_prompt=False)
    want = tok.encode('[gMASK]<sop><|user|>\n北京和上海的天气?<|assistant|>\n我查一下<|assistant|>get_weather\n{"city": "北京"}'
                      '<|assistant|>get_weather\n{"city": "上海", "days": 2}<|endoftext|>', allow_special=True)
    assert ids == want, show(ids, want)
    assert tools.render(fmt, tok, CONV[:2], [], True) == fmt.render(tok, CONV[:2], True)
    assert tools.render(FORMATS["codegeex4"], tok, CONV, tools.check_tools(TOOLS), True)[0] == \
        tools.render(fmt, tok, CONV, tools.check_tools(TOOLS), True)[0]  # CodeGeeX4: GLM-4's layout


def test_chatglm3_tools_prompt_is_its_build_chat_input(sp_model):  # noqa: F811
    """ChatGLM3: the tools as a JSON list (indent 4) after its preamble in the system turn; a call is
    <|assistant|> encode("name\\n") encode("```python\\ntool_call(k=v)\\n```"); results in <|observation|>."""
    tok, sp, s = sp_tokenizer(sp_model, CHATGLM3_SPECIALS)
    ids, _ = tools.render(FORMATS["chatglm3"], tok, CONV, tools.check_tools(TOOLS), add_generation_prompt=True)
    listed = "[\n" + "\n".join("    " + line for line in f"{WEATHER_JSON},\n{TIME_JSON}".split("\n")) + "\n]"
    system = "Answer the following questions as best as you can. You have access to the following tools:\n" + listed
    want = [s["[gMASK]"], s["sop"], s["<|system|>"]] + sp.encode("\n") + sp.encode(system)
    want += [s["<|system|>"]] + sp.encode("\n") + sp.encode("简短回答")
    want += [s["<|user|>"]] + sp.encode("\n") + sp.encode("北京和上海的天气?")
    for call in ('tool_call(city="北京")', 'tool_call(city="上海", days=2)'):
        want += [s["<|assistant|>"]] + sp.encode("get_weather\n") + sp.encode(f"```python\n{call}\n```")
    for result in ('{"temp": 21}', '{"temp": 25}'):
        want += [s["<|observation|>"]] + sp.encode("\n") + sp.encode(result)
    want += [s["<|assistant|>"]]
    assert ids == want, show(ids, want)
    # JSON's literals become Python's; a key that is no Python name cannot be a keyword argument
    lit = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": '{"a": true, "b": null, "c": [1, -2.5, "x"], "d": {"k": false}}'}}]}]
    body = tools.family_messages("chatglm3", lit, [])[0]["content"]
    assert body == '```python\ntool_call(a=True, b=None, c=[1, -2.5, "x"], d={"k": False})\n```'
    assert json.loads(tools.chatglm3_arguments(body)) == {"a": True, "b": None, "c": [1, -2.5, "x"], "d": {"k": False}}
    with pytest.raises(ValueError, match="'a-b' cannot be a Python keyword"):
        tools.family_messages("chatglm3", [{**lit[0], "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": '{"a-b": 1}'}}]}], [])


def test_families_without_tools_and_bad_requests(tok):
    for name in ("chatglm", "chatglm2", "codegeex2"):
        with pytest.raises(ValueError, match=f"the {name} chat format has no tool calling"):
            tools.render(FORMATS[name], tok, CONV[1:2], tools.check_tools(TOOLS), True)
    with pytest.raises(ValueError, match=r"tools\[1\].function.name: 'a b'"):
        tools.check_tools([TOOLS[0], {"type": "function", "function": {"name": "a b"}}])
    with pytest.raises(ValueError, match="defined twice"):
        tools.check_tools([TOOLS[0], TOOLS[0]])
    fns = tools.check_tools(TOOLS)
    assert [tools.check_choice(c, fns) for c in (None, "none", "auto", "required")] == ["auto", None, "auto", "required"]
    assert tools.check_choice({"type": "function", "function": {"name": "get_time"}}, fns) == "get_time"
    assert tools.check_choice(None, []) is None
    with pytest.raises(ValueError, match="'nope', which is not in tools"):
        tools.check_choice({"type": "function", "function": {"name": "nope"}}, fns)
    with pytest.raises(ValueError, match="needs tools"):
        tools.check_choice("required", [])
    bad = [{**CONV[2], "tool_calls": [{"id": "c", "type": "function", "function": {"name": "x\n{}", "arguments": "{}"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls\[0\].function.name: 'x\\n{}'"):
        tools.render(FORMATS["glm4"], tok, bad, [], True)
    with pytest.raises(ValueError, match="only assistant messages carry tool_calls"):
        tools.render(FORMATS["glm4"], tok, [{**CONV[2], "role": "user"}], [], True)


# ---- parsing ------------------------------------------------------------------------------------------------
GLM4_REPLIES = {  # reply text -> (content, [(name, arguments)])
    'get_weather\n{"city": "北京", "days": 3}': (None, [("get_weather", '{"city": "北京", "days": 3}')]),
    '\n你好！': ("你好！", []),
    '\nget_weather\n{"city": "x"}': ('get_weather\n{"city": "x"}', []),  # a plain reply that mentions a call
    'get_weather\n{"city": "x"}<|assistant|>get_time\n{"tz": "UTC"}':
        (None, [("get_weather", '{"city": "x"}'), ("get_time", '{"tz": "UTC"}')]),
    '\n我查一下<|assistant|>get_time\n{}': ("我查一下", [("get_time", "{}")]),
    'get_weath\n{"city": "x"}': ('get_weath\n{"city": "x"}', []),  # unknown name
    'get_weather\n["x"]': ('get_weather\n["x"]', []),  # not an object
    'get_weather\n{"city": "x"': ('get_weather\n{"city": "x"', []),  # cut: partial JSON
    'get_weather\n{"city": x}': ('get_weather\n{"city": x}', []),  # malformed JSON
    'get_weather\n{"city": "x"}<|assistant|>get_time\n{"tz"': ('get_weather\n{"city": "x"}<|assistant|>get_time\n{"tz"', []),
    'get_weather': ("get_weather", []),
    'get_weather\n': ("get_weather\n", []),
    'get_time\nsoon': ("get_time\nsoon", []),
    '<|assist': ("<|assist", []),
    '': ("", []),
}
CHATGLM3_REPLIES = {
    'get_weather\n```python\ntool_call(city="北京", days=3)\n```': (None, [("get_weather", '{"city": "北京", "days": 3}')]),
    "get_weather\n ```python\ntool_call(city='x')\n```\n": (None, [("get_weather", '{"city": "x"}')]),
    '\n好的<|assistant|>get_time\n```python\ntool_call()\n```': ("好的", [("get_time", "{}")]),
    'get_weather\n```python\ntool_call(city=__import__("os").getcwd())\n```':
        ('get_weather\n```python\ntool_call(city=__import__("os").getcwd())\n```', []),  # never evaluated
    'get_weather\n```python\ntool_call("x")\n```': ('get_weather\n```python\ntool_call("x")\n```', []),
    'get_weather\n```python\ntool_call(city="x"': ('get_weather\n```python\ntool_call(city="x"', []),
    'other\n```python\ntool_call()\n```': ('other\n```python\ntool_call()\n```', []),
}


def calls_of(calls):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("syntax,replies", [("glm4", GLM4_REPLIES), ("chatglm3", CHATGLM3_REPLIES)])
def test_whole_replies(syntax, replies):
    for text, (content, calls) in replies.items():
        got_content, got = tools.parse_reply(text, syntax, NAMES)
        assert (got_content, calls_of(got)) == (content, calls), text
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
        assert len({c["id"] for c in got}) == len(got)


def stream(syntax, pieces, parallel=True):
    p = tools.ToolParser(syntax, NAMES, parallel, counter())
    deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish()
    return deltas, p


@pytest.mark.parametrize("syntax,replies", [("glm4", GLM4_REPLIES), ("chatglm3", CHATGLM3_REPLIES)])
def test_streaming_equals_whole_at_every_split(syntax, replies):
    """Every reply cut in two at every character, and fed one character at a time: the deltas add up to
    the whole reply's parse; a call's first delta carries index, id, type and name (arguments ""), later
    ones only argument fragments; content is never a held-back prefix of a call that then came."""
    for text, (_, calls) in replies.items():
        whole = tools.parse_reply(text, syntax, NAMES, new_id=counter())
        broken = text.startswith("get_weather\n{") and not calls and syntax == "glm4"  # args began to stream
        splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
        for pieces in splits:
            deltas, p = stream(syntax, pieces)
            got = tools.merge(deltas)
            if broken:
                assert p.broken and not p.ok, pieces
                continue
            assert (got[0] or "", got[1]) == (whole[0] or "", whole[1]), pieces
            assert p.ok == bool(calls)
            seen = set()
            for d in deltas:
                assert set(d) in ({"content"}, {"tool_calls"}) and (d.get("content") or d.get("tool_calls")), d
                for c in d.get("tool_calls", ()):
                    if c["index"] not in seen:
                        seen.add(c["index"])
                        assert set(c) == {"index", "id", "type", "function"} and c["function"]["arguments"] == "", d
                    else:
                        assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}, d


def test_glm4_arguments_stream_as_they_come():
    text = 'get_weather\n{"city": "北京", "days": 3}'
    deltas, p = stream("glm4", list(text))
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    frags = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert frags == list('{"city": "北京", "days": 3}'), frags  # one fragment per piece, none held back
    # nothing is shown while the text could still be a function's name, and a SEP split anywhere is held
    p = tools.ToolParser("glm4", NAMES)
    assert p.feed("get_") == [] and p.feed("wea") == [] and p.feed("x") == [{"content": "get_weax"}]
    p = tools.ToolParser("glm4", NAMES)
    assert p.feed("\nok<|assi") == [{"content": "ok"}] and p.feed("stant|>") == []
    assert p.feed("\nmore") == [{"content": "more"}]


def test_parallel_tool_calls_false_keeps_the_first():
    text = 'get_weather\n{"city": "x"}<|assistant|>get_time\n{"tz": "UTC"}<|assistant|>\nbye'
    content, calls = tools.parse_reply(text, "glm4", NAMES, parallel=False)
    assert (content, calls_of(calls)) == (None, [("get_weather", '{"city": "x"}')])
    deltas, p = stream("glm4", list(text), parallel=False)
    assert calls_of(tools.merge(deltas)[1]) == [("get_weather", '{"city": "x"}')] and p.ok


# ---- forcing a call: the grammar, checked with llguidance's own matcher ------------------------------------
@pytest.fixture(scope="module")
def matcher_for(tok):
    llg = pytest.importorskip("llguidance")
    llt = llg.LLTokenizer(tok.tok.to_str(), eos_token=tok.special("eos"))

    def make(grammar):
        return llg.LLMatcher(llt, llg.LLMatcher.grammar_from_lark(grammar))
    return make


def accepts(make, grammar, tok, text) -> bool:
    ids = []
    for i, part in enumerate(text.split(tools.SEP)):  # <|assistant|> is the special token, not its text
        ids += ([tok.special("assistant")] if i else []) + tok.encode(part)
    m = make(grammar)
    return m.consume_tokens(ids) and m.is_accepting() and not m.is_error()


@pytest.mark.parametrize("syntax", ["glm4", "chatglm3"])
def test_forced_grammar_admits_exactly_valid_calls(syntax, matcher_for, tok):
    fns = tools.check_tools(TOOLS)

    def call(name, args):
        if syntax == "glm4":
            return f"{name}\n{json.dumps(args, ensure_ascii=False)}"
        return f"{name}\n```python\ntool_call(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items()) + ")\n```"
    ok = call("get_weather", {"city": "北京", "days": 7})
    two = ok + tools.SEP + call("get_time", {"tz": "CET"})
    required = tools.forced_grammar(syntax, fns, None, True)
    assert accepts(matcher_for, required, tok, ok) and accepts(matcher_for, required, tok, two)
    assert accepts(matcher_for, required, tok, call("get_weather", {"city": "x"}))  # the optional one left out
    if syntax == "chatglm3":  # SentencePiece's "▁" before the name and the block, as ChatGLM3's tokens decode
        spaced = " " + ok.replace("\n```", "\n ```", 1)
        assert accepts(matcher_for, required, tok, spaced)
        assert calls_of(tools.parse_reply(spaced, syntax, NAMES)[1]) == [("get_weather", '{"city": "北京", "days": 7}')]
    for bad in (call("get_weather", {"city": "北京", "days": 8}),  # above maximum
                call("get_weather", {"days": 2}),  # required city missing
                call("get_weather", {"city": "123456789"}),  # over maxLength
                call("get_time", {"tz": "PST"}),  # not in the enum
                call("get_clock", {}), "\n" + ok, "hello"):
        assert not accepts(matcher_for, required, tok, bad), bad
    one = tools.forced_grammar(syntax, fns, None, parallel=False)
    assert accepts(matcher_for, one, tok, ok) and not accepts(matcher_for, one, tok, two)
    named = tools.forced_grammar(syntax, fns, "get_time", True)
    assert accepts(matcher_for, named, tok, call("get_time", {"tz": "UTC"}))
    assert not accepts(matcher_for, named, tok, ok) and not accepts(matcher_for, named, tok, two)


@pytest.mark.parametrize("syntax", ["glm4", "chatglm3"])
def test_random_walks_through_the_grammar_are_valid_calls(syntax, matcher_for, tok):
    """Tokens drawn at random among those the grammar allows (a model with no idea): every finished
    walk parses back into calls whose arguments validate against their function's schema."""
    import random

    fns = tools.check_tools(TOOLS)
    grammar = tools.forced_grammar(syntax, fns, None, True)
    rng, done = random.Random(0), 0
    for _ in range(30):
        m, ids = matcher_for(grammar), []
        while not m.is_stopped() and len(ids) < 200:
            allowed = [i for i, b in enumerate(m.compute_logit_bias()[:tok.vocab_size]) if b]
            t = rng.choice(allowed)
            if t == tok.special("eos"):
                break
            assert m.consume_token(t), m.get_error()
            ids.append(t)
        if len(ids) >= 200:
            continue
        text = tok.decode(ids, skip_special_tokens=False)
        content, calls = tools.parse_reply(text, syntax, NAMES)
        assert calls and content is None, text
        for c in calls:
            schema = {"get_weather": WEATHER, "get_time": TIME}[c["function"]["name"]]["parameters"]
            args = json.loads(c["function"]["arguments"])
            assert valid(args, schema), (args, schema)
        done += 1
    assert done >= 20, done


def valid(args: dict, schema: dict) -> bool:
    """The schema keywords WEATHER and TIME use, checked by hand."""
    props = schema["properties"]
    if not set(schema.get("required", ())) <= set(args) or not set(args) <= set(props):
        return False
    for k, v in args.items():
        p = props[k]
        if "enum" in p and v not in p["enum"]:
            return False
        if p.get("type") == "string" and not (isinstance(v, str) and len(v) <= p.get("maxLength", len(v))):
            return False
        if p.get("type") == "integer" and not (type(v) is int and p.get("minimum", v) <= v <= p.get("maximum", v)):
            return False
    return True


def test_valid_checks_the_keywords():
    weather = WEATHER["parameters"]
    assert valid({"city": "北京", "days": 7}, weather) and valid({"tz": "UTC"}, TIME["parameters"])
    assert not any(valid(a, weather) for a in ({"days": 1}, {"city": "123456789"}, {"city": "x", "days": 8},
                                               {"city": "x", "days": 1.5}, {"city": "x", "more": 1}))
    assert not valid({"tz": "PST"}, TIME["parameters"])


def test_grammar_layout_options():
    g = tools.forced_grammar("glm4", tools.check_tools(TOOLS), "get_weather", True)
    assert g.startswith("start: call\n") and json.dumps(JSON_OPTIONS["item_separator"]) in g
    with pytest.raises(ValueError, match="property 'from' cannot be a Python keyword"):
        tools.forced_grammar("chatglm3", [{"name": "f", "parameters": {"type": "object", "properties": {"from": {}}}}])
    with pytest.raises(ValueError, match="property 'a-b' cannot be a Python keyword"):
        tools.forced_grammar("chatglm3", [{"name": "f", "parameters": {"type": "object", "properties": {"a-b": {}}}}])


# ---- the server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm4_model(tok):
    """A random GLM-4-shaped model with room for the tools' system turn (its Chinese costs the tiny BPE
    several hundred tokens)."""
    import torch

    from glmkit.config import ModelConfig
    from glmkit.model import GLM

    torch.manual_seed(0)
    m = GLM(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial",
                        max_seq_len=2048, chat_format="glm4")).eval()
    m.init_weights(seed=3)
    return m


@pytest.fixture()
def tool_client(glm4_model, tok):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from glmkit.server.app import create_app

    with TestClient(create_app(glm4_model, tok, "tiny")) as c:
        yield c


def openai_messages(conv):
    """CONV as a client sends it: tool results are role "tool" with the id of their call."""
    return [{"role": "tool", "tool_call_id": f"call_{i}", "content": m["content"]} if m["role"] == "observation" else m
            for i, m in enumerate(conv)]


def chunks_of(r) -> list:
    from tests.serving import sse

    assert r.status_code == 200, r.text
    return sse(r.text)


def test_server_tool_choice_none_and_auto(tool_client, tok):
    """none: the prompt has no tools and the reply is what the same request without tools gives; auto: the
    tools' turn is in the prompt (token counts as the renderer's), and streaming adds up to the same reply."""
    messages, fns = openai_messages(CONV), tools.check_tools(TOOLS)
    base = {"messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": 4}
    plain = tool_client.post("/v1/chat/completions", json=base).json()
    none = tool_client.post("/v1/chat/completions", json={**base, "tools": TOOLS, "tool_choice": "none"}).json()
    assert none["choices"] == plain["choices"] and none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert plain["usage"]["prompt_tokens"] == len(tools.render(FORMATS["glm4"], tok, CONV, [], True)[0])
    auto = tool_client.post("/v1/chat/completions", json={**base, "tools": TOOLS}).json()
    assert auto["usage"]["prompt_tokens"] == len(tools.render(FORMATS["glm4"], tok, CONV, fns, True)[0])
    # the tools' turn, as written out above, is what was added (a special token bounds it on both sides)
    assert auto["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] == len(tok.encode(GLM4_TOOLS_TURN, allow_special=True))
    (ch,) = auto["choices"]
    assert ch["message"]["role"] == "assistant" and ch["finish_reason"] in ("stop", "length", "tool_calls")
    chunks = chunks_of(tool_client.post("/v1/chat/completions", json={**base, "tools": TOOLS, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    content, calls = tools.merge(deltas)
    assert (content or "", calls) == (ch["message"]["content"] or "", ch["message"].get("tool_calls", []))
    assert chunks[-1]["choices"][0]["finish_reason"] == ch["finish_reason"]


def test_server_refuses_what_does_not_fit(tool_client, tok):
    from tests.serving import assert_error

    msgs = [{"role": "user", "content": "hi"}]
    post = tool_client.post
    assert_error(post("/v1/chat/completions", json={"messages": msgs, "tool_choice": "required"}), 400, param="tool_choice")
    assert_error(post("/v1/chat/completions", json={"messages": msgs, "tools": TOOLS, "tool_choice": "always"}), 400,
                 param="tool_choice")
    named = {"type": "function", "function": {"name": "nope"}}
    err = assert_error(post("/v1/chat/completions", json={"messages": msgs, "tools": TOOLS, "tool_choice": named}), 400,
                       param="tool_choice")
    assert "not in tools" in err["message"]
    assert_error(post("/v1/chat/completions", json={"messages": msgs, "tools": TOOLS + TOOLS[:1]}), 400, param="tools")
    bad = [{"type": "function", "function": {"name": "a\nb"}}]
    assert_error(post("/v1/chat/completions", json={"messages": msgs, "tools": bad}), 400, param="tools.0.function.name")
    user_calls = [{"role": "user", "content": "x", "tool_calls": CONV[2]["tool_calls"]}]
    assert_error(post("/v1/chat/completions", json={"messages": user_calls}), 400, param="messages")


def test_server_without_tool_calling_says_so(tok):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from glmkit.config import ModelConfig
    from glmkit.model import GLM
    from glmkit.server.app import create_app
    from tests.serving import assert_error

    model = GLM(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, position="rope_partial",
                            max_seq_len=256, chat_format="chatglm2")).eval()
    with TestClient(create_app(model, tok, "tiny")) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "tools": TOOLS}), 400, param="tools")
        assert "chatglm2 chat format has no tool calling" in err["message"]


def accumulate(chunks) -> tuple[str | None, list[dict], str]:
    """What an OpenAI client assembles from a chat stream (choice 0): content, tool calls, finish_reason."""
    chunks = list(chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.tool_calls or ():
            if c.id is not None:
                calls[c.index] = {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": ""}}
            calls[c.index]["function"]["arguments"] += c.function.arguments or ""
    return content, [calls[k] for k in sorted(calls)], [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def test_official_client_round_trip_with_a_forced_call(glm4_model, tok):
    """The official client: a call forced by a named tool_choice (valid on a random model: the grammar
    decides), streamed and not; its result sent back as a tool message; the model answers. Prompts are
    checked against the renderer by their token counts."""
    openai = pytest.importorskip("openai")
    from glmkit.server.app import create_app
    from tests.serving import serve

    fns = tools.check_tools(TOOLS)
    user = [{"role": "user", "content": "北京天气?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    ask = {"model": "tiny", "tools": TOOLS, "max_tokens": 120, "temperature": 1.0}
    with serve(create_app(glm4_model, tok, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for seed in (1, 2):
            r = client.chat.completions.create(messages=user, tool_choice=named, seed=seed, **ask)
            (ch,) = r.choices
            assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
            (call,) = ch.message.tool_calls
            assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
            args = json.loads(call.function.arguments)
            assert valid(args, WEATHER["parameters"]), args
            assert r.usage.prompt_tokens == len(tools.render(FORMATS["glm4"], tok, user, fns, True)[0])
            content, calls, finish = accumulate(client.chat.completions.create(
                messages=user, tool_choice=named, seed=seed, stream=True, **ask))
            assert (content, finish) == (None, "tool_calls")
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
                ("get_weather", call.function.arguments)]
        # "required" may call any function, several in one reply (separated by <|assistant|>): here some
        # choices do; parallel_tool_calls false keeps the first
        for parallel in (True, False):
            r = client.chat.completions.create(messages=user, tool_choice="required", seed=1, n=3, parallel_tool_calls=parallel,
                                               **{**ask, "max_tokens": 200})
            assert {c.finish_reason for c in r.choices} == {"tool_calls"}
            counts = [len(c.message.tool_calls) for c in r.choices]
            assert max(counts) > 1 if parallel else set(counts) == {1}, counts
            for c in (call for ch in r.choices for call in ch.message.tool_calls):
                assert valid(json.loads(c.function.arguments), {"get_weather": WEATHER, "get_time": TIME}[c.function.name]["parameters"])
        # the result goes back; the answer's prompt holds the call turn and the observation turn
        history = user + [ch.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
        a = client.chat.completions.create(messages=history, seed=5, **{**ask, "max_tokens": 8})
        rendered = user + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "observation", "content": '{"temp": 21}'}]
        assert a.usage.prompt_tokens == len(tools.render(FORMATS["glm4"], tok, rendered, fns, True)[0])
        assert a.choices[0].finish_reason in ("stop", "length", "tool_calls")
        content, calls, finish = accumulate(client.chat.completions.create(
            messages=history, seed=5, stream=True, **{**ask, "max_tokens": 8}))
        assert (content, finish) == (a.choices[0].message.content, a.choices[0].finish_reason)


@pytest.fixture(scope="module")
def chatglm3_tok():
    """A SentencePiece BPE model with byte fallback, ChatGLM2/3's kind (the grammar engine reads its pieces; a
    unigram model's it cannot), with ChatGLM3's specials appended."""
    from glmkit.tokenizer import Tokenizer
    from tests.test_tokenizer_upstream import CHATGLM_OPTIONS, _train_sp

    return Tokenizer.from_sentencepiece(_train_sp(**CHATGLM_OPTIONS), CHATGLM3_SPECIALS)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="llguidance 1.9's mask admits a SentencePiece piece ('▁t') "
                   "inside a forced literal that its own consume then refuses ('forced bytes: got \\n'), so the row ends "
                   "with an engine error; GLM-4's byte-level BPE is not affected. Remove this mark once it passes")
def test_chatglm3_forced_call_served(chatglm3_tok):
    """ChatGLM3 (SentencePiece, its own call syntax): a named call is forced, comes back as JSON arguments
    that match the schema, and the stream (which can announce a ChatGLM3 call only once its block is
    closed) adds up to the same call."""
    pytest.importorskip("fastapi")
    import torch
    from fastapi.testclient import TestClient

    from glmkit.config import ModelConfig
    from glmkit.model import GLM
    from glmkit.server.app import create_app

    tok = chatglm3_tok
    torch.manual_seed(0)
    model = GLM(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial",
                            max_seq_len=2048, chat_format="chatglm3")).eval()
    model.init_weights(seed=1)
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": [{"role": "user", "content": "Hello there"}], "tools": TOOLS, "tool_choice": named,
            "max_tokens": 120, "temperature": 1.0, "seed": 3}
    with TestClient(create_app(model, tok, "tiny")) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        assert "choices" in r, r
        (ch,) = r["choices"]
        assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None, ch
        (call,) = ch["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and valid(json.loads(call["function"]["arguments"]), WEATHER["parameters"])
        chunks = chunks_of(c.post("/v1/chat/completions", json={**body, "stream": True}))
        content, calls = tools.merge([x["choices"][0]["delta"] for x in chunks[1:-1]])
        assert (content, calls_of(calls)) == (None, calls_of([call])) and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_call_cut_by_a_stop_string(tool_client):
    """A stop string that cuts a forced call: before its arguments began, the reply is plain content, streamed
    or not (the held-back name comes out at the end); after they began, the whole reply is content while the
    stream, which already announced the call, ends with finish_reason "stop" rather than "tool_calls"."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": named, "max_tokens": 60,
            "temperature": 1.0, "seed": 1}
    for stop, whole, streamed in (("\n", "get_weather", ("get_weather", [])),
                                  ('"city"', "get_weather\n{", (None, [("get_weather", "{")]))):
        r = tool_client.post("/v1/chat/completions", json={**body, "stop": stop}).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": whole}
        assert r["choices"][0]["finish_reason"] == "stop"
        chunks = chunks_of(tool_client.post("/v1/chat/completions", json={**body, "stop": stop, "stream": True}))
        content, calls = tools.merge([c["choices"][0]["delta"] for c in chunks[1:-1]])
        assert (content, calls_of(calls)) == streamed and chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---- the GLM-4.5 family (glm45: GLM-4.5 / 4.6; glm47: GLM-4.7 / 4.7-Flash / GLM-5) ----------------------------
GLM45_MARKUP = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def glm45_tok():
    """The test BPE with the family's markup added as tokens (not special: a chat template's text matches them)."""
    from tokenizers import AddedToken

    from glmkit.tokenizer import train_bpe
    from tests.serving import TEXTS

    t = train_bpe(texts=TEXTS, vocab_size=300)
    t.tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in GLM45_MARKUP])
    return t


def glm45_tools_text(nl):
    """The tools' system turn as the published templates print it, written out by hand."""
    example = (f"<tool_call>{{function-name}}{nl}<arg_key>{{arg-key-1}}</arg_key>{nl}<arg_value>{{arg-value-1}}</arg_value>{nl}"
               f"<arg_key>{{arg-key-2}}</arg_key>{nl}<arg_value>{{arg-value-2}}</arg_value>{nl}...{nl}</tool_call>")
    return ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            '{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": {"type": "object", '
            '"properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, '
            '"required": ["city"], "additionalProperties": false}}}\n'
            '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": '
            '{"enum": ["UTC", "CET"]}}, "additionalProperties": false}}}\n</tools>\n\n'
            "For each function call, output the function name and arguments within the following XML format:\n" + example)


GLM45_CONV = CONV[:2] + [{"role": "assistant", "content": "<think>旧的</think>\n我查一下", "tool_calls": CONV[2]["tool_calls"]}] + CONV[3:]


@pytest.mark.parametrize("name", ["glm45", "glm47"])
def test_glm45_prompt_is_the_published_template(name, glm45_tok):
    """GLM-4.6's and GLM-4.7-Flash's chat_template.jinja (add_generation_prompt, enable_thinking unset): the
    tools turn, the reasoning after the last user message kept (earlier: dropped), content then the calls (a string value raw,
    others JSON), the two results in one <|observation|> turn; glm47 has no newlines and opens <think>."""
    tok, fmt = glm45_tok, FORMATS[name]
    ids, mask = tools.render(fmt, tok, GLM45_CONV, tools.check_tools(TOOLS), add_generation_prompt=True)
    if name == "glm45":
        text = ("[gMASK]<sop>" + glm45_tools_text("\n") + "<|system|>\n简短回答<|user|>\n北京和上海的天气?<|assistant|>\n"
                "<think>旧的</think>\n我查一下\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>"
                "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>上海</arg_value>\n<arg_key>days</arg_key>\n"
                "<arg_value>2</arg_value>\n</tool_call><|observation|>\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n"
                "<tool_response>\n{\"temp\": 25}\n</tool_response><|assistant|>")
    else:
        text = ("[gMASK]<sop>" + glm45_tools_text("") + "<|system|>简短回答<|user|>北京和上海的天气?<|assistant|><think>旧的</think>我查一下"
                "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call><tool_call>get_weather"
                "<arg_key>city</arg_key><arg_value>上海</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
                "<|observation|><tool_response>{\"temp\": 21}</tool_response><tool_response>{\"temp\": 25}</tool_response>"
                "<|assistant|><think>")
    want = tok.encode(text, allow_special=True)
    assert ids == want, show(ids, want)
    assert tok.token_id("<tool_call>") in ids and tok.token_id("</tool_response>") in ids  # markup as its tokens
    # reasoning after the last user message is shown; the reply is learned, ended by eos
    last = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nok"}]
    ids, mask = fmt.render(tok, last)
    nl = "\n" if name == "glm45" else ""
    want = tok.encode(f"[gMASK]<sop><|user|>{nl}hi<|assistant|>{nl}<think>r</think>{nl}ok<|endoftext|>", allow_special=True)
    assert ids == want, show(ids, want)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == f"{nl}<think>r</think>{nl}ok<|endoftext|>"
    ids, _ = fmt.render(tok, last + [{"role": "user", "content": "x"}], add_generation_prompt=True)
    empty = "\n<think></think>\n" if nl else "</think>"
    want = tok.encode(f"[gMASK]<sop><|user|>{nl}hi<|assistant|>{empty}ok<|user|>{nl}x<|assistant|>" + ("" if nl else "<think>"),
                      allow_special=True)
    assert ids == want, show(ids, want)
    with pytest.raises(ValueError, match="arguments must be a JSON object"):
        tools.render(fmt, tok, [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": "[1]"}}]}], [], True)


GLM45_REPLIES = {  # reply -> (content, [(name, arguments)]); glm45 writes the newlines
    "\n<think>想想</think>\n好的": ("好的", []),
    "\nHello": ("Hello", []),
    "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n<arg_key>days</arg_key>"
    "\n<arg_value>2</arg_value>\n</tool_call>": (None, [("get_weather", '{"city": "123", "days": 2}')]),
    "\n<think>x</think>\n我查一下\n<tool_call>get_time\n<arg_key>tz</arg_key>\n<arg_value>UTC</arg_value>\n</tool_call>"
    "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北 京</arg_value>\n</tool_call>":
        ("我查一下", [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"city": "北 京"}')]),
    "\n<tool_call>get_clock\n</tool_call>": ("<tool_call>get_clock\n</tool_call>", []),  # unknown function
    "<tool_call>get_time\n<arg_key>tz": ("<tool_call>get_time\n<arg_key>tz", []),  # cut short
    "<tool_call>get_time\nstray<arg_key>tz</arg_key><arg_value>1</arg_value></tool_call>":
        ("<tool_call>get_time\nstray<arg_key>tz</arg_key><arg_value>1</arg_value></tool_call>", []),
}


def test_glm45_replies_whole_and_streamed_at_every_split():
    """Thinking out of the content, calls typed by the schema (city is a string: "123" stays text), malformed
    calls as content; every split in two and one character at a time add up to the whole parse; a call's
    first delta carries id and name, the second its arguments."""
    fns = tools.check_tools(TOOLS)
    for syntax in ("glm45", "glm47"):
        for text, (content, calls) in GLM45_REPLIES.items():
            if syntax == "glm47":  # the prompt opened <think>; no newlines between pieces
                text = (text.replace("\n<think>", "") if "<think>" in text else "</think>" + text).replace("\n", "")
                content = content.replace("\n", "") if content else content
            got = tools.parse_reply(text, syntax, NAMES, fns=fns, new_id=counter())
            assert (got[0], calls_of(got[1])) == (content, calls), (syntax, text, got)
            for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
                p = tools.make_parser(syntax, NAMES, True, counter(), fns)
                deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish()
                assert tools.merge(deltas) == (got[0] or None, got[1]), (syntax, pieces)
                assert p.ok == bool(calls)
                for d in deltas:
                    assert set(d) in ({"content"}, {"tool_calls"}), d
    p = tools.make_parser("glm45", NAMES, True, counter(), fns)
    assert p.feed("\n<think>secret") == [] and p.feed("</think>\nok") == [{"content": "ok"}] and p.reasoning == "secret"
    one = "<tool_call>get_time<arg_key>tz</arg_key><arg_value>UTC</arg_value></tool_call>"
    assert len(tools.parse_reply("</think>" + one + one, "glm47", NAMES, parallel=False, fns=fns)[1]) == 1


@pytest.mark.parametrize("syntax", ["glm45", "glm47"])
def test_glm45_forced_grammar(syntax, glm45_tok):
    """llguidance's matcher on the family's token ids: the empty thinking block then valid calls only, and
    random walks through the grammar parse back into schema-valid calls."""
    import random

    llg = pytest.importorskip("llguidance")
    tok, fns = glm45_tok, tools.check_tools(TOOLS)
    llt = llg.LLTokenizer(tok.tok.to_str(), eos_token=tok.special("eos"))

    def accepts(grammar, text):  # the markup as its tokens, as the model writes it
        m = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_lark(grammar))
        return m.consume_tokens(tok.encode(text, allow_special=True)) and m.is_accepting() and not m.is_error()
    nl = "\n" if syntax == "glm45" else ""
    think = "\n<think></think>" if nl else "</think>"

    def call(name, **args):
        return (f"{nl}<tool_call>{name}" + "".join(f"{nl}<arg_key>{k}</arg_key>{nl}<arg_value>"
                f"{v if isinstance(v, str) else json.dumps(v)}</arg_value>" for k, v in args.items()) + f"{nl}</tool_call>")
    required = tools.forced_grammar(syntax, fns, None, True)
    ok = think + call("get_weather", city="北京", days=7)
    assert accepts(required, ok) and accepts(required, ok + call("get_time", tz="CET"))
    assert accepts(required, think + call("get_weather", city="x"))
    for bad in (think + call("get_weather", city="北京", days=8), think + call("get_weather", days=2),
                think + call("get_weather", city="123456789"), think + call("get_time", tz="PST"),
                think + call("get_clock"), call("get_weather", city="x"), think + "hello"):
        assert not accepts(required, bad), bad
    assert not accepts(tools.forced_grammar(syntax, fns, "get_time", True), ok)
    assert not accepts(tools.forced_grammar(syntax, fns, None, False), ok + call("get_time", tz="CET"))
    m0, rng, done = llg.LLMatcher(llt, llg.LLMatcher.grammar_from_lark(required)), random.Random(0), 0
    for _ in range(20):
        m, ids = m0.deep_copy(), []
        while not m.is_stopped() and len(ids) < 150:
            t = rng.choice([i for i, b in enumerate(m.compute_logit_bias()[:tok.vocab_size]) if b])
            if t == tok.special("eos"):
                break
            assert m.consume_token(t), m.get_error()
            ids.append(t)
        if len(ids) >= 150:
            continue
        content, calls = tools.parse_reply(tok.decode(ids, skip_special_tokens=False), syntax, NAMES, fns=fns)
        assert calls and content is None, tok.decode(ids)
        for c in calls:
            assert valid(json.loads(c["function"]["arguments"]), {"get_weather": WEATHER, "get_time": TIME}[c["function"]["name"]]["parameters"])
        done += 1
    assert done >= 10, done


def test_glm45_served_round_trip(glm45_tok):
    """The chat route on a tiny random model in the glm45 format: a named forced call is valid (the grammar
    decides), streamed and not alike; its result goes back and the prompt is the renderer's."""
    pytest.importorskip("fastapi")
    import torch
    from fastapi.testclient import TestClient

    from glmkit.config import ModelConfig
    from glmkit.model import GLM
    from glmkit.server.app import create_app

    tok, fns = glm45_tok, tools.check_tools(TOOLS)
    torch.manual_seed(0)
    model = GLM(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial",
                            max_seq_len=2048, chat_format="glm45")).eval()
    model.init_weights(seed=3)
    user = [{"role": "user", "content": "北京天气?"}]
    ask = {"messages": user, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
           "max_tokens": 80, "temperature": 1.0}
    with TestClient(create_app(model, tok, "tiny")) as c:
        for seed in (1,):
            r = c.post("/v1/chat/completions", json={**ask, "seed": seed}).json()
            (ch,) = r["choices"]
            assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None, ch
            (call,) = ch["message"]["tool_calls"]
            assert call["function"]["name"] == "get_weather" and valid(json.loads(call["function"]["arguments"]), WEATHER["parameters"])
            assert r["usage"]["prompt_tokens"] == len(tools.render(FORMATS["glm45"], tok, user, fns, True)[0])
            chunks = chunks_of(c.post("/v1/chat/completions", json={**ask, "seed": seed, "stream": True}))
            content, calls = tools.merge([x["choices"][0]["delta"] for x in chunks[1:-1]])
            assert (content, calls_of(calls)) == (None, calls_of([call]))
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        history = user + [ch["message"], {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
        a = c.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 8, "seed": 5}).json()
        rendered = user + [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "observation", "content": '{"temp": 21}'}]
        assert a["usage"]["prompt_tokens"] == len(tools.render(FORMATS["glm45"], tok, rendered, fns, True)[0])
        assert "<think>" not in (a["choices"][0]["message"]["content"] or "")


def test_glm45_chat_leaves_the_thinking_out(glm45_tok):
    """generate.chat / chat_stream on a glm45 model whose reply a grammar fixes to a thinking block and an
    answer: the answer alone comes back, whole and streamed."""
    import torch

    from glmkit.config import ModelConfig
    from glmkit.constrain import Constraint
    from glmkit.generate import chat, chat_stream
    from glmkit.model import GLM
    from glmkit.sampling import SamplingParams

    torch.manual_seed(0)
    model = GLM(ModelConfig(vocab_size=glm45_tok.vocab_size, dim=32, n_layers=1, n_heads=2, position="rope_partial",
                            max_seq_len=256, chat_format="glm45")).eval()
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1,
                            constraint=Constraint.lark('start: "\\n" <think> "ab" </think> "\\nhi"'))
    msgs = [{"role": "user", "content": "x"}]
    assert chat(model, glm45_tok, msgs, params).text == "hi"
    assert "".join(chat_stream(model, glm45_tok, msgs, params)) == "hi"
    # glm47's prompt opens <think>: a constrained reply closes it first, so the constrained text is the answer
    model.cfg = dataclasses.replace(model.cfg, chat_format="glm47")
    params = dataclasses.replace(params, constraint=Constraint.regex("hi+"))
    got = chat(model, glm45_tok, msgs, params)
    assert re.fullmatch("hi+", got.text) and glm45_tok.decode(got.token_ids[:1]) == "</think>", (got.text, got.token_ids)
