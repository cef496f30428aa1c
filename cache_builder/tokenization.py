"""Tokenization with byte offsets: text -> token ids and each token's [start, end) UTF-8 bytes in the text.

Text is tokenized with `tokenizer(text, add_special_tokens=True)`, i.e. the tokenizer's own default for
BOS/EOS. SmolLM2 adds nothing (its "BOS" is `<|im_start|>`, which only the chat template writes); a
Llama-style tokenizer would prepend BOS to every document. Pre-tokenized ids are taken as they are (no BOS
added), checked against the vocabulary.

Byte offsets are half-open [start, end) into the document's UTF-8 text. They come from the tokenizer's
character offsets; for byte-level BPE tokenizers (GPT-2 style, SmolLM2) each token's exact bytes are
used, so a character split over several tokens (CJK, emoji) gets disjoint spans that tile the text.
Tokens the tokenizer adds (a BOS) have an empty span. Bytes the vocabulary has no token for are dropped
by the tokenizer (SmolLM2: 21 byte values, see `_exact_spans`); they belong to no token's span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cache_builder.documents import IDS_FIELD, Document
from cache_builder.errors import BuildError

# GPT-2's byte-level alphabet, inverted: the printable stand-in of every byte -> the byte.
BYTE_DECODER: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}
# The same as a `str.translate` table: stand-in character -> the byte it stands for (as a latin-1 code point).
_BYTE_TABLE: dict[int, int] = {ord(c): b for c, b in BYTE_DECODER.items()}


@dataclass(frozen=True)
class TokenizerInfo:
    """What tokenization needs to know about a tokenizer, looked up once."""

    is_fast: bool  # a Rust tokenizer: gives character offsets
    byte_level: bool  # GPT-2 style byte-level BPE: token strings map back to exact bytes
    added: frozenset[str]  # added/special tokens: their strings are literal text, not byte-mapped
    missing_bytes: frozenset[int]  # byte-level only: bytes with no token of their own (dropped from text)
    vocab_size: int

    @staticmethod
    def of(tokenizer) -> TokenizerInfo:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        vocab = tokenizer.get_vocab() if byte_level else {}
        missing = frozenset(b for c, b in BYTE_DECODER.items() if c not in vocab) if byte_level else frozenset()
        return TokenizerInfo(bool(getattr(tokenizer, "is_fast", False)), byte_level,
                             frozenset(tokenizer.get_added_vocab()), missing, len(tokenizer))


def encode_texts(texts: list[str], tokenizer, ctx: TokenizerInfo) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if not ctx.is_fast:  # slow (Python) tokenizers give no offsets
        return [(np.asarray(tokenizer(t, add_special_tokens=True)["input_ids"], np.int32), None) for t in texts]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
    out = []
    for i, text in enumerate(texts):
        e = enc.encodings[i]
        ids = np.asarray(e.ids, dtype=np.int32)  # (T,)
        in_text = np.asarray([s is not None for s in e.sequence_ids], dtype=bool)  # False for added BOS/EOS
        out.append((ids, byte_offsets(text, e.offsets, in_text, e.tokens, ctx)))
    return out


def byte_offsets(text: str, char_offsets: np.ndarray, in_text: np.ndarray, tokens: list[str] | None = None,
                 info: TokenizerInfo | None = None) -> np.ndarray:
    """[start, end) UTF-8 byte offsets (T, 2) of tokens, from the tokenizer's character offsets (T, 2).

    With the token strings of a byte-level BPE tokenizer (`tokens` and `info`), each span is refined to
    the token's own bytes; this matters where one character is split over several tokens (all of them
    report the character's span). Tokens not in the text (`in_text` False: an added BOS) get an empty
    span at their character offset.
    """
    char_offsets = np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2)
    in_text = np.asarray(in_text, dtype=bool)
    raw = text.encode("utf-8")
    lead = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80  # first byte of each character
    char_to_byte = np.append(np.flatnonzero(lead), len(raw))  # (chars + 1,)
    spans = char_to_byte[char_offsets]  # (T, 2)
    spans[~in_text, 1] = spans[~in_text, 0]
    if tokens is not None and info is not None and info.byte_level:
        found = _token_bytes([t for t, k in zip(tokens, in_text) if k], info.added)
        if found is not None:
            spans[in_text] = _exact_spans(raw, *found, spans[in_text], info.missing_bytes)
    return spans.astype(np.int32)


def _exact_spans(raw: bytes, joined: bytes, lengths: np.ndarray, coarse: np.ndarray,
                 missing: frozenset[int]) -> np.ndarray:
    """Each token's own bytes (T, 2), from the tokens' bytes `joined` (lengths (T,)) and char spans (T, 2).

    Usually the tokens' bytes tile the text and a cumulative sum gives the spans. But a byte-level
    tokenizer drops the bytes its vocabulary has no token for (SmolLM2 lacks 21 of the 256, e.g. 0x16
    and 0xF1, the lead byte of U+40000..U+7FFFF), merges their neighbours across the gap ('"\\x16:' is
    the one token '":') and reports wrong character offsets after them. Then the tokens are matched
    against the text byte by byte, skipping only `missing` bytes: a token's span runs from its first
    byte to its last and may enclose dropped bytes. If the text cannot be matched so, the character
    spans stay.
    """
    ends = np.cumsum(lengths)
    if joined == raw:
        return np.stack([ends - lengths, ends], axis=1)
    out = np.empty_like(coarse)
    cursor = 0
    for i, (a, b) in enumerate(zip((ends - lengths).tolist(), ends.tolist())):
        start = cursor
        for j in range(a, b):
            while cursor < len(raw) and raw[cursor] != joined[j]:
                if raw[cursor] not in missing:  # the tokenizer changed the text: no exact alignment
                    return coarse
                cursor += 1
            if cursor == len(raw):
                return coarse
            if j == a:
                start = cursor
            cursor += 1
        out[i] = (start, cursor)
    return out


def _token_bytes(tokens: list[str], added: frozenset[str]) -> tuple[bytes, np.ndarray] | None:
    """All tokens' bytes joined, and each token's length; None if these are not byte-level tokens.

    A byte-level token is a string of stand-ins, one character per byte, so one `str.translate` maps
    the whole document back to bytes. Added tokens (`<|im_end|>`) are literal text instead.
    """
    if added.isdisjoint(tokens):
        try:
            joined = "".join(tokens).translate(_BYTE_TABLE).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte alphabet
            return None
        return joined, np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    try:
        pieces = [t.encode("utf-8") if t in added else bytes(BYTE_DECODER[c] for c in t) for t in tokens]
    except KeyError:
        return None
    return b"".join(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))


def check_ids(doc: Document, ctx: TokenizerInfo) -> np.ndarray:
    ids = np.asarray(doc.input_ids, dtype=np.int64)
    if len(ids) and ids.max() >= ctx.vocab_size:
        raise BuildError(f"{doc.source}: record {doc.index}: token id {int(ids.max())} in {IDS_FIELD!r} is outside "
                         f"the teacher's vocabulary ({ctx.vocab_size} tokens)")
    return ids.astype(np.int32)
