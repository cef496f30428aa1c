"""What a new user broke (issue #19, builder and format cases 1, 2, 3, 6, 7, 13, 14, 16): kdcache deletes only
what it made, outputs never overlap inputs, odd corpus files are one line, empty splits are warned about, a resumed
build says so, and engine options are not content."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cache_builder.build import run_build
from cache_builder.errors import BuildError
from cache_builder.settings import BuildSettings
from cache_builder.sources import resolve_sources
from cache_builder.teacher_vllm import engine_args
from formats.convert import convert_cache
from formats.errors import CacheError
from formats.manifest import write_manifest
from formats.reader import open_cache
from kdcache.cli import main
from tests.cache_builder.test_streaming import settings, text_corpus


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_cache(tiny_teacher, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    out = root / "c"
    run_build(settings(tiny_teacher, text_corpus(root / "corpus", chars=600), out))
    return out


def test_convert_onto_a_symlink_to_its_source_is_refused_and_the_source_is_intact(small_cache, tmp_path, capsys):
    before = listing(small_cache)
    (tmp_path / "a").symlink_to(small_cache)
    assert main(["convert", str(small_cache), "--to", "zarr", "--out", str(tmp_path / "a"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "through a symlink" in err and "never writes over what it reads" in err
    assert listing(small_cache) == before


def test_convert_into_its_own_source_folder_is_refused(small_cache, tmp_path):
    with pytest.raises(CacheError, match="lies inside the source cache"):
        convert_cache(small_cache, "zarr", small_cache / "converted")
    assert not (small_cache / "converted").exists()


def test_a_build_over_its_own_corpus_with_overwrite_is_refused_and_the_corpus_kept(tiny_teacher, tmp_path, capsys):
    corpus = text_corpus(tmp_path / "d", chars=300)
    before = listing(corpus)
    code = main(["build", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", str(corpus),
                 "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "never writes over what it reads" in err
    assert listing(corpus) == before


def test_a_build_into_a_folder_inside_its_corpus_is_refused_before_any_work(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "d", chars=300)
    with pytest.raises(BuildError, match=r"--out .*d/cache lies inside --corpus"):
        run_build(settings(tiny_teacher, corpus, corpus / "cache"))
    assert not (corpus / "cache").exists()


def test_a_corpus_file_inside_the_output_folder_is_refused(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "work" / "d", chars=300)
    with pytest.raises(BuildError, match=r"--corpus .* lies inside --out"):
        run_build(settings(tiny_teacher, corpus / "heapq.py.txt", tmp_path / "work", overwrite=True))
    assert (corpus / "heapq.py.txt").exists()


def test_overwrite_never_deletes_a_folder_that_is_not_a_kdcache_cache(tiny_teacher, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    with pytest.raises(CacheError, match="is not a kdcache cache.*--overwrite deletes, only its own caches"):
        run_build(settings(tiny_teacher, text_corpus(tmp_path / "d", chars=300), mine, overwrite=True))
    assert listing(mine) == {"thesis.tex": b"months of work"}


def test_overwrite_never_deletes_a_folder_whose_manifest_is_not_a_kdcache_one(tiny_teacher, tmp_path):
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my app", "icons": []}')
    (other / "index.html").write_text("<html></html>")
    before = listing(other)
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        run_build(settings(tiny_teacher, text_corpus(tmp_path / "d", chars=300), other, overwrite=True))
    assert listing(other) == before


def test_overwrite_replaces_a_kdcache_cache(tiny_teacher, tmp_path):
    corpus = text_corpus(tmp_path / "d", chars=300)
    out = tmp_path / "c"
    run_build(settings(tiny_teacher, corpus, out))
    final = run_build(settings(tiny_teacher, corpus, out, top_k=2, overwrite=True))
    assert final.complete and open_cache(out).manifest.top_k == 2


def test_a_fifo_in_the_corpus_is_one_line_not_a_hang(tmp_path):
    corpus = text_corpus(tmp_path / "d", chars=100)
    os.mkfifo(corpus / "pipe.txt")
    with pytest.raises(BuildError, match=r"pipe.txt: a FIFO; kdcache reads only regular files"):
        resolve_sources([str(corpus)])


def test_a_symlink_loop_in_the_corpus_is_one_line(tmp_path):
    corpus = text_corpus(tmp_path / "d", chars=100)
    (corpus / "loop.txt").symlink_to(corpus / "loop.txt")
    with pytest.raises(BuildError, match=r"loop.txt: a symlink loop"):
        resolve_sources([str(corpus)])


def test_a_dangling_symlink_in_the_corpus_is_one_line(tmp_path):
    corpus = text_corpus(tmp_path / "d", chars=100)
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(BuildError, match=r"gone.txt: cannot be read \(a dangling symlink\)"):
        resolve_sources([str(corpus)])


def test_a_jsonl_file_starting_with_a_byte_order_mark_is_read(tiny_teacher, tmp_path):
    corpus = tmp_path / "d"
    corpus.mkdir()
    lines = [json.dumps({"text": f"document number {i}, with a few words"}) for i in range(4)]
    (corpus / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    (corpus / "plain.jsonl").write_text("\n".join(lines))
    m = run_build(settings(tiny_teacher, corpus, tmp_path / "c", heldout_fraction=0.0))
    assert m.totals()["sequences"] == 8


def test_an_unknown_chat_role_is_refused_naming_the_record(tiny_teacher, tmp_path):
    corpus = tmp_path / "d"
    corpus.mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]}
    (corpus / "chat.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(BuildError, match=r"chat.jsonl:2: messages\[1\] has role 'wizard'; expected one of system"):
        run_build(settings(tiny_teacher, corpus, tmp_path / "c"))


def test_an_empty_split_is_warned_about(tiny_teacher, tmp_path, capsys):
    corpus = text_corpus(tmp_path / "d", chars=200)  # 6 files, one document each
    run_build(settings(tiny_teacher, corpus, tmp_path / "few", heldout_fraction=0.01))
    err = capsys.readouterr().err
    assert "warning: split 'heldout' is empty: --heldout-fraction 0.01 sent no document there" in err
    run_build(settings(tiny_teacher, corpus, tmp_path / "most", heldout_fraction=0.99))
    err = capsys.readouterr().err
    assert "warning: split 'train' is empty: --heldout-fraction 0.99 sent every document there" in err


def test_a_build_with_both_splits_gives_no_warning(tiny_teacher, tmp_path, capsys):
    m = run_build(settings(tiny_teacher, text_corpus(tmp_path / "d", chars=200), tmp_path / "c", heldout_fraction=0.5))
    assert m.split_shards("train") and m.split_shards("heldout")
    assert "warning" not in capsys.readouterr().err


def test_a_resumed_build_says_it_resumes(tiny_teacher, tmp_path, capsys):
    corpus = text_corpus(tmp_path / "d", chars=600)
    out = tmp_path / "c"
    run_build(settings(tiny_teacher, corpus, out))
    m = open_cache(out).manifest
    m.shards, m.complete = m.shards[:2], False  # as a build killed after two shards leaves it
    write_manifest(out, m)
    capsys.readouterr()
    run_build(settings(tiny_teacher, corpus, out))
    assert "kdcache build: resuming" in capsys.readouterr().err


def test_engine_options_that_do_not_change_the_numerics_are_not_content():
    base = dict(teacher="t", corpus=["c"], out="o", backend="vllm")
    small = BuildSettings(**base, vllm={"max_num_seqs": 4, "kv_cache_gib": 1, "gpu_memory_utilization": 0.5})
    other = BuildSettings(**base, vllm={"max_num_batched_tokens": 512, "enforce_eager": True})
    assert small.content_settings() == other.content_settings() == BuildSettings(**base).content_settings()
    quantized = BuildSettings(**base, vllm={"quantization": "fp8", "max_num_seqs": 4})
    assert quantized.content_settings()["vllm"] == {"quantization": "fp8"}


def test_a_cpu_engine_gets_a_kv_cache_size_so_it_does_not_reserve_most_of_the_memory(monkeypatch):
    from cache_builder.settings import VllmOptions

    s = BuildSettings(teacher="t", corpus=["c"], out="o", backend="vllm", device="cpu")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs = engine_args("t", s, VllmOptions(), eager=True)
    assert 0.25 * (1 << 30) <= kwargs["kv_cache_memory_bytes"] <= 4 * (1 << 30)
    assert engine_args("t", s, VllmOptions(kv_cache_gib=1.5), eager=True)["kv_cache_memory_bytes"] == 3 << 29
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # the user's own setting is vLLM's to read
    assert "kv_cache_memory_bytes" not in engine_args("t", s, VllmOptions(), eager=True)
