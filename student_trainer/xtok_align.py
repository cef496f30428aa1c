"""Cross-tokenizer alignment: a batch of cached teacher tokens -> the same text in the student's tokens, each student
position paired with the teacher position whose token ends at the same byte (formats/SPEC.md, "Cross-tokenizer
students", says it normatively).

Text: a token's bytes come from its tokenizer's vocabulary (`token_bytes`); the teacher's tokenizer is the one whose
fingerprint the manifest records (the folder the manifest names, or one the user gives). A *segment* is a run of a
cached sequence from one document (the whole sequence, or one packed document: position_ids restart at 0). Its text
is the concatenation of its tokens' bytes, leaving out tokens with an empty byte span (a BOS the tokenizer added).
The student tokenizes each segment's text on its own (its BOS etc. only where the segment starts its document, at
byte 0), so windows (a first offset > 0) and packed documents need nothing special. Bytes that are not valid UTF-8
where they stand (a window that starts or ends inside a character; a character whose lead byte the teacher's
tokenizer dropped) cannot be text to the student: the text is cut there and the pieces are tokenized in order.

Alignment: teacher position i (predicting teacher token i+1) and student position j (predicting student token
j+1) have seen the same text when tokens i and j end at the same byte of the segment; they are paired if, besides,
both have a next token in the segment (and the teacher's is a training target). Where several tokens end at one
byte, the last of them is paired. Unpaired student positions keep their CE target only.

Vocabulary map (for byte_align): teacher id -> the student id with exactly the same bytes, -1 where there is none;
built once per pair of tokenizers and kept in kdcache's per-user folder (formats/home.py) under xtok/, named by both
tokenizer fingerprints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from formats.home import kdcache_home
from formats.manifest import Manifest
from formats.tokenizer import tokenizer_info
from student_trainer.batch import IGNORE_INDEX, Batch
from student_trainer.errors import AlignError
from student_trainer.xtok_losses import XTOK_LOSSES

XTOK_KINDS = tuple(XTOK_LOSSES)  # the kd kinds whose student has its own tokenizer
MAP_VERSION = 1  # bumped when the vocabulary map's definition changes: older files are not reused
# GPT-2's byte-level alphabet, inverted (as the builder's tokenization.py): printable stand-in -> the byte.
BYTE_DECODER: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


# ------------------------------------------------------------------------------------------- token bytes


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes of text each token id (0 .. len(tokenizer) - 1) stands for.

    Byte-level BPE entries map back through GPT-2's byte alphabet; otherwise `<0xNN>` (byte fallback) is byte NN
    and `▁` (SentencePiece's space) a space. Added and special tokens stand for their content in UTF-8 (where a
    document holds that text, the tokenizer matches it). An id with no entry stands for nothing.
    """
    added = {i: s.encode("utf-8") for s, i in tokenizer.get_added_vocab().items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    alphabet = BYTE_DECODER if _is_byte_level(tokenizer) else None
    out = []
    for i, piece in enumerate(pieces):
        if i in added or piece is None:
            out.append(added.get(i, b""))
        elif alphabet is not None:
            out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def byte_lengths(tokenizer) -> np.ndarray:
    """(V,) int64: how many bytes of text each token stands for (bits per byte counts these)."""
    return np.fromiter(map(len, token_bytes(tokenizer)), dtype=np.int64)


# ------------------------------------------------------------------------------------------- vocabulary map


def vocab_map(teacher: list[bytes], student: list[bytes]) -> np.ndarray:
    """(V_teacher,) int64: the student id whose bytes equal teacher id i's, or -1. Tokens that stand for no bytes
    map to nothing; where one side has several ids with the same bytes, only the lowest pair up (one to one)."""
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student):
        if b:
            by_bytes.setdefault(b, i)
    out = np.full(len(teacher), -1, dtype=np.int64)
    taken: set[int] = set()
    for i, b in enumerate(teacher):
        j = by_bytes.get(b, -1)
        if j >= 0 and j not in taken:
            out[i] = j
            taken.add(j)
    return out


def cached_vocab_map(teacher_tokenizer, student_tokenizer, folder: Path | None = None) -> np.ndarray:
    """`vocab_map` of the two tokenizers, read from `folder` (default kdcache_home()/xtok) when built before.

    The file is named by both fingerprints and MAP_VERSION; one that does not load as an int64 array of the
    right length with ids inside the student's vocabulary is rebuilt. Written atomically (temp file + rename);
    a folder that cannot be written only costs the rebuild next time.
    """
    t_fp = tokenizer_info(teacher_tokenizer)["fingerprint"]
    s_fp = tokenizer_info(student_tokenizer)["fingerprint"]
    folder = Path(folder) if folder is not None else kdcache_home() / "xtok"
    path = folder / f"vocab-map-v{MAP_VERSION}-{t_fp[:16]}-{s_fp[:16]}.npy"
    try:
        found = np.load(path, allow_pickle=False)
        if found.dtype == np.int64 and found.shape == (len(teacher_tokenizer),) and found.max() < len(student_tokenizer):
            return found
    except (OSError, ValueError):
        pass
    mapping = vocab_map(token_bytes(teacher_tokenizer), token_bytes(student_tokenizer))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".vocab-map-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, mapping, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass
    return mapping


# ------------------------------------------------------------------------------------------- alignment


def utf8_runs(data: bytes) -> list[tuple[int, int]]:
    """[start, end) runs of `data` that are valid UTF-8, in order; the bytes between them are not."""
    runs, pos = [], 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start:
                runs.append((pos, pos + e.start))
            pos += e.end
            continue
        runs.append((pos, len(data)))
        break
    return runs


@dataclass
class AlignStats:
    """Counts of one aligned batch."""

    targets: int  # student positions with a next-token target
    aligned: int  # of them, paired with a teacher position
    student_tokens: int
    teacher_tokens: int


@dataclass
class _Segment:
    """One document's run of a cached row, as text (see the module docstring)."""

    row: int  # batch row
    first: int  # its first position in the cached row
    text: bytes  # its tokens' bytes, tokens with an empty span left out
    ends: np.ndarray  # (n,) int64: where each teacher token ends, in bytes into `text`
    targets: np.ndarray  # (n,) bool: teacher positions whose next token is a target (the loader's kd_mask)
    doc_start: bool  # the segment starts at byte 0 of its document (not a later window)
    runs: list = field(default_factory=list)  # (start byte, student encoding, text) per valid UTF-8 run


@dataclass
class _Row:
    ids: list[int]  # student token ids of the row, segments one after the other
    positions: list[int]  # restart at 0 at each segment
    labels: list[int]  # next student token in the segment, IGNORE_INDEX (-100) at a segment's end
    teacher_pos: list[int]  # paired teacher position in the cached row, -1 for none


class Aligner:
    """Turns a loader Batch of teacher tokens into a Batch of the student's tokens of the same text.

    The result is an ordinary Batch (so the loss, chunking and device code are those of every kind): input_ids,
    position_ids and labels are the student's; kd_mask marks the paired positions; topk_logprobs and tail_logmass
    are the paired teacher position's; topk_ids are the student ids with the same bytes as the teacher's top-k
    entries (`vocab_map`; -1 where none, and everywhere when no map is given, as for uld, which needs no ids).
    target_logprob is 0 and hidden is empty (teacher positions do not carry over to student positions).
    """

    def __init__(self, teacher_bytes: list[bytes], student_tokenizer, mapping: np.ndarray | None = None):
        if not getattr(student_tokenizer, "is_fast", False):
            raise AlignError("a cross-tokenizer student needs a fast tokenizer (a tokenizer.json) for token offsets")
        self.teacher_bytes = teacher_bytes
        self.teacher_lengths = np.fromiter(map(len, teacher_bytes), dtype=np.int64)
        self.tokenizer = student_tokenizer
        self.student_bytes = token_bytes(student_tokenizer)
        self.vocab_size = len(student_tokenizer)
        self.mapping = mapping
        with_special = student_tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = student_tokenizer("x", add_special_tokens=False)["input_ids"]
        cut = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
        self.prefix = list(with_special[:cut])  # what the student puts before a document (a BOS), if anything

    def align(self, batch: Batch) -> tuple[Batch, AlignStats]:
        """The student's Batch for `batch` (on the CPU, as the loader gives it) and its counts."""
        if batch.byte_offsets is None:
            raise AlignError("cross-tokenizer training needs the cache's byte_offsets field in every batch")
        segments = self._segments(batch)
        pieces = [(seg, a, seg.text[a:e].decode("utf-8")) for seg in segments for a, e in utf8_runs(seg.text)]
        texts = [text for _, _, text in pieces]  # tokenized in one call: the Rust tokenizer is fastest on batches
        encodings = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True).encodings if texts else []
        for (seg, start, text), enc in zip(pieces, encodings):
            seg.runs.append((start, enc, text))
        rows = [_Row([], [], [], []) for _ in range(batch.input_ids.shape[0])]
        for seg in segments:
            s_ids, s_ends = self._student_tokens(seg)
            _extend(rows[seg.row], s_ids, s_ends, seg)
        return self._collate(batch, rows)

    def _segments(self, batch: Batch) -> list[_Segment]:
        ids, spans = batch.input_ids.numpy(), batch.byte_offsets.numpy()  # (B, T), (B, T, 2)
        positions, kd = batch.position_ids.numpy(), batch.kd_mask.numpy()
        out = []
        for b in range(ids.shape[0]):
            n = int((spans[b, :, 0] >= 0).sum())  # padding has offsets -1
            starts = [0, *(np.flatnonzero(positions[b, 1:n] == 0) + 1)] if n else []
            for a, e in zip(starts, [*starts[1:], n]):
                in_text = spans[b, a:e, 1] > spans[b, a:e, 0]  # (n,): an added BOS has an empty span
                text = b"".join(self.teacher_bytes[i] for i in ids[b, a:e][in_text])
                ends = np.cumsum(np.where(in_text, self.teacher_lengths[ids[b, a:e]], 0))  # (n,)
                out.append(_Segment(b, a, text, ends, kd[b, a:e], bool(spans[b, a, 0] == 0)))
        return out

    def _student_tokens(self, seg: _Segment) -> tuple[list[int], np.ndarray]:
        """Student ids of a segment and where each ends, in bytes into the segment's text."""
        ids, ends = (list(self.prefix), [np.zeros(len(self.prefix), np.int64)]) if seg.doc_start else ([], [])
        for start, enc, text in seg.runs:
            run_ids = enc.ids
            lengths = np.fromiter((len(self.student_bytes[i]) for i in run_ids), dtype=np.int64, count=len(run_ids))
            raw = text.encode("utf-8")
            if int(lengths.sum()) == len(raw) and b"".join(self.student_bytes[i] for i in run_ids) == raw:
                run_ends = np.cumsum(lengths)
            else:  # the tokenizer rewrote the text (a normalizer, a prepended space): trust its character offsets
                char_to_byte = np.cumsum([0, *(len(c.encode("utf-8")) for c in text)])
                run_ends = char_to_byte[np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 1]]
            ids += run_ids
            ends.append(start + run_ends)
        return ids, (np.concatenate(ends) if ends else np.zeros(0, np.int64))

    def _collate(self, batch: Batch, rows: list[_Row]) -> tuple[Batch, AlignStats]:
        # numpy, not torch: small single-threaded gathers; torch's thread pool only adds waits on a busy CPU
        b_n, t_n = len(rows), max(1, max(len(r.ids) for r in rows))
        input_ids = np.zeros((b_n, t_n), np.int64)
        position_ids = np.tile(np.arange(t_n), (b_n, 1))  # padding: its own "document", as in the loader
        labels = np.full((b_n, t_n), IGNORE_INDEX, np.int64)
        teacher_pos = np.full((b_n, t_n), -1, np.int64)
        for b, r in enumerate(rows):
            n = len(r.ids)
            input_ids[b, :n], position_ids[b, :n], labels[b, :n], teacher_pos[b, :n] = \
                r.ids, r.positions, r.labels, r.teacher_pos
        paired = teacher_pos >= 0  # (B, T_s)
        at = (np.arange(b_n)[:, None], np.maximum(teacher_pos, 0))  # the paired teacher position, or 0
        topk_logprobs = np.where(paired[..., None], batch.topk_logprobs.numpy()[at], 0.0).astype(np.float32)
        tail = np.where(paired, batch.tail_logmass.numpy()[at], -np.inf).astype(np.float32)  # (B, T_s)
        topk_ids = np.full(topk_logprobs.shape, -1, np.int64)  # (B, T_s, k)
        if self.mapping is not None:
            topk_ids[paired] = self.mapping[batch.topk_ids.numpy()[at][paired]]
        student_tokens = sum(len(r.ids) for r in rows)
        t = torch.from_numpy
        out = Batch(input_ids=t(input_ids), position_ids=t(position_ids), labels=t(labels), kd_mask=t(paired),
                    topk_ids=t(topk_ids), topk_logprobs=t(topk_logprobs), tail_logmass=t(tail),
                    target_logprob=torch.zeros(b_n, t_n), doc_index=batch.doc_index, num_tokens=student_tokens)
        stats = AlignStats(targets=int((labels != IGNORE_INDEX).sum()), aligned=int(paired.sum()),
                           student_tokens=student_tokens, teacher_tokens=batch.num_tokens)
        return out, stats


def _extend(row: _Row, s_ids: list[int], s_ends: np.ndarray, seg: _Segment) -> None:
    """Append one segment's student tokens (ids, byte ends (m,)) to `row`, each paired with the teacher position
    whose token ends at the same byte, where both have a next token (the teacher's a target)."""
    m = len(s_ids)
    can = np.flatnonzero(np.arange(m) < m - 1)  # student positions with a next token in the segment
    can = can[np.append(s_ends[can[:-1]] != s_ends[can[1:]], True)]  # several end at one byte: the last
    cand = np.flatnonzero(seg.targets)  # teacher positions that may be paired; their ends never decrease
    k = np.searchsorted(seg.ends[cand], s_ends[can], side="right") - 1  # the last candidate ending at or before
    hit = k >= 0
    hit[hit] = seg.ends[cand[k[hit]]] == s_ends[can[hit]]
    teacher_pos = np.full(m, -1, dtype=np.int64)
    teacher_pos[can[hit]] = seg.first + cand[k[hit]]
    row.ids += s_ids
    row.positions += range(m)
    row.labels += [*s_ids[1:], IGNORE_INDEX][:m]
    row.teacher_pos += teacher_pos.tolist()


# ------------------------------------------------------------------------------------------- setup


def load_teacher_tokenizer(manifest: Manifest, url: str, folder: str = ""):
    """The tokenizer that built the cache at `url`: from `folder`, else from the teacher folder the manifest names
    (a cache moved to another machine needs `folder`). Its fingerprint must be the one the manifest records."""
    path = folder or str(manifest.teacher.get("path") or "")
    if not path or not Path(path).is_dir():
        where = f"--teacher-tokenizer {path!r} is not a folder" if folder else \
            f"the teacher folder the cache names ({path!r}) is not on this machine"
        raise AlignError(f"{url}: a student with another tokenizer reads the cached token ids as bytes with the "
                         f"teacher's tokenizer, and {where}: give --teacher-tokenizer DIR (a folder with its tokenizer.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AlignError(f"teacher tokenizer {path!r}: cannot be loaded ({str(e).splitlines()[0]})") from None
    found, want = tokenizer_info(tokenizer)["fingerprint"], manifest.tokenizer["fingerprint"]
    if found != want:
        raise AlignError(f"teacher tokenizer {path!r} (fingerprint {found[:12]}) is not the one that built {url} "
                         f"(fingerprint {want[:12]}); give the teacher's own with --teacher-tokenizer DIR")
    return tokenizer


def xtok_aligner(kind: str, manifest: Manifest, url: str, student_tokenizer, teacher_tokenizer: str = "") -> Aligner:
    """The Aligner for a student of kd_kind `kind` (uld, byte_align; any other name: a map-less Aligner, as eval
    uses) on the cache at `url`; one-line AlignError when the cache lacks what alignment needs."""
    if "byte_offsets" not in manifest.fields:
        raise AlignError(f"{url}: a student with another tokenizer (kd_kind {kind}) is paired with the teacher by "
                         "the bytes of its tokens, and this cache has no byte offsets; rebuild it with --byte-offsets")
    if "loss_mask" in manifest.fields:
        raise AlignError(f"{url}: a cache with loss_mask (chat turns) cannot train a student with another tokenizer "
                         "yet; build one from text documents with --byte-offsets")
    teacher = load_teacher_tokenizer(manifest, url, teacher_tokenizer)
    mapping = cached_vocab_map(teacher, student_tokenizer) if kind == "byte_align" else None
    return Aligner(token_bytes(teacher), student_tokenizer, mapping)
