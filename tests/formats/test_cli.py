"""The `kdcache inspect | verify | convert` commands: output, exit status, one-line errors (formats/cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from formats.verify import verify_cache
from kdcache.cli import main


def test_inspect_json_describes_teacher_tokenizer_fields_splits_totals_and_shards(small_cache, capsys):
    assert main(["inspect", str(small_cache.root), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["teacher"]["name"] == "synthetic"
    assert d["tokenizer"]["vocab_size"] == 64 and d["top_k"] == 8 and d["sample_draws"] == 16
    assert d["backend"] == small_cache.backend and d["complete"] is True and d["format_version"] == "1.2.0"
    assert d["fields"] == {n: s.to_json() for n, s in small_cache.fields.items()}
    assert d["splits"] == {"train": {"sequences": 4, "tokens": 40, "shards": 2},
                           "heldout": {"sequences": 1, "tokens": 6, "shards": 1}}
    assert d["totals"] == small_cache.manifest.totals()
    assert d["bytes_per_token"]["fields_uncompressed"]["topk_ids"] == 32  # 8 x I32
    assert d["bytes_per_token"]["fields_uncompressed"]["hidden/5"] == 16  # 8 x BF16
    assert d["bytes_per_token"]["on_disk"] == round(d["totals"]["bytes"] / 46, 3)
    assert [s["path"] for s in d["shards"]] == [s.path for s in small_cache.manifest.shards]


def test_plain_inspect_prints_a_readable_summary(small_cache, capsys):
    assert main(["inspect", str(small_cache.root)]) == 0
    out = capsys.readouterr().out
    assert f"(kdcache format 1.2.0, {small_cache.backend}, complete)" in out
    assert "teacher    synthetic" in out and "top-k      8" in out
    assert "split      train: 4 sequences, 40 tokens, 2 shards" in out
    assert "total      5 sequences, 46 tokens, 3 shards" in out
    assert "hidden/2 F16[8]" in out


def test_verify_exits_0_on_a_good_cache(small_cache, capsys):
    assert main(["verify", str(small_cache.root)]) == 0
    assert capsys.readouterr().out == f"{small_cache.root}: OK\n"
    assert main(["verify", "--no-checksums", str(small_cache.root)]) == 0


def test_verify_exits_1_with_one_line_per_problem(small_cache, capsys):
    (small_cache.root / "stray.bin").write_bytes(b"x")
    shard = small_cache.root / small_cache.manifest.shards[0].path
    victim = shard if shard.is_file() else shard / "topk_ids" / "c" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x80
    victim.write_bytes(data)
    problems = verify_cache(str(small_cache.root))
    assert len(problems) == 2
    assert main(["verify", str(small_cache.root)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == problems
    assert captured.err == f"2 problem(s) found in {small_cache.root}\n"


def test_convert_writes_the_other_backend_with_equal_content(small_cache, tmp_path, capsys):
    other = "zarr" if small_cache.backend == "parquet" else "parquet"
    out = tmp_path / "out"
    assert main(["convert", str(small_cache.root), "--to", other, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: 3 shards written as {other}; content checksums match {small_cache.root}\n"
    assert verify_cache(str(out)) == []
    src = json.loads((small_cache.root / "manifest.json").read_text())
    dst = json.loads((out / "manifest.json").read_text())
    assert [s["content_sha256"] for s in dst["shards"]] == [s["content_sha256"] for s in src["shards"]]


def test_convert_of_a_missing_source_is_an_error_line_and_exit_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), "--to", "zarr", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"kdcache convert: error: {tmp_path / 'nowhere'}: no manifest.json; not a kdcache cache\n"
    assert not (tmp_path / "out").exists()


def test_convert_of_a_source_with_a_missing_shard_is_an_error_line_and_exit_2(small_cache, tmp_path, capsys):
    path = small_cache.root / small_cache.manifest.shards[1].path
    path.rename(path.with_name("moved"))
    assert main(["convert", str(small_cache.root), "--to", "zarr", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache convert: error: ") and f"shard {small_cache.manifest.shards[1].path!r}" in err
    assert err.count("\n") == 1


def test_convert_onto_its_own_source_is_an_error_line_and_exit_2(small_cache, capsys):
    assert main(["convert", str(small_cache.root), "--to", "parquet", "--out", str(small_cache.root)]) == 2
    err = capsys.readouterr().err
    assert err == (f"kdcache convert: error: --out {small_cache.root} is the source cache {small_cache.root}: a command "
                   "never writes over what it reads; choose another --out\n")


def test_convert_into_a_foreign_directory_is_an_error_line_and_exit_2(small_cache, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("")
    assert main(["convert", str(small_cache.root), "--to", "zarr", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache convert: error: ") and "is not empty and is not a kdcache cache" in err
    assert err.count("\n") == 1


def test_inspect_of_a_cache_of_an_unknown_major_version_is_an_error_line_and_exit_2(small_cache, capsys):
    manifest = json.loads((small_cache.root / "manifest.json").read_text())
    manifest["format_version"] = "2.0.0"
    (small_cache.root / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(small_cache.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcache inspect: error: ") and "reads format 1.x" in err and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["parquet"])  # one run of the real console script is enough
def test_the_installed_kdcache_command_verifies_and_inspects_a_cache(small_cache):
    exe = Path(sys.executable).parent / "kdcache"
    if not exe.exists():
        pytest.skip(f"no kdcache console script next to {sys.executable} (package not installed in this environment)")
    ok = subprocess.run([str(exe), "verify", str(small_cache.root)], capture_output=True, text=True, timeout=120)
    assert (ok.returncode, ok.stdout) == (0, f"{small_cache.root}: OK\n")
    (small_cache.root / "manifest.json").write_text("{}")
    bad = subprocess.run([str(exe), "inspect", "--json", str(small_cache.root)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("kdcache inspect: error: ") and bad.stderr.count("\n") == 1
