"""The corpus: user files -> documents -> token sequences of at most `seq_len` tokens for the teacher.

The stages, one module each: `sources` (paths, directories and globs -> files), `readers` (a file -> its
documents), `documents` (a document's identity and split; the options and counters shared by all stages),
`tokenization` (text -> ids and byte offsets), `chat` (messages -> ids and loss mask), `packing` (windows and
packed sequences). This module runs them in order, as a stream: a source is read when the stream reaches it,
so memory does not grow with the corpus. Empty documents (whitespace-only text, no turns, no ids) are skipped
and counted; counts are in the `CorpusStats` a caller may pass in.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Iterator

from cache_builder.chat import encode_chat
from cache_builder.documents import CorpusOptions, CorpusStats, Document, check_options, is_heldout
from cache_builder.errors import BuildError
from cache_builder.packing import Packer, TokenizedSequence, Tokens, unpacked, windows
from cache_builder.readers import read_source
from cache_builder.sources import CorpusFingerprint, resolve_sources
from cache_builder.tokenization import TokenizerInfo, check_ids, encode_texts

# A tokenizer call takes up to this many documents and characters: the Rust tokenizer is much faster on batches,
# but its output (Python lists of ids and offsets, ~100 B per token) is held until the batch is consumed, so the
# characters bound the builder's memory whatever the documents' sizes (256 book-sized documents were gigabytes).
TOKENIZE_BATCH = 256
TOKENIZE_BATCH_CHARS = 1 << 18


def iter_documents(opts: CorpusOptions, stats: CorpusStats | None = None,
                   fingerprint: CorpusFingerprint | None = None) -> Iterator[Document]:
    """Non-empty documents in a fixed order: sources sorted by path, records in file order. With `fingerprint`,
    each source's files are hashed into it when the stream reaches them."""
    check_options(opts)
    stats = stats if stats is not None else CorpusStats()
    found = 0
    for kind, path in resolve_sources(opts.paths, stats):
        stats.sources += 1
        if fingerprint is not None:
            fingerprint.read(path)
        for doc in read_source(kind, path, opts, stats):
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


def first_records_hold_chat(opts: CorpusOptions) -> bool:
    """Whether the first record of some jsonl, parquet or arrow source is a chat record: the build then stores a
    loss mask. Reads one record (or batch) per source, not the corpus; a parquet or arrow source's column, and so
    every record's kind, is fixed by its schema, while a jsonl file's later records must agree with its first
    (`CorpusOptions.chat`)."""
    for kind, path in resolve_sources(opts.paths):
        if kind == "txt":
            continue
        # The first good record decides; bad ones are skipped here and reported by the stream where they belong.
        first = next(read_source(kind, path, dataclasses.replace(opts, skip_bad_records=True), CorpusStats()), None)
        if first is not None and first.messages is not None:
            return True
    return False


def tokenize_corpus(opts: CorpusOptions, tokenizer, stats: CorpusStats | None = None,
                    fingerprint: CorpusFingerprint | None = None) -> Iterator[TokenizedSequence]:
    """Sequences of at most `opts.seq_len` tokens, in document order (packed per split with `packing`)."""
    stats = stats if stats is not None else CorpusStats()
    packers = {"train": Packer(opts.seq_len), "heldout": Packer(opts.seq_len)}
    for tokens in _tokenized_documents(opts, tokenizer, stats, fingerprint):
        if len(tokens.ids) > opts.seq_len:
            stats.windowed_documents += 1
        for window in windows(tokens, opts.seq_len):
            out = packers[window.split].add(window) if opts.packing else [unpacked(window)]
            for seq in out:
                stats.sequences += 1
                stats.tokens += len(seq.input_ids)
                yield seq
    for packer in packers.values():
        for seq in packer.flush():
            stats.sequences += 1
            stats.tokens += len(seq.input_ids)
            yield seq


def _tokenized_documents(opts: CorpusOptions, tokenizer, stats: CorpusStats,
                         fingerprint: CorpusFingerprint | None) -> Iterator[Tokens]:
    """Documents tokenized in batches, in order."""
    ctx = TokenizerInfo.of(tokenizer)
    batch: list[tuple[int, str, Document]] = []
    chars = 0
    for doc_index, doc in enumerate(iter_documents(opts, stats, fingerprint)):
        split = "heldout" if is_heldout(doc, opts.heldout_fraction) else "train"
        stats.heldout_documents += split == "heldout"
        batch.append((doc_index, split, doc))
        chars += len(doc.text or "")
        if len(batch) == TOKENIZE_BATCH or chars >= TOKENIZE_BATCH_CHARS:
            yield from _tokenize_batch(batch, tokenizer, ctx, stats)
            batch, chars = [], 0
    yield from _tokenize_batch(batch, tokenizer, ctx, stats)


def _tokenize_batch(batch: list[tuple[int, str, Document]], tokenizer, ctx: TokenizerInfo,
                    stats: CorpusStats) -> Iterator[Tokens]:
    texts = [doc.text for _, _, doc in batch if doc.text is not None]
    encoded = iter(encode_texts(texts, tokenizer, ctx)) if texts else iter(())
    for doc_index, split, doc in batch:
        if doc.text is not None:
            ids, offsets = next(encoded)
            mask = None
        elif doc.messages is not None:
            ids, mask = encode_chat(doc, tokenizer)
            offsets = None
        else:
            ids, mask, offsets = check_ids(doc, ctx), None, None
        if len(ids):
            yield Tokens(doc_index, split, ids, mask, offsets)
        else:  # e.g. text made only of bytes the vocabulary lacks, which the tokenizer drops
            stats.empty_documents += 1
