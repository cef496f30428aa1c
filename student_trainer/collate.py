"""Collation: stored sequences padded and shifted into a Batch, one batch at a time (`collate`) or a whole
window's batches at once into one shared-memory buffer that crosses to the trainer process (`PackedBatches`).

The conventions (shift, -100 labels, padding values) are Batch's (student_trainer/batch.py).
"""

from __future__ import annotations

from multiprocessing.reduction import DupFd

import numpy as np
import torch

from formats.schema import FieldSpec, top_k_of
from student_trainer.batch import IGNORE_INDEX, Batch
from student_trainer.errors import LoaderError
from student_trainer.memory import lend, map_sent, slot_array, take_slot


def _layout(b: int, t: int, k: int, s_n: int, hidden: dict[int, int],
            offsets: bool = False) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every array of a collated batch of b rows padded to t (hidden: layer -> d)."""
    i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
    out = [("input_ids", (b, t), i64), ("position_ids", (b, t), i64), ("labels", (b, t), i64),
           ("kd_mask", (b, t), np.dtype(bool)), ("topk_ids", (b, t, k), i64), ("topk_logprobs", (b, t, k), f32),
           ("tail_logmass", (b, t), f32), ("target_logprob", (b, t), f32)]
    if s_n:
        out += [("sample_ids", (b, t, s_n), i64), ("sample_counts", (b, t, s_n), f32)]
    out += [(f"hidden/{layer}", (b, t, d), f32) for layer, d in hidden.items()]
    out += [("byte_offsets", (b, t, 2), i64)] if offsets else []
    return out + [("doc_index", (b,), i64)]


def _shape_of(seqs: list[dict[str, np.ndarray]], hidden_layers: list[int], pad_to: int):
    first = seqs[0]
    t = max(max(len(s["input_ids"]) for s in seqs), pad_to)
    s_n = first["sample_ids"].shape[1] if "sample_ids" in first else 0
    hidden = {layer: first[f"hidden/{layer}"].shape[1] for layer in hidden_layers}
    k = first["topk_ids"].shape[1] if "topk_ids" in first else 0  # 0: a samples-only cache
    return _layout(len(seqs), t, k, s_n, hidden, "byte_offsets" in first)


def _half_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Stored F32/F16/BF16 values into float32 `dst`. BF16 bits go straight into the upper half of each
    float32 (widen, then shift in place): no temporaries, two passes over the output."""
    if src.dtype == np.uint16:
        bits = dst.view(np.uint32)
        bits[...] = src
        bits <<= 16
    else:
        dst[...] = src


def targets(seq: dict[str, np.ndarray]) -> np.ndarray:
    """(n - 1,) bool: which of a sequence's tokens 1..n-1 are next-token targets: in the loss mask (when the cache
    has one) and not the first token of the next packed document."""
    ok = np.ones(max(len(seq["input_ids"]) - 1, 0), bool)
    if "loss_mask" in seq:
        ok &= seq["loss_mask"][1:].astype(bool)
    p = seq.get("position_ids")
    if p is not None:
        ok &= p[1:] != 0  # the first token of the next packed document is not predicted
    return ok


def _fill(seqs: list[dict[str, np.ndarray]], out: dict[str, np.ndarray], hidden_layers: list[int]) -> None:
    """Write the sequences into the (uninitialised) arrays of `out`, padding included."""
    t = out["input_ids"].shape[1]
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids = s["input_ids"]
        out["input_ids"][r, :n] = ids
        out["input_ids"][r, n:] = 0
        p = s.get("position_ids")
        out["position_ids"][r, :n] = np.arange(n) if p is None else p
        out["position_ids"][r, n:] = np.arange(t - n)  # padding is its own "document": nothing real attends to it
        nxt_ok = targets(s)
        out["labels"][r, : n - 1] = np.where(nxt_ok, ids[1:], IGNORE_INDEX)
        out["labels"][r, max(n - 1, 0):] = IGNORE_INDEX
        if "topk_ids" in s:  # a samples-only cache (k = 0) has none: its batch holds (B, T, 0) tensors
            out["topk_ids"][r, :n] = s["topk_ids"]
            out["topk_ids"][r, n:] = 0
            _half_into(out["topk_logprobs"][r, :n], s["topk_logprobs"])
            out["topk_logprobs"][r, n:] = 0
        out["tail_logmass"][r, :n] = s["tail_logmass"]
        out["tail_logmass"][r, n:] = -np.inf
        out["target_logprob"][r, : n - 1] = np.where(nxt_ok, s["target_logprob"][: n - 1], 0.0)
        out["target_logprob"][r, max(n - 1, 0):] = 0
        if "sample_ids" in out:
            out["sample_ids"][r, :n] = s["sample_ids"]
            out["sample_ids"][r, n:] = -1
            out["sample_counts"][r, :n] = s["sample_counts"]
            out["sample_counts"][r, n:] = 0
        for layer in hidden_layers:
            h = out[f"hidden/{layer}"]
            _half_into(h[r, :n], s[f"hidden/{layer}"])
            h[r, n:] = 0
        out["doc_index"][r] = int(s["doc_index"])
        if "byte_offsets" in out:
            out["byte_offsets"][r, :n] = s["byte_offsets"]
            out["byte_offsets"][r, n:] = -1
    np.not_equal(out["labels"], IGNORE_INDEX, out=out["kd_mask"])


def _as_batch(arrays: dict[str, torch.Tensor], num_tokens: int) -> Batch:
    return Batch(
        input_ids=arrays["input_ids"], position_ids=arrays["position_ids"], labels=arrays["labels"],
        kd_mask=arrays["kd_mask"], topk_ids=arrays["topk_ids"], topk_logprobs=arrays["topk_logprobs"],
        tail_logmass=arrays["tail_logmass"], target_logprob=arrays["target_logprob"],
        sample_ids=arrays.get("sample_ids"), sample_counts=arrays.get("sample_counts"),
        hidden={int(n[7:]): a for n, a in arrays.items() if n.startswith("hidden/")},
        doc_index=arrays["doc_index"], num_tokens=num_tokens, byte_offsets=arrays.get("byte_offsets"),
    )


def collate(seqs: list[dict[str, np.ndarray]], hidden_layers: list[int], pad_to: int = 0,
            fields: dict[str, FieldSpec] | None = None) -> Batch:
    """Pad and shift sequences (dicts of stored arrays) into a Batch; see Batch for the conventions.
    An empty list gives the filler batch, shaped after the cache's field table `fields`."""
    if not seqs:
        return _filler_batch(fields, hidden_layers)
    out = {name: np.empty(shape, dtype) for name, shape, dtype in _shape_of(seqs, hidden_layers, pad_to)}
    _fill(seqs, out, hidden_layers)
    return _as_batch({n: torch.from_numpy(a) for n, a in out.items()}, sum(len(s["input_ids"]) for s in seqs))


def _filler_batch(fields: dict[str, FieldSpec], hidden_layers: list[int]) -> Batch:
    """One row, one padding token, nothing to learn: keeps a rank with no data in DDP's lock-step. It has
    the cache's k, sample slots and hidden layers, so every loss path (RS-KD, hidden alignment) runs on it."""
    z = torch.zeros(1, 1, dtype=torch.int64)
    k = top_k_of(fields)
    s_n = fields["sample_ids"].shape[0] if "sample_ids" in fields else 0
    return Batch(input_ids=z, position_ids=z.clone(), labels=torch.full((1, 1), IGNORE_INDEX),
                 kd_mask=torch.zeros(1, 1, dtype=torch.bool),
                 topk_ids=torch.zeros(1, 1, k, dtype=torch.int64), topk_logprobs=torch.zeros(1, 1, k),
                 tail_logmass=torch.full((1, 1), -float("inf")), target_logprob=torch.zeros(1, 1),
                 sample_ids=torch.full((1, 1, s_n), -1, dtype=torch.int64) if s_n else None,
                 sample_counts=torch.zeros(1, 1, s_n) if s_n else None,
                 hidden={layer: torch.zeros(1, 1, fields[f"hidden/{layer}"].shape[0]) for layer in hidden_layers},
                 doc_index=torch.full((1,), -1), num_tokens=0,
                 byte_offsets=torch.full((1, 1, 2), -1) if "byte_offsets" in fields else None)


_ALIGN = 64
_TORCH_DTYPE = {np.dtype(np.int64).str: torch.int64, np.dtype(np.float32).str: torch.float32,
                np.dtype(bool).str: torch.bool}


class PackedBatches:
    """A window's batches collated into one flat buffer (a list-like of Batch for torchdata's Unbatcher).

    A worker process hands its results to the trainer through torch's shared-memory pickler, which costs a
    shared-memory segment and a file-descriptor hand-off (a socket round trip) per tensor: with a dozen
    tensors per batch that cost more than decoding the cache. Here all of a window's batch arrays are carved
    from one buffer, filled in place by collation, and cross the process boundary as one file descriptor; the
    trainer side rebuilds each Batch as views of it (no copy). The buffer is a reused slot of this process's
    pool (student_trainer/memory.py; figures in benchmarks/RESULTS.md, "Loader throughput"). With `shared`
    (in a worker process) the object is only for sending: it pickles as the slot's descriptor and is rebuilt
    on the other side.
    """

    def __init__(self, seqs_per_batch: list[list[dict[str, np.ndarray]]], hidden_layers: list[int], pad_to: int,
                 fields: dict[str, FieldSpec], shared: bool = False):
        layouts, offset = [], 0
        for seqs in seqs_per_batch:
            if not seqs:
                layouts.append(None)
                continue
            entries = []
            for name, shape, dtype in _shape_of(seqs, hidden_layers, pad_to):
                entries.append((name, offset, shape, dtype.str))
                offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
            layouts.append((entries, sum(len(s["input_ids"]) for s in seqs)))
        self.layouts, self.nbytes = layouts, offset
        self.fillers = {i: _filler_batch(fields, hidden_layers) for i, layout in enumerate(layouts) if layout is None}
        self._slot = take_slot(offset)
        flat = slot_array(self._slot, offset)
        for seqs, layout in zip(seqs_per_batch, layouts):
            if layout is not None:
                _fill(seqs, {name: np.ndarray(shape, np.dtype(dt), buffer=flat, offset=off)
                             for name, off, shape, dt in layout[0]}, hidden_layers)
        del flat  # no export of the mapping may outlive this: the pool may remap a free slot
        self.buffer = None if shared else lend(self._slot, offset)

    def __reduce__(self):
        if self.buffer is not None:
            raise LoaderError("PackedBatches: only a window collated with shared=True can be sent to another process")
        return _received, (DupFd(self._slot.fd), self.nbytes, self.layouts, self.fillers)

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> Batch:
        if i in self.fillers:
            return self.fillers[i]
        entries, num_tokens = self.layouts[i]
        arrays = {}
        for name, off, shape, dt in entries:
            dtype = _TORCH_DTYPE[dt]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            arrays[name] = self.buffer[off : off + nbytes].view(dtype).view(shape)
        return _as_batch(arrays, num_tokens)


def _received(dupfd, nbytes: int, layouts: list, fillers: dict[int, Batch]) -> PackedBatches:
    """Trainer side of a window sent by a worker: its batches as views of the worker's slot, which the worker
    reuses once the window's storage is freed here."""
    out = PackedBatches.__new__(PackedBatches)
    out.layouts, out.nbytes, out.fillers, out._slot = layouts, nbytes, fillers, None
    out.buffer = map_sent(dupfd.detach(), nbytes)
    return out
