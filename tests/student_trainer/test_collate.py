"""student_trainer.collate: stored sequences padded and shifted into batches (labels, masks, packed documents,
dtypes) and the filler batch of an empty rank slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.reader import open_cache
from formats.schema import from_float32, make_fields, to_float32
from student_trainer.batch import IGNORE_INDEX
from student_trainer.collate import collate
from student_trainer.loader import EpochReader, LoaderSettings
from tests.student_trainer.sequences import K, identity, same_batch, stored_sequences, synthetic

SMALL = LoaderSettings(batch_size=2, shuffle_blocks=2, num_workers=0)


def test_labels_are_the_next_tokens_and_padding_is_masked():
    a, b = synthetic([5, 6, 7, 8, 9], doc=3, seed=0), synthetic([20, 21, 22], doc=4, seed=1)
    batch = collate([a, b], [], pad_to=7)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [20, 21, 22, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, 8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [21, 22] + [IGNORE_INDEX] * 5]
    assert torch.equal(batch.kd_mask, batch.labels != IGNORE_INDEX)
    # padding restarts the positions: it is a document of its own, which no real token attends to
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert batch.doc_index.tolist() == [3, 4] and batch.num_tokens == 8
    assert torch.equal(batch.topk_ids[0, :5], torch.from_numpy(a["topk_ids"]).long())
    assert torch.equal(batch.topk_logprobs[1, :3], torch.from_numpy(b["topk_logprobs"]))
    assert torch.isinf(batch.tail_logmass[1, 3:]).all() and (batch.tail_logmass[1, 3:] < 0).all()
    assert batch.target_logprob[0, :4].tolist() == a["target_logprob"][:4].tolist()
    assert batch.target_logprob[0, 4:].eq(0).all() and not batch.target_logprob.isnan().any()


def test_loss_mask_positions_and_packed_document_starts_are_not_targets():
    ids = [10, 11, 12, 13, 14, 15, 16]
    seq = synthetic(ids, doc=0, seed=2, loss_mask=np.array([1, 1, 0, 1, 1, 1, 1], np.uint8),
                    position_ids=np.array([0, 1, 2, 0, 1, 2, 3], np.int32))
    batch = collate([seq], [])
    # position i predicts token i+1: not when token 2 is outside the loss mask, nor when token 3 starts a document
    assert batch.labels.tolist() == [[11, IGNORE_INDEX, IGNORE_INDEX, 14, 15, 16, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch.target_logprob[0, [1, 2, 6]].eq(0).all()


def test_an_empty_rank_slice_collates_to_one_fully_masked_row_shaped_like_the_cache(tiny_cache):
    fields = open_cache(tiny_cache).manifest.fields
    filler = collate([], [1, 2], fields=fields)
    assert filler.doc_index.tolist() == [-1] and filler.num_tokens == 0
    assert filler.input_ids.shape == (1, 1) and not filler.kd_mask.any() and filler.labels.eq(IGNORE_INDEX).all()
    assert filler.topk_ids.shape == (1, 1, 8) and filler.sample_ids.shape == (1, 1, 16)
    assert {layer: h.shape for layer, h in filler.hidden.items()} == {1: (1, 1, 128), 2: (1, 1, 128)}
    # and the reader hands it out when a window's last global batch has fewer sequences than ranks
    fillers = [b for rank in range(3) for b in EpochReader(tiny_cache, "train", SMALL, rank, 3, [1, 2]).batches(0)
               if b.doc_index.tolist() == [-1]]
    assert fillers, "no rank slice was empty; the test proves nothing"
    assert all(same_batch(f, filler) for f in fillers)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_logprobs_and_hidden_states_are_decoded_to_float32(dtype):
    d = 6
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(5, d)).astype(np.float32)
    seq = synthetic([1, 2, 3, 4, 5], doc=0, seed=4, lp_dtype=dtype, **{"hidden/2": from_float32(hidden, dtype)})
    batch = collate([seq], [2])
    assert batch.topk_logprobs.dtype == torch.float32 and batch.hidden[2].dtype == torch.float32
    np.testing.assert_array_equal(batch.topk_logprobs[0].numpy(), to_float32(seq["topk_logprobs"], dtype))
    np.testing.assert_array_equal(batch.hidden[2][0].numpy(), to_float32(seq["hidden/2"], dtype))
    np.testing.assert_allclose(batch.hidden[2][0].numpy(), hidden, rtol=1e-2, atol=1e-3)  # values, not raw bits


def test_the_packed_cache_decodes_bf16_and_f16_and_masks_every_document_start(packed_cache):
    fields = open_cache(packed_cache).manifest.fields
    assert fields["topk_logprobs"].dtype == "BF16" and fields["hidden/1"].dtype == "F16"
    stored = stored_sequences(packed_cache, "train")
    starts = 0
    for batch in EpochReader(packed_cache, "train", SMALL, hidden_layers=[1]).batches(0):
        for r, doc in enumerate(batch.doc_index.tolist()):
            seq = stored[identity(doc, batch.input_ids[r].numpy())]
            n = len(seq["input_ids"])
            np.testing.assert_array_equal(batch.topk_logprobs[r, :n].numpy(), to_float32(seq["topk_logprobs"], "BF16"))
            np.testing.assert_array_equal(batch.hidden[1][r, :n].numpy(), to_float32(seq["hidden/1"], "F16"))
            assert batch.position_ids[r, :n].tolist() == seq["position_ids"].tolist()
            inner = np.flatnonzero(seq["position_ids"][1:] == 0)  # position i predicts the start of a document
            starts += len(inner)
            assert batch.labels[r, inner].eq(IGNORE_INDEX).all()
            others = np.setdiff1d(np.arange(n - 1), inner)
            assert batch.labels[r, others].tolist() == seq["input_ids"][1:][others].tolist()
    assert starts > 0, "no sequence packed two documents; the test proves nothing"


def test_the_filler_batch_takes_k_sample_slots_and_hidden_sizes_from_the_field_table():
    fields = make_fields(K, "F16", sample_slots=3, hidden={5: (7, "BF16")})
    filler = collate([], [5], fields=fields)
    assert filler.topk_logprobs.shape == (1, 1, K) and filler.sample_counts.shape == (1, 1, 3)
    assert filler.hidden[5].shape == (1, 1, 7) and filler.sample_ids.eq(-1).all()


