"""A shard group through the teacher: its rows in length-bucketed batches of at most `max_batch_tokens`, and the
records they give assembled into the shard's block. The same function runs in a local build and in every Ray
replica; batches never cross a group, so a group's records are bit-identical wherever and whenever it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cache_builder.capture import CaptureSettings, sample_seed
from cache_builder.errors import BuildError
from cache_builder.groups import ShardGroup
from cache_builder.teacher import Job, Teacher
from formats.schema import FieldSpec, SeqBlock


@dataclass(frozen=True)
class RecordSpec:
    """What every shard of a build stores, and how its records are computed."""

    capture: CaptureSettings
    layers: list[int]  # HF hidden_states indices to store
    hidden_dtype: str  # format dtype of the stored hidden states
    fields: dict[str, FieldSpec]
    max_batch_tokens: int
    seed: int  # RS-KD seed of the build


def segments(position_ids: np.ndarray | None, n: int) -> list[tuple[int, int]]:
    """Document segments of a (packed) sequence: runs that start where position_ids restart at 0."""
    if position_ids is None:
        return [(0, n)]
    starts = [int(i) for i in np.flatnonzero(position_ids == 0)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [n]))


def bucketed_batches(jobs: list[Job], max_batch_tokens: int) -> list[list[Job]]:
    """Sort rows by length (longest first) and cut into batches whose padded size fits the budget."""
    order = sorted(jobs, key=lambda j: (-len(j.ids), j.seq))
    batches, current = [], []
    for job in order:
        width = len(current[0].ids) if current else len(job.ids)
        if current and width * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(job)
    if current:
        batches.append(current)
    return batches


def group_block(teacher: Teacher, group: ShardGroup, spec: RecordSpec,
                on_batch: Callable[[int], None] | None = None) -> SeqBlock:
    """The block of records of one shard group; `on_batch(tokens)` as the teacher finishes rows (progress)."""
    jobs = []
    for j, q in enumerate(group.sequences):
        for g, (a, b) in enumerate(segments(q.position_ids, len(q.input_ids))):
            nxt = int(q.input_ids[b]) if b < len(q.input_ids) else -1
            jobs.append(Job(j, a, q.input_ids[a:b], nxt, sample_seed(spec.seed, group.split, group.first + j) + g))
    results: dict[int, list[tuple[int, dict]]] = {}
    for batch in bucketed_batches(jobs, spec.max_batch_tokens):
        recs = teacher.run(batch, spec.capture, spec.layers, spec.hidden_dtype, progress=on_batch)
        for job, rec in zip(batch, recs):
            results.setdefault(job.seq, []).append((job.start, rec))
    seqs = []
    for j, q in enumerate(group.sequences):
        parts = sorted(results[j], key=lambda r: r[0])
        rec = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        rec.update(input_ids=q.input_ids, doc_index=np.int64(q.doc_index))
        if "loss_mask" in spec.fields:
            rec["loss_mask"] = q.loss_mask if q.loss_mask is not None else np.ones(len(q.input_ids), np.uint8)
        if "position_ids" in spec.fields:
            rec["position_ids"] = q.position_ids
        if "byte_offsets" in spec.fields:
            if q.byte_offsets is None:
                raise BuildError("--byte-offsets needs text documents (not pre-tokenized ids or chat messages)")
            rec["byte_offsets"] = q.byte_offsets
        seqs.append(rec)
    return SeqBlock.from_sequences(seqs, spec.fields)
