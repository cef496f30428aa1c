"""Record readers: one source file (or datasets folder) -> its documents, in file order.

- `.txt`: one document per file, or one per line / per paragraph (`txt_split`);
- `.jsonl`: one JSON object per line with a text field (`text_field`), or `messages` (chat turns,
  rendered with the teacher's chat template), or `input_ids` (pre-tokenized, used as is);
- `.parquet` and `.arrow` files, and `datasets` folders written by `save_to_disk` (arrow IPC streams
  listed in state.json, read with pyarrow alone), with the same three kinds of column.
When a record has several of these fields the first of text field, `messages`, `input_ids` wins:
re-tokenizing text with the teacher's own tokenizer is always right, stored ids may come from another.
A malformed record is an error naming the file and line (or row), or is skipped and counted with
`skip_bad_records`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cache_builder.documents import CHAT_ROLES, IDS_FIELD, MESSAGES_FIELD, CorpusOptions, CorpusStats, Document, content_hash
from cache_builder.errors import BuildError
from cache_builder.sources import datasets_arrow_files

PARQUET_BATCH_ROWS = 1024


def read_source(kind: str, path: Path, opts: CorpusOptions, stats: CorpusStats) -> Iterator[Document]:
    """The documents of one source (`sources.resolve_sources` gives its kind), empty ones included."""
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
                    if lineno == 1:
                        text = text.removeprefix("\ufeff")  # a byte-order mark is an encoding artefact
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
        if not opts.chat:
            raise BuildError(f"{where}: a chat record ({MESSAGES_FIELD!r}), but no source starts with one; the cache's "
                             "fields (a loss mask or not) are fixed from each source's first record before the corpus "
                             "streams: start this file with a chat record, or put chat records in a file of their own")
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
        if m["role"] not in CHAT_ROLES:
            # A misspelt role would be rendered by some templates and dropped or refused by others.
            raise BuildError(f"{where}: {MESSAGES_FIELD}[{j}] has role {m['role']!r}; expected one of "
                             f"{', '.join(CHAT_ROLES)}")
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
