"""The shard writers' `compression` option (used by benchmarks/storage.py to measure what zstd saves):
an uncompressed shard reads back the same arrays through the ordinary readers, which need no setting."""

from __future__ import annotations

import pytest

from formats.errors import CacheError
from formats.schema import SeqBlock, content_sha256
from tests.formats.synth import BACKENDS, VOCAB, make_sequences, rich_fields, same_bytes


def read_back(path, backend, fields, block):
    if backend == "parquet":
        from formats.shard_parquet import ParquetShard

        return ParquetShard(str(path), fields, str(path)).read_all()
    import zarr

    from formats.shard_zarr import ZarrShard

    return ZarrShard(zarr.storage.LocalStore(str(path), read_only=True), fields, str(path), block.num_tokens, len(block)).read_all()


def size(path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_uncompressed_shard_reads_back_the_same_content_and_is_larger(tmp_path, backend):
    from formats import shard_parquet, shard_zarr

    fields = rich_fields(8)
    # Repetitive content (the same sequence many times) so that zstd surely saves bytes.
    block = SeqBlock.from_sequences(make_sequences([40], fields, VOCAB) * 30, fields)
    module = shard_parquet if backend == "parquet" else shard_zarr
    sizes = {}
    for compression in ("zstd", "none"):
        path = tmp_path / f"{compression}.{backend}"
        module.write(path, block, fields, compression=compression)
        back = read_back(path, backend, fields, block)
        assert content_sha256(back, fields) == content_sha256(block, fields)
        assert same_bytes(back.token["topk_logprobs"], block.token["topk_logprobs"])
        sizes[compression] = size(path)
    assert sizes["none"] > sizes["zstd"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unknown_compression_is_refused(tmp_path, backend):
    from formats import shard_parquet, shard_zarr

    fields = rich_fields(8)
    block = SeqBlock.from_sequences(make_sequences([5], fields, VOCAB), fields)
    with pytest.raises(CacheError, match="compression must be one of zstd, none"):
        (shard_parquet if backend == "parquet" else shard_zarr).write(tmp_path / "x", block, fields, compression="lz4")
