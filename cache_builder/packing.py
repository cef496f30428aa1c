"""Windows and packing: tokenized documents -> sequences of at most `seq_len` tokens for the teacher.

Documents longer than `seq_len` are cut into consecutive windows. With `packing`, windows of the same
split are packed greedily in order; `position_ids` restart at 0 at each document (or window) start, and
`doc_index` names the document of the first token only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Tokens:
    """One tokenized document before windowing."""

    doc_index: int
    split: str
    ids: np.ndarray  # int32 (T,)
    loss_mask: np.ndarray | None  # uint8 (T,)
    byte_offsets: np.ndarray | None  # int32 (T, 2)


@dataclass
class TokenizedSequence:
    input_ids: np.ndarray  # int32 (T,), 1 <= T <= seq_len
    loss_mask: np.ndarray | None  # uint8 (T,): 1 where token i is a training target; None = all tokens
    position_ids: np.ndarray | None  # int32 (T,), packing only: restarts at 0 at each document start
    byte_offsets: np.ndarray | None  # int32 (T, 2): [start, end) into the document's UTF-8 text
    doc_index: int  # index (iter_documents order) of the document of the first token
    split: str  # "train" | "heldout"


def windows(t: Tokens, seq_len: int) -> Iterator[Tokens]:
    for a in range(0, len(t.ids), seq_len):
        b = a + seq_len
        yield Tokens(t.doc_index, t.split, t.ids[a:b],
                     None if t.loss_mask is None else t.loss_mask[a:b],
                     None if t.byte_offsets is None else t.byte_offsets[a:b])


def unpacked(w: Tokens) -> TokenizedSequence:
    return TokenizedSequence(w.ids, w.loss_mask, None, w.byte_offsets, w.doc_index, w.split)


class Packer:
    """Greedy packing in order: a window that does not fit in the open sequence starts a new one."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.parts: list[Tokens] = []
        self.length = 0

    def add(self, w: Tokens) -> list[TokenizedSequence]:
        out = self.flush() if self.length + len(w.ids) > self.seq_len else []
        self.parts.append(w)
        self.length += len(w.ids)
        return out

    def flush(self) -> list[TokenizedSequence]:
        if not self.parts:
            return []
        parts, self.parts, self.length = self.parts, [], 0
        ids = np.concatenate([p.ids for p in parts])  # (T,)
        positions = np.concatenate([np.arange(len(p.ids), dtype=np.int32) for p in parts])  # (T,)
        mask = None
        if any(p.loss_mask is not None for p in parts):  # text documents next to chat ones count whole
            mask = np.concatenate([p.loss_mask if p.loss_mask is not None else np.ones(len(p.ids), np.uint8)
                                   for p in parts])
        offsets = None
        if all(p.byte_offsets is not None for p in parts):  # each row is into its own document's text
            offsets = np.concatenate([p.byte_offsets for p in parts])  # (T, 2)
        return [TokenizedSequence(ids, mask, positions, offsets, parts[0].doc_index, parts[0].split)]
