"""A fixed build gives the same cache as it did before the code was restructured.

`tests/data/golden_build.npz` holds every stored array of two small builds made with the code of
commit d4735dc (round 1's last): a packed text build with every optional field (RS-KD samples, two
hidden layers, byte offsets, heldout split) and a chat build (loss mask). The test rebuilds both
through the command line and compares shard by shard: the shard layout, the manifest's content
checksums of every field that holds no teacher float (ids, offsets, masks, counts), and the teacher's
floats to within what another CPU's float32 kernels can change (summation order).

The RS-KD draws (`sample_ids`, `sample_counts`) alone were re-recorded by issue #16's change (`--samples-only`
below): torch.multinomial builds its cumulative distribution in the dtype of its weights, and in float32 that
loses every id whose probability is below half an ulp of the running sum (never drawn) and shifts the others'
bins by the sum's rounding; the builder now draws from float64 weights, the same distribution without that
bias, which moves some draws.

Re-record only for an intended change of the content: `python -m tests.cache_builder.test_golden_build`
(`--samples-only`: replace the RS-KD draws and keep every other array).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cache_builder.default_teacher import default_teacher_dir
from formats.reader import open_cache
from formats.schema import content_sha256, to_float32
from kdcache.cli import main
from tests.cache_builder.tiny_teacher import make_tiny_teacher

GOLDEN = Path(__file__).parents[1] / "data" / "golden_build.npz"
STDLIB = Path(os.__file__).parent
# Fields whose values never pass through a float kernel: their checksums must agree exactly.
EXACT = ("input_ids", "doc_index", "loss_mask", "position_ids", "byte_offsets")
# float32 kernels of other CPUs sum in another order: a few ulps of log-prob, one bf16 step of a hidden state.
FLOAT_TOL = {"F32": 2e-5, "F16": 2e-3, "BF16": 2e-2}

CHAT = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a heap?"},
                  {"role": "assistant", "content": "A tree where each parent is no larger than its children."}]},
    {"messages": [{"role": "user", "content": "Name a sorting algorithm."},
                  {"role": "assistant", "content": "Merge sort: split, sort halves, merge."},
                  {"role": "user", "content": "And its cost?"}, {"role": "assistant", "content": "n log n."}]},
]


def write_inputs(root: Path) -> tuple[Path, Path]:
    text = root / "text"
    text.mkdir(parents=True, exist_ok=True)
    for name, chars in (("colorsys.py", 700), ("bisect.py", 450), ("keyword.py", 350), ("heapq.py", 600)):
        (text / (name + ".txt")).write_text((STDLIB / name).read_text(encoding="utf-8")[:chars], encoding="utf-8")
    (text / "short.txt").write_text("tiny", encoding="utf-8")
    chat = root / "chat"
    chat.mkdir(parents=True, exist_ok=True)
    (chat / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT), encoding="utf-8")
    return text, chat


# --dtype float32: the golden arrays come from a float32 teacher (--dtype auto is bf16 on CPUs with bf16).
BUILDS = {
    "text": ["--dtype", "float32", "--top-k", "6", "--sample-draws", "20", "--hidden-layers=-1,1", "--byte-offsets", "--packing",
             "--seq-len", "96", "--heldout-fraction", "0.3", "--shard-tokens", "200", "--max-batch-tokens", "256",
             "--seed", "3"],
    "chat": ["--dtype", "float32", "--top-k", "4", "--logprob-dtype", "bf16", "--seq-len", "64", "--shard-tokens", "100",
             "--max-batch-tokens", "128"],
}


def build_all(teacher: Path, root: Path) -> dict[str, str]:
    text, chat = write_inputs(root / "corpus")
    out = {}
    for name, args in BUILDS.items():
        cache = root / name
        corpus = text if name == "text" else chat
        rc = main(["build", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(cache), "--no-progress",
                   *args])
        assert rc == 0
        out[name] = str(cache)
    return out


def snapshot(caches: dict[str, str]) -> dict[str, np.ndarray]:
    """Every shard's arrays and manifest facts, flattened into npz keys `build/shard/field`."""
    arrays: dict[str, np.ndarray] = {}
    for name, url in caches.items():
        cache = open_cache(url)
        m = cache.manifest
        arrays[f"{name}/fields"] = np.array(json.dumps({k: v.to_json() for k, v in m.fields.items()}, sort_keys=True))
        for i, entry in enumerate(m.shards):
            block = cache.read_shard(entry)
            key = f"{name}/{i}"
            arrays[f"{key}/meta"] = np.array(json.dumps(
                {"split": entry.split, "sequences": entry.sequences, "tokens": entry.tokens}))
            arrays[f"{key}/seq_offsets"] = block.offsets
            for field, arr in {**block.token, **block.sequence}.items():
                arrays[f"{key}/{field}"] = np.asarray(arr)
    return arrays


def test_a_fixed_build_gives_the_cache_it_gave_before_the_restructuring(tiny_teacher, tmp_path):
    golden = dict(np.load(GOLDEN))
    caches = build_all(tiny_teacher, tmp_path)
    now = snapshot(caches)
    assert sorted(now) == sorted(golden), "the shard layout or the field table changed"
    for name, url in caches.items():
        cache = open_cache(url)
        fields = cache.manifest.fields
        assert json.loads(str(now[f"{name}/fields"])) == json.loads(str(golden[f"{name}/fields"]))
        exact = {k: v for k, v in fields.items() if k in EXACT}
        for i, entry in enumerate(cache.manifest.shards):
            key = f"{name}/{i}"
            assert str(now[f"{key}/meta"]) == str(golden[f"{key}/meta"])
            block = cache.read_shard(entry)
            ref = type(block)(offsets=golden[f"{key}/seq_offsets"],
                              token={f: golden[f"{key}/{f}"] for f in block.token},
                              sequence={f: golden[f"{key}/{f}"] for f in block.sequence})
            assert content_sha256(block, exact) == content_sha256(ref, exact), f"{key}: ids, offsets or masks changed"
            for field, spec in fields.items():
                a, b = now[f"{key}/{field}"], golden[f"{key}/{field}"]
                if spec.dtype in FLOAT_TOL:
                    np.testing.assert_allclose(to_float32(a, spec.dtype), to_float32(b, spec.dtype),
                                               rtol=FLOAT_TOL[spec.dtype], atol=FLOAT_TOL[spec.dtype], err_msg=f"{key}/{field}")
                elif field in ("topk_ids", "sample_ids", "sample_counts"):
                    # Chosen by the teacher's floats: a near tie may swap on another CPU, nothing more.
                    assert (a == b).mean() > 0.99, f"{key}/{field}"
                else:
                    np.testing.assert_array_equal(a, b, err_msg=f"{key}/{field}")


if __name__ == "__main__":  # re-record: `python -m tests.cache_builder.test_golden_build` (intended changes only)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_tiny_teacher(Path(tmp) / "teacher", default_teacher_dir())
        snap = snapshot(build_all(teacher, Path(tmp)))
    if "--samples-only" in sys.argv:
        kept = dict(np.load(GOLDEN))
        assert sorted(kept) == sorted(snap), "the shard layout or the field table changed: re-record everything"
        snap = {k: snap[k] if k.endswith(("/sample_ids", "/sample_counts")) else v for k, v in kept.items()}
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **snap)
    print(f"{GOLDEN}: {len(snap)} arrays, {GOLDEN.stat().st_size} bytes")
