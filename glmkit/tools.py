"""Tool calling: OpenAI's contract (`tools`, assistant `tool_calls`, `tool` results) laid out in each GLM
family's own published format, and the model's reply parsed back into calls, whole or as a stream.

    from glmkit.tools import check_tools, render, ToolParser, forced_grammar
    fns = check_tools(body_tools)                            # the function objects, checked
    ids, _ = render(fmt, tok, messages, fns, add_generation_prompt=True)
    p = make_parser(tool_syntax(fmt), [f["name"] for f in fns], fns=fns); deltas = p.feed(piece) + p.finish()
    content, calls, ok = parse_reply(text, tool_syntax(fmt), names)
    Constraint.lark(forced_grammar(tool_syntax(fmt), fns, name=None, parallel=True))   # tool_choice "required"

The formats, as the families publish them (an assistant turn is `<|assistant|>{metadata}\\n{content}`, the
metadata line naming the function called; `chat.py` lays the turns out token for token):

  glm4 (GLM-4-9B-chat's chat_template in its tokenizer_config.json; CodeGeeX4 is fine-tuned on the same
    layout, as the CodeGeeX4 templates of two independent fine-tuning toolkits render it)
      tools   a system turn: GLM4_PREAMBLE + "\\n\\n# 可用工具", then per function "\\n\\n## {name}\\n\\n"
              + the function object as JSON (indent 4, non-ASCII kept, the client's key order: the template's
              `tojson(indent=4)`) + GLM4_FUNCTION_NOTE. The template prints the tools of a message before that
              message's own content, so a client's system prompt follows as its own system turn.
      call    `<|assistant|>{name}\\n{arguments JSON}`, one turn per call (GLM-4's OpenAI server renders an
              assistant message's tool_calls so); the reply to parse is `name\\n{...}`, several calls
              separated by `<|assistant|>` (the model may open a further assistant turn itself)
      result  `<|observation|>\\n{content}`, one turn per tool message (no format carries call ids: results
              follow their calls in order; `tool_call_id` is not rendered)
  chatglm3 (ChatGLM3-6B: its tokenizer's build_chat_input, its PROMPT.md and tools_using_demo)
      tools   a system turn: CHATGLM3_PREAMBLE + "\\n" + the list of function objects as JSON (indent 4,
              non-ASCII kept): bare {name, description, parameters} objects, the shape the demo asks for
      call    `<|assistant|>{name}\\n` + "```python\\ntool_call(k=v, ...)\\n```" (Python keyword arguments;
              strings double-quoted as PROMPT.md writes them); parsed back without eval: the keyword values
              must be literals (JSON's true / false / null are read too)
      result  `<|observation|>\\n{content}`

  glm45 (GLM-4.5 / 4.6's chat_template.jinja; glm47: GLM-4.7 / 4.7-Flash / GLM-5's, the same with no
    newlines between the pieces; `chat.Glm45` lays the turns out, the markup as its tokens)
      tools   the first system turn: GLM45_TOOLS_HEAD, one line per tool (the whole tool object
              {"type": "function", "function": {...}} as `tojson` writes it: ", " / ": ", non-ASCII kept),
              GLM45_TOOLS_TAIL and an example call laid out as the family writes calls
      call    inside the assistant turn, after its content: `\n<tool_call>{name}`, per argument
              `\n<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>` (a string value raw, any other as JSON),
              then `\n</tool_call>`; several calls one after another
      result  consecutive tool messages share one `<|observation|>` turn, each
              `\n<tool_response>\n{content}\n</tool_response>`
    The reply opens with the thinking block (`\n<think>...</think>`; glm47's prompt opens it already):
    the parser keeps it out of the content (in `Glm45Parser.reasoning`, not sent), then content up to the
    first `<tool_call>`. A call is announced whole when its `</tool_call>` arrives; its values are typed by
    the function's schema (a property of type string stays text, others are read as JSON, text if not).

Streaming (`ToolParser`): text that could still begin a call (a prefix of a function name, a tail that
could become "<|assistant|>") is held back and flushed as content once it cannot. A GLM-4 call is
announced (id, name, arguments "") when `name\\n{` has arrived, and its arguments stream as they come; a
ChatGLM3 call only when its block is complete (its arguments are Python, converted to JSON at the end).
A reply that does not parse (unknown name, arguments that are not a JSON object / literal keywords)
is plain content, never an error. Streaming and the whole reply agree on every reply except one whose
GLM-4 arguments break after they began to stream: deltas sent cannot be recalled, so the stream ends
with finish_reason "stop" / "length" (not "tool_calls"), while the whole reply becomes content.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import uuid

from .constrain import JSON_OPTIONS

GLM4_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                 "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOLS_HEADING = "\n\n# 可用工具"
GLM4_FUNCTION_NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
CHATGLM3_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"
SEP = "<|assistant|>"  # a further assistant turn inside one reply: the next call
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names (no newline, no markup)
SYNTAXES = ("glm4", "chatglm3", "glm45", "glm47")
GLM45 = ("glm45", "glm47")  # the <tool_call> family: its own parser (Glm45Parser), its layout in chat.Glm45


# ---- the request side ---------------------------------------------------------------------------------
def check_tools(tools) -> list[dict]:
    """The function objects of OpenAI's `tools` list, in order; ValueError naming the bad field."""
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} objects, got {type(tools).__name__}")
    fns, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ValueError(f"{where}: must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"{where}.function.name: {name!r} must be 1 to 64 letters, digits, '_' or '-'")
        if name in seen:
            raise ValueError(f"{where}.function.name: {name!r} is defined twice")
        seen.add(name)
        if not isinstance(f.get("description", ""), str):
            raise ValueError(f"{where}.function.description must be a string")
        if not isinstance(f.get("parameters", {}), dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        fns.append(f)
    return fns


def check_choice(choice, fns: list[dict]) -> str | None:
    """OpenAI's tool_choice against the functions: "none", "auto", "required", or the name of the one
    function the reply must call. Returns None when no tool reaches the prompt ("none", or no tools)."""
    names = [f["name"] for f in fns]
    if choice is None:
        return "auto" if fns else None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if choice != "none" and not fns:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return None if choice == "none" else choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names) or 'none'})")
    return name


def tool_syntax(fmt) -> str:
    """The tool syntax of a chat format (`ChatFormat.tools`); ValueError for a family without tools."""
    if fmt.tools is None:
        raise ValueError(f"the {fmt.name} chat format has no tool calling (GLM-4, CodeGeeX4, ChatGLM3 and GLM-4.5+ have); "
                         "send the request without tools, tool_calls and tool messages")
    return fmt.tools


def _py(v) -> str:
    """A JSON value as a Python literal, strings double-quoted (ChatGLM3's tool_call(...) arguments)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, (int, float, str)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(map(_py, v)) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_py(x)}" for k, x in v.items()) + "}"


def _keyword_ok(k: str) -> bool:
    """Whether `k` can be a Python keyword argument (ChatGLM3 calls functions as tool_call(k=v))."""
    return k.isidentifier() and not keyword.iskeyword(k)


def _call_body(syntax: str, name: str, arguments: str, where: str) -> str:
    """The content of an assistant turn whose metadata is `name`: the arguments as the family writes them."""
    if syntax == "glm4":
        return arguments  # verbatim: the JSON text the model wrote, as GLM-4's own server renders it
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}.function.arguments is not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    bad = [k for k in args if not _keyword_ok(k)]
    if bad:
        raise ValueError(f"{where}.function.arguments: {bad[0]!r} cannot be a Python keyword argument (ChatGLM3 "
                         "calls functions as tool_call(name=value))")
    return "```python\ntool_call(" + ", ".join(f"{k}={_py(v)}" for k, v in args.items()) + ")\n```"


def tools_turn(syntax: str, fns: list[dict]) -> str:
    """The system turn's content that lists the functions."""
    if syntax == "glm4":
        return GLM4_PREAMBLE + GLM4_TOOLS_HEADING + "".join(
            f"\n\n## {f['name']}\n\n{json.dumps(f, ensure_ascii=False, indent=4)}{GLM4_FUNCTION_NOTE}" for f in fns)
    return CHATGLM3_PREAMBLE + "\n" + json.dumps(fns, ensure_ascii=False, indent=4)


GLM45_TOOLS_HEAD = "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within "
GLM45_TOOLS_TAIL = "\n\nFor each function call, output the function name and arguments within the following XML format:\n"


def glm45_tools_turn(fns: list[dict], compact: bool = False) -> list:
    """The tools' system turn of the GLM-4.5 family as `chat.Glm45` parts (str: text, 1-tuple: markup)."""
    nl = "" if compact else "\n"
    listed = "".join("\n" + json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in fns)
    parts = [GLM45_TOOLS_HEAD, ("<tools>",), ("</tools>",), " XML tags:\n", ("<tools>",), listed + "\n", ("</tools>",),
             GLM45_TOOLS_TAIL, ("<tool_call>",), "{function-name}"]
    for i in (1, 2):
        parts += [nl, ("<arg_key>",), f"{{arg-key-{i}}}", ("</arg_key>",), nl, ("<arg_value>",), f"{{arg-value-{i}}}",
                  ("</arg_value>",)]
    return parts + [nl + "..." + nl, ("</tool_call>",)]


def glm45_call(name: str, arguments: str, nl: str, where: str) -> list:
    """One call of an assistant message as `chat.Glm45` parts; `arguments` is OpenAI's JSON text."""
    if not NAME.match(name):
        raise ValueError(f"{where}.function.name: {name!r} must be 1 to 64 letters, digits, '_' or '-'")
    try:
        args = json.loads(arguments)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{where}.function.arguments is not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    parts = [nl, ("<tool_call>",), name]
    for k, v in args.items():
        parts += [nl, ("<arg_key>",), k, ("</arg_key>",), nl, ("<arg_value>",),
                  v if isinstance(v, str) else json.dumps(v, ensure_ascii=False), ("</arg_value>",)]
    return parts + [nl, ("</tool_call>",)]


def family_messages(syntax: str | None, messages: list[dict], fns: list[dict]) -> list[dict]:
    """OpenAI-shaped messages (role system / user / assistant with optional `tool_calls` / observation for
    tool results) as the family's turns: the tools turn first (when `fns`), each call its own assistant
    turn with the function's name as metadata, text before the calls its own plain assistant turn."""
    out = [{"role": "system", "content": tools_turn(syntax, fns)}] if fns else []
    for n, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if not calls:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
            continue
        if m["role"] != "assistant":
            raise ValueError(f"message {n}: only assistant messages carry tool_calls, not {m['role']} messages")
        if m.get("content"):
            out.append({"role": "assistant", "content": m["content"]})
        for j, c in enumerate(calls):
            f = c["function"]
            if not NAME.match(f["name"]):  # it becomes the turn's metadata line
                raise ValueError(f"messages[{n}].tool_calls[{j}].function.name: {f['name']!r} must be 1 to 64 letters, "
                                 "digits, '_' or '-'")
            out.append({"role": "assistant", "metadata": f["name"],
                        "content": _call_body(syntax, f["name"], f["arguments"], f"messages[{n}].tool_calls[{j}]")})
    return out


def render(fmt, tok, messages: list[dict], fns: list[dict], add_generation_prompt: bool = False):
    """`fmt.render` of a conversation with tools (`fns`, check_tools' output; [] for none) and tool calls."""
    needs = bool(fns) or any(m.get("tool_calls") for m in messages)
    if fmt.tools in GLM45:  # the format lays tools and calls out itself: they live inside its turns
        return fmt.render(tok, messages, add_generation_prompt, fns=fns)
    return fmt.render(tok, family_messages(tool_syntax(fmt) if needs else None, messages, fns), add_generation_prompt)


# ---- forcing a call (tool_choice "required" / a named function) -------------------------------------------
def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _schema(f: dict) -> dict:
    """The function's argument schema with glmkit's JSON layout; a function without parameters takes {}.
    Lenient (unknown keywords ignored) unless the function says `strict: true`, as OpenAI reads it."""
    schema = f.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return {**schema, "x-guidance": {**JSON_OPTIONS, "lenient": not f.get("strict", False)}}


def _chatglm3_kwargs(f: dict) -> str:
    """Lark for ChatGLM3's keyword arguments of `f`: each declared property `k=` + its schema's JSON (read
    back as Python: `true` etc. are accepted by the parser), required ones in order, then the optional
    ones, each in property order."""
    schema = f.get("parameters") or {}
    props = schema.get("properties") or {}
    if schema.get("type", "object") != "object" or not isinstance(props, dict):
        raise ValueError(f"function {f['name']}: a forced ChatGLM3 call needs parameters of type object with properties")
    bad = [k for k in props if not _keyword_ok(k)]
    if bad:
        raise ValueError(f"function {f['name']}: property {bad[0]!r} cannot be a Python keyword argument")
    lenient = not f.get("strict", False)
    item = {k: f'"{k}=" %json ' + json.dumps({**(v if isinstance(v, dict) else {}),
                                               "x-guidance": {**JSON_OPTIONS, "lenient": lenient}}, ensure_ascii=False)
            for k, v in props.items()}
    req = [k for k in props if k in set(schema.get("required") or ())]
    opt = [k for k in props if k not in req]
    if req:
        return " \", \" ".join(item[k] for k in req) + "".join(f' (", " {item[k]})?' for k in opt)
    alts = [item[k] + "".join(f' (", " {item[o]})?' for o in opt[i + 1:]) for i, k in enumerate(opt)]
    return "(" + " | ".join(alts) + ")?" if alts else ""


def forced_grammar(syntax: str, fns: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect, JSON schemas embedded with %json) whose every sentence is a
    valid call in the family's syntax: of `name`, or of any of `fns` (several, separated by the
    <|assistant|> special token, when `parallel` and no name is forced)."""
    chosen = [f for f in fns if name is None or f["name"] == name]
    if syntax in GLM45:
        return _glm45_grammar(syntax, chosen, parallel and name is None)
    rules = []
    for i, f in enumerate(chosen):
        if syntax == "glm4":
            body = f"{_lark_str(f['name'] + chr(10))} %json " + json.dumps(_schema(f), ensure_ascii=False)
        else:
            # SentencePiece pieces start with "▁" (a space once decoded): ChatGLM3's own tokens for the name and
            # the block (each encoded with its dummy prefix in its training layout) may carry one
            body = (f'" "? {_lark_str(f["name"] + chr(10))} " "? ' + _lark_str("```python\ntool_call(") + " "
                    + _chatglm3_kwargs(f) + " " + _lark_str(")\n```"))
        rules.append(f"c{i}: {body}")
    many = parallel and name is None
    return "\n".join([f"start: call{' (<|assistant|> call)*' if many else ''}",
                      "call: " + " | ".join(f"c{i}" for i in range(len(chosen)))] + rules) + "\n"


def _glm45_string(schema) -> bool:
    """Whether a property's value is written raw (as text, not JSON): type string, or string-only enum / const."""
    if not isinstance(schema, dict):
        return False
    if "type" in schema:
        return schema["type"] == "string"
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    return bool(values) and all(isinstance(v, str) for v in values)


def _glm45_value(v: dict, lenient: bool) -> str:
    """Lark for one argument's value: a string property as raw text (its enum / const as literals, else any
    text without "<" within minLength..maxLength; `pattern` and `format` are not enforced), any other
    value as JSON against its schema."""
    if _glm45_string(v):
        values = v.get("enum", [v["const"]] if "const" in v else None)
        if values:
            return "(" + " | ".join(_lark_str(x) for x in values) + ")"
        lo, hi = v.get("minLength", 0), v.get("maxLength")
        return f"/[^<]{{{lo},{'' if hi is None else hi}}}/"
    return "%json " + json.dumps({**v, "x-guidance": {**JSON_OPTIONS, "lenient": lenient}}, ensure_ascii=False)


def _glm45_grammar(syntax: str, chosen: list[dict], many: bool) -> str:
    """GLM-4.5 family: the empty thinking block (glm45: `\n<think></think>`; glm47's prompt opened it:
    `</think>`), then the calls; each declared property `<arg_key>k</arg_key><arg_value>v</arg_value>`
    (required ones in order, then optional ones in property order). The markup is its tokens (`<think>`
    in llguidance's Lark: the token of that name), never its text."""
    nl = "" if syntax == "glm47" else "\n"
    def lit(t):
        return _lark_str(t) + " " if t else ""
    rules = []
    for i, f in enumerate(chosen):
        schema = f.get("parameters") or {}
        props = schema.get("properties") or {}
        if schema.get("type", "object") != "object" or not isinstance(props, dict):
            raise ValueError(f"function {f['name']}: a forced GLM-4.5 call needs parameters of type object with properties")
        lenient = not f.get("strict", False)

        def item(k, v, lenient=lenient):
            return (f"{lit(nl)}<arg_key> {_lark_str(k)} </arg_key> {lit(nl)}<arg_value> "
                    f"{_glm45_value(v if isinstance(v, dict) else {}, lenient)} </arg_value>")
        req = [k for k in props if k in set(schema.get("required") or ())]
        opt = [k for k in props if k not in req]
        body = " ".join(item(k, props[k]) for k in req) + "".join(f" ({item(k, props[k])})?" for k in opt)
        rules.append(f"c{i}: {lit(nl)}<tool_call> {_lark_str(f['name'])} {body} {lit(nl)}</tool_call>")
    think = '"\\n" <think> </think>' if nl else "</think>"
    return "\n".join([f"start: {think} call{' call*' if many else ''}",
                      "call: " + " | ".join(f"c{i}" for i in range(len(chosen)))] + rules) + "\n"


# ---- the reply side ---------------------------------------------------------------------------------------
class _Literal(Exception):
    pass


def _value(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant) \
            and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_value(k) if k is not None else None for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise _Literal("dict keys must be strings")
        return dict(zip(keys, (_value(v) for v in node.values)))
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null", "True", "False", "None"):
        return {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}[node.id]
    raise _Literal(f"not a literal: {ast.dump(node)[:60]}")


def chatglm3_arguments(body: str) -> str | None:
    """JSON arguments of a ChatGLM3 call body ("```python\\ntool_call(k=v, ...)\\n```"), or None when it
    is not one (read with `ast`, never evaluated)."""
    lines = body.strip().split("\n")
    if len(lines) < 3 or not lines[0].strip().startswith("```") or lines[-1].strip() != "```":
        return None
    try:
        tree = ast.parse("\n".join(lines[1:-1]).strip(), mode="eval").body
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "tool_call"
                and not tree.args and all(k.arg is not None for k in tree.keywords)):
            return None
        return json.dumps({k.arg: _value(k.value) for k in tree.keywords}, ensure_ascii=False)
    except (SyntaxError, ValueError, _Literal, RecursionError):
        return None


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolParser:
    """An incremental parser of one reply: `feed(piece)` and `finish()` return OpenAI chat deltas
    ({"content": ...} or {"tool_calls": [...]}) in order. After `finish`: `calls` (the complete ones),
    `broken` (a GLM-4 call whose streamed arguments did not end as a JSON object).

    The reply is split at "<|assistant|>" into turns; each turn is `metadata\\n content`. An empty metadata
    line: plain text (its newline dropped, as a reply without tools shows it). A known function's name:
    a call. Anything else: the turn's text as it is. `parallel=False`: what follows the first call is dropped."""

    def __init__(self, syntax: str, names, parallel: bool = True, new_id=new_call_id):
        if syntax not in SYNTAXES or syntax in GLM45:
            raise ValueError(f"tool syntax {syntax!r} is not one of {SYNTAXES[:2]} (make_parser picks the parser)")
        self.syntax, self.names, self.parallel, self.new_id = syntax, frozenset(names), parallel, new_id
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}}
        self.broken = False
        self.pending = ""  # a tail that may be the start of SEP
        self._turn()

    def _turn(self):
        self.mode = "skip" if self.calls and not self.parallel else "meta"  # meta / text / call / skip
        self.meta = self.body = ""
        self.open = None  # the streaming GLM-4 call's index once announced

    # ---- deltas ----
    def _content(self, out: list, s: str):
        if s:
            out.append({"content": s})

    def _announce(self, out: list, name: str) -> int:
        k = len(self.calls)
        self.calls.append({"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": ""}})
        out.append({"tool_calls": [{"index": k, "id": self.calls[k]["id"], "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        return k

    def _args(self, out: list, k: int, s: str):
        if s:
            self.calls[k]["function"]["arguments"] += s
            out.append({"tool_calls": [{"index": k, "function": {"arguments": s}}]})

    # ---- the turn's text ----
    def _text(self, out: list, s: str):
        if self.mode == "meta":
            self.meta += s
            if "\n" not in self.meta:
                if not any(n.startswith(self.meta.lstrip(" ")) for n in self.names):
                    self.mode = "text"
                    self._content(out, self.meta)
                return
            name, rest = self.meta.split("\n", 1)
            if name == "":
                self.mode = "text"
                self._content(out, rest)
            elif name.strip() in self.names:
                self.mode, self.meta = "call", name.strip()
                self._call_text(out, rest)
            else:
                self.mode = "text"
                self._content(out, self.meta)
        elif self.mode == "text":
            self._content(out, s)
        elif self.mode == "call":
            self._call_text(out, s)

    def _call_text(self, out: list, s: str):
        if self.open is not None:
            return self._args(out, self.open, s)
        self.body += s
        if self.syntax == "glm4" and self.body:
            if self.body[0] != "{":  # not a call after all: the turn is text
                self.mode = "text"
                self._content(out, self.meta + "\n" + self.body)
                return
            self.open = self._announce(out, self.meta)
            body, self.body = self.body, ""
            self._args(out, self.open, body)

    def _end_turn(self, out: list):
        if self.mode == "meta":
            self._content(out, self.meta)
        elif self.mode == "call":
            if self.open is not None:
                self.broken |= not _json_object(self.calls[self.open]["function"]["arguments"])
            else:
                args = chatglm3_arguments(self.body) if self.syntax == "chatglm3" else None
                if args is None:
                    self._content(out, self.meta + "\n" + self.body)
                else:
                    self._args(out, self._announce(out, self.meta), args)
        self._turn()

    # ---- public ----
    def feed(self, piece: str) -> list[dict]:
        out: list[dict] = []
        text = self.pending + piece
        *turns, last = text.split(SEP)
        for t in turns:
            self._text(out, t)
            self._end_turn(out)
        keep = next((k for k in range(min(len(SEP) - 1, len(last)), 0, -1) if SEP.startswith(last[-k:])), 0)
        self.pending = last[len(last) - keep:] if keep else ""
        self._text(out, last[:len(last) - keep])
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._text(out, self.pending)
        self.pending = ""
        self._end_turn(out)
        return out

    @property
    def ok(self) -> bool:
        """The reply held calls and all of them parsed."""
        return bool(self.calls) and not self.broken


class Glm45Parser:
    """`ToolParser`'s contract for the GLM-4.5 family: the thinking block first (kept in `reasoning`),
    then content up to `<tool_call>`, then calls, each announced whole (id, name and JSON arguments in
    one delta) at its `</tool_call>`. Whitespace between the pieces is the template's, not content. A
    call that does not parse (unknown name, stray text) is content as written."""

    OPEN, CLOSE, THINK_END = "<tool_call>", "</tool_call>", "</think>"

    def __init__(self, syntax: str, names, parallel: bool = True, new_id=new_call_id, fns=()):
        if syntax not in GLM45:
            raise ValueError(f"tool syntax {syntax!r} is not one of {GLM45}")
        self.names, self.parallel, self.new_id = frozenset(names), parallel, new_id
        self.strings = {f["name"]: {k for k, v in ((f.get("parameters") or {}).get("properties") or {}).items()
                                    if _glm45_string(v)} for f in fns}
        self.calls: list[dict] = []
        self.broken = False  # never: a call is sent only once whole
        self.reasoning = ""
        self.mode = "think" if syntax == "glm47" else "start"  # start / think / text / call / skip
        self.buf = ""  # text not yet decided
        self.started = False  # content sent

    def _arguments(self, name: str, body: str) -> str | None:
        m = re.fullmatch(r"\s*((?:<arg_key>.*?</arg_key>\s*<arg_value>.*?</arg_value>\s*)*)", body, re.S)
        if m is None:
            return None
        args = {}
        for k, v in re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", m.group(1), re.S):
            if k.strip() in self.strings.get(name, ()):
                args[k.strip()] = v
                continue
            try:
                args[k.strip()] = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                args[k.strip()] = v
        return json.dumps(args, ensure_ascii=False)

    def _call(self, out: list, text: str):
        """`text` is what lay between <tool_call> and </tool_call>."""
        name, _, rest = text.partition("<arg_key>")
        name = name.strip()
        args = self._arguments(name, "<arg_key>" + rest if _ else "") if name in self.names else None
        if args is None:
            return self._content(out, self.OPEN + text + self.CLOSE)
        if self.calls and not self.parallel:
            return
        k = len(self.calls)
        self.calls.append({"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": args}})
        out.append({"tool_calls": [{"index": k, "id": self.calls[k]["id"], "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": args}}]})

    def _content(self, out: list, s: str):
        if not self.started:
            s = s.lstrip("\n")
        if s:
            self.started = True
            out.append({"content": s})

    @staticmethod
    def _held(text: str, mark: str) -> int:
        """How many characters at the end of `text` could begin `mark`."""
        return next((k for k in range(min(len(mark) - 1, len(text)), 0, -1) if mark.startswith(text[-k:])), 0)

    def _run(self, out: list, final: bool):
        while True:
            b = self.buf
            if self.mode == "start":  # glm45: "\n<think>" may open the reply
                t = b.lstrip("\n")
                if t.startswith("<think>"):
                    self.mode, self.buf = "think", t[len("<think>"):]
                elif "<think>".startswith(t) and not final:
                    return
                else:
                    self.mode = "text"
            elif self.mode == "think":
                i = b.find(self.THINK_END)
                if i < 0:
                    if final:  # the thinking never ended: what there is is reasoning
                        self.reasoning, self.buf = self.reasoning + b, ""
                    return
                self.reasoning += b[:i]
                self.mode, self.buf = "text", b[i + len(self.THINK_END):]
            elif self.mode == "text":
                i = b.find(self.OPEN)
                if i >= 0:
                    if b[:i].strip():
                        self._content(out, b[:i].rstrip())
                    self.mode, self.buf = "call", b[i + len(self.OPEN):]
                    continue
                if final:
                    self._content(out, b.rstrip())  # the template strips the content
                    self.buf = ""
                    return
                keep = self._held(b, self.OPEN)
                head = b[:len(b) - keep]
                stripped = head.rstrip()  # trailing whitespace waits: it may come before a call
                if stripped.strip() or not self.calls:
                    self._content(out, stripped)
                self.buf = head[len(stripped):] + b[len(b) - keep:]
                return
            elif self.mode == "call":
                i = b.find(self.CLOSE)
                if i < 0:
                    if final:
                        self._content(out, self.OPEN + b)
                        self.buf = ""
                    return
                self._call(out, b[:i])
                self.mode, self.buf = "text", b[i + len(self.CLOSE):]

    def feed(self, piece: str) -> list[dict]:
        out: list[dict] = []
        self.buf += piece
        self._run(out, False)
        return out

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._run(out, True)
        return out

    @property
    def ok(self) -> bool:
        return bool(self.calls)


def make_parser(syntax: str, names, parallel: bool = True, new_id=new_call_id, fns=()):
    """The incremental parser of a reply in `syntax`: `ToolParser`, or `Glm45Parser` (which also takes the
    function objects `fns`, to type the values it reads)."""
    if syntax in GLM45:
        return Glm45Parser(syntax, names, parallel, new_id, fns)
    return ToolParser(syntax, names, parallel, new_id)


def merge(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """The content (None when empty) and complete tool calls that a list of deltas adds up to."""
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", ()):
            if "id" in c:
                calls.append({"id": c["id"], "type": "function", "function": dict(c["function"])})
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    return content or None, calls


def parse_reply(text: str, syntax: str, names, parallel: bool = True, new_id=new_call_id, fns=()) -> tuple[str | None, list[dict]]:
    """A whole reply as (content, tool_calls): content None when the reply is calls only; a reply whose
    calls do not all parse is plain content (its leading newline dropped, as a reply without tools).
    `fns`: the function objects (the GLM-4.5 family types argument values by their schemas)."""
    p = make_parser(syntax, names, parallel, new_id, fns)
    content, calls = merge(p.feed(text) + p.finish())
    if p.broken:
        return (text[1:] if text.startswith("\n") else text), []
    return (content, calls) if calls else (content or "", [])
