"""The corpus: every input form, stable ids and splits, windows, packing, byte offsets, chat masks, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_builder.corpus import iter_documents, tokenize_corpus
from cache_builder.documents import CorpusOptions, CorpusStats, is_heldout
from cache_builder.sources import corpus_fingerprint
from cache_builder.tokenization import BYTE_DECODER, TokenizerInfo, byte_offsets
from cache_builder.errors import BuildError

NON_ASCII = "Grüße aus Köln: naïve café, 日本語のテキスト, emoji 😀👍🏽, Ελληνικά, עברית, and ﬁ ligatures."


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8",
                    errors="backslashreplace")  # a lone surrogate stays a JSON escape
    return path


def write_datasets_folder(folder: Path, texts: list[str], shards: int = 2) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: arrow IPC streams listed in state.json, plus dataset_info.json."""
    folder.mkdir(parents=True)
    schema = pa.schema([("text", pa.string()), ("n", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": {"text": {"dtype": "string"}}}})})
    per = -(-len(texts) // shards)
    names = []
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        part = texts[s * per:(s + 1) * per]
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch([pa.array(part), pa.array(range(len(part)), pa.int64())], schema=schema))
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_format_type": None, "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def docs(paths, **kw) -> list:
    return list(iter_documents(CorpusOptions(paths=[str(p) for p in paths], **kw)))


def seqs(paths, tokenizer, stats=None, **kw) -> list:
    return list(tokenize_corpus(CorpusOptions(paths=[str(p) for p in paths], **kw), tokenizer, stats))


# --- input forms -------------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path: Path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    [d] = docs([tmp_path / "a.txt"])
    assert (d.text, d.index, d.messages, d.input_ids) == ("line one\nline two\n", 0, None, None)
    assert d.doc_id.startswith("a.txt:0:")


def test_txt_split_lines_gives_one_document_per_nonempty_line_indexed_by_line(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first\r\n\nthird\n")
    stats = CorpusStats()
    got = list(iter_documents(CorpusOptions(paths=[str(tmp_path / "a.txt")], txt_split="lines"), stats))
    assert [(d.index, d.text) for d in got] == [(0, "first"), (2, "third")]
    assert stats.empty_documents == 2  # the blank line and the piece after the last newline


def test_txt_split_paragraphs_splits_at_blank_lines(tmp_path: Path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\n  \nparagraph two\n")
    assert [d.text for d in docs([tmp_path / "a.txt"], txt_split="paragraphs")] == ["para one\nstill one",
                                                                                     "paragraph two"]


def test_jsonl_records_with_text_messages_and_input_ids_become_documents(tmp_path: Path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    write_jsonl(tmp_path / "a.jsonl", [{"text": "plain"}, {"messages": chat}, {"input_ids": [5, 6, 7]}])
    got = docs([tmp_path / "a.jsonl"])
    assert [(d.text, d.messages, d.input_ids) for d in got] == [("plain", None, None), (None, chat, None),
                                                                (None, None, [5, 6, 7])]
    assert [d.index for d in got] == [0, 1, 2]


def test_text_field_option_reads_another_field(tmp_path: Path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "one", "text": 3}])
    pq.write_table(pa.table({"body": ["two"]}), tmp_path / "b.parquet")
    assert [d.text for d in docs([tmp_path], text_field="body")] == ["one", "two"]


def test_parquet_rows_are_documents_and_input_ids_columns_pass_through(tmp_path: Path, tokenizer):
    pq.write_table(pa.table({"text": ["row zero", None, "row two"], "other": [1, 2, 3]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 3], [4]], pa.list_(pa.int32()))}), tmp_path / "u.parquet")
    stats = CorpusStats()
    got = list(iter_documents(CorpusOptions(paths=[str(tmp_path)], skip_bad_records=True), stats))
    assert [(d.index, d.text, d.input_ids) for d in got] == [(0, "row zero", None), (2, "row two", None),
                                                             (0, None, [1, 2, 3]), (1, None, [4])]
    assert stats.skipped_records == 1  # the null text
    out = seqs([tmp_path / "u.parquet"], tokenizer)
    assert [s.input_ids.tolist() for s in out] == [[1, 2, 3], [4]]  # as stored: no BOS added
    assert all(s.input_ids.dtype == np.int32 and s.byte_offsets is None for s in out)


def test_parquet_messages_column_is_rendered_as_chat(tmp_path: Path, tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    pq.write_table(pa.table({"messages": [chat]}), tmp_path / "c.parquet")
    [d] = docs([tmp_path / "c.parquet"])
    assert d.messages == chat
    [s] = seqs([tmp_path / "c.parquet"], tokenizer)
    assert s.loss_mask is not None and s.loss_mask.sum() > 0


def test_datasets_folder_is_read_with_pyarrow_in_state_json_order(tmp_path: Path):
    folder = write_datasets_folder(tmp_path / "ds", [f"text {i}" for i in range(5)])
    got = docs([folder])
    assert [(d.index, d.text) for d in got] == [(i, f"text {i}") for i in range(5)]
    assert {d.source for d in got} == {str(folder.resolve())}
    # Found inside a directory too, without reading its arrow files a second time.
    (tmp_path / "x.txt").write_text("x")
    assert len(docs([tmp_path])) == 6


def test_arrow_file_in_either_ipc_format_is_read(tmp_path: Path):
    table = pa.table({"text": ["one", "two"]})
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert [(Path(d.source).name, d.index, d.text) for d in docs([tmp_path])] == [
        ("a.arrow", 0, "one"), ("a.arrow", 1, "two"), ("b.arrow", 0, "one"), ("b.arrow", 1, "two")]


def test_directory_is_walked_recursively_in_sorted_order_skipping_other_files(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b" / "c.txt").write_text("c")
    (tmp_path / "README.md").write_text("not corpus")
    (tmp_path / ".hidden.txt").write_text("hidden")
    stats = CorpusStats()
    got = list(iter_documents(CorpusOptions(paths=[str(tmp_path)]), stats))
    assert [d.text for d in got] == ["a", "c", "z"]
    assert stats.ignored_files == [str(tmp_path / "README.md")]


def test_glob_selects_matching_files_and_overlapping_paths_count_once(tmp_path: Path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    got = docs([tmp_path / "x*.txt", tmp_path / "x1.txt", tmp_path / "**" / "x2.txt"])
    assert [d.text for d in got] == ["x1.txt", "x2.txt"]


# --- identity, splits, fingerprint -------------------------------------------------------------------


@pytest.fixture
def many_docs(tmp_path: Path) -> list[Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"document number {i}"} for i in range(1500)])
    b = tmp_path / "b.txt"
    b.write_text("\n".join(f"line {i}" for i in range(1500)))
    return [a, b]


def test_doc_ids_are_stable_across_runs_and_source_order(many_docs: list[Path], tmp_path: Path):
    a, b = many_docs
    first = [d.doc_id for d in docs([a, b], txt_split="lines")]
    assert [d.doc_id for d in docs([b, a], txt_split="lines")] == first
    # Another machine, another directory: the same ids.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = [Path(shutil.copy(p, elsewhere / p.name)) for p in (b, a)]
    assert [d.doc_id for d in docs(moved, txt_split="lines")] == first
    assert len(set(first)) == 3000


def test_heldout_split_is_reproducible_and_close_to_the_fraction(many_docs: list[Path]):
    got = docs(many_docs, txt_split="lines")
    held = [is_heldout(d, 0.2) for d in got]
    assert 0.17 < np.mean(held) < 0.23
    assert [is_heldout(d, 0.2) for d in reversed(got)] == held[::-1]  # a property of the document alone
    assert all(not is_heldout(d, 0.0) for d in got) and all(is_heldout(d, 1.0) for d in got)
    # Growing the fraction only moves documents into heldout.
    assert all(is_heldout(d, 0.3) for d, h in zip(got, held) if h)


def test_sequences_carry_their_documents_split(many_docs: list[Path], tokenizer):
    got = docs(many_docs[:1])
    want = {i: "heldout" if is_heldout(d, 0.25) else "train" for i, d in enumerate(got)}
    stats = CorpusStats()
    out = seqs(many_docs[:1], tokenizer, stats, heldout_fraction=0.25)
    assert {s.doc_index: s.split for s in out} == want
    assert stats.heldout_documents == sum(v == "heldout" for v in want.values())


def test_corpus_fingerprint_follows_content_and_options_not_location(many_docs: list[Path], tmp_path: Path):
    a, b = many_docs
    fp = corpus_fingerprint(CorpusOptions(paths=[str(a), str(b)]))
    assert [s["path"] for s in fp["sources"]] == [str(a.resolve()), str(b.resolve())]
    assert fp["sources"][0]["bytes"] == a.stat().st_size
    assert corpus_fingerprint(CorpusOptions(paths=[str(b), str(a)]))["sha256"] == fp["sha256"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = [str(shutil.copy(p, elsewhere / p.name)) for p in (a, b)]
    assert corpus_fingerprint(CorpusOptions(paths=moved))["sha256"] == fp["sha256"]
    assert corpus_fingerprint(CorpusOptions(paths=moved, txt_split="lines"))["sha256"] != fp["sha256"]
    assert corpus_fingerprint(CorpusOptions(paths=moved, text_field="body"))["sha256"] != fp["sha256"]
    with open(moved[1], "a") as f:
        f.write("\nmore")
    assert corpus_fingerprint(CorpusOptions(paths=moved))["sha256"] != fp["sha256"]


# --- tokenization: windows, packing, byte offsets, chat ---------------------------------------------


def test_text_is_tokenized_with_the_tokenizers_default_special_tokens(tmp_path: Path, tokenizer):
    (tmp_path / "a.txt").write_text("Hello world")
    [s] = seqs([tmp_path / "a.txt"], tokenizer)
    # SmolLM2 adds no BOS: its bos_token is <|im_start|>, which only the chat template writes.
    assert s.input_ids.tolist() == tokenizer("Hello world", add_special_tokens=True).input_ids == [19556, 905]
    assert (s.loss_mask, s.position_ids, s.doc_index, s.split) == (None, None, 0, "train")


def test_long_document_is_split_into_windows_of_seq_len(tmp_path: Path, tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    want = tokenizer(text).input_ids
    stats = CorpusStats()
    out = seqs([tmp_path / "a.txt"], tokenizer, stats, seq_len=64)
    assert [len(s.input_ids) for s in out][:-1] == [64] * (len(out) - 1) and 1 <= len(out[-1].input_ids) <= 64
    assert np.concatenate([s.input_ids for s in out]).tolist() == want
    assert np.concatenate([s.byte_offsets for s in out])[-1, 1] == len(text.encode())
    assert {s.doc_index for s in out} == {0} and stats.windowed_documents == 1


def segments(s) -> list[list[int]]:
    """The pieces of a packed sequence: cut where position_ids restart at 0."""
    starts = np.flatnonzero(s.position_ids == 0).tolist() + [len(s.input_ids)]
    assert starts[0] == 0
    for a, b in zip(starts, starts[1:]):
        assert s.position_ids[a:b].tolist() == list(range(b - a))
    return [s.input_ids[a:b].tolist() for a, b in zip(starts, starts[1:])]


def test_packing_fills_sequences_and_records_document_boundaries(tmp_path: Path, tokenizer):
    texts = [" ".join(["tok"] * n) for n in (5, 9, 3, 30, 2, 7)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    per_doc = [tokenizer(t).input_ids for t in texts]
    out = seqs([tmp_path / "a.jsonl"], tokenizer, seq_len=16, packing=True)
    assert all(1 <= len(s.input_ids) <= 16 and s.position_ids.dtype == np.int32 for s in out)
    pieces = [piece for s in out for piece in segments(s)]
    assert pieces == [ids[i:i + 16] for ids in per_doc for i in range(0, len(ids), 16)]  # windows first
    # Greedy: a piece opens a new sequence only when it does not fit into the open one.
    assert all(len(out[i].input_ids) + len(segments(out[i + 1])[0]) > 16 for i in range(len(out) - 1))
    assert [s.doc_index for s in out][0] == 0
    assert all(s.byte_offsets.shape == (len(s.input_ids), 2) for s in out)


def test_packing_never_mixes_train_and_heldout_documents(tmp_path: Path, tokenizer):
    texts = [f"document {i} " + "x " * (i % 7) for i in range(200)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    held = [is_heldout(d, 0.3) for d in docs([tmp_path / "a.jsonl"])]
    out = seqs([tmp_path / "a.jsonl"], tokenizer, seq_len=64, packing=True, heldout_fraction=0.3)
    for split in ("train", "heldout"):
        members = [i for i, h in enumerate(held) if h == (split == "heldout")]
        mine = [s for s in out if s.split == split]
        assert [piece for s in mine for piece in segments(s)] == [tokenizer(texts[i]).input_ids for i in members]
        assert {s.doc_index for s in mine} <= set(members)
    assert 30 < sum(held) < 90


def test_byte_offsets_round_trip_for_ascii_and_non_ascii_text(tmp_path: Path, tokenizer):
    text = "Plain ASCII first.\n" + NON_ASCII + "\n\t tabs  and  spaces <|im_end|> end"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    [s] = seqs([tmp_path / "a.txt"], tokenizer, seq_len=4096)
    raw = text.encode("utf-8")
    spans = s.byte_offsets
    assert spans.dtype == np.int32 and spans.shape == (len(s.input_ids), 2)
    assert spans[0, 0] == 0 and spans[-1, 1] == len(raw) and (spans[1:, 0] == spans[:-1, 1]).all()  # they tile
    split_chars = 0
    for tid, (a, b) in zip(s.input_ids.tolist(), spans.tolist()):
        piece = tokenizer.decode([tid])
        if "\ufffd" in piece:  # part of a character split over tokens: its bytes alone are not UTF-8
            split_chars += 1
            assert tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(tid)]) == piece
            continue
        assert raw[a:b].decode("utf-8") == piece
    assert split_chars > 0  # the CJK and emoji above are split over byte tokens


def is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(b in it for b in small)


@pytest.fixture(scope="module")
def info(tokenizer) -> TokenizerInfo:
    return TokenizerInfo.of(tokenizer)  # reads the whole vocabulary: once, not per example


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=60))
def test_byte_offsets_give_each_tokens_own_bytes_for_any_unicode_text(tokenizer, info, text: str):
    enc = tokenizer([text], add_special_tokens=True, return_offsets_mapping=True).encodings[0]
    in_text = [s is not None for s in enc.sequence_ids]
    spans = byte_offsets(text, enc.offsets, in_text, enc.tokens, info)
    raw = text.encode("utf-8")
    assert spans.shape == (len(enc.ids), 2) and (spans[1:, 0] >= spans[:-1, 1]).all()  # in order, disjoint
    token_bytes = [bytes(tokenizer.convert_tokens_to_string([t]).encode("utf-8", "surrogateescape"))
                   for t in enc.tokens]
    pieces = [raw[a:b] for a, b in spans.tolist()]
    if tokenizer.decode(enc.ids) == text:  # a lossless tokenization: the spans tile the text ...
        assert b"".join(pieces) == raw
        for piece, want in zip(pieces, token_bytes):  # ... and whole-character tokens are their bytes
            if b"\xef\xbf\xbd" not in want:
                assert piece == want
        coarse = byte_offsets(text, enc.offsets, in_text)  # inside the character offsets, in bytes
        assert (coarse[:, 0] <= spans[:, 0]).all() and (coarse[:, 1] >= spans[:, 1]).all()
    else:  # bytes without a token were dropped: each span starts and ends on its token's bytes
        whole = [bytes(BYTE_DECODER[c] for c in t) for t in enc.tokens]
        for piece, want in zip(pieces, whole):
            assert piece[:1] == want[:1] and piece[-1:] == want[-1:] and is_subsequence(want, piece)


def test_bytes_the_tokenizer_drops_belong_to_no_token(tokenizer, info):
    # SmolLM2 has no token for the bytes 0xF1, 0x04 and 0x16: the tokenizer drops them, merges across
    # the gap ('"\x16:' is one token) and reports wrong character offsets after them.
    text = 'a\U00040000\x12b\x04c"\x16:'
    enc = tokenizer([text], return_offsets_mapping=True).encodings[0]
    assert tokenizer.decode(enc.ids) == 'a\ufffd\ufffd\ufffd\x12bc":'  # three stray continuation bytes
    spans = byte_offsets(text, enc.offsets, [True] * len(enc.ids), enc.tokens, info)
    raw = text.encode()
    assert [raw[a:b] for a, b in spans.tolist()] == [b"a", b"\x80", b"\x80", b"\x80", b"\x12", b"b", b"c",
                                                      b'"\x16:']


def test_chat_loss_mask_covers_exactly_the_assistant_content(tmp_path: Path, tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? Say assistant."},
            {"role": "assistant", "content": "It is 4. 😀"}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "assistant"}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    [s] = seqs([tmp_path / "c.jsonl"], tokenizer, seq_len=4096)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert s.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False).input_ids
    assert s.byte_offsets is None and s.loss_mask.dtype == np.uint8
    marked = tokenizer.decode(s.input_ids[s.loss_mask == 1].tolist())
    assert marked == "It is 4. 😀assistant"
    # The turn markers and the end-of-turn token are context, not targets.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not s.loss_mask[s.input_ids == im_end].any()


def test_chat_without_system_message_gets_the_templates_default_and_a_correct_mask(tmp_path: Path, tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}]  # "a" also in the system text
    write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    [s] = seqs([tmp_path / "c.jsonl"], tokenizer)
    assert tokenizer.decode(s.input_ids[:3].tolist()) == "<|im_start|>system\n"
    assert tokenizer.decode(s.input_ids[s.loss_mask == 1].tolist()) == "a"


def test_packed_chat_and_text_documents_get_a_full_loss_mask(tmp_path: Path, tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    write_jsonl(tmp_path / "c.jsonl", [{"text": "plain text"}, {"messages": chat}])
    [s] = seqs([tmp_path / "c.jsonl"], tokenizer, seq_len=512, packing=True)
    n_text = len(tokenizer("plain text").input_ids)
    assert s.loss_mask[:n_text].all() and 0 < s.loss_mask[n_text:].sum() < len(s.input_ids) - n_text
    assert s.byte_offsets is None  # the chat part has none


def test_empty_documents_are_skipped_and_counted(tmp_path: Path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": "kept"}, {"messages": []},
                                       {"input_ids": []}])
    stats = CorpusStats()
    out = seqs([tmp_path / "a.jsonl"], tokenizer, stats)
    assert [s.doc_index for s in out] == [0] and stats.empty_documents == 4 and stats.documents == 1


# --- bad input ---------------------------------------------------------------------------------------


def test_empty_corpus_raises_build_error_naming_the_paths(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(BuildError, match=r"empty\.txt.*no documents"):
        docs([tmp_path / "empty.txt"])


def test_malformed_json_line_names_file_and_line(tmp_path: Path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "ok too"}\n')
    with pytest.raises(BuildError, match=r"a\.jsonl:3: malformed JSON"):
        docs([p])


def test_skip_bad_records_skips_and_counts_malformed_lines(tmp_path: Path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "broken\n[1, 2]\n{"other": 1}\n{"text": "bad \xff byte"}\n'
                  b'{"text": "ok too"}\n')
    stats = CorpusStats()
    got = list(iter_documents(CorpusOptions(paths=[str(p)], skip_bad_records=True), stats))
    assert [(d.index, d.text) for d in got] == [(0, "ok"), (5, "ok too")]
    assert stats.skipped_records == 4


def test_missing_text_field_names_the_field_and_the_line(tmp_path: Path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(BuildError, match=r"a\.jsonl:2: no field 'text'.*'body'.*--text-field"):
        docs([p])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(BuildError, match=r"b\.parquet: no column 'text'.*columns: body"):
        docs([tmp_path / "b.parquet"])


def test_wrong_field_types_are_named(tmp_path: Path):
    for record, pattern in [({"text": 3}, "field 'text' is int"),
                            ({"messages": [{"role": "user"}]}, r"messages\[0\] needs string fields"),
                            ({"input_ids": [1, "2"]}, "field 'input_ids' must be a list of non-negative integers"),
                            ({"text": "\ud800"}, "text is not valid Unicode"),
                            ({"text": None}, "field 'text' is null")]:
        p = write_jsonl(tmp_path / "a.jsonl", [record])
        with pytest.raises(BuildError, match=r"a\.jsonl:1: " + pattern):
            docs([p])


def test_non_utf8_bytes_name_the_file_line_and_byte_offset(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes("fine\nstill fine\nbad \xff here".encode("latin-1"))
    with pytest.raises(BuildError, match=r"a\.txt:3: not valid UTF-8 \(byte offset 20"):
        docs([tmp_path / "a.txt"])
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')
    with pytest.raises(BuildError, match=r"b\.jsonl:2: not valid UTF-8 \(byte offset 25"):
        docs([tmp_path / "b.jsonl"])


def test_non_utf8_parquet_cell_names_the_row(tmp_path: Path):
    col = pa.array([b"ok", b"bad \xff"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": col}), tmp_path / "a.parquet")
    with pytest.raises(BuildError, match=r"a\.parquet: row 1: field 'text' is not valid UTF-8"):
        docs([tmp_path / "a.parquet"])


def test_unknown_extension_is_an_error_when_named(tmp_path: Path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(BuildError, match=r"a\.csv: unknown corpus file type '\.csv'"):
        docs([tmp_path / "a.csv"])


def test_unreadable_parquet_and_arrow_files_are_named(tmp_path: Path):
    (tmp_path / "a.parquet").write_text("not parquet")
    with pytest.raises(BuildError, match=r"a\.parquet: not a readable Parquet file"):
        docs([tmp_path / "a.parquet"])
    (tmp_path / "b.arrow").write_text("not arrow")
    with pytest.raises(BuildError, match=r"b\.arrow: not an Arrow IPC file"):
        docs([tmp_path / "b.arrow"])


def test_path_or_glob_that_matches_nothing_is_an_error(tmp_path: Path):
    with pytest.raises(BuildError, match="no such file or directory"):
        docs([tmp_path / "missing.txt"])
    with pytest.raises(BuildError, match=r"glob .*\*\.jsonl.* matches nothing"):
        docs([tmp_path / "*.jsonl"])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(BuildError, match="holds no corpus files"):
        docs([tmp_path])


def test_pre_tokenized_ids_outside_the_vocabulary_are_an_error(tmp_path: Path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1, 49152]}])
    with pytest.raises(BuildError, match=r"a\.jsonl: record 0: token id 49152 .*\(49152 tokens\)"):
        seqs([tmp_path / "a.jsonl"], tokenizer)


def test_bad_options_are_named(tmp_path: Path):
    (tmp_path / "a.txt").write_text("x")
    for kw, pattern in [({"txt_split": "sentences"}, "--txt-split"), ({"seq_len": 0}, "--seq-len"),
                        ({"heldout_fraction": 1.5}, "--heldout-fraction")]:
        with pytest.raises(BuildError, match=pattern):
            docs([tmp_path / "a.txt"], **kw)
