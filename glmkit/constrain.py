"""Constrained decoding: a `Constraint` says what a sequence may be (a JSON schema, any JSON object, a
regular expression, one of a list of strings, a Lark grammar); the sampler masks every token that
could not continue it, so the output always matches.

    from glmkit.constrain import Constraint
    c = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    params = SamplingParams(max_new_tokens=64, constraint=c)
    generate(model, [ids], params, tokenizer=tok)              # the tokenizer's end of text ends it
    Engine(model, constraint_vocab=ConstraintVocab.of(tok, model.cfg.vocab_size))   # the engine: stop_ids needed
    Constraint.choice(["positive", "negative"]); Constraint.regex(r"\\d{4}-\\d{2}-\\d{2}")
    Constraint.lark('start: "yes" | "no"')
    # the server: response_format (json_object, json_schema), guided_json / _regex / _choice / _grammar

Built on llguidance (its Earley parser over a derivative-based lexer, from PyPI): chosen over
xgrammar after measuring both on a 151,552-token vocabulary (bench/constrained.py, Zen 4): llguidance
compiled a schema in 1.2 ms (a second one 0.7 ms) where xgrammar took 922 ms (8 ms), and a server sees a
new schema with most requests; masks took 0.20 ms median / 4.3 ms at worst per token against xgrammar's
0.006 / 18 ms, both small beside a decode step; and it is one wheel with no dependencies where xgrammar
brings triton, transformers and tvm-ffi. A `Constraint` is a value (hashable, shareable by the rows
that use it); the per-row parsing state lives in the sampler.

JSON is generated compactly as `json.dumps` writes it (", " and ": ", no other whitespace): flexible
whitespace would let a sampled model pad forever.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# llguidance's JSON compiler options: json.dumps's separators, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ImportError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What a sequence must match. `kind` is one of KINDS; `spec` its canonical text (the schema as
    JSON text, the pattern, the choices as a JSON list, the Lark grammar); `strict` (JSON schemas):
    refuse keywords the engine cannot enforce rather than ignore them; `newline_first`: one newline may
    come before the match (`after_newline`); `think_first`: the `</think>` token comes first (`after_thinking`)."""

    kind: str
    spec: str
    strict: bool = True
    newline_first: bool = False
    think_first: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind {self.kind!r} is not one of {KINDS}")
        if not isinstance(self.spec, str):
            raise ValueError(f"constraint spec must be text, got {type(self.spec).__name__}")

    # ---- constructors ----
    @classmethod
    def json_schema(cls, schema: dict | bool | str, strict: bool = True) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema is an object (or true / false), got {type(schema).__name__}")
        if schema is False:
            raise ValueError("the JSON schema false admits no value: nothing could be generated")
        if schema is True:  # any JSON value: the empty schema, which the grammar engine takes
            schema = {}
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), strict)  # key order kept: properties come out in it

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a regex constraint needs a non-empty pattern")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("a choice constraint needs a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("a grammar constraint needs a non-empty Lark grammar")
        return cls("lark", grammar)

    def after_newline(self) -> Constraint:
        """This constraint with one optional newline before it: GLM-4's chat replies start with "\\n" after
        <|assistant|> (the chat layer drops it), and forbidding it would push the model off its own first
        token. Compact JSON has no other room for whitespace."""
        return dataclasses.replace(self, newline_first=True)

    def after_thinking(self) -> Constraint:
        """This constraint after the `</think>` token: GLM-4.7's prompt opens the thinking block, which the
        reply must close before its content (a reply still thinking is no answer yet)."""
        return dataclasses.replace(self, think_first=True)

    # ---- to the engine ----
    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (cached: rows sharing a constraint compile it once)."""
        return _grammar(self)

    def _build_grammar(self) -> str:
        body = self._body_grammar()
        if not (self.newline_first or self.think_first):
            return body
        # llguidance composes grammars: a Lark rule refers to another grammar of the list as @name
        try:  # llguidance's JSON form (schemas, regexes), or Lark text (grammars, choices)
            inner = json.loads(body)["grammars"]
        except (ValueError, TypeError, KeyError):
            inner = [{"lark_grammar": body}]
        inner[0]["name"] = "body"
        lead = "start: </think> @body" if self.think_first else 'start: "\\n"? @body'
        return json.dumps({"grammars": [{"name": "lead", "lark_grammar": lead}] + inner})

    def _body_grammar(self) -> str:
        llg = _llguidance()
        M = llg.LLMatcher
        if self.kind == "json_schema":
            return M.grammar_from_json_schema(self.spec, defaults={**JSON_OPTIONS, "lenient": not self.strict})
        if self.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            # \d as [0-9] (llguidance's default for Lark; its bare regexes take Unicode digits, which its newer
            # tables and Python's re disagree on, e.g. U+1E5F8); \w and \s stay Unicode (Chinese is a word)
            return M.grammar_from_lark(f"start: /{llg.regex_to_lark(self.spec, 'd')}/")
        if self.kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in json.loads(self.spec)))
        return M.grammar_from_lark(self.spec)

    def check(self) -> None:
        """ValueError naming the problem when the grammar engine cannot build this constraint (the
        verdict is cached: the server checks at its boundary, the engine again at submit)."""
        err = _validation_error(self)
        if err:
            raise ValueError(f"invalid {self.kind.replace('_', ' ')} constraint: {err}")


@lru_cache(maxsize=256)
def _grammar(c: Constraint) -> str:
    return c._build_grammar()


@lru_cache(maxsize=256)
def _validation_error(c: Constraint) -> str:
    try:
        return _llguidance().LLMatcher.validate_grammar(c.grammar())
    except ValueError as e:
        return str(e)


class ConstraintVocab:
    """A tokenizer's vocabulary as the grammar engine reads it: llguidance's tokenizer over the model's
    `n_vocab` ids (an embedding may be padded past the tokenizer's; those ids are never allowed), built
    on first use and shared by every row (`of` keeps one per tokenizer and size). It makes each row's
    matcher (`matcher`) and fills the rows' allowed-token bitmasks (`fill`).

    llguidance marks "the constraint may end here" with the bit of its end-of-sequence token, the
    tokenizer's end of text; the sampler moves that bit to each row's own stop ids (a chat format has
    several). Special tokens never match a constraint's text, so they appear only as such stops."""

    _shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer, n_vocab: int):
        if n_vocab < tokenizer.vocab_size:
            raise ValueError(f"n_vocab={n_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
        try:
            self.eos = tokenizer.special("eos")
        except KeyError:
            raise ValueError("constrained decoding needs the tokenizer's end-of-text token, which marks where a "
                             "constraint may end; this tokenizer has none") from None
        self.tokenizer, self.n_vocab = tokenizer, n_vocab
        self.words = (n_vocab + 31) // 32  # int32 words of one row's bitmask

    @classmethod
    def of(cls, tokenizer, n_vocab: int) -> ConstraintVocab:
        """The one ConstraintVocab of this tokenizer and vocabulary size (llguidance's tokenizer over
        151,552 ids takes a while to build: once per process)."""
        with cls._lock:
            per = cls._shared.setdefault(tokenizer, {})
            if n_vocab not in per:
                per[n_vocab] = cls(tokenizer, n_vocab)
            return per[n_vocab]

    @cached_property
    def lltokenizer(self):
        """llguidance's tokenizer, read from the `tokenizers` JSON. ValueError when llguidance cannot read it
        (it knows byte-level BPE, GLM-4's, and SentencePiece BPE with byte fallback, ChatGLM2/3's; not a
        SentencePiece unigram's Metaspace decoder, original GLM's and ChatGLM-6B's)."""
        llg = _llguidance()
        try:
            return llg.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.n_vocab, eos_token=self.eos)
        except Exception as e:  # a ValueError or a Rust panic, for a tokenizer it cannot read
            raise ValueError(f"the grammar engine (llguidance) cannot read this tokenizer ({e}), so constrained "
                             "decoding is not available with it") from None

    @cached_property
    def _executor(self):
        return _llguidance().LLExecutor()

    def matcher(self, constraint: Constraint):
        """A fresh llguidance matcher for one row (quiet: an error shows in its state, read by the sampler)."""
        return _llguidance().LLMatcher(self.lltokenizer, constraint.grammar(), log_level=0)

    def check(self, constraint: Constraint) -> None:
        """ValueError when `constraint` cannot start in this vocabulary: its matcher fails to build (a grammar
        too large for the engine's limits, e.g. a{1000000}) or no token may begin it (a pattern that admits
        no text). What `Constraint.check` cannot see without the tokenizer; one mask, milliseconds."""
        constraint.check()
        m = self.matcher(constraint)
        mask = torch.zeros(1, self.words, dtype=torch.int32)
        if not m.is_error():
            self.fill([m], mask)
        if m.is_error():
            raise ValueError(f"invalid {constraint.kind.replace('_', ' ')} constraint: {m.get_error().splitlines()[0]}")
        if not mask.any() and not m.is_accepting():
            raise ValueError(f"the {constraint.kind.replace('_', ' ')} constraint admits no text: no token can begin it")

    def fill(self, matchers: list, bitmask) -> None:
        """Each matcher's allowed next tokens into row k of `bitmask` (n, words) int32, on the CPU and
        contiguous: bit i of word j allows token 32 j + i. Several rows in parallel (llguidance's threads).
        Through the matchers' own calls, not `llguidance.torch`: importing that compiles a kernel with
        torch.compile (seconds at first use) that we do not need."""
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous() or \
                tuple(bitmask.shape) != (len(matchers), self.words):
            raise ValueError(f"the bitmask must be a contiguous CPU int32 tensor of shape ({len(matchers)}, {self.words})")
        row_bytes = self.words * 4
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
        else:
            self._executor.unsafe_compute_mask_ptr([(m, k) for k, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   row_bytes, len(matchers))
