"""Upstream vocabularies read into one form: a `tokenizers` Tokenizer with the same ids.

    glmkit.load_tokenizer("glm-4-9b-chat/")      # tokenizer.model (ranks) + tokenizer_config.json
    Tokenizer.from_tiktoken("glm-4-9b-chat/tokenizer.model")                # GLM-4's specials by default
    Tokenizer.from_sentencepiece("chatglm3-6b/tokenizer.model", CHATGLM3_SPECIALS)

GLM-4 (and CodeGeeX4) ship a tiktoken rank file (`base64(token bytes) rank` per line) read with a
GPT-4-style split pattern; ChatGLM2/3 (and CodeGeeX2) ship a SentencePiece BPE model with their
special tokens appended after its pieces; original GLM and ChatGLM-6B ship SentencePiece unigram
models. Each becomes a `tokenizers` model that reproduces the reference encoder's ids:

- tiktoken: merges the adjacent pair whose concatenation has the lowest rank, leftmost first, and
  takes a pre-token whole when it is itself a token. A byte-level BPE does the same when every
  split of a token into two tokens is a merge, ordered by the token's rank, and `ignore_merges`
  is on. Deriving the merges is one pass over the ranks (seconds for GLM-4's 151,329).
- SentencePiece BPE: merges the adjacent pair whose concatenation is the best-scored piece,
  leftmost first, over the whole normalized text ("▁" for spaces, a dummy "▁" in front), then
  falls back to byte pieces. Same construction, ordered by piece score, no pre-tokenizer.

Facts used (published tokenization_chatglm.py of glm-4-9b-chat, chatglm2-6b, chatglm3-6b):
GLM-4's split pattern is glmkit's SPLIT_PATTERN; its specials follow the 151,329 ranks;
ChatGLM2 appends [MASK] [gMASK] [sMASK] sop eop after the SentencePiece pieces (ids
64789..64793), ChatGLM3 also <|system|> <|user|> <|assistant|> <|observation|> (64794..64797).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

# GLM-4's special tokens in id order, placed right after the ranks (151329 = <|endoftext|>).
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def byte_level_alphabet() -> list[str]:
    """The printable character a byte-level BPE uses for each byte 0..255: printable Latin-1 bytes
    stand for themselves, the others (controls, space, 0x7f-0xa0, 0xad) take U+0100 onwards in
    byte order. This is the map `tokenizers`' ByteLevel pre-tokenizer and decoder apply."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def read_tiktoken_ranks(source: str | Path | bytes, where: str | None = None) -> dict[bytes, int]:
    """The ranks of a tiktoken file (path or contents): one `base64(token) rank` per line."""
    where = where or str(source if not isinstance(source, bytes) else "tiktoken ranks")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(f"{where}: line {n} is not `base64-token rank` ({line[:60]!r}); "
                             "is this a tiktoken rank file?") from None
        if token in ranks:
            raise ValueError(f"{where}: line {n}: token {token!r} is listed twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{where}: no ranks in this file")
    return ranks


def tiktoken_tokenizer(ranks: dict[bytes, int], specials: dict[str, int], pattern: str, where: str = "ranks"):
    """A byte-level BPE `tokenizers` Tokenizer with tiktoken's ids for `ranks` and `pattern`,
    and `specials` (name -> id) as special tokens at their ids."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    n = len(ranks)
    by_id = sorted(ranks.items(), key=lambda kv: kv[1])
    if by_id[0][1] != 0 or by_id[-1][1] != n - 1 or len({r for _, r in by_id}) != n:
        raise ValueError(f"{where}: ranks must be 0..{n - 1}, each once (got {by_id[0][1]}..{by_id[-1][1]})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: no rank for the single bytes {missing[:8]} ({len(missing)} missing); "
                         "tiktoken needs all 256 to encode any text")
    order = sorted(specials.items(), key=lambda kv: kv[1])
    if order and order[0][1] < n:
        raise ValueError(f"{where}: special token {order[0][0]!r} has id {order[0][1]}, inside the {n} ranks; "
                         f"specials follow them (ids {n} on)")
    order = with_placeholders(order, n)
    alphabet = byte_level_alphabet()
    table = {b: alphabet[b] for b in range(256)}
    strs = [tok.decode("latin-1").translate(table) for tok, _ in by_id]
    vocab = {s: i for i, s in enumerate(strs)}
    for name, _ in order:
        if name.encode().decode("latin-1").translate(table) in vocab:  # its text would already be a token
            raise ValueError(f"{where}: special token {name!r} is also an ordinary token of the ranks")
    # Every split of a token into two tokens is a merge; merges are ordered by the merged token's
    # rank, so the BPE picks the pair tiktoken picks (lowest merged rank). Pitfall, admitted: two
    # different splits of one token both present in a word are ordered by their parts' ranks here,
    # where tiktoken takes the leftmost; that needs a word holding e.g. [ab, a, ba] at once, which
    # merging by rank seems never to leave (reversing this order changed no ids of 20,000 strings
    # over a 20,000-token vocabulary of "a"s and "b"s).
    merges, get = [], ranks.get
    for tok, _ in by_id:
        found = []
        for i in range(1, len(tok)):
            left = get(tok[:i])
            if left is not None:
                right = get(tok[i:])
                if right is not None:
                    found.append((left, right))
        if len(found) > 1:
            found.sort()
        merges += [[strs[a], strs[b]] for a, b in found]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
             "vocab": vocab, "merges": merges}
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in order],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": model,
    }
    return HFTokenizer.from_str(json.dumps(spec))


def with_placeholders(order: list[tuple[str, int]], start: int) -> list[tuple[str, int]]:
    """`order` ((name, id) by id, ids from `start`) with a "<|reserved_ID|>" special at each id it
    skips: `tokenizers` numbers added tokens consecutively, so a gap must hold a token."""
    out, next_id = [], start
    for name, i in order:
        if i < next_id:
            raise ValueError(f"special tokens {out[-1][0] if out else ''!r} and {name!r} share id {i}")
        out += [(f"<|reserved_{j}|>", j) for j in range(next_id, i)]
        out.append((name, i))
        next_id = i + 1
    return out


def is_tiktoken_file(head: bytes) -> bool:
    """Whether the first bytes of a `tokenizer.model` look like tiktoken ranks (text lines of
    `base64 rank`) rather than a SentencePiece protobuf (binary, starting with a field tag)."""
    import re

    return re.match(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+\r?\n", head) is not None


def sentencepiece_tokenizer(data: bytes, extra_specials=(), where: str = "SentencePiece model"):
    """A `tokenizers` Tokenizer with SentencePiece's ids for a serialized ModelProto (unigram or BPE),
    plus `extra_specials` appended after its pieces (ids len(pieces) + i), as ChatGLM2/3 do."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError(f"reading {where} needs the sentencepiece and protobuf packages ({e})") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{where}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise ValueError(f"{where}: not a SentencePiece model (no pieces)")
    kind = proto.trainer_spec.model_type
    if kind == pb.TrainerSpec.UNIGRAM:
        tok = _unigram(proto, pb)
    elif kind == pb.TrainerSpec.BPE:
        tok = _bpe(proto, pb, where)
    else:
        raise NotImplementedError(f"{where}: SentencePiece model type {pb.TrainerSpec.ModelType.Name(kind)} is not "
                                  "supported (only unigram and BPE)")
    n = len(proto.pieces)
    for k, name in enumerate(extra_specials):
        if tok.token_to_id(name) is not None:
            raise ValueError(f"{where}: special token {name!r} is already a piece of the model")
        tok.add_special_tokens([name])
        if tok.token_to_id(name) != n + k:  # never expected: added tokens are numbered consecutively
            raise AssertionError(f"{where}: {name!r} got id {tok.token_to_id(name)}, not {n + k}")
    return tok


def _unigram(proto, pb):
    """Pieces and scores become a Unigram model; SentencePiece's normalizer (its precompiled NFKC
    map, whitespace collapsing) and its "▁" word-boundary marker are reproduced; user-defined and
    control pieces ([MASK], <|startofpiece|>, ...) become special tokens, matched whole."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

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
    return tok


def _bpe(proto, pb, where):
    """SentencePiece's BPE encoder as a `tokenizers` BPE: merges from the piece scores, its
    normalizer as normalizers, byte pieces as byte fallback, control pieces as special tokens."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    T = pb.ModelProto.SentencePiece
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise NotImplementedError(f"{where}: SentencePiece BPE with treat_whitespace_as_suffix or without "
                                  "escape_whitespaces is not supported")
    unused = [p.piece for p in proto.pieces if p.type == T.UNUSED]
    if unused:
        raise NotImplementedError(f"{where}: SentencePiece BPE with unused pieces ({unused[:3]}) is not supported")
    pieces = [p.piece for p in proto.pieces]
    vocab = {}
    for i, p in enumerate(pieces):
        if p in vocab:
            raise ValueError(f"{where}: piece {p!r} appears twice (ids {vocab[p]} and {i})")
        vocab[p] = i
    # Merge targets are the normal pieces (SentencePiece also merges into user-defined ones, which
    # its matcher has already taken whole). Best score first; equal scores by id.
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == T.NORMAL}
    merges = []
    for piece in sorted(normal, key=normal.get):
        found = []
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                found.append((normal[left], normal[right], left, right))
        found.sort()
        merges += [[a, b] for _, _, a, b in found]
    unk = pieces[spec.unk_id] if 0 <= spec.unk_id < len(pieces) else None
    model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(spec.byte_fallback),
             "ignore_merges": False, "vocab": vocab, "merges": merges}
    norms = []
    if norm.precompiled_charsmap:
        from tokenizers import normalizers

        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        # Pitfall: `tokenizers`' Precompiled maps a whole grapheme cluster by its first match, so
        # "\r\n" (one cluster) becomes one space under NFKC, where SentencePiece maps each character
        pre = normalizers.Precompiled(norm.precompiled_charsmap)
        each = pre.normalize_str("\r") + pre.normalize_str("\n")
        if pre.normalize_str("\r\n") != each:
            norms.append({"type": "Replace", "pattern": {"String": "\r\n"}, "content": each})
        norms.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if norm.remove_extra_whitespaces:  # only " " counts, as in SentencePiece (not tabs or newlines)
        # (\A and \z: `tokenizers`' regexes are Ruby-style, where ^ and $ match at every newline)
        norms += [{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    norms.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    # User-defined pieces are taken whole wherever they occur in the normalized text, as
    # SentencePiece's prefix matcher does; `tokenizers` finds them there when they are "normalized"
    # added tokens, but then runs the normalizer over each piece's own text too. So the dummy "▁"
    # goes in front of any text except one that is exactly a user-defined piece. Left over: that
    # text alone, which SentencePiece reads as "▁" + the piece, and a piece not normalized like the
    # text around it. (A user-defined piece holding a space never matches: the text has "▁" there.)
    user = [p.piece for p in proto.pieces if p.type == T.USER_DEFINED and " " not in p.piece]
    if norm.add_dummy_prefix and user:
        import re

        alternatives = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        norms.append({"type": "Replace", "pattern": {"Regex": f"\\A(?!(?:{alternatives})\\z)"}, "content": "\u2581"})
    elif norm.add_dummy_prefix:
        norms.append({"type": "Prepend", "prepend": "\u2581"})
    decoders = []
    if unk is not None:  # SentencePiece decodes the unknown piece as its unk_surface (" ⁇ ")
        decoders.append({"type": "Replace", "pattern": {"String": unk}, "content": spec.unk_surface})
    decoders += [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                 {"type": "ByteFallback"}, {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    # Control pieces (<s>, </s>, <unk>) are never produced from text; user-defined ones are.
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": p.type == T.USER_DEFINED, "special": p.type != T.USER_DEFINED}
             for i, p in enumerate(proto.pieces) if p.type in (T.CONTROL, T.UNKNOWN) or p.piece in set(user)]
    spec_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": {"type": "Sequence", "normalizers": norms}, "pre_tokenizer": None,
                 "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}
    return HFTokenizer.from_str(json.dumps(spec_json))
