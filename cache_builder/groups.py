"""Shard groups: the stream of token sequences cut into the groups that become shards, and which part computes which.

A split's group closes once it holds `shard_tokens` tokens, or when the stream ends: a rule of the token stream
alone, so every build of a corpus (resumed, in parts, on any number of Ray replicas) meets the same groups, and
a group computes the same records wherever it runs (`records.group_block` batches within a group only). Group
`g` of a split belongs to part `g % num_parts`: the parts of a build compute exactly the shards of a one-part
build, and `merge` puts them back in that order. Only the open group of each split is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cache_builder.errors import BuildError
from cache_builder.packing import TokenizedSequence
from formats.manifest import ShardEntry

SPLITS = ("train", "heldout")


@dataclass
class ShardGroup:
    split: str
    index: int  # the group's index in its split: the same in every build of this corpus
    first: int  # index in the split of its first sequence (RS-KD seeds depend on it)
    sequences: list[TokenizedSequence]
    tokens: int = 0  # sum of the sequences' lengths
    leads: bool = True  # its split holds the corpus's first sequence: the manifest lists that split's shards first


def shard_groups(sequences: Iterable[TokenizedSequence], shard_tokens: int) -> Iterator[ShardGroup]:
    """The groups of `sequences`, each as soon as it closes (so the two splits' groups interleave)."""
    open_groups: dict[str, ShardGroup] = {}
    counts = {split: [0, 0] for split in SPLITS}  # per split: groups closed, sequences seen
    leading = None
    for q in sequences:
        leading = leading or q.split
        n_groups, n_seqs = counts[q.split]
        group = open_groups.setdefault(q.split, ShardGroup(q.split, n_groups, n_seqs, [], leads=q.split == leading))
        group.sequences.append(q)
        group.tokens += len(q.input_ids)
        counts[q.split][1] += 1
        if group.tokens >= shard_tokens:
            counts[q.split][0] += 1
            yield open_groups.pop(q.split)
    for split in SPLITS:
        if split in open_groups:
            yield open_groups.pop(split)


def part_index(group: ShardGroup, num_parts: int, part: int) -> int | None:
    """The group's shard index within part `part` (its position among the part's shards of the split), or None
    when another part computes it."""
    return group.index // num_parts if group.index % num_parts == part else None


def check_published(entry: ShardEntry, group: ShardGroup) -> None:
    """A resumed build skips the groups its cache already holds; each must be the shard published for it."""
    if (entry.sequences, entry.tokens) != (len(group.sequences), group.tokens):
        raise BuildError(f"{entry.path}: published shard ({entry.sequences} sequences, {entry.tokens} tokens) does not "
                         f"line up with this corpus ({len(group.sequences)} sequences, {group.tokens} tokens); "
                         "use --overwrite")
