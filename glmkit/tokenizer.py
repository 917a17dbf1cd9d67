"""Tokenizer: one wrapper over HF `tokenizers`, GLM special tokens by name, the GLM-4 chat template.

    glmkit tokenizer train --vocab 16000 --out tok/ FILES...     # byte-level BPE
    tok = glmkit.load_tokenizer("tok/")          # tokenizer.json, or an upstream tokenizer.model
    ids = tok.encode("床前明月光"); tok.decode(ids)
    tok.special("gmask")                          # ids by role, never hard-coded
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    dec = tok.incremental_decoder(); text = "".join(dec.add(i) for i in ids) + dec.flush()

Byte-level BPE makes decoding lossless for any string. The pre-tokenizer splits like GPT-4's
(letters, up-to-3-digit numbers, punctuation runs, whitespace); a run of Han characters stays one
pre-token, so BPE learns frequent Chinese words. Upstream checkpoints ship other vocabularies,
converted on load to a `tokenizers` Tokenizer with the same ids (glmkit.vocab): GLM-4 and
CodeGeeX4 a tiktoken rank file (`tokenizer.model`, this pre-tokenizer is theirs), ChatGLM2/3 and
CodeGeeX2 a SentencePiece BPE model (`tokenizer.model`, specials appended after its pieces),
original GLM (`cog-pretrain.model`) and ChatGLM-6B (`ice_text.model`) SentencePiece unigram models
(SentencePiece models need the `sentencepiece` package for their protobuf).
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path


def check_unicode(text: str, where: str = "") -> None:
    """ValueError for a string that is not text: a lone surrogate ("\\ud800" is valid JSON, and Python
    keeps it) fails later in the tokenizer or in UTF-8 output."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a lone surrogate {text[e.start]!r} at character {e.start}{where}: not valid Unicode") from None


# GLM special tokens, in the order a freshly trained tokenizer gives them ids 0..9.
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# role -> names used across the family (original GLM spells sop/eop as <|startofpiece|> etc.)
ROLES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>"),
    "mask": ("[MASK]",), "smask": ("[sMASK]",), "gmask": ("[gMASK]",),
    "sop": ("<sop>", "<|startofpiece|>", "sop"), "eop": ("<eop>", "<|endofpiece|>", "eop"),
    "system": ("<|system|>",), "user": ("<|user|>",), "assistant": ("<|assistant|>",),
    "observation": ("<|observation|>",),
}
# ChatGLM2/3 spell sop/eop as bare words: such a name counts only as a special token, never as the
# ordinary word piece another vocabulary may have.
BARE_SPECIALS = frozenset({"sop", "eop"})
CHAT_ROLES = ("system", "user", "assistant", "observation")
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SENTENCE_END_CHARS = ".?!;。？！；…\n"


class Tokenizer:
    def __init__(self, tok, path: Path | None = None):
        self.tok, self.path = tok, path
        self._lock = threading.Lock()
        self._max_token_chars: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)), Path(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_sentencepiece(cls, model: str | Path | bytes, extra_specials=(), where: str | None = None) -> Tokenizer:
        """A SentencePiece model (a path, or the serialized ModelProto as bytes), unigram (original GLM,
        ChatGLM-6B) or BPE (ChatGLM2/3, llama-type GGUF vocabularies), as a `tokenizers` Tokenizer with
        SentencePiece's ids; `extra_specials` are appended after its pieces as special tokens (ChatGLM2/3
        append theirs so: CHATGLM2_SPECIALS / CHATGLM3_SPECIALS in glmkit.vocab). Needs `sentencepiece`."""
        from .vocab import sentencepiece_tokenizer

        path = None if isinstance(model, bytes) else Path(model)
        data = model if path is None else path.read_bytes()
        return cls(sentencepiece_tokenizer(data, tuple(extra_specials), where or str(path or "SentencePiece model")), path)

    @classmethod
    def from_tiktoken(cls, path: str | Path, special_tokens: dict[str, int] | None = None) -> Tokenizer:
        """A tiktoken rank file (GLM-4's `tokenizer.model`: `base64(token) rank` lines) as a byte-level
        BPE with tiktoken's ids under GLM-4's split pattern. `special_tokens` (name -> id, right after
        the ranks) default to GLM-4's published ones (glmkit.vocab.GLM4_SPECIALS from id len(ranks))."""
        from .vocab import GLM4_SPECIALS, read_tiktoken_ranks, tiktoken_tokenizer

        ranks = read_tiktoken_ranks(path)
        if special_tokens is None:
            special_tokens = {name: len(ranks) + k for k, name in enumerate(GLM4_SPECIALS)}
        return cls(tiktoken_tokenizer(ranks, dict(special_tokens), SPLIT_PATTERN, str(path)), Path(path))

    # ---- basics ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings in the text ("[MASK]", "<|user|>") are encoded as
        plain text unless `allow_special`: user input can never forge a role or mask token.
        Raises ValueError for text the tokenizer cannot take (a lone surrogate, a Rust panic)."""
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Parallel over all cores (the Rust side uses a thread pool).

        Pitfalls this handles: `tokenizers`' single-text `encode` holds the GIL for the whole call (a
        10 MB prompt froze a server's event loop for seconds), its batch call releases it, so every
        encode goes through here. `encode_special_tokens` is a flag on the shared tokenizer: it is set
        and used under one lock, or a thread encoding with `allow_special` could let another thread's
        user text through as special tokens. A panic in the Rust code (`PanicException`, a
        BaseException) becomes a ValueError, as the caller's bad input it is."""
        for t in texts:
            check_unicode(t)
        with self._lock:
            self.tok.encode_special_tokens = not allow_special
            try:
                return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
            except BaseException as e:  # pyo3's PanicException derives from BaseException
                if type(e).__name__ != "PanicException":
                    raise
                raise ValueError(f"the tokenizer could not encode this text ({e})") from None

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its byte length bounds them): a text longer
        than context x this can never fit, so a server refuses it before tokenizing."""
        if self._max_token_chars is None:
            self._max_token_chars = max(len(t.encode("utf-8", "replace")) for t in self.tok.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        i = self.tok.token_to_id(name)
        if i is None:
            raise KeyError(f"tokenizer {self.path or ''} has no token {name!r}")
        return i

    def special(self, role: str) -> int:
        """Id of a special token by role (eos, mask, smask, gmask, sop, eop, system, user, ...)."""
        if role not in ROLES:
            raise KeyError(f"unknown special role {role!r}; known: {list(ROLES)}")
        for name in ROLES[role]:
            i = self.tok.token_to_id(name)
            if i is not None and (name not in BARE_SPECIALS or self._is_special(i)):
                return i
        raise KeyError(f"tokenizer {self.path or ''} has no {role} token (looked for {ROLES[role]})")

    def _is_special(self, i: int) -> bool:
        t = self.tok.get_added_tokens_decoder().get(i)
        return t is not None and t.special

    def sentence_end_table(self):
        """Bool array over the vocabulary: True for tokens whose text ends a sentence."""
        import numpy as np

        table = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            s = self.tok.decode([i], skip_special_tokens=False)
            table[i] = bool(s) and s.rstrip(" \t")[-1:] in SENTENCE_END_CHARS and s.strip() != ""
        return table

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(directory) / "tokenizer.json"))

    # ---- chat --------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """GLM-4 chat format (`chat.Glm4`): `[gMASK]<sop>` then `<|role|>\\n{content}` per message.

        Returns ids and a loss mask that is True on assistant replies and on the token that ends
        each reply (the next role token, or `<|endoftext|>` after a final reply), so a model trained
        on it learns when to stop. With `add_generation_prompt`, ends with `<|assistant|>`. Other
        families' formats: `glmkit.chat.chat_format(model.cfg)`.
        """
        from .chat import FORMATS

        return FORMATS["glm4"].render(self, messages, add_generation_prompt)

    def chat_stop_ids(self) -> list[int]:
        """The ids that end a GLM-4 reply: end of text, the next user or observation turn."""
        from .chat import FORMATS

        return FORMATS["glm4"].stop_ids(self)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streams text token by token without ever emitting half a UTF-8 character.

    Byte-level tokens can end inside a multi-byte character; decoding them alone yields U+FFFD.
    We decode a short window (from the last emitted boundary) and hold back output while it ends
    in U+FFFD. The window restarts at each emission, so the cost per token stays constant.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here are already emitted

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (e.g. a stream that stopped mid-character), as decode would give it."""
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def train_bpe(files: list[str | Path] | None = None, vocab_size: int = 16000, texts=None, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with the GLM special tokens (ids 0..9) on files and/or an iterator."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    if files:
        for f in files:
            if not Path(f).exists():
                raise FileNotFoundError(f"training file {f} does not exist")
        tok.train([str(f) for f in files], trainer)
    elif texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        raise ValueError("train_bpe needs files or texts")
    return Tokenizer(tok)


def _jsonl_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a tokenizer.json, or a `.model` file (SentencePiece, or
    GLM-4's tiktoken ranks: told apart by content, both are named tokenizer.model upstream)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint directory, a tokenizer.json or a "
                                "tokenizer .model file")
    if not path.is_dir():  # a file the user named: read as named
        if path.suffix == ".model":  # upstream's tokenizer.model: its directory's config names the specials
            parent = path.parent if path.name == "tokenizer.model" else None
            return _read_model_file(path, _tokenizer_config(parent) if parent else {}, parent)
        if path.suffix == ".json":
            return Tokenizer.from_file(path)
        if path.suffix.lower() == ".gguf":  # the vocabulary a llama.cpp model file carries
            from .ggufio import read_vocab

            vocab = read_vocab(path)
            return Tokenizer.from_sentencepiece(vocab) if isinstance(vocab, bytes) else Tokenizer(vocab, path)
        raise ValueError(f"{path} is neither a directory nor a tokenizer.json / .model / .gguf file")
    from .convert import confined

    # in a checkpoint directory, a file (or symlink) pointing outside it is refused, as weights are
    config = _tokenizer_config(path)
    names = ["tokenizer.json", "tokenizer.model", "cog-pretrain.model", "ice_text.model"]
    auto_map = config.get("auto_map")
    auto = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None  # [slow class, fast class]
    fast = auto[1] if isinstance(auto, list) and len(auto) > 1 else None
    if config.get("tokenizer_class") in REMOTE_CODE_TOKENIZERS and not fast:
        # THUDM's remote-code tokenizers read tokenizer.model, and with no fast class named, nothing
        # reads a tokenizer.json beside it (CodeGeeX4 ships one): the published ids are the model's
        names.remove("tokenizer.model")
        names.insert(0, "tokenizer.model")
    for name in names:
        if (path / name).is_symlink() or (path / name).exists():
            confined(path, name, "tokenizer file")
            if name.endswith(".json"):
                return Tokenizer.from_file(path / name)
            return _read_model_file(path / name, config, path if name == "tokenizer.model" else None)
    raise FileNotFoundError(f"{path} has no tokenizer.json (nor a tokenizer .model); this checkpoint ships no tokenizer")


# tokenizer_config.json's tokenizer_class of THUDM's remote code: ChatGLM-6B/2/3 and CodeGeeX2 (ChatGLMTokenizer),
# GLM-4 and CodeGeeX4 (ChatGLM4Tokenizer)
REMOTE_CODE_TOKENIZERS = ("ChatGLMTokenizer", "ChatGLM4Tokenizer")


def _tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json of a checkpoint directory, {} when it has none."""
    from .convert import confined

    p = directory / "tokenizer_config.json"
    if not (p.is_symlink() or p.exists()):
        return {}
    confined(directory, p.name, "tokenizer file")
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e}); fix or remove it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(config).__name__}")
    return config


def _declared_specials(config: dict, where: str) -> dict[str, int]:
    """name -> id of tokenizer_config.json's `added_tokens_decoder` ({"151329": {"content": ...}})."""
    out = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            out[entry["content"]] = int(key)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{where}: added_tokens_decoder entry {key!r} is not {{id: {{\"content\": ...}}}}") from None
    return out


def _read_model_file(file: Path, config: dict, directory: Path | None) -> Tokenizer:
    """A `.model` file: tiktoken ranks (GLM-4) or a SentencePiece model, with the special tokens the
    checkpoint's tokenizer_config.json declares, or the published ones of its family."""
    from .vocab import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS, is_tiktoken_file, with_placeholders

    with open(file, "rb") as f:
        head = f.read(256)
    declared = _declared_specials(config, f"{directory or file.parent}/tokenizer_config.json")
    if is_tiktoken_file(head):
        return Tokenizer.from_tiktoken(file, declared or None)
    extra = ()
    if directory is not None and config.get("tokenizer_class") == "ChatGLMTokenizer":
        # ChatGLM2/3 and CodeGeeX2 append their specials after the pieces; ChatGLM3 adds the roles.
        # (ChatGLM-6B names its model ice_text.model and keeps its specials among the pieces.)
        extra = CHATGLM3_SPECIALS if _is_chatglm3(directory, declared) else CHATGLM2_SPECIALS
    tok = Tokenizer.from_sentencepiece(file, extra)
    # other checkpoints' added tokens follow the pieces (a gap holds a placeholder)
    after = [(name, i) for name, i in sorted(declared.items(), key=lambda kv: kv[1]) if i >= tok.vocab_size]
    for name, _ in with_placeholders(after, tok.vocab_size):
        tok.tok.add_special_tokens([name])
    for name, i in declared.items():  # what the checkpoint declares must be what we built
        if tok.tok.token_to_id(name) != i:
            raise ValueError(f"{file}: tokenizer_config.json declares {name!r} as id {i}, but the model gives "
                             f"{tok.tok.token_to_id(name)}; this tokenizer.model does not match its config")
    return tok


def _is_chatglm3(directory: Path, declared: dict[str, int]) -> bool:
    """ChatGLM3 (roles as special tokens) rather than ChatGLM2 / CodeGeeX2: its tokenizer_config.json
    declares a role token, or (older revisions) its tokenization_chatglm.py, read as text, lists them."""
    from .convert import confined
    from .vocab import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS

    if any(name in declared for name in set(CHATGLM3_SPECIALS) - set(CHATGLM2_SPECIALS)):
        return True
    code = directory / "tokenization_chatglm.py"
    if code.is_symlink() or code.exists():
        confined(directory, code.name, "tokenizer file")
        return "<|observation|>" in code.read_text(encoding="utf-8", errors="replace")
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="glmkit tokenizer", description="Train a byte-level BPE with the GLM special tokens.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on text files (.txt, or .jsonl with a 'text' field)")
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab", type=int, default=16000)
    t.add_argument("--out", required=True, help="directory for tokenizer.json")
    t.add_argument("--min-frequency", type=int, default=2)
    a = p.parse_args(argv)
    files = [Path(f) for f in a.files]
    jsonl = [f for f in files if f.suffix == ".jsonl"]
    if jsonl:
        texts = (t for f in files for t in (_jsonl_texts(f) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]))
        tok = train_bpe(vocab_size=a.vocab, texts=texts, min_frequency=a.min_frequency)
    else:
        tok = train_bpe(files, vocab_size=a.vocab, min_frequency=a.min_frequency)
    tok.save(a.out)
    print(f"tokenizer with {tok.vocab_size} tokens -> {Path(a.out) / 'tokenizer.json'}")
    return 0
