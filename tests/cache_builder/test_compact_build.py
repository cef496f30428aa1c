"""`kdcache build --topk-encoding compact` and `kdcache convert --topk-encoding`, through the real command line: a
compact build verifies, keeps the top-1, tail and target of the plain build exactly, and is what converting the
plain build gives; converting back gives a plain cache that verifies; bad combinations are refused on one line
before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from formats.reader import open_cache
from kdcache.cli import main

STDLIB = Path(os.__file__).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("colorsys.py", "textwrap.py", "bisect.py"):
        (folder / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:2500], encoding="utf-8")
    return folder


def build(teacher: Path, corpus: Path, out: Path, *flags: str) -> int:
    return main(["build", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out), "--top-k", "8",
                 "--seq-len", "128", "--shard-tokens", "300", "--no-progress", *flags])


def logical(root: Path) -> list:
    cache = open_cache(root)
    return [cache.read_shard(e) for e in cache.shards()]


@pytest.fixture(scope="module")
def built(tiny_teacher, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    assert build(tiny_teacher, corpus, root / "plain") == 0
    assert build(tiny_teacher, corpus, root / "compact", "--topk-encoding", "compact", "--logprob-bits", "5",
                 "--format", "zarr") == 0
    return {"plain": root / "plain", "compact": root / "compact"}


def test_a_compact_build_verifies_and_records_its_encoding(built, capsys):
    assert main(["verify", str(built["compact"])]) == 0
    m = open_cache(built["compact"]).manifest
    enc = m.fields["topk_ids"].encoding
    assert enc is not None and enc.logprob_bits == 5 and m.fields["topk_logprobs"].encoding == enc
    assert m.build["topk_encoding"] == "compact" and m.build["logprob_bits"] == 5
    plain = open_cache(built["plain"]).manifest
    assert plain.build["topk_encoding"] == "plain" and "logprob_bits" not in plain.build
    assert main(["inspect", str(built["compact"])]) == 0
    assert "top-k      8 (compact, 5-bit log-prob codes)" in capsys.readouterr().out
    assert "compact 5-bit codes" in (built["compact"] / "README.md").read_text()


def test_a_compact_build_keeps_top1_tail_target_and_the_id_sets_of_the_plain_build(built):
    enc = open_cache(built["compact"]).manifest.fields["topk_ids"].encoding
    vals = np.exp(enc.values.astype(np.float64))
    for p, c in zip(logical(built["plain"]), logical(built["compact"]), strict=True):
        for name in ("input_ids", "tail_logmass"):
            assert np.array_equal(p.token[name], c.token[name]), name
        assert np.array_equal(p.token["target_logprob"], c.token["target_logprob"], equal_nan=True)
        assert np.array_equal(p.token["topk_ids"][:, 0], c.token["topk_ids"][:, 0])
        assert np.array_equal(p.token["topk_logprobs"][:, 0], c.token["topk_logprobs"][:, 0])
        assert np.array_equal(np.sort(p.token["topk_ids"], 1), np.sort(c.token["topk_ids"], 1))
        # each entry after the top-1 holds one of the two codebook values around its probability p (SPEC's bound)
        def by_id(block):  # the entries after the top-1 (the same ids in both caches), ordered by id
            order = np.argsort(block.token["topk_ids"][:, 1:], 1)
            return np.take_along_axis(block.token["topk_logprobs"][:, 1:], order, 1)

        src, got = by_id(p), by_id(c)
        code = np.searchsorted(enc.values, got)  # the stored values are the codebook's exactly
        assert np.array_equal(enc.values[code], got)
        lower = np.where(code > 0, vals[np.maximum(code - 1, 0)], 0.0)
        upper = np.where(code < len(vals) - 1, vals[np.minimum(code + 1, len(vals) - 1)], 1.0)
        p_src = np.exp(src.astype(np.float64))
        assert len(p_src) and ((lower <= p_src * (1 + 1e-6)) & (p_src <= upper * (1 + 1e-6))).all()


def test_convert_plain_to_compact_gives_the_compact_build_and_back_gives_plain_arrays(built, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(built["plain"]), "--to", "zarr", "--topk-encoding", "compact", "--logprob-bits", "5",
                 "--out", str(out)]) == 0
    assert "stored compact (5-bit log-prob codes, quantized from" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    want = [s.content_sha256 for s in open_cache(built["compact"]).manifest.shards]
    assert [s.content_sha256 for s in open_cache(out).manifest.shards] == want

    back = tmp_path / "back"
    assert main(["convert", str(built["compact"]), "--to", "parquet", "--topk-encoding", "plain", "--out", str(back)]) == 0
    assert "stored plain (the decoded values of" in capsys.readouterr().out
    assert main(["verify", str(back)]) == 0  # a valid plain cache: top-k and tail sum to 1
    m = open_cache(back).manifest
    assert m.fields["topk_ids"].encoding is None and m.fields["topk_logprobs"].dtype == "F32"
    assert m.build["topk_encoding"] == "plain" and "logprob_bits" not in m.build
    assert m.build["decoded_from"] == {"topk_encoding": "compact", "logprob_bits": 5}
    for a, b in zip(logical(built["compact"]), logical(back), strict=True):
        assert np.array_equal(a.token["topk_ids"], b.token["topk_ids"])
        assert np.array_equal(a.token["topk_logprobs"], b.token["topk_logprobs"])
        assert (b.token["tail_logmass"] >= a.token["tail_logmass"]).all()


@pytest.mark.parametrize("flags", [["--logprob-bits", "2"], ["--logprob-bits", "3", "--top-k", "4"]])
def test_a_compact_cache_requantized_with_other_bits_verifies(built, tmp_path, capsys, flags):
    out = tmp_path / "requantized"
    assert main(["convert", str(built["compact"]), *flags, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0, capsys.readouterr().out
    m = open_cache(out).manifest
    assert m.fields["topk_ids"].encoding.logprob_bits == int(flags[1])
    assert m.build["decoded_from"] == {"topk_encoding": "compact", "logprob_bits": 5}


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--topk-encoding", "compact", "--logprob-dtype", "bf16"], "--topk-encoding compact quantizes float32 log-probs: "
                                                                "use --logprob-dtype fp32, not bf16"),
    (["--topk-encoding", "compact", "--top-k", "1"], "--topk-encoding compact needs --top-k >= 2"),
    (["--logprob-bits", "4"], "--logprob-bits 4 applies to a compact top-k: add --topk-encoding compact"),
    (["--topk-encoding", "compact", "--logprob-bits", "9"], "--logprob-bits must be at most 8, got 9"),
])
def test_bad_compact_build_flags_are_refused_before_any_work(tiny_teacher, corpus, tmp_path, capsys, flags, message):
    err = refused(["build", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", str(tmp_path / "c"),
                   "--no-progress", *flags], capsys)
    assert err.startswith("kdcache build: error: ") and message in err
    assert not (tmp_path / "c").exists()


def test_convert_refuses_logprob_bits_for_a_plain_top_k(built, tmp_path, capsys):
    err = refused(["convert", str(built["plain"]), "--logprob-bits", "4", "--out", str(tmp_path / "c")], capsys)
    assert "--logprob-bits applies to a compact top-k (--topk-encoding compact)" in err
    assert not (tmp_path / "c").exists()
