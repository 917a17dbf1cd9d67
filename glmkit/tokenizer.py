"""Tokenizer: one wrapper over HF `tokenizers`, with GLM special tokens looked up by name.

    tok = glmkit.load_tokenizer("path/to/checkpoint")   # reads tokenizer.json
    ids = tok.encode("床前明月光")
    tok.decode(ids); tok.token_id("[gMASK]")

This is the loading half: checkpoints that ship a `tokenizer.json` (GLM-4 HF releases, glmkit's
own models). Training a tokenizer, SentencePiece models of the original GLM and the chat template
come with the data pipeline (issue 3).
"""

from __future__ import annotations

from pathlib import Path

# The GLM special tokens by role; ids are always looked up in the tokenizer, never hard-coded.
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class Tokenizer:
    def __init__(self, tok, path: Path | None = None):
        self.tok, self.path = tok, path

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)), Path(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        i = self.tok.token_to_id(name)
        if i is None:
            raise KeyError(f"tokenizer {self.path or ''} has no token {name!r}")
        return i

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer.json file)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "tokenizer.json"
    if file.exists():
        return Tokenizer.from_file(file)
    if path.is_dir() and any((path / n).exists() for n in ("tokenizer.model", "ice_text.model")):
        raise NotImplementedError(
            f"{path} has a SentencePiece tokenizer only; reading those is not implemented yet "
            "(it comes with the data pipeline). Models that ship tokenizer.json load today."
        )
    raise FileNotFoundError(f"{path} has no tokenizer.json; this checkpoint does not ship a tokenizer")
