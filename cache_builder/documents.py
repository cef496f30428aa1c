"""Documents: what the corpus's records become before tokenization, and the options and counters that every
stage of the corpus (sources, readers, tokenization, packing) shares.

Identity: a document is (source file name, record index, sha256 of its content); `doc_id` depends on
neither the machine nor the order the paths were given in, so the held-out split (a hash of `doc_id`)
is reproducible. `doc_index` is the position in `corpus.iter_documents` order (sources sorted by path).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cache_builder.errors import BuildError

TXT_SPLITS = ("file", "lines", "paragraphs")
MESSAGES_FIELD = "messages"
# Roles of the OpenAI / Hugging Face chat format (ipython: Llama 3 tool output); the loss mask covers "assistant".
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
IDS_FIELD = "input_ids"


@dataclass(frozen=True)
class CorpusOptions:
    paths: list[str]  # files, directories (walked recursively, sorted) and globs
    text_field: str = "text"  # field holding the text in jsonl / parquet / arrow records
    txt_split: str = "file"  # .txt documents: "file" | "lines" | "paragraphs"
    seq_len: int = 1024  # longest sequence in tokens; longer documents are cut into windows
    packing: bool = False  # pack short documents of one split into sequences of up to seq_len tokens
    heldout_fraction: float = 0.0  # fraction of documents (by a hash of doc_id) in the "heldout" split
    skip_bad_records: bool = False  # skip and count malformed records instead of failing
    # False: a chat record is an error. A streamed build fixes its field table (a loss mask or not) before it
    # reads the corpus, from the first record of each source (`corpus.first_records_hold_chat`).
    chat: bool = True


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


def check_options(opts: CorpusOptions) -> None:
    if isinstance(opts.paths, (str, os.PathLike)) or not opts.paths:
        raise BuildError(f"corpus: give a list of files, directories or globs, got {opts.paths!r}")
    if opts.txt_split not in TXT_SPLITS:
        raise BuildError(f"--txt-split must be one of {', '.join(TXT_SPLITS)}, got {opts.txt_split!r}")
    if opts.seq_len <= 0:
        raise BuildError(f"--seq-len must be positive, got {opts.seq_len}")
    if not 0.0 <= opts.heldout_fraction <= 1.0:
        raise BuildError(f"--heldout-fraction must be in [0, 1], got {opts.heldout_fraction}")


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


def is_heldout(doc: Document, fraction: float) -> bool:
    """True for about `fraction` of documents: a hash of doc_id read as a number in [0, 1).

    Depends on the document alone, so the split is the same whatever the order or subset of sources."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(b"kdcache-heldout\0" + doc.doc_id.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction
