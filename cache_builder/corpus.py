"""The corpus: user files -> documents -> token sequences of at most `seq_len` tokens for the teacher.

Inputs (files, directories walked recursively in sorted order, and globs; hidden files are skipped, and
so are files of other types met in a directory or glob (listed in `CorpusStats.ignored_files`), while a
file named explicitly must be of a known type):
- `.txt`: one document per file, or one per line / per paragraph (`txt_split`);
- `.jsonl`: one JSON object per line with a text field (`text_field`), or `messages` (chat turns,
  rendered with the teacher's chat template), or `input_ids` (pre-tokenized, used as is);
- `.parquet` and `.arrow` files, and `datasets` folders written by `save_to_disk` (arrow IPC streams
  listed in state.json, read with pyarrow alone), with the same three kinds of column.
When a record has several of these fields the first of text field, `messages`, `input_ids` wins:
re-tokenizing text with the teacher's own tokenizer is always right, stored ids may come from another.

Identity: a document is (source file name, record index, sha256 of its content); `doc_id` depends on
neither the machine nor the order the paths were given in, so the held-out split (a hash of `doc_id`)
is reproducible. `doc_index` is the position in `iter_documents` order (sources sorted by path).

Tokenization (`tokenize_corpus`):
- text: `tokenizer(text, add_special_tokens=True)`, i.e. the tokenizer's own default for BOS/EOS.
  SmolLM2 adds nothing (its "BOS" is `<|im_start|>`, which only the chat template writes); a
  Llama-style tokenizer would prepend BOS to every document.
- chat: `apply_chat_template(messages, tokenize=False)` then tokenized without special tokens (the
  template already wrote them); `loss_mask` is 1 on tokens overlapping an assistant message's content.
  The end-of-turn token is not part of the content and is not marked.
- pre-tokenized ids are taken as they are (no BOS added), checked against the vocabulary.
Documents longer than `seq_len` are cut into consecutive windows. With `packing`, windows of the same
split are packed greedily in order; `position_ids` restart at 0 at each document (or window) start, and
`doc_index` names the document of the first token only. Empty documents (whitespace-only text, no
turns, no ids) are skipped and counted; counts are in the `CorpusStats` a caller may pass in.

Byte offsets are half-open [start, end) into the document's UTF-8 text. They come from the tokenizer's
character offsets; for byte-level BPE tokenizers (GPT-2 style, SmolLM2) each token's exact bytes are
used, so a character split over several tokens (CJK, emoji) gets disjoint spans that tile the text.
Tokens the tokenizer adds (a BOS) have an empty span. Bytes the vocabulary has no token for are dropped
by the tokenizer (SmolLM2: 21 byte values, see `_exact_spans`); they belong to no token's span.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from cache_builder.errors import BuildError

TXT_SPLITS = ("file", "lines", "paragraphs")
SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
MESSAGES_FIELD = "messages"
IDS_FIELD = "input_ids"
TOKENIZE_BATCH = 256  # documents per tokenizer call: the Rust tokenizer is much faster on batches
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class CorpusOptions:
    paths: list[str]  # files, directories (walked recursively, sorted) and globs
    text_field: str = "text"  # field holding the text in jsonl / parquet / arrow records
    txt_split: str = "file"  # .txt documents: "file" | "lines" | "paragraphs"
    seq_len: int = 1024  # longest sequence in tokens; longer documents are cut into windows
    packing: bool = False  # pack short documents of one split into sequences of up to seq_len tokens
    heldout_fraction: float = 0.0  # fraction of documents (by a hash of doc_id) in the "heldout" split
    skip_bad_records: bool = False  # skip and count malformed records instead of failing
    num_parts: int = 1  # keep only documents with doc_index % num_parts == part (one part per node)
    part: int = 0


@dataclass(frozen=True)
class Document:
    source: str  # the source path as resolved (a file, or a datasets folder)
    index: int  # record index in the source: jsonl line - 1, parquet/arrow row, txt piece (line / paragraph)
    text: str | None  # plain text
    messages: list[dict] | None  # chat turns [{"role", "content"}]
    input_ids: list[int] | None  # pre-tokenized
    content_sha256: str  # sha256 of the canonical content (see `content_hash`)

    @property
    def doc_id(self) -> str:
        """Stable across machines and path order: the file name, not its directory, is part of it."""
        return f"{Path(self.source).name}:{self.index}:{self.content_sha256[:16]}"


@dataclass
class CorpusStats:
    """Counts filled in while `iter_documents` / `tokenize_corpus` run; read them after the loop."""

    sources: int = 0  # files (or datasets folders) read
    documents: int = 0  # non-empty documents yielded
    empty_documents: int = 0  # documents with no text (whitespace only), no turns or no ids: skipped
    skipped_records: int = 0  # malformed records skipped because of skip_bad_records
    ignored_files: list[str] = field(default_factory=list)  # unknown extensions met in directories/globs
    heldout_documents: int = 0
    windowed_documents: int = 0  # documents longer than seq_len, cut into windows
    sequences: int = 0
    tokens: int = 0


@dataclass
class TokenizedSequence:
    input_ids: np.ndarray  # int32 (T,), 1 <= T <= seq_len
    loss_mask: np.ndarray | None  # uint8 (T,): 1 where token i is a training target; None = all tokens
    position_ids: np.ndarray | None  # int32 (T,), packing only: restarts at 0 at each document start
    byte_offsets: np.ndarray | None  # int32 (T, 2): [start, end) into the document's UTF-8 text
    doc_index: int  # index (iter_documents order) of the document of the first token
    split: str  # "train" | "heldout"


# ---------------------------------------------------------------------------------------------------
# Sources: paths, directories and globs -> sorted list of (kind, path)


def check_options(opts: CorpusOptions) -> None:
    if isinstance(opts.paths, (str, os.PathLike)) or not opts.paths:
        raise BuildError(f"corpus: give a list of files, directories or globs, got {opts.paths!r}")
    if opts.txt_split not in TXT_SPLITS:
        raise BuildError(f"--txt-split must be one of {', '.join(TXT_SPLITS)}, got {opts.txt_split!r}")
    if opts.seq_len <= 0:
        raise BuildError(f"--seq-len must be positive, got {opts.seq_len}")
    if not 0.0 <= opts.heldout_fraction <= 1.0:
        raise BuildError(f"--heldout-fraction must be in [0, 1], got {opts.heldout_fraction}")
    if opts.num_parts < 1:
        raise BuildError(f"--num-parts must be positive, got {opts.num_parts}")
    if not 0 <= opts.part < opts.num_parts:
        raise BuildError(f"--part must be in [0, {opts.num_parts}), got {opts.part}")


def resolve_sources(paths: list[str], stats: CorpusStats | None = None) -> list[tuple[str, Path]]:
    """(kind, path) of every source, sorted by path, each once; kind is txt|jsonl|parquet|arrow|datasets."""
    stats = stats if stats is not None else CorpusStats()
    found: dict[Path, str] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if p.exists():  # checked first: a real file name may contain glob characters
            matches, named = [p], True
        elif any(c in str(raw) for c in "*?["):
            matches, named = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))], False
            if not matches:
                raise BuildError(f"corpus glob {raw!r} matches nothing")
        else:
            raise BuildError(f"corpus path {raw!r}: no such file or directory")
        if sum(_add_source(m, named, found, stats) for m in matches) == 0:
            raise BuildError(f"corpus path {raw!r} holds no corpus files ({', '.join(SUFFIXES)} or a datasets folder)")
    return sorted(((kind, path) for path, kind in found.items()), key=lambda kp: str(kp[1]))


def _add_source(p: Path, named: bool, found: dict[Path, str], stats: CorpusStats) -> int:
    """Add the sources at `p` to `found`; returns how many it holds (counting ones already found)."""
    if not p.is_dir():
        return _add_file(p, named, found, stats)
    if is_datasets_folder(p):
        found[p.resolve()] = "datasets"
        return 1
    n = 0
    for root, dirs, files in os.walk(p):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_datasets_folder(here / d):
                found[(here / d).resolve()] = "datasets"
                dirs.remove(d)  # its arrow files belong to it
                n += 1
        n += sum(_add_file(here / name, False, found, stats) for name in sorted(files) if not name.startswith("."))
    return n


def _add_file(p: Path, named: bool, found: dict[Path, str], stats: CorpusStats) -> int:
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is not None:
        found[p.resolve()] = kind
        return 1
    if named:
        # A file named on purpose must be read; in a directory or glob, READMEs and the like are skipped.
        raise BuildError(f"{p}: unknown corpus file type {p.suffix or '(no extension)'!r}; expected "
                         f"{', '.join(SUFFIXES)} or a datasets folder")
    stats.ignored_files.append(str(p))
    return 0


def is_datasets_folder(p: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def datasets_arrow_files(folder: Path) -> list[Path]:
    """The data files of a datasets folder, in the order state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{folder / 'state.json'}: not a datasets state file ({e})") from None
    files = [folder / n for n in names]
    for f in files:
        if not f.is_file():
            raise BuildError(f"{folder}: state.json lists {f.name!r}, which is missing")
    return files


# ---------------------------------------------------------------------------------------------------
# Documents


def content_hash(text: str | None = None, messages: list[dict] | None = None, ids: list[int] | None = None) -> str:
    """sha256 of a kind tag and the canonical content: UTF-8 text, compact sorted-key JSON of the
    messages (None-valued keys dropped), or the JSON list of ids. The tag keeps the text "[1, 2]" and
    the ids [1, 2] apart."""
    if text is not None:
        payload = b"text\0" + text.encode("utf-8")
    elif messages is not None:
        payload = b"messages\0" + json.dumps(messages, sort_keys=True, ensure_ascii=False,
                                             separators=(",", ":")).encode("utf-8")
    else:
        payload = b"input_ids\0" + json.dumps(ids, separators=(",", ":")).encode("ascii")
    return hashlib.sha256(payload).hexdigest()


def iter_documents(opts: CorpusOptions, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Non-empty documents in a fixed order: sources sorted by path, records in file order."""
    check_options(opts)
    stats = stats if stats is not None else CorpusStats()
    found = 0
    for kind, path in resolve_sources(opts.paths, stats):
        stats.sources += 1
        for doc in _read_source(kind, path, opts, stats):
            if _is_empty(doc):
                stats.empty_documents += 1
                continue
            found += 1
            stats.documents += 1
            yield doc
    if found == 0:
        raise BuildError(f"corpus {list(opts.paths)}: no documents found ({stats.empty_documents} empty, "
                         f"{stats.skipped_records} bad records skipped)")


def _is_empty(doc: Document) -> bool:
    if doc.text is not None:
        return not doc.text.strip()
    return not (doc.messages if doc.messages is not None else doc.input_ids)


def _read_source(kind: str, path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    if kind == "txt":
        yield from _read_txt(path, opts.txt_split)
    elif kind == "jsonl":
        yield from _read_jsonl(path, opts, stats)
    elif kind == "parquet":
        yield from _read_rows(path, _parquet_columns(path, opts), opts, stats)
    else:  # an arrow file, or a datasets folder whose rows are numbered across its arrow files
        files = datasets_arrow_files(path) if kind == "datasets" else [path]
        yield from _read_rows(path, _arrow_columns(path, files, opts), opts, stats)


def _read_txt(path: Path, split: str) -> Iterator[Document]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise BuildError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding artefact, not text
    if split == "file":
        pieces = [text]
    elif split == "lines":
        pieces = [line.removesuffix("\r") for line in text.split("\n")]  # index = 0-based line number
    else:
        pieces = [p.strip("\r\n") for p in _paragraphs(text)]
    for i, piece in enumerate(pieces):
        yield Document(str(path), i, piece, None, None, content_hash(text=piece))


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n(?:[ \t\r]*\n)+", text)  # one or more blank (or whitespace-only) lines


def _read_jsonl(path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BuildError(f"{path}:{lineno}: not valid UTF-8 (byte offset {start + e.start}: "
                                     f"{e.reason})") from None
                try:
                    # without its line break: a line cut inside a string then reads "Unterminated string"
                    record = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    reason = e.msg.removesuffix(" at")  # some messages end in "at", meant to be followed by the place
                    raise BuildError(f"{path}:{lineno}: malformed JSON ({reason} at column {e.colno})") from None
                yield _document(record, str(path), lineno - 1, f"{path}:{lineno}", opts)
            except BuildError:
                if not opts.skip_bad_records:
                    raise
                stats.skipped_records += 1


def _document(record, source: str, index: int, where: str, opts: CorpusOptions) -> Document:
    """The document of one record; `where` names it in errors (file:line or file: row n)."""
    if not isinstance(record, dict):
        raise BuildError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get(opts.text_field) is not None:
        text = record[opts.text_field]
        if not isinstance(text, str):
            raise BuildError(f"{where}: field {opts.text_field!r} is {type(text).__name__}, expected a string")
        return Document(source, index, text, None, None, _hash_or_error(where, text=text))
    if record.get(MESSAGES_FIELD) is not None:
        messages = _check_messages(record[MESSAGES_FIELD], where)
        return Document(source, index, None, messages, None, _hash_or_error(where, messages=messages))
    if record.get(IDS_FIELD) is not None:
        ids = record[IDS_FIELD]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise BuildError(f"{where}: field {IDS_FIELD!r} must be a list of non-negative integers")
        return Document(source, index, None, None, ids, content_hash(ids=ids))
    if opts.text_field in record:
        raise BuildError(f"{where}: field {opts.text_field!r} is null")
    present = ", ".join(map(repr, record)) or "none"
    raise BuildError(f"{where}: no field {opts.text_field!r} (nor {MESSAGES_FIELD!r} or {IDS_FIELD!r}); "
                     f"fields present: {present}; name the text field with --text-field")


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list):
        raise BuildError(f"{where}: field {MESSAGES_FIELD!r} must be a list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BuildError(f"{where}: {MESSAGES_FIELD}[{j}] needs string fields 'role' and 'content'")
        out.append({k: v for k, v in m.items() if v is not None})  # arrow structs fill absent keys with None
    return out


def _hash_or_error(where: str, **content) -> str:
    try:
        return content_hash(**content)
    except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\ud800"); they have no UTF-8 form
        raise BuildError(f"{where}: text is not valid Unicode ({e.reason})") from None


def _read_rows(path: Path, columns, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    """Documents from (column name, arrow array) chunks of a parquet or arrow source, rows numbered from 0."""
    row = 0
    for column, array in columns:
        for value in _column_values(array):
            where = f"{path}: row {row}"
            try:
                if value is None:
                    raise BuildError(f"{where}: field {column!r} is null")
                if isinstance(value, _BadValue):
                    raise BuildError(f"{where}: field {column!r} is not valid UTF-8")
                yield _document({column: value}, str(path), row, where, opts)
            except BuildError:
                if not opts.skip_bad_records:
                    raise
                stats.skipped_records += 1
            row += 1


def _pick_column(names: list[str], opts: CorpusOptions, where: str) -> str:
    """The one column read: the text field, else messages, else input_ids."""
    for column in (opts.text_field, MESSAGES_FIELD, IDS_FIELD):
        if column in names:
            return column
    raise BuildError(f"{where}: no column {opts.text_field!r} (nor {MESSAGES_FIELD!r} or {IDS_FIELD!r}); "
                     f"columns: {', '.join(names)}; name the text column with --text-field")


class _BadValue:
    """Stands for a string cell that is not valid UTF-8 (pyarrow does not check on write)."""


def _column_values(array) -> list:
    try:
        return array.to_pylist()
    except UnicodeDecodeError:  # find the bad cells one by one; only on this rare path
        out = []
        for i in range(len(array)):
            try:
                out.append(array[i].as_py())
            except UnicodeDecodeError:
                out.append(_BadValue())
        return out


def _parquet_columns(path: Path, opts: CorpusOptions):
    """(column, array) chunks of the document column of a parquet file; other columns are not read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BuildError(f"{path}: not a readable Parquet file ({e})") from None
    column = _pick_column(pf.schema_arrow.names, opts, str(path))
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        yield column, batch.column(0)


def _arrow_columns(source: Path, files: list[Path], opts: CorpusOptions):
    """(column, array) chunks of the document column of arrow IPC files (memory-mapped, not copied)."""
    column = None
    for f in files:
        for batch in _arrow_batches(f):
            if column is None:
                column = _pick_column(batch.schema.names, opts, str(source))
            yield column, batch.column(column)


def _arrow_batches(path: Path):
    """Record batches of an arrow IPC file: the stream format `datasets` writes, or the file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise BuildError(f"{path}: not an Arrow IPC file ({e})") from None
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


# ---------------------------------------------------------------------------------------------------
# Splits and fingerprint


def is_heldout(doc: Document, fraction: float) -> bool:
    """True for about `fraction` of documents: a hash of doc_id read as a number in [0, 1).

    Depends on the document alone, so the split is the same whatever the order or subset of sources."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(b"kdcache-heldout\0" + doc.doc_id.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def corpus_fingerprint(opts: CorpusOptions) -> dict:
    """{"sources": [{"path", "bytes", "sha256"}], "sha256": combined} over every file read.

    The combined hash covers the options that change documents (text_field, txt_split) and, per file in
    order, its name (doc ids contain it), size and content hash; not its directory, so a corpus moved to
    another machine keeps its fingerprint.
    """
    check_options(opts)
    entries = []
    for kind, path in resolve_sources(opts.paths):
        files = datasets_arrow_files(path) if kind == "datasets" else [path]
        for f in files:
            label = f"{path.name}/{f.name}" if kind == "datasets" else f.name
            entries.append({"path": str(f), "name": label, "bytes": f.stat().st_size, "sha256": _file_sha256(f)})
    combined = json.dumps({"text_field": opts.text_field, "txt_split": opts.txt_split,
                           "files": [[e["name"], e["bytes"], e["sha256"]] for e in entries]}, separators=(",", ":"))
    return {"sources": [{"path": e["path"], "bytes": e["bytes"], "sha256": e["sha256"]} for e in entries],
            "sha256": hashlib.sha256(combined.encode("utf-8")).hexdigest()}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class _Tokens:
    """One tokenized document before windowing."""

    doc_index: int
    split: str
    ids: np.ndarray  # int32 (T,)
    loss_mask: np.ndarray | None  # uint8 (T,)
    byte_offsets: np.ndarray | None  # int32 (T, 2)


def tokenize_corpus(opts: CorpusOptions, tokenizer, stats: CorpusStats | None = None) -> Iterator[TokenizedSequence]:
    """Sequences of at most `opts.seq_len` tokens, in document order (packed per split with `packing`)."""
    stats = stats if stats is not None else CorpusStats()
    packers = {"train": _Packer(opts.seq_len), "heldout": _Packer(opts.seq_len)}
    for tokens in _tokenized_documents(opts, tokenizer, stats):
        if len(tokens.ids) > opts.seq_len:
            stats.windowed_documents += 1
        for window in _windows(tokens, opts.seq_len):
            out = packers[window.split].add(window) if opts.packing else [_unpacked(window)]
            for seq in out:
                stats.sequences += 1
                stats.tokens += len(seq.input_ids)
                yield seq
    for packer in packers.values():
        for seq in packer.flush():
            stats.sequences += 1
            stats.tokens += len(seq.input_ids)
            yield seq


def _tokenized_documents(opts: CorpusOptions, tokenizer, stats: CorpusStats) -> Iterator[_Tokens]:
    """Documents of this part, tokenized in batches, in order."""
    ctx = TokenizerInfo.of(tokenizer)
    batch: list[tuple[int, str, Document]] = []
    for doc_index, doc in enumerate(iter_documents(opts, stats)):
        if doc_index % opts.num_parts != opts.part:
            continue
        split = "heldout" if is_heldout(doc, opts.heldout_fraction) else "train"
        stats.heldout_documents += split == "heldout"
        batch.append((doc_index, split, doc))
        if len(batch) == TOKENIZE_BATCH:
            yield from _tokenize_batch(batch, tokenizer, ctx, stats)
            batch = []
    yield from _tokenize_batch(batch, tokenizer, ctx, stats)


def _tokenize_batch(batch: list[tuple[int, str, Document]], tokenizer, ctx: "TokenizerInfo",
                    stats: CorpusStats) -> Iterator[_Tokens]:
    texts = [doc.text for _, _, doc in batch if doc.text is not None]
    encoded = iter(_encode_texts(texts, tokenizer, ctx)) if texts else iter(())
    for doc_index, split, doc in batch:
        if doc.text is not None:
            ids, offsets = next(encoded)
            mask = None
        elif doc.messages is not None:
            ids, mask = _encode_chat(doc, tokenizer)
            offsets = None
        else:
            ids, mask, offsets = _check_ids(doc, ctx), None, None
        if len(ids):
            yield _Tokens(doc_index, split, ids, mask, offsets)
        else:  # e.g. text made only of bytes the vocabulary lacks, which the tokenizer drops
            stats.empty_documents += 1


def _encode_texts(texts: list[str], tokenizer, ctx: "TokenizerInfo") -> list[tuple[np.ndarray, np.ndarray | None]]:
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
                 info: "TokenizerInfo | None" = None) -> np.ndarray:
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
            joined = "".join(tokens).translate(_byte_table()).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte alphabet
            return None
        return joined, np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    decoder = _byte_decoder()
    try:
        pieces = [t.encode("utf-8") if t in added else bytes(decoder[c] for c in t) for t in tokens]
    except KeyError:
        return None
    return b"".join(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, int]:
    """`str.translate` table: stand-in character -> the byte it stands for (as a latin-1 code point)."""
    return {ord(c): b for c, b in _byte_decoder().items()}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in of every byte, back to the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass(frozen=True)
class TokenizerInfo:
    """What tokenization needs to know about a tokenizer, looked up once."""

    is_fast: bool  # a Rust tokenizer: gives character offsets
    byte_level: bool  # GPT-2 style byte-level BPE: token strings map back to exact bytes
    added: frozenset[str]  # added/special tokens: their strings are literal text, not byte-mapped
    missing_bytes: frozenset[int]  # byte-level only: bytes with no token of their own (dropped from text)
    vocab_size: int

    @staticmethod
    def of(tokenizer) -> "TokenizerInfo":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        vocab = tokenizer.get_vocab() if byte_level else {}
        missing = frozenset(b for c, b in _byte_decoder().items() if c not in vocab) if byte_level else frozenset()
        return TokenizerInfo(bool(getattr(tokenizer, "is_fast", False)), byte_level,
                             frozenset(tokenizer.get_added_vocab()), missing, len(tokenizer))


def _check_ids(doc: Document, ctx: TokenizerInfo) -> np.ndarray:
    ids = np.asarray(doc.input_ids, dtype=np.int64)
    if len(ids) and ids.max() >= ctx.vocab_size:
        raise BuildError(f"{doc.source}: record {doc.index}: token id {int(ids.max())} in {IDS_FIELD!r} is outside "
                         f"the teacher's vocabulary ({ctx.vocab_size} tokens)")
    return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Chat


def _encode_chat(doc: Document, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (T,) of the rendered conversation and its loss mask (T,): 1 on assistant content."""
    rendered, spans = assistant_spans(doc.messages, tokenizer, f"{doc.source}: record {doc.index}")
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (T, 2) characters
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:  # a token belongs to the content if its characters overlap it
        mask |= ((offsets[:, 0] < b) & (offsets[:, 1] > a)).astype(np.uint8)
    return ids, mask


def assistant_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of assistant message contents.

    The conversation is rendered a second time with each assistant content replaced by a marker that
    no text contains; putting the contents back in place of the markers must give the real rendering,
    which proves the template copies the content verbatim and tells exactly where it went.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise BuildError(f"{where}: chat documents need a fast tokenizer (tokenizer.json) for character offsets")
    if getattr(tokenizer, "chat_template", None) is None:
        raise BuildError(f"{where}: the teacher's tokenizer has no chat template; cannot render 'messages'")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    marked = [dict(m) for m in messages]
    markers = {}
    for j, m in enumerate(marked):
        if m["role"] == "assistant" and m["content"]:
            markers[j] = f"\ue000kdcache-{j}\ue001"
            m["content"] = markers[j]
    template = tokenizer.apply_chat_template(marked, tokenize=False)
    for strip in (False, True):  # some templates trim message content
        spans, out, pos = [], [], 0
        for j, marker in markers.items():
            k = template.find(marker, pos)
            if k < 0:
                break
            content = messages[j]["content"].strip() if strip else messages[j]["content"]
            out.append(template[pos:k])
            start = sum(map(len, out))
            out.append(content)
            spans.append((start, start + len(content)))
            pos = k + len(marker)
        else:
            out.append(template[pos:])
            if "".join(out) == rendered:
                return rendered, spans
    raise BuildError(f"{where}: the chat template does not copy assistant messages verbatim; cannot mark "
                     "the assistant turns for the loss mask")


# ---------------------------------------------------------------------------------------------------
# Windows and packing


def _windows(t: _Tokens, seq_len: int) -> Iterator[_Tokens]:
    for a in range(0, len(t.ids), seq_len):
        b = a + seq_len
        yield _Tokens(t.doc_index, t.split, t.ids[a:b],
                      None if t.loss_mask is None else t.loss_mask[a:b],
                      None if t.byte_offsets is None else t.byte_offsets[a:b])


def _unpacked(w: _Tokens) -> TokenizedSequence:
    return TokenizedSequence(w.ids, w.loss_mask, None, w.byte_offsets, w.doc_index, w.split)


class _Packer:
    """Greedy packing in order: a window that does not fit in the open sequence starts a new one."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.parts: list[_Tokens] = []
        self.length = 0

    def add(self, w: _Tokens) -> list[TokenizedSequence]:
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
