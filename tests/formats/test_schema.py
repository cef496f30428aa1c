"""Field tables, named dtypes, SeqBlock and the content checksum (SPEC.md, Fields / Dtypes / Content checksum)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from formats.errors import CacheError
from formats.schema import (
    MAX_K,
    FieldSpec,
    SeqBlock,
    bf16_to_f32,
    check_block,
    check_field_table,
    content_sha256,
    f32_to_bf16,
    from_float32,
    make_fields,
    to_float32,
)
from tests.formats.synth import make_sequences, rich_fields


def test_a_field_table_with_every_option_passes_the_field_table_check():
    fields = rich_fields(k=64, logprob_dtype="BF16")
    check_field_table(fields)
    assert fields["topk_ids"] == FieldSpec("token", "I32", (64,))
    assert fields["topk_logprobs"] == FieldSpec("token", "BF16", (64,))
    assert fields["sample_counts"] == FieldSpec("token", "U8", (4,))
    assert fields["hidden/5"] == FieldSpec("token", "BF16", (8,))
    assert fields["doc_index"] == FieldSpec("sequence", "I64", ())


def test_top_k_zero_makes_a_samples_only_table_without_top_k_fields():
    fields = make_fields(0, sample_slots=4)
    check_field_table(fields)
    assert "topk_ids" not in fields and "topk_logprobs" not in fields
    assert {"tail_logmass", "target_logprob", "sample_ids", "sample_counts"} <= set(fields)


@pytest.mark.parametrize("kwargs", [
    {"top_k": 0},
    {"top_k": MAX_K + 1},
    {"top_k": 8, "logprob_dtype": "F64"},
    {"top_k": 8, "sample_slots": 4, "count_dtype": "U32"},
    {"top_k": 8, "hidden": {3: (16, "F32")}},
    {"top_k": 8, "hidden": {-1: (16, "F16")}},
], ids=["k0", "k_over_limit", "logprob_f64", "counts_u32", "hidden_f32", "hidden_negative_layer"])
def test_make_fields_refuses_options_the_spec_does_not_allow(kwargs):
    with pytest.raises(CacheError):
        make_fields(**kwargs)


def test_field_spec_json_round_trips():
    for name, spec in rich_fields().items():
        assert FieldSpec.from_json(name, spec.to_json()) == spec


@pytest.mark.parametrize("obj", [
    {"per": "token", "dtype": "I32"},
    {"per": "token", "dtype": "I32", "shape": [], "extra": 1},
    {"per": "document", "dtype": "I32", "shape": []},
    {"per": "token", "dtype": "F64", "shape": []},
    {"per": "token", "dtype": "I32", "shape": [2.0]},
    {"per": "token", "dtype": "I32", "shape": [True]},
    {"per": "token", "dtype": "I32", "shape": [2, 2]},
    {"per": "token", "dtype": "I32", "shape": [0]},
    {"per": "token", "dtype": "I32", "shape": [2**40]},
    ["token", "I32", []],
], ids=["no_shape", "extra_key", "bad_per", "unknown_dtype", "float_shape", "bool_shape", "2d_shape",
        "zero_shape", "huge_shape", "not_an_object"])
def test_a_malformed_field_entry_is_refused_naming_the_field(obj):
    with pytest.raises(CacheError, match="'topk_ids'"):
        FieldSpec.from_json("topk_ids", obj)


def _table(**changes) -> dict[str, FieldSpec]:
    fields = make_fields(8, sample_slots=4)
    for name, spec in changes.items():
        if spec is None:
            del fields[name]
        else:
            fields[name] = spec
    return fields


@pytest.mark.parametrize("changes, message", [
    ({"input_ids": None}, "required field 'input_ids' is missing"),
    ({"doc_index": None}, "required field 'doc_index' is missing"),
    ({"tail_logmass": FieldSpec("token", "F16")}, "'tail_logmass'"),
    ({"target_logprob": FieldSpec("token", "BF16")}, "'target_logprob'"),
    ({"input_ids": FieldSpec("token", "I64")}, "'input_ids'"),
    ({"doc_index": FieldSpec("token", "I64")}, "'doc_index'"),
    ({"topk_ids": FieldSpec("token", "I64", (8,))}, "'topk_ids'"),
    ({"topk_logprobs": FieldSpec("token", "F32", (4,))}, "different k"),
    ({"sample_counts": None}, "come together"),
    ({"sample_counts": FieldSpec("token", "U8", (3,))}, "sample_ids must be"),
    ({"sample_counts": FieldSpec("token", "I32", (4,))}, "sample_ids must be"),
    ({"loss_mask": FieldSpec("token", "I32")}, "'loss_mask'"),
    ({"byte_offsets": FieldSpec("token", "I32", (3,))}, "'byte_offsets'"),
    ({"hidden/3": FieldSpec("token", "F32", (16,))}, "'hidden/3'"),
    ({"hidden/3": FieldSpec("sequence", "F16", (16,))}, "'hidden/3'"),
    ({"hidden/x": FieldSpec("token", "F16", (16,))}, "'hidden/x' is not defined"),
    ({"entropy": FieldSpec("token", "F32")}, "'entropy' is not defined"),
    ({"topk_ids": FieldSpec("token", "I32", (MAX_K + 1,)),
      "topk_logprobs": FieldSpec("token", "F32", (MAX_K + 1,))}, "limit"),
    ({"sample_ids": FieldSpec("token", "I32", (MAX_K + 1,)),
      "sample_counts": FieldSpec("token", "U16", (MAX_K + 1,))}, "limit"),
    ({"topk_ids": None}, "required field 'topk_ids' is missing"),
    ({"topk_ids": None, "topk_logprobs": None, "sample_ids": None, "sample_counts": None},
     "required field 'topk_ids' is missing"),
], ids=["no_input_ids", "no_doc_index", "tail_f16", "target_bf16", "input_ids_i64", "doc_index_per_token",
        "topk_ids_i64", "k_mismatch", "samples_alone", "slots_mismatch", "counts_i32", "loss_mask_i32",
        "byte_offsets_3", "hidden_f32", "hidden_per_sequence", "hidden_not_a_layer", "unknown_field",
        "k_over_limit", "slots_over_limit", "topk_ids_alone_missing", "no_topk_and_no_samples"])
def test_a_field_table_the_spec_does_not_define_is_refused(changes, message):
    with pytest.raises(CacheError, match=message):
        check_field_table(_table(**changes))


def _block(lengths=(3, 0, 5, 2)) -> tuple[SeqBlock, dict[str, FieldSpec]]:
    fields = rich_fields()
    seqs = make_sequences([n or 1 for n in lengths], fields)
    for seq, n in zip(seqs, lengths):
        if n == 0:  # an empty sequence: every token field sliced to zero rows
            for name, spec in fields.items():
                if spec.per == "token":
                    seq[name] = seq[name][:0]
    return SeqBlock.from_sequences(seqs, fields), fields


def test_from_sequences_cuts_the_flat_token_axis_at_the_sequence_lengths():
    block, fields = _block()
    assert block.offsets.tolist() == [0, 3, 3, 8, 10]
    assert block.offsets.dtype == np.int64
    assert len(block) == 4 and block.num_tokens == 10
    check_block(block, fields, "test")
    assert block.get(1)["input_ids"].shape == (0,)
    assert block.get(2)["topk_ids"].shape == (5, 8)
    assert block.get(3)["doc_index"] == 3


def test_a_sequence_lacking_a_declared_field_is_refused_naming_it():
    fields = rich_fields()
    seq = make_sequences([4], fields)[0]
    del seq["loss_mask"]
    with pytest.raises(CacheError, match="'loss_mask'"):
        SeqBlock.from_sequences([seq], fields)


def test_a_sequence_with_an_undeclared_field_is_refused_naming_it():
    fields = rich_fields()
    seq = make_sequences([4], fields)[0]
    seq["entropy"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(CacheError, match="entropy"):
        SeqBlock.from_sequences([seq], fields)


def test_slice_rebases_offsets_and_concat_of_the_slices_gives_back_the_block():
    block, fields = _block()
    part = block.slice(2, 4)
    assert part.offsets.tolist() == [0, 5, 7]
    np.testing.assert_array_equal(part.token["input_ids"], block.token["input_ids"][3:10])
    joined = SeqBlock.concat([block.slice(0, 1), block.slice(1, 3), block.slice(3, 4)], fields)
    assert joined.offsets.tolist() == block.offsets.tolist()
    for name in fields:
        got = (joined.token if name in joined.token else joined.sequence)[name]
        want = (block.token if name in block.token else block.sequence)[name]
        assert got.tobytes() == want.tobytes(), name


def test_content_checksum_follows_the_byte_layout_written_in_the_spec():
    block, fields = _block()
    h = hashlib.sha256()
    h.update(b"seq_offsets\tI64\n" + block.offsets.astype("<i8").tobytes())
    for name in sorted(fields):
        spec = fields[name]
        arr = block.token[name] if spec.per == "token" else block.sequence[name]
        h.update(f"{name}\t{spec.dtype}\t{','.join(str(s) for s in spec.shape)}\n".encode())
        h.update(arr.astype(spec.np_dtype.newbyteorder("<")).tobytes(order="C"))
    assert content_sha256(block, fields) == h.hexdigest()


def test_content_checksum_does_not_depend_on_how_the_block_was_cut():
    block, fields = _block()
    parts = [block.slice(0, 2), block.slice(2, 4)]
    assert content_sha256(SeqBlock.concat(parts, fields), fields) == content_sha256(block, fields)
    # a slice's offsets are rebased, so a sub-block hashes like the same sequences written alone
    inner = block.slice(2, 4)
    inner.offsets = inner.offsets + 7  # offsets that do not start at 0 are rebased by the checksum
    assert content_sha256(inner, fields) == content_sha256(block.slice(2, 4), fields)


def test_content_checksum_changes_with_one_flipped_bit_in_any_field():
    block, fields = _block()
    before = content_sha256(block, fields)
    for name, spec in fields.items():
        arr = block.token[name] if spec.per == "token" else block.sequence[name]
        raw = arr.reshape(-1).view(np.uint8)
        raw[0] ^= 1
        assert content_sha256(block, fields) != before, name
        raw[0] ^= 1
    assert content_sha256(block, fields) == before


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.token.update(input_ids=b.token["input_ids"].astype(np.int64)), "dtype"),
    (lambda b: b.token.update(topk_ids=b.token["topk_ids"][:, :4]), "shape"),
    (lambda b: b.sequence.update(doc_index=b.sequence["doc_index"][:2]), "shape"),
    (lambda b: b.token.update(entropy=np.zeros(b.num_tokens, np.float32)), "undeclared"),
    (lambda b: b.token.pop("tail_logmass"), "'tail_logmass' is missing"),
    (lambda b: setattr(b, "offsets", b.offsets.astype(np.int32)), "int64"),
    (lambda b: setattr(b, "offsets", b.offsets[[0, 3, 2, 4]]), "never decrease"),
], ids=["dtype", "k", "sequence_rows", "undeclared", "missing", "offsets_dtype", "offsets_decrease"])
def test_check_block_refuses_arrays_that_do_not_match_the_field_table(mutate, message):
    block, fields = _block()
    mutate(block)
    with pytest.raises(CacheError, match=message):
        check_block(block, fields, "shard x")


def test_bf16_rounds_to_nearest_even_and_keeps_nan_and_infinities():
    one = 1.0
    step = 2.0**-7  # one BF16 ulp at 1.0
    values = np.array([one, one + step / 2, one + 3 * step / 2, one + step / 2 + 2**-20, -2.5,
                       np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    bits = f32_to_bf16(values)
    assert bits.dtype == np.uint16
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0xFF80, 0x7FC0, 0x0000, 0x8000]
    back = bf16_to_f32(bits)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back[[0, 4, 5, 6]], [1.0, -2.5, np.inf, -np.inf])
    assert np.isnan(back[7])


def test_values_representable_in_bf16_survive_the_round_trip_exactly():
    bits = np.arange(0, 2**16, dtype=np.uint16)
    finite = bits[np.isfinite(bf16_to_f32(bits))]
    assert f32_to_bf16(bf16_to_f32(finite)).tolist() == finite.tolist()


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_float_fields_convert_to_and_from_float32_in_their_storage_dtype(dtype):
    values = np.array([0.0, -0.5, -3.25, -np.inf, np.nan], dtype=np.float32)
    stored = from_float32(values, dtype)
    assert stored.dtype == {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    back = to_float32(stored, dtype)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values)  # these values are exact in every dtype; NaN == NaN here
