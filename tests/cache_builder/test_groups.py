"""Shard groups: a rule of the token stream alone, each split cut on its own, and parts that share the groups out."""

from __future__ import annotations

import numpy as np

from cache_builder.groups import part_index, shard_groups
from cache_builder.packing import TokenizedSequence


def stream(lengths_and_splits: list[tuple[int, str]]) -> list[TokenizedSequence]:
    return [TokenizedSequence(np.arange(n, dtype=np.int32), None, None, None, i, split)
            for i, (n, split) in enumerate(lengths_and_splits)]


def test_each_split_is_cut_where_its_own_tokens_reach_shard_tokens():
    rng = np.random.default_rng(0)
    seqs = stream([(int(rng.integers(1, 40)), "heldout" if rng.random() < 0.3 else "train") for _ in range(300)])
    groups = list(shard_groups(iter(seqs), 100))
    for split in ("train", "heldout"):
        mine = [g for g in groups if g.split == split]
        assert [g.index for g in mine] == list(range(len(mine)))
        assert [q.doc_index for g in mine for q in g.sequences] == [q.doc_index for q in seqs if q.split == split]
        assert [g.first for g in mine] == list(np.cumsum([0] + [len(g.sequences) for g in mine[:-1]]))
        for g in mine[:-1]:  # closed by the rule: the last sequence took the group to shard_tokens
            assert g.tokens >= 100 > g.tokens - len(g.sequences[-1].input_ids)
        assert all(g.tokens == sum(len(q.input_ids) for q in g.sequences) for g in mine)
    assert all(g.leads == (g.split == seqs[0].split) for g in groups)


def test_a_group_is_yielded_as_soon_as_it_closes():
    seqs = stream([(60, "train"), (60, "train"), (10, "heldout"), (60, "train")])
    consumed = []

    def tracked():
        for q in seqs:
            consumed.append(q.doc_index)
            yield q

    groups = shard_groups(tracked(), 100)
    first = next(groups)
    assert (first.split, [q.doc_index for q in first.sequences]) == ("train", [0, 1]) and consumed == [0, 1]


def test_parts_share_out_every_group_once_each_part_taking_every_pth():
    seqs = stream([(30, "train" if i % 4 else "heldout") for i in range(200)])
    groups = list(shard_groups(iter(seqs), 90))
    for parts in (1, 2, 3):
        owners = [[p for p in range(parts) if part_index(g, parts, p) is not None] for g in groups]
        assert all(len(o) == 1 for o in owners)
        for p in range(parts):
            for split in ("train", "heldout"):
                mine = [g for g in groups if g.split == split and part_index(g, parts, p) is not None]
                assert [part_index(g, parts, p) for g in mine] == list(range(len(mine)))
                assert all(g.index % parts == p for g in mine)
