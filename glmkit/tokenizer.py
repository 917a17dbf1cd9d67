"""Tokenizer: one wrapper over HF `tokenizers`, GLM special tokens by name, the GLM-4 chat template.

    glmkit tokenizer train --vocab 16000 --out tok/ FILES...     # byte-level BPE
    tok = glmkit.load_tokenizer("tok/")          # tokenizer.json, or a SentencePiece *.model
    ids = tok.encode("床前明月光"); tok.decode(ids)
    tok.special("gmask")                          # ids by role, never hard-coded
    ids, loss_mask = tok.render_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    dec = tok.incremental_decoder(); text = "".join(dec.add(i) for i in ids) + dec.flush()

Byte-level BPE makes decoding lossless for any string. The pre-tokenizer splits like GPT-4's
(letters, up-to-3-digit numbers, punctuation runs, whitespace); a run of Han characters stays one
pre-token, so BPE learns frequent Chinese words. Original GLM (`cog-pretrain.model`) and
ChatGLM-6B (`ice_text.model`) ship SentencePiece models: unigram ones are converted to a
`tokenizers` Tokenizer on load (needs the `sentencepiece` package for its model protobuf).
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
    "sop": ("<sop>", "<|startofpiece|>"), "eop": ("<eop>", "<|endofpiece|>"),
    "system": ("<|system|>",), "user": ("<|user|>",), "assistant": ("<|assistant|>",),
    "observation": ("<|observation|>",),
}
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
    def from_sentencepiece(cls, path: str | Path) -> Tokenizer:
        """Convert a SentencePiece unigram model (original GLM, ChatGLM-6B) to a `tokenizers` one.

        Pieces and scores become a Unigram model; SentencePiece's normalizer (its precompiled NFKC
        map, whitespace collapsing) and its "▁" word-boundary marker are reproduced; user-defined
        and control pieces ([MASK], <|startofpiece|>, ...) become special tokens, matched whole.
        """
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError as e:
            raise ImportError(f"reading {path} needs the sentencepiece and protobuf packages ({e})") from None
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(Path(path).read_bytes())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        if proto.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM:
            raise NotImplementedError(f"{path}: only SentencePiece unigram models are supported")
        # Pitfall: SentencePiece keeps user-defined pieces ([MASK], ...) in the unigram vocab itself,
        # so plain text containing "[MASK]" still segments into that piece (as in SentencePiece);
        # `allow_special=False` cannot prevent it for these models. Demoting their scores does not
        # help: the unknown-piece penalty is derived from the lowest score.
        vocab = [(p.piece, p.score) for p in proto.pieces]
        tok = HFTokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
        norm = []
        if proto.normalizer_spec.precompiled_charsmap:
            norm.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
        if proto.normalizer_spec.remove_extra_whitespaces:
            norm += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
        if norm:
            tok.normalizer = normalizers.Sequence(norm)
        scheme = "always" if proto.normalizer_spec.add_dummy_prefix else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        specials = [p.piece for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED)]
        tok.add_special_tokens(specials)
        return cls(tok, Path(path))

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
            if i is not None:
                return i
        raise KeyError(f"tokenizer {self.path or ''} has no {role} token (looked for {ROLES[role]})")

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
    """The tokenizer of a checkpoint directory, a tokenizer.json, or a SentencePiece .model file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint directory, a tokenizer.json or a "
                                "SentencePiece .model file")
    if not path.is_dir():  # a file the user named: read as named
        if path.suffix == ".model":
            return Tokenizer.from_sentencepiece(path)
        if path.suffix == ".json":
            return Tokenizer.from_file(path)
        if path.suffix.lower() == ".gguf":  # the vocabulary a llama.cpp model file carries
            from .ggufio import read_vocab

            vocab = read_vocab(path)
            return Tokenizer.from_sentencepiece(vocab) if isinstance(vocab, bytes) else Tokenizer(vocab, path)
        raise ValueError(f"{path} is neither a directory nor a tokenizer.json / SentencePiece .model file")
    from .convert import confined

    # in a checkpoint directory, a file (or symlink) pointing outside it is refused, as weights are
    for name in ("tokenizer.json", "tokenizer.model", "cog-pretrain.model", "ice_text.model"):
        if (path / name).is_symlink() or (path / name).exists():
            confined(path, name, "tokenizer file")
            return Tokenizer.from_file(path / name) if name.endswith(".json") else Tokenizer.from_sentencepiece(path / name)
    raise FileNotFoundError(f"{path} has no tokenizer.json (nor a SentencePiece .model); this checkpoint ships no tokenizer")


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
