"""Cross-tokenizer alignment on hand-made strings: the teacher is SmolLM2's tokenizer (offsets made by the builder's
own code), the student a byte-level BPE written out by hand, so every expected pairing can be read off the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cache_builder.tokenization import TokenizerInfo, byte_offsets
from student_trainer.batch import IGNORE_INDEX
from student_trainer.collate import collate
from student_trainer.xtok_align import Aligner, cached_vocab_map, token_bytes, utf8_runs, vocab_map

# Merges that cross SmolLM2's token boundaries: "hello world hello" is hello|Ġworld|Ġhello to the teacher and
# hell|oĠw|orld|Ġhello to the student (one pre-token: no regex split, so merges may run over spaces).
MERGES = [("h", "e"), ("he", "l"), ("hel", "l"), ("o", "Ġ"), ("oĠ", "w"), ("o", "r"), ("or", "l"), ("orl", "d"),
          ("Ġ", "hell"), ("Ġhell", "o")]


def hand_student(bos: bool = False) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<s>"] = len(vocab)  # not id 0, which is padding in a batch
    tok = Tokenizer(models.BPE(vocab, MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def teacher(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def teacher_tokens(teacher, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids (T,) and [start, end) byte offsets (T, 2) exactly as the cache builder stores them."""
    enc = teacher([text], add_special_tokens=True, return_offsets_mapping=True).encodings[0]
    in_text = [s is not None for s in enc.sequence_ids]
    spans = byte_offsets(text, enc.offsets, in_text, enc.tokens, TokenizerInfo.of(teacher))
    return np.asarray(enc.ids, np.int32), spans


def teacher_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]]):
    """A loader Batch; each row is a list of (ids, offsets) documents packed with position_ids restarts. The tail
    of teacher position i is -(i + 1) / 64, so the position a student position was paired with can be read back."""
    seqs = []
    for docs in rows:
        ids = np.concatenate([d[0] for d in docs])
        n = len(ids)
        seqs.append({"input_ids": ids, "byte_offsets": np.concatenate([d[1] for d in docs]),
                     "position_ids": np.concatenate([np.arange(len(d[0]), dtype=np.int32) for d in docs]),
                     "topk_ids": np.stack([np.roll(ids, -1), np.zeros(n, np.int32)], axis=1),  # the next token first
                     "topk_logprobs": np.full((n, 2), -1.0, np.float32),
                     "tail_logmass": -(np.arange(n, dtype=np.float32) + 1) / 64,
                     "target_logprob": np.zeros(n, np.float32), "doc_index": np.int64(0)})
    return collate(seqs, [])


def paired(out) -> list[list[int]]:
    """Per row, the teacher position each student position is paired with (-1: none), padding cut off."""
    pos = torch.where(out.kd_mask, (-out.tail_logmass * 64).round().long() - 1, -1)
    return [pos[b, : int((out.input_ids[b] != 0).sum())].tolist() for b in range(len(pos))]


def student_text(aligner: Aligner, ids) -> bytes:
    return b"".join(aligner.student_bytes[i] for i in ids)


def test_merges_that_cross_teacher_boundaries_pair_only_where_both_tokens_end(teacher):
    student = hand_student()
    ids, spans = teacher_tokens(teacher, "hello world hello")
    assert spans[:, 1].tolist() == [5, 11, 17]  # hello | Ġworld | Ġhello
    aligner = Aligner(token_bytes(teacher), student)
    out, stats = aligner.align(teacher_batch([[(ids, spans)]]))
    assert student.convert_ids_to_tokens(out.input_ids[0].tolist()) == ["hell", "oĠw", "orld", "Ġhello"]
    # Student ends 4, 7, 11, 17: only "orld" ends where a teacher token does (Ġworld, byte 11) and has a next token.
    assert paired(out) == [[-1, -1, 1, -1]]
    assert out.labels[0].tolist() == [*out.input_ids[0, 1:].tolist(), IGNORE_INDEX]
    assert (stats.targets, stats.aligned, stats.student_tokens, stats.teacher_tokens) == (3, 1, 4, 3)


def test_multibyte_characters_split_over_byte_tokens_pair_at_every_shared_byte_end(teacher):
    text = "é日😀x naïve"
    ids, spans = teacher_tokens(teacher, text)
    aligner = Aligner(token_bytes(teacher), hand_student())
    out, _ = aligner.align(teacher_batch([[(ids, spans)]]))
    row = out.input_ids[0].tolist()
    assert student_text(aligner, row) == text.encode()
    ends = np.cumsum([len(aligner.student_bytes[i]) for i in row])  # this student has single-byte tokens here
    # Teacher token i ends at byte spans[i, 1] of the document; the student token ending there is paired with it.
    want = [next((i for i in range(len(ids) - 1) if spans[i, 1] == e), -1) if j < len(row) - 1 else -1
            for j, e in enumerate(ends)]
    assert paired(out) == [want]
    assert sum(w >= 0 for w in want) == len(ids) - 1  # every teacher position but the last found its partner


def test_a_window_that_starts_inside_a_character_drops_the_partial_bytes(teacher):
    text = "日本 ok"
    ids, spans = teacher_tokens(teacher, text)
    cut = next(i for i in range(1, len(ids)) if spans[i, 0] % 3 != 0 and spans[i, 0] < 6)  # starts mid-character
    window = (ids[cut:], spans[cut:])
    aligner = Aligner(token_bytes(teacher), hand_student(bos=True))
    out, _ = aligner.align(teacher_batch([[window]]))
    row = out.input_ids[0].tolist()
    start = spans[cut, 0]
    whole = -(-start // 3) * 3  # the next character boundary: the partial character is not text to the student
    assert student_text(aligner, row) == text.encode()[whole:]
    assert aligner.tokenizer.bos_token_id not in row  # a window that does not start its document gets no BOS
    ends = whole - start + np.cumsum([len(aligner.student_bytes[i]) for i in row])  # bytes into the window's text
    t_ends = spans[cut:, 1] - start
    want = [next((i for i in range(len(t_ends) - 1) if t_ends[i] == e), -1) if j < len(row) - 1 else -1
            for j, e in enumerate(ends)]
    assert paired(out) == [want] and max(want) >= 0


def test_packed_documents_are_aligned_each_on_its_own_and_the_first_gets_the_students_bos(teacher):
    a, b = teacher_tokens(teacher, "hello world hello"), teacher_tokens(teacher, "world hello")
    aligner = Aligner(token_bytes(teacher), hand_student(bos=True))
    out, stats = aligner.align(teacher_batch([[a, b], [b]]))
    bos = aligner.tokenizer.bos_token_id
    first = [bos, *aligner.tokenizer("hello world hello", add_special_tokens=False)["input_ids"]]
    second = [bos, *aligner.tokenizer("world hello", add_special_tokens=False)["input_ids"]]
    assert out.input_ids[0, : len(first) + len(second)].tolist() == first + second
    assert out.position_ids[0, : len(first) + len(second)].tolist() == [*range(len(first)), *range(len(second))]
    labels = out.labels[0].tolist()
    assert labels[len(first) - 1] == IGNORE_INDEX and labels[len(first) + len(second) - 1] == IGNORE_INDEX  # not across documents
    rows = paired(out)
    # Document b sits at teacher positions 3.. of row 0 and 0.. of row 1: the same pairs, shifted by 3.
    assert rows[0][len(first):] == [p + 3 if p >= 0 else -1 for p in rows[1]]
    assert all(p < 3 for p in rows[0][: len(first)]) and max(rows[1]) >= 0
    assert out.input_ids[1, len(second):].eq(0).all() and not out.kd_mask[1, len(second):].any()  # padding
    assert stats.student_tokens == 2 * len(second) + len(first)


def test_a_teacher_token_with_an_empty_span_is_not_text(teacher):
    ids, spans = teacher_tokens(teacher, "hello world hello")
    with_bos = (np.concatenate([[teacher.convert_tokens_to_ids("<|im_start|>")], ids]).astype(np.int32),
                np.concatenate([[[0, 0]], spans]).astype(np.int32))  # an added BOS: empty span at byte 0
    aligner = Aligner(token_bytes(teacher), hand_student())
    plain, _ = aligner.align(teacher_batch([[(ids, spans)]]))
    out, _ = aligner.align(teacher_batch([[with_bos]]))
    assert out.input_ids.tolist() == plain.input_ids.tolist()
    assert paired(out) == [[p + 1 if p >= 0 else -1 for p in paired(plain)[0]]]


def test_byte_align_batches_carry_the_student_ids_of_the_teachers_entries(teacher):
    student = hand_student()
    mapping = vocab_map(token_bytes(teacher), token_bytes(student))
    ids, spans = teacher_tokens(teacher, "hello world hello")
    out, _ = Aligner(token_bytes(teacher), student, mapping).align(teacher_batch([[(ids, spans)]]))
    j = paired(out)[0].index(1)  # the student position paired with teacher position 1 (after "Ġworld")
    # topk_ids of teacher position 1 are (Ġhello, <|endoftext|>): the student has "Ġhello", not the teacher's special.
    assert out.topk_ids[0, j].tolist() == [student.convert_tokens_to_ids("Ġhello"), -1]
    assert (out.topk_ids[~out.kd_mask] == -1).all()


def test_token_bytes_undo_the_byte_alphabet_and_give_added_tokens_their_content(teacher):
    table = token_bytes(teacher)
    assert len(table) == len(teacher)
    assert table[teacher.convert_tokens_to_ids("Ġworld")] == b" world"
    assert table[teacher.convert_tokens_to_ids("<|im_start|>")] == b"<|im_start|>"
    ids, _ = teacher_tokens(teacher, "é日😀")
    assert b"".join(table[i] for i in ids) == "é日😀".encode()


def test_the_vocabulary_map_pairs_equal_byte_strings_one_to_one():
    teacher = [b"a", b"b", b"ab", b"", b"a", b"zz"]
    student = [b"ab", b"", b"a", b"q", b"b"]
    assert vocab_map(teacher, student).tolist() == [2, 4, 0, -1, -1, -1]


def test_the_vocabulary_map_is_built_once_and_a_damaged_file_is_rebuilt(teacher, tmp_path):
    student = hand_student()
    first = cached_vocab_map(teacher, student, tmp_path)
    (path,) = tmp_path.glob("vocab-map-*.npy")
    np.save(path, np.full(len(teacher), 7, np.int64))  # a stored map is read back as it is
    assert (cached_vocab_map(teacher, student, tmp_path) == 7).all()
    path.write_bytes(b"not a numpy file")
    again = cached_vocab_map(teacher, student, tmp_path)
    assert np.array_equal(again, first) and np.array_equal(np.load(path), first)
    assert (first >= 0).sum() == len({b for b in token_bytes(student) if b} & set(token_bytes(teacher)))


def test_utf8_runs_skip_only_the_bytes_that_cannot_be_text():
    data = "日本".encode()[1:] + b"ok" + "é".encode()[:1] + b"x" + "😀".encode()[:3]
    assert [data[a:b] for a, b in utf8_runs(data)] == ["本ok".encode(), b"x"]


def test_a_tokenizer_aligned_with_itself_pairs_every_position_and_maps_every_id_to_itself(teacher):
    table = token_bytes(teacher)
    mapping = vocab_map(table, table)
    docs = [teacher_tokens(teacher, "def f(x):\n    return  x  # é日😀"), teacher_tokens(teacher, "hello world hello")]
    out, stats = Aligner(table, teacher, mapping).align(teacher_batch([docs]))
    n = sum(len(d[0]) for d in docs)
    assert out.input_ids[0].tolist() == np.concatenate([d[0] for d in docs]).tolist()
    assert paired(out)[0] == [i if i not in (len(docs[0][0]) - 1, n - 1) else -1 for i in range(n)]
    assert stats.aligned == stats.targets == n - 2
    assert (mapping[mapping >= 0] == np.flatnonzero(mapping >= 0)).all() and (mapping >= 0).mean() > 0.999
