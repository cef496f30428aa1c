"""The streaming build (issue #14, point 1): shards are published while the corpus is still being read, the
corpus fingerprint is finished with the manifest and still guards a resume, a build with nothing left to do
loads no teacher, and the field table is fixed from each source's first record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cache_builder.build import run_build
from cache_builder.documents import CorpusOptions
from cache_builder.errors import BuildError
from cache_builder.settings import BuildSettings
from cache_builder.sources import corpus_fingerprint
from cache_builder.teacher_hf import HFTeacher
from formats.manifest import MANIFEST_NAME, parse_manifest, write_manifest
from formats.reader import open_cache
from formats.verify import verify_cache

STDLIB = Path(os.__file__).parent
FILES = ("bisect.py", "colorsys.py", "heapq.py", "keyword.py", "textwrap.py", "fnmatch.py")


def text_corpus(folder: Path, chars: int = 2500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (folder / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return folder


def settings(teacher: Path, corpus: Path, out: Path, **kw) -> BuildSettings:
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=str(out), top_k=4, seq_len=64, shard_tokens=128,
                max_batch_tokens=256, sample_draws=4, heldout_fraction=0.25, progress=False)
    base.update(kw)
    return BuildSettings(**base)


def shard_list(out: Path) -> list[tuple]:
    return [(s.path, s.sequences, s.tokens, s.sha256, s.content_sha256) for s in open_cache(out).manifest.shards]


def forbid_loading_the_teacher(monkeypatch) -> None:
    """Makes loading the teacher an error: a build that succeeds afterwards needed no teacher."""
    def refuse(self):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(HFTeacher, "start", refuse)


def test_shards_are_published_before_the_corpus_has_been_read_to_its_end(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    good_lines = "".join(json.dumps({"text": f"record {i} of the last file"}) + "\n" for i in range(400))
    # Read last (sources are read in path order), after more documents than one tokenizer batch.
    (corpus / "zz-last.jsonl").write_text(good_lines + '{"text": "cut short\n')
    out = tmp_path / "c"
    with pytest.raises(BuildError, match=r"zz-last.jsonl:401: malformed JSON"):
        run_build(settings(tiny_teacher, corpus, out))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 5, "nothing was published before the bad record"
    assert sorted(os.listdir(out / "shards")) == sorted(Path(s["path"]).name for s in manifest["shards"])
    # What was published is exactly the start of the build of the corpus without the bad record.
    (corpus / "zz-last.jsonl").write_text(good_lines)
    good = tmp_path / "good"
    run_build(settings(tiny_teacher, corpus, good))
    got = [(s["path"], s["content_sha256"]) for s in manifest["shards"]]
    assert got == [(p, c) for p, _, _, _, c in shard_list(good)][:len(got)]


def test_the_finished_manifest_holds_the_fingerprint_of_every_file(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    m = run_build(settings(tiny_teacher, corpus, tmp_path / "c"))
    want = corpus_fingerprint(CorpusOptions(paths=[str(corpus)]))
    assert m.corpus["sha256"] == want["sha256"] and m.corpus["sources"] == want["sources"]
    assert m.corpus["listing_sha256"] == want["listing_sha256"] and len(m.corpus["sources"]) == len(FILES)


def test_a_finished_cache_asked_for_again_loads_no_teacher(tiny_teacher, tmp_path, monkeypatch):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "c"
    run_build(settings(tiny_teacher, corpus, out))
    want = shard_list(out)
    forbid_loading_the_teacher(monkeypatch)
    again = run_build(settings(tiny_teacher, corpus, out))
    assert again.complete and shard_list(out) == want and verify_cache(str(out)) == []


def test_a_build_killed_after_its_last_shard_finishes_without_loading_the_teacher(tiny_teacher, tmp_path,
                                                                                   monkeypatch):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "c"
    run_build(settings(tiny_teacher, corpus, out))
    want = shard_list(out)
    m = parse_manifest((out / MANIFEST_NAME).read_bytes())
    m.complete = False  # as a build killed between its last publication and finishing the cache leaves it
    m.corpus["sha256"] = None
    write_manifest(out, m)
    forbid_loading_the_teacher(monkeypatch)
    again = run_build(settings(tiny_teacher, corpus, out))
    assert again.complete and shard_list(out) == want and again.corpus["sha256"] is not None


def test_a_corpus_file_whose_content_changed_since_the_shards_were_made_is_refused(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "c"
    run_build(settings(tiny_teacher, corpus, out))
    victim = corpus / "bisect.py.txt"  # the first file read: its shards are published
    text = victim.read_text(encoding="utf-8")
    victim.write_text(text[:100] + ("X" if text[100] != "X" else "Y") + text[101:], encoding="utf-8")  # same size
    with pytest.raises(BuildError, match=r"bisect.py.txt: corpus file changed since this cache was built"):
        run_build(settings(tiny_teacher, corpus, out))
    assert open_cache(out).manifest.complete, "refusing the new corpus must leave the finished cache as it was"
    # An unfinished build: the resumed stream meets the changed file before any shard is computed.
    m = parse_manifest((out / MANIFEST_NAME).read_bytes())
    m.shards, m.complete, m.corpus["sha256"] = m.shards[:2], False, None
    write_manifest(out, m)
    with pytest.raises(BuildError, match=r"bisect.py.txt: corpus file changed since this cache was built"):
        run_build(settings(tiny_teacher, corpus, out))


def test_a_chat_file_after_text_files_gives_the_whole_cache_a_loss_mask(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "corpus", chars=600)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    (corpus / "zz-chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    m = run_build(settings(tiny_teacher, corpus, tmp_path / "c", heldout_fraction=0.0))
    assert "loss_mask" in m.fields
    cache = open_cache(tmp_path / "c")
    masks = [cache.sequence(i)["loss_mask"] for i in range(cache.num_sequences())]
    assert all(mask.all() for mask in masks[:-1]) and 0 < masks[-1].sum() < len(masks[-1])


def test_a_chat_record_in_a_file_that_starts_with_text_is_refused_naming_it(tiny_teacher, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    (corpus / "mixed.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    with pytest.raises(BuildError, match=r"mixed.jsonl:2: a chat record \('messages'\), but no source starts with one"):
        run_build(settings(tiny_teacher, corpus, tmp_path / "c"))
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_large_documents_are_tokenized_a_bounded_number_of_characters_at_a_time(tokenizer, tmp_path, monkeypatch):
    from cache_builder import corpus as corpus_module

    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(12):  # "books" of ~30k characters: 256 of them in one call would hold gigabytes
        (folder / f"book-{i:02d}.txt").write_text(((STDLIB / "textwrap.py").read_text(encoding="utf-8") * 2)[:30000])
    opts = CorpusOptions(paths=[str(folder)], seq_len=256)  # a .txt file is one document

    def sequences() -> list[tuple]:
        return [(s.split, s.input_ids.tolist()) for s in corpus_module.tokenize_corpus(opts, tokenizer)]

    calls: list[int] = []
    encode = corpus_module.encode_texts
    monkeypatch.setattr(corpus_module, "encode_texts",
                        lambda texts, *a: calls.append(sum(map(len, texts))) or encode(texts, *a))
    monkeypatch.setattr(corpus_module, "TOKENIZE_BATCH_CHARS", 100_000)
    batched = sequences()
    assert calls == [120_000] * 3  # calls end at the document that reaches the bound
    monkeypatch.setattr(corpus_module, "TOKENIZE_BATCH", 1)
    assert batched == sequences()  # the batching changes no token
