"""Chat formats: how each GLM family lays a conversation out in token ids, which ids end a reply, and
(CodeGeeX4) how a code prefix and suffix become a fill-in-the-middle prompt.

    from glmkit.chat import chat_format
    fmt = chat_format(model.cfg)                    # cfg.chat_format, or GLM-4's when it names none
    ids, loss_mask = fmt.render(tok, messages, add_generation_prompt=True)
    fmt.stop_ids(tok)                               # the ids that end a reply
    if fmt.infills: ids = fmt.infill(tok, tok.encode(prefix), tok.encode(suffix))

Each format renders token for token what its family's published remote code (`build_prompt`,
`build_chat_input` / `build_single_message`) or chat template renders:

    chatglm    ChatGLM-6B    "[Round i]\\n问：q\\n答：a\\n" rounds from 0 (a single question alone, no
                             round header), then [gMASK] <sop>: a prefix-LM reads the prompt as Part A
    chatglm2   ChatGLM2-6B   [gMASK] sop + "[Round i]\\n\\n问：q\\n\\n答：a\\n\\n" rounds from 1, one encode
    chatglm3   ChatGLM3-6B   [gMASK] sop, then per message <|role|> encode(metadata + "\\n") encode(content)
    glm4       GLM-4-9B      [gMASK] <sop>, then per message <|role|> encode(metadata + "\\n" + content)
    codegeex2  CodeGeeX2-6B  code completion only ("# language: Python\\n..."); no chat
    glm45      GLM-4.5/4.6   [gMASK]<sop> <|role|> "\\n" content; assistant "\\n<think>..</think>\\n" content,
                             calls as <tool_call> markup (glmkit.tools); the markup as its tokens
    glm47      GLM-4.7/5     glm45 without the newlines; the prompt opens <think>
    codegeex4  CodeGeeX4     GLM-4's chat, and code infilling: <|user|> "\\n###PATH:...\\n###LANGUAGE:...\\n
                             ###MODE:BLOCK\\n" <|code_suffix|> suffix <|code_prefix|> prefix <|code_middle|>
                             <|assistant|> "\\n"

Pitfall: ChatGLM2/3 use SentencePiece, which puts a "▁" dummy prefix at the start of every encode
call, so what is encoded separately matters (ChatGLM3's "\\n" after a role is its own call, and so its
own "▁"); GLM-4's byte-level BPE has no dummy prefix. The loss mask (for SFT) is True on each assistant
reply and on the token that ends it (the next role token, or end of text after the last reply).
Text-free edge logic like `tokenizer`: no model imports.
"""

from __future__ import annotations

from collections.abc import Collection

ROLES = ("system", "user", "assistant", "observation")


def _first(tok, names: tuple[str, ...]) -> int:
    """Id of the first of `names` the tokenizer has (families spell <sop> as "sop", eos as "</s>")."""
    for n in names:
        i = tok.tok.token_to_id(n)
        if i is not None:
            return i
    raise KeyError(f"tokenizer {tok.path or ''} has none of the tokens {names}")


def _check(messages, roles: tuple[str, ...], fmt: str) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {n}: must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {n}: role {role!r} is not one of {ROLES}")
        if role not in roles:
            raise ValueError(f"message {n}: the {fmt} chat format has no {role} turns; it takes {roles}")
        if not isinstance(content, str):
            raise ValueError(f"message {n}: content must be a string, got {type(content).__name__}")
        if not isinstance(m.get("metadata", ""), str):
            raise ValueError(f"message {n}: metadata must be a string, got {type(m['metadata']).__name__}")


class ChatFormat:
    """One family's chat layout. `blank`: the rendered prompt ends with [gMASK] <sop> and a prefix-LM
    reads all before them bidirectionally (lay it out with `infill.blank_prompt`); otherwise the ids are
    read causally as they are. `strip_newline`: a reply starts with the template's "\\n" (an empty
    metadata line), which is not part of the reply's text. `infills`: has a code infilling prompt.
    `tools`: the family's tool-calling syntax (`glmkit.tools`), None for a family without tools."""

    name = ""
    blank = False
    strip_newline = False
    infills = False
    tools: str | None = None

    def render(self, tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        raise ValueError(self.no_chat)

    def stop_ids(self, tok) -> list[int]:
        return [tok.special("eos")]

    def infill(self, tok, prefix: list[int], suffix: list[int]) -> list[int]:
        raise ValueError(f"the {self.name} format has no code infilling prompt")

    def reply_constraint(self, constraint):
        """A constraint on the reply's text as the constraint on what the model writes after the prompt:
        the template's newline after <|assistant|> may come first (the chat layer drops it)."""
        return constraint.after_newline() if self.strip_newline else constraint

    @property
    def no_chat(self) -> str:
        return f"the {self.name} format has no chat template"

    def __repr__(self) -> str:
        return f"<ChatFormat {self.name}>"


class RoleFormat(ChatFormat):
    """ChatGLM3 and GLM-4: [gMASK] sop, then `<|role|>{metadata}\\n{content}` per message, a reply
    ended by the next role token (or end of text); generation prompted by `<|assistant|>`."""

    strip_newline = True
    prefix: tuple[tuple[str, ...], ...] = ()  # the [gMASK] and sop tokens' names, as the family spells them

    def body(self, tok, metadata: str, content: str) -> list[int]:
        raise NotImplementedError

    def render(self, tok, messages, add_generation_prompt=False):
        _check(messages, ROLES, self.name)
        ids, mask = [_first(tok, names) for names in self.prefix], [False, False]
        for n, m in enumerate(messages):
            ids.append(tok.special(m["role"]))
            mask.append(n > 0 and messages[n - 1]["role"] == "assistant")  # ends the reply before it
            body = self.body(tok, m.get("metadata", ""), m["content"])
            ids += body
            mask += [m["role"] == "assistant"] * len(body)
        last_assistant = bool(messages) and messages[-1]["role"] == "assistant"
        if last_assistant and not add_generation_prompt:
            ids.append(tok.special("eos"))
            mask.append(True)
        if add_generation_prompt:
            ids.append(tok.special("assistant"))
            mask.append(last_assistant)
        return ids, mask

    def stop_ids(self, tok):
        return [tok.special(r) for r in ("eos", "user", "observation")]


class Glm4(RoleFormat):
    """GLM-4's chat template renders the text `<|role|>{metadata}\\n{content}` and encodes it whole."""

    name = "glm4"
    tools = "glm4"
    prefix = (("[gMASK]",), ("<sop>",))

    def body(self, tok, metadata, content):
        return tok.encode(f"{metadata}\n{content}")


class ChatGLM3(RoleFormat):
    """ChatGLM3's build_single_message: encode(f"{metadata}\\n") and encode(content), two calls."""

    name = "chatglm3"
    tools = "chatglm3"
    prefix = (("[gMASK]",), ("sop", "<sop>"))

    def body(self, tok, metadata, content):
        return tok.encode(f"{metadata}\n") + tok.encode(content)


class CodeGeeX4(Glm4):
    """GLM-4's chat, and CodeGeeX4's infilling prompt (its guide's "contextual completion", BLOCK mode,
    path and language left blank as the guide allows). The three code markers are single tokens where
    the tokenizer has them, their text otherwise."""

    name = "codegeex4"
    infills = True
    strip_newline = True
    MARKERS = ("<|code_suffix|>", "<|code_prefix|>", "<|code_middle|>")

    def infill(self, tok, prefix, suffix):
        marks = []
        for name in self.MARKERS:
            i = tok.tok.token_to_id(name)
            marks.append([i] if i is not None else tok.encode(name))
        return ([_first(tok, names) for names in self.prefix] + [tok.special("user")]
                + tok.encode("\n###PATH:\n###LANGUAGE:\n###MODE:BLOCK\n") + marks[0] + list(suffix) + marks[1]
                + list(prefix) + marks[2] + [tok.special("assistant")] + tok.encode("\n"))


def _encode_parts(tok, parts) -> list[int]:
    """Ids of a turn given as parts: an int is a token id, a 1-tuple `(markup,)` the template's markup
    (`<think>`, `<tool_call>` ...: its token where the tokenizer has one, else its text), a str plain text.
    Adjacent text is encoded in one call, as a chat template's text is tokenized between added tokens."""
    ids, text = [], ""
    for p in parts:
        i = tok.tok.token_to_id(p[0]) if isinstance(p, tuple) else None
        if isinstance(p, tuple) and i is None:
            text += p[0]
        elif isinstance(p, str):
            text += p
        else:
            ids += tok.encode(text) if text else []
            ids.append(p if isinstance(p, int) else i)
            text = ""
    return ids + (tok.encode(text) if text else [])


class Glm45(ChatFormat):
    """GLM-4.5 / 4.6 (Glm4Moe; its chat_template.jinja, GLM-4.6's identical in layout): [gMASK]<sop>, the
    tools (when any) as the first system turn, then `<|role|>\n{content}` per message; an assistant turn
    is `\n<think>{reasoning}</think>` (reasoning shown only after the last user message, else the empty
    `\n<think></think>`), `\n{content}` when there is any, then its calls
    `\n<tool_call>{name}\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>...\n</tool_call>`; consecutive tool
    results share one `<|observation|>` turn, each `\n<tool_response>\n{content}\n</tool_response>`.
    Thinking is on (the template's default with enable_thinking unset): the prompt ends `<|assistant|>` and
    the reply opens with `\n<think>`; `glmkit.tools`' parser takes the reasoning out of the reply's content.
    Messages may carry OpenAI `tool_calls` (arguments a JSON object's text); `fns` are the tools shown."""

    name = "glm45"
    tools = "glm45"
    strip_newline = True
    nl = "\n"  # between the template's pieces (GLM-4.7's compact layout has none)
    empty_think = ("\n", ("<think>",), ("</think>",))  # an assistant turn without shown reasoning
    reply_opens: tuple = ()  # what the generation prompt adds after <|assistant|>

    def render(self, tok, messages, add_generation_prompt=False, fns=()):
        from .tools import glm45_call, glm45_tools_turn

        _check(messages, ROLES, self.name)
        nl, ids, mask = self.nl, [_first(tok, ("[gMASK]",)), _first(tok, ("<sop>",))], [False, False]
        last_user = max((n for n, m in enumerate(messages) if m["role"] == "user"), default=-1)

        def add(parts, learned):
            body = _encode_parts(tok, parts)
            ids.extend(body)
            mask.extend([learned] * len(body))
        if fns:
            ids.append(tok.special("system"))
            mask.append(False)
            add(glm45_tools_turn(fns, compact=not nl), False)
        for n, m in enumerate(messages):
            role, content = m["role"], m["content"]
            after_reply = n > 0 and messages[n - 1]["role"] == "assistant"
            if m.get("tool_calls") and role != "assistant":
                raise ValueError(f"message {n}: only assistant messages carry tool_calls, not {role} messages")
            if not (role == "observation" and n > 0 and messages[n - 1]["role"] == "observation"):
                ids.append(tok.special(role))
                mask.append(after_reply)
            if role == "observation":
                add([nl, ("<tool_response>",), nl + content + nl, ("</tool_response>",)], False)
            elif role != "assistant":
                add([nl + content], False)
            else:
                reasoning = ""
                if "</think>" in content:  # the template's split: reasoning before </think>, content after
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                parts = list(self.empty_think) if not (n > last_user and reasoning) else \
                    [nl, ("<think>",), reasoning.strip(), ("</think>",)]
                if content.strip():
                    parts.append(nl + content.strip())
                for j, c in enumerate(m.get("tool_calls") or ()):
                    parts += glm45_call(c["function"]["name"], c["function"]["arguments"], nl, f"messages[{n}].tool_calls[{j}]")
                add(parts, True)
        last_assistant = bool(messages) and messages[-1]["role"] == "assistant"
        if last_assistant and not add_generation_prompt:  # end of the reply, for SFT (the template writes none)
            ids.append(tok.special("eos"))
            mask.append(True)
        if add_generation_prompt:
            ids.append(tok.special("assistant"))
            mask.append(last_assistant)
            add(list(self.reply_opens), False)
        return ids, mask

    def stop_ids(self, tok):
        return [tok.special(r) for r in ("eos", "user", "observation")]


class Glm47(Glm45):
    """GLM-4.7 / GLM-4.7-Flash / GLM-5 (Glm4MoeLite, GlmMoeDsa; GLM-4.7-Flash's chat_template.jinja): GLM-4.5's
    turns with no newlines between the pieces, an assistant turn without shown reasoning opens `</think>`,
    and the generation prompt opens the thinking block itself: `<|assistant|><think>`."""

    name = "glm47"
    tools = "glm47"
    strip_newline = False
    nl = ""
    empty_think = (("</think>",),)
    reply_opens = (("<think>",),)

    def reply_constraint(self, constraint):
        return constraint.after_thinking()  # the prompt opened <think>: closed at once, then the constrained text


class RoundFormat(ChatFormat):
    """ChatGLM-6B and ChatGLM2: user / assistant turns as "[Round i]" text, no system or observation
    turns. Generation continues after "答：". A conversation that ends with an assistant reply renders
    as the families' fine-tuning scripts lay one out: the prompt (earlier replies inside it, not
    learned), the last reply encoded on its own, then the end token; the mask is True on those."""

    first_round, sep, alone = 0, "\n", False

    def _prompt(self, messages) -> tuple[str, str | None]:
        _check(messages, ("user", "assistant"), self.name)
        for n, m in enumerate(messages):
            want = "user" if n % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"message {n}: the {self.name} format needs user and assistant turns alternating, "
                                 f"starting with user; got {m['role']!r} where {want!r} belongs")
        if not messages:
            raise ValueError(f"the {self.name} format needs at least one user message")
        answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        turns = messages[:-1] if answer is not None else messages
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        query = turns[-1]["content"]
        if self.alone and not pairs:
            return query, answer
        s, r0 = self.sep, self.first_round
        text = "".join(f"[Round {r0 + i}]{s}问：{q}{s}答：{a}{s}" for i, (q, a) in enumerate(pairs))
        return text + f"[Round {r0 + len(pairs)}]{s}问：{query}{s}答：", answer

    def render(self, tok, messages, add_generation_prompt=False):
        prompt, answer = self._prompt(messages)
        if answer is not None and add_generation_prompt:
            raise ValueError(f"the {self.name} format prompts a reply only after a user message; the last message "
                             "is the assistant's")
        ids = self.wrap(tok, tok.encode(prompt))
        mask = [False] * len(ids)
        if answer is not None:
            reply = tok.encode(answer) + [self.end(tok)]
            ids, mask = ids + reply, mask + [True] * len(reply)
        return ids, mask

    def wrap(self, tok, prompt: list[int]) -> list[int]:
        raise NotImplementedError

    def end(self, tok) -> int:
        raise NotImplementedError


class ChatGLM(RoundFormat):
    """ChatGLM-6B's build_prompt; its tokenizer appends [gMASK] <sop>, and a reply ends with <eop>."""

    name = "chatglm"
    blank = True
    alone = True

    def wrap(self, tok, prompt):
        return prompt + [tok.special("gmask"), tok.special("sop")]

    def end(self, tok):
        return tok.special("eop")

    def stop_ids(self, tok):
        return [tok.special("eop"), tok.special("eos")]


class ChatGLM2(RoundFormat):
    """ChatGLM2-6B's build_prompt, encoded after its [gMASK] sop prefix; a reply ends with </s>."""

    name = "chatglm2"
    first_round, sep = 1, "\n\n"

    def wrap(self, tok, prompt):
        return [_first(tok, ("[gMASK]",)), _first(tok, ("sop", "<sop>"))] + prompt

    def end(self, tok):
        return tok.special("eos")


class CodeGeeX2(ChatFormat):
    """CodeGeeX2-6B: a code completion model with no chat; prompts are code headed by a language tag."""

    name = "codegeex2"

    @property
    def no_chat(self) -> str:
        return ("CodeGeeX2 is a code completion model with no chat format; complete a prompt instead, e.g. "
                "'# language: Python\\n# a function that adds two numbers\\ndef add('")


FORMATS: dict[str, ChatFormat] = {f.name: f for f in (Glm4(), ChatGLM3(), ChatGLM2(), ChatGLM(), CodeGeeX2(), CodeGeeX4(),
                                                      Glm45(), Glm47())}


def get_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise KeyError(f"unknown chat format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def chat_format(cfg, tok=None) -> ChatFormat:
    """The format a model's config names (`ModelConfig.chat_format`). When it names none: a ChatGLM2/3
    tokenizer (its <sop> is spelled "sop") says which of the two by its role tokens; otherwise GLM-4's
    (what every model used before formats were chosen per checkpoint, and what glmkit's own models train on)."""
    name = getattr(cfg, "chat_format", None)
    if name is None and tok is not None and tok.tok.token_to_id("sop") is not None:
        name = "chatglm3" if tok.tok.token_to_id("<|user|>") is not None else "chatglm2"
    return get_format(name or "glm4")


# ---- choosing the format of an upstream (remote-code) release -------------------------------------------
GLM4_VOCAB = 151552  # GLM-4 / CodeGeeX4 padded_vocab_size; ChatGLM2/3 / CodeGeeX2: 65024; ChatGLM-6B: 130528
GLM4_EOS = 151329  # <|endoftext|>, first of GLM-4's eos_token_id list


def _names(*values) -> str:
    """The release names a config carries (`_name_or_path`, tokenizer_config's `name_or_path`), lowered,
    with the directory part dropped: a local copy's path names its parent folders too."""
    return " ".join(v.rstrip("/").rsplit("/", 1)[-1].lower() for v in values if isinstance(v, str))


def format_from_config(d: dict, tokenizer_config: dict | None = None, token_names: Collection[str] = ()) -> str | None:
    """The chat format of a THUDM remote-code release (`model_type: chatglm`), from its config.json `d`;
    None when it cannot tell.

    `tokenizer_config`: the release's tokenizer_config.json (its `name_or_path`, and `chat_template`:
    ChatGLM3's renders `<|{{ role }}|>` role tokens; ChatGLM2 and CodeGeeX2 have none). `token_names`: the special tokens the release's tokenizer
    has (ChatGLM3's tokenization_chatglm.py adds <|system|> ... <|observation|>, ChatGLM2's only [MASK]
    [gMASK] [sMASK] sop eop). Needed because ChatGLM2, ChatGLM3 and CodeGeeX2 share one architecture,
    one tokenizer.model and near-identical config.json files: only their names (`_name_or_path`) and the
    tokenizer's role tokens tell them apart. GLM-4 and CodeGeeX4 share the GLM-4 vocabulary.
    """
    if not isinstance(d, dict):
        raise ValueError(f"config.json must be a JSON object, got {type(d).__name__}")
    tc = tokenizer_config if isinstance(tokenizer_config, dict) else {}
    names = _names(d.get("_name_or_path"), tc.get("name_or_path"), tc.get("_name_or_path"))
    template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else ""
    tokens = set(token_names)
    vocab = d.get("padded_vocab_size", d.get("vocab_size"))
    eos = d.get("eos_token_id")
    eos = set(eos) if isinstance(eos, list) else {eos}
    if "position_encoding_2d" in d:
        return "chatglm"
    # GLM-4's vocabulary (its size, its eos, its bracketed <sop>) or its release name
    if vocab == GLM4_VOCAB or GLM4_EOS in eos or "<sop>" in tokens or "codegeex4" in names or "glm-4" in names or "glm4" in names:
        return "codegeex4" if "codegeex4" in names else "glm4"
    if "codegeex2" in names:
        return "codegeex2"
    if "<|user|>" in tokens or "<|" in template or "chatglm3" in names:  # role tokens: ChatGLM3's template has them
        return "chatglm3"
    if "chatglm2" in names or (tokens and "[gMASK]" in tokens):
        return "chatglm2"
    return None
