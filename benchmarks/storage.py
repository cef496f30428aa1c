"""Cache size in bytes per token for each storage mode, and how faithfully each mode keeps the teacher.

    python benchmarks/storage.py [--tokens 12000] [--heldout-fraction 0.3]

Data: the demo corpus (`kdcache.demo.stdlib_corpus`: Python standard-library modules as text),
tokenized by the builder's `tokenize_corpus` (sequences of up to 512 tokens, documents split into train and
held-out by the builder's hash), run once through the demo teacher SmolLM2-135M-Instruct (transformers,
float32, this CPU). From the same logits, every mode's records are made by the builder's own
`cache_builder.capture.capture_rows` (and the hidden state as the builder stores it), so the modes differ
only in what they keep.

Modes (every mode also stores input_ids I32, tail_logmass F32, target_logprob F32 and doc_index, as the
format requires): top-k 12 / 64 / 128 with F16 or BF16 log-probs; `rskd50`: a samples-only cache (k = 0,
format 1.1; `kdcache build --top-k 0 --sample-draws 50`): RS-KD with 50 draws (N = 50) in 50 slots (the
builder's default: never truncates) with U8 counts; `rskd50+top1`: the same samples next to a top-1 entry (F16),
the smallest top-k format 1.0 allowed; `topk64-bf16+hidden`: top-k 64 BF16 plus one BF16 hidden layer (layer 15 of 30, 576
wide). Each mode is written as one shard with the Parquet and the Zarr writers, with zstd (level 3, as caches
are written: level 3, and level 9 for the RS-KD sample columns; Parquet stores the sample columns without
their padding slots and sample_counts BYTE_STREAM_SPLIT, format 1.1) and without compression.

Bytes per token: `file` = the shard's bytes on disk / tokens (this small cache pays the fixed metadata once:
the Parquet footer, Zarr's JSON files); `data` (Parquet) = the column chunks' compressed bytes / tokens, what
a large cache tends to, since its fixed metadata is amortised over 262144-token shards.

Fidelity, on every position of the held-out sequences; p = the teacher's full distribution (float32
log-softmax, evaluated in float64), q = the mode's reconstruction from what it stores (stored dtypes decoded):
- top-k, uniform tail: q_i = exp(stored log-prob) on the k ids, the stored tail mass exp(tail_logmass) spread
  evenly over the other V - k ids, renormalised to sum 1 (the rounding of F16/BF16 moves the sum slightly).
- top-k, renormalised (no tail, DistillKit's default): q_i = p_i / sum_K p_j on the k ids, 0 elsewhere. Its
  KL(p || q) is infinite whenever the tail has mass, so it is reported as inf; TVD and CE errors are finite.
- RS-KD: the estimator is q^ = c/N (c = how often each id was drawn), unbiased (E q^ = p) but zero off the
  drawn ids, so KL(p || q^) is infinite. The KL column uses the smoothed q~ = (c + 1/V) / (N + 1): one extra
  pseudo-draw spread evenly over the vocabulary, a convention stated here, not a property of RS-KD; the TVD
  and CE columns use q^ itself, which is what the RS-KD loss trains on.
Columns: `kl` = mean KL(p || q) in nats per token; `tvd` = mean 1/2 sum |p - q|, which is also half the L1
error of the soft-target cross-entropy gradient with respect to the student's logits (s - q vs s - p);
`ce_rel_err` = mean |CE(q, s) - CE(p, s)| / CE(p, s) per token and `ce_bias` = (sum CE(q, s) - sum CE(p, s)) /
sum CE(p, s), for a reference student s = the 4-layer student the demo derives from the teacher
(`student_from_teacher`, not trained), CE(q, s) = -sum_i q_i log s_i.

Top-k frontier (issue 17; `benchmarks/topk_frontier.py` defines it): bytes/token, KL(p || q) with the rest of the
mass spread evenly, and top-1 kept, for k = 50 and 128 and the modes exact oracle (plain F32), plain BF16 and
compact (SPEC.md "Compact top-k") with 5, 6 (the default) and 7 bits, each written by CacheWriter as its own
cache of the required fields plus the top-k; on every position of this corpus, and of the issue's comparison
corpus (the first 4000 characters of argparse, difflib, statistics, string, shlex, csv, calendar and glob,
windows of <= 512 tokens, one pass of the same teacher).

The last line printed is JSON with `bytes_per_token` (mode -> Parquet zstd file bytes per token),
`rskd_bytes_per_token`, `compact_k128_bytes`, `compact_k128_kl_over_oracle`, `compact_k50_bytes`,
`compact_k50_kl_over_oracle` (comparison corpus, 6 bits) and every other figure. Writes its section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import processor, update_results  # noqa: E402
from topk_frontier import FrontierData, compact_parts, comparison_corpus, frontier, frontier_markdown  # noqa: E402

DRAWS = 50
HIDDEN_LAYER = 15
FRONTIER_MODES = ("bf16", "compact5", "compact6", "compact7")
DISTILLKIT = {"DistillKit k=128 (recommended)": 330, "DistillKit budget (k=50)": 114, "RS-KD paper (12 x 3 B)": 36}


def modes() -> dict[str, dict]:
    """name -> capture settings and hidden layers of each storage mode."""
    out = {}
    for k in (12, 64, 128):
        for dtype in ("F16", "BF16"):
            out[f"topk{k}-{dtype.lower()}"] = {"top_k": k, "dtype": dtype, "draws": 0, "hidden": []}
    out["rskd50"] = {"top_k": 0, "dtype": "F16", "draws": DRAWS, "hidden": []}
    out["rskd50+top1"] = {"top_k": 1, "dtype": "F16", "draws": DRAWS, "hidden": []}
    out["topk64-bf16+hidden"] = {"top_k": 64, "dtype": "BF16", "draws": 0, "hidden": [HIDDEN_LAYER]}
    return out


def shard_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parquet_data_bytes(path: Path) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(str(path)).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns))


def parquet_columns(path: Path, tokens: int) -> dict[str, float]:
    """Compressed bytes per token of each column of a Parquet shard."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(str(path)).metadata
    out: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            name = meta.schema.column(c).path.split(".")[0]
            out[name] = out.get(name, 0.0) + meta.row_group(g).column(c).total_compressed_size / tokens
    return {k: round(v, 2) for k, v in out.items()}


class Fidelity:
    """Running sums of the fidelity figures of one reconstruction (see the module docstring)."""

    def __init__(self):
        self.n = 0
        self.kl = self.tvd = self.ce_rel = self.ce_q = self.ce_p = 0.0

    def add(self, logp, q, log_s, kl_q=None) -> None:
        """logp (n, V) float64 teacher log-probs; q (n, V) float64 reconstruction; log_s (n, V) student
        log-probs; kl_q: the distribution the KL is taken against when it differs from q (None: q; 'inf')."""
        import torch

        p = logp.exp()
        if isinstance(kl_q, str):
            self.kl = math.inf
        else:
            ref = q if kl_q is None else kl_q
            self.kl += float(torch.where(p > 0, p * (logp - ref.clamp_min(1e-300).log()), 0.0).sum())
        self.tvd += float(0.5 * (p - q).abs().sum())
        ce_p = -(p * log_s).sum(-1)
        ce_q = -(q * log_s).sum(-1)
        self.ce_rel += float(((ce_q - ce_p).abs() / ce_p).sum())
        self.ce_q += float(ce_q.sum())
        self.ce_p += float(ce_p.sum())
        self.n += logp.shape[0]

    def figures(self) -> dict:
        return {"kl": self.kl / self.n, "tvd": self.tvd / self.n, "ce_rel_err": self.ce_rel / self.n,
                "ce_bias": (self.ce_q - self.ce_p) / self.ce_p}


def reconstructions(rec: dict, mode: dict, vocab: int, rows: slice):
    """(name, q, kl_q) of each reconstruction of one mode for positions `rows` of a record."""
    import torch

    from formats.schema import to_float32

    out = []
    if mode["draws"]:
        ids = torch.from_numpy(rec["sample_ids"][rows].astype(np.int64))
        counts = torch.from_numpy(rec["sample_counts"][rows].astype(np.float64))
        n = ids.shape[0]
        q = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(1, ids.clamp_min(0), counts) / DRAWS
        smooth = (q * DRAWS + 1.0 / vocab) / (DRAWS + 1)
        out.append(("rskd (q^ = c/N; KL of smoothed)", q, smooth))
        return out
    k = mode["top_k"]
    ids = torch.from_numpy(rec["topk_ids"][rows].astype(np.int64))
    top = torch.from_numpy(to_float32(rec["topk_logprobs"][rows], mode["dtype"]).astype(np.float64)).exp()
    tail = torch.from_numpy(rec["tail_logmass"][rows].astype(np.float64)).exp()
    n = ids.shape[0]
    q = (tail / (vocab - k))[:, None].expand(n, vocab).clone().scatter_(1, ids, top)
    out.append(("uniform tail", q / q.sum(-1, keepdim=True), None))
    renorm = torch.zeros(n, vocab, dtype=torch.float64).scatter_(1, ids, top / top.sum(-1, keepdim=True))
    out.append(("renormalised, no tail", renorm, "inf"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12000, help="about this many tokens go through the teacher")
    ap.add_argument("--heldout-fraction", type=float, default=0.3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from cache_builder.build import resolve_teacher_path
    from cache_builder.capture import CaptureSettings, capture_rows, sample_seed, to_numpy
    from cache_builder.corpus import tokenize_corpus
    from cache_builder.documents import CorpusOptions
    from cache_builder.teacher_hf import load_hf_teacher
    from formats import shard_parquet, shard_zarr
    from formats.schema import SeqBlock, make_fields
    from formats.tokenizer import tokenizer_info
    from kdcache.demo import stdlib_corpus
    from student_trainer.student import student_from_teacher

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-storage-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # caches of hundreds of MB
    corpus = stdlib_corpus(tmp / "corpus", args.tokens * 4)  # ~3.5-4 characters per token of code
    path, teacher_name = resolve_teacher_path("default")
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer_info(tokenizer)["vocab_size"]
    seqs = list(tokenize_corpus(CorpusOptions(paths=[str(corpus)], seq_len=args.seq_len,
                                              heldout_fraction=args.heldout_fraction), tokenizer))
    teacher = load_hf_teacher(path, device="cpu")
    student = student_from_teacher(path, 4)[0].eval()
    own = FrontierData(vocab)
    all_modes = modes()
    records = {name: [] for name in all_modes}
    fidelity: dict[tuple[str, str], Fidelity] = {}
    counts = {"train": 0, "heldout": 0}
    distinct = []
    index_in_split = {"train": 0, "heldout": 0}
    for q in seqs:
        ids = torch.from_numpy(q.input_ids.astype(np.int64))[None]
        n = ids.shape[1]
        with torch.inference_mode():
            out = teacher.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            logits = out.logits[0, :, :vocab].float()  # (n, V)
            next_ids = torch.full((n,), -1, dtype=torch.long)
            next_ids[:-1] = ids[0, 1:]
            own.add(logits, next_ids, q.input_ids, q.doc_index)
            seed = sample_seed(0, q.split, index_in_split[q.split])
            for name, m in all_modes.items():
                cs = CaptureSettings(top_k=m["top_k"], vocab_size=vocab, logprob_dtype=m["dtype"],
                                     sample_draws=m["draws"], seed=0)
                gen = torch.Generator().manual_seed(seed) if m["draws"] else None
                rec = {k: to_numpy(t) for k, t in capture_rows(logits, next_ids, cs, gen).items()}
                if m["draws"]:
                    rec["sample_counts"] = rec["sample_counts"].astype(np.uint8)
                    distinct.append((rec["sample_counts"] > 0).sum(1))
                for layer in m["hidden"]:
                    rec[f"hidden/{layer}"] = to_numpy(out.hidden_states[layer][0].to(torch.bfloat16))
                rec.update(input_ids=q.input_ids, doc_index=np.int64(q.doc_index))
                records[name].append(rec)
            if q.split == "heldout":
                logp = torch.log_softmax(logits, -1).double()
                log_s = torch.log_softmax(student(input_ids=ids).logits[0, :, :vocab].float(), -1).double()
                for start in range(0, n, 128):
                    rows = slice(start, min(start + 128, n))
                    for name, m in all_modes.items():
                        if name == "rskd50+top1":
                            continue  # the same samples as rskd50: the same reconstruction
                        for kind, qd, kl_q in reconstructions(records[name][-1], m, vocab, rows):
                            fidelity.setdefault((name, kind), Fidelity()).add(logp[rows], qd, log_s[rows], kl_q)
        index_in_split[q.split] += 1
        counts[q.split] += n
        if counts["train"] + counts["heldout"] >= args.tokens:
            break
    teacher_s = time.perf_counter() - t_start
    tokens = counts["train"] + counts["heldout"]
    print(f"teacher + records: {tokens} tokens ({counts['heldout']} held out) in {teacher_s:.0f} s", flush=True)

    sizes = {}
    for name, m in all_modes.items():
        fields = make_fields(m["top_k"], m["dtype"], sample_slots=DRAWS if m["draws"] else 0, count_dtype="U8",
                             hidden={layer: (teacher.model.config.hidden_size, "BF16") for layer in m["hidden"]})
        block = SeqBlock.from_sequences(records[name], fields)
        row = {}
        for backend, module in (("parquet", shard_parquet), ("zarr", shard_zarr)):
            for compression in ("zstd", "none"):
                out_path = tmp / "shards" / f"{name}-{compression}.{backend}"
                out_path.parent.mkdir(exist_ok=True)
                module.write(out_path, block, fields, compression=compression)
                row[f"{backend}/{compression}"] = shard_bytes(out_path) / tokens
                if backend == "parquet":
                    row[f"parquet-data/{compression}"] = parquet_data_bytes(out_path) / tokens
        row["raw"] = sum(a.nbytes for a in block.token.values()) / tokens
        if name == "rskd50":
            rskd_columns = parquet_columns(tmp / "shards" / f"{name}-zstd.parquet", tokens)
        sizes[name] = row
        print(f"{name:20s} " + "  ".join(f"{k} {v:7.1f}" for k, v in row.items()), flush=True)
    fid = {f"{name} | {kind}": f.figures() for (name, kind), f in fidelity.items()}
    for key, f in fid.items():
        print(f"{key:50s} kl {f['kl']:.4g}  tvd {f['tvd']:.4f}  ce_rel_err {f['ce_rel_err']:.4f}  ce_bias {f['ce_bias']:+.4f}")
    distinct_all = np.concatenate(distinct)
    comparison = FrontierData(vocab)
    for q in tokenize_corpus(CorpusOptions(paths=[str(comparison_corpus(tmp / "comparison"))], seq_len=512), tokenizer):
        ids = torch.from_numpy(q.input_ids.astype(np.int64))[None]
        next_ids = torch.full((ids.shape[1],), -1, dtype=torch.long)
        next_ids[:-1] = ids[0, 1:]
        with torch.inference_mode():
            comparison.add(teacher.model(input_ids=ids, use_cache=False).logits[0, :, :vocab].float(), next_ids,
                           q.input_ids, q.doc_index)
    fronts = {"own": frontier(own, tmp / "frontier-own", FRONTIER_MODES),
              "comparison": frontier(comparison, tmp / "frontier-comparison", FRONTIER_MODES)}
    parts = {k: compact_parts(str(tmp / "frontier-comparison" / f"k{k}-compact6")) for k in (50, 128)}
    for corpus, rows in fronts.items():
        for key, f in rows.items():
            print(f"frontier {corpus:10s} {key:16s} {f['bytes_per_token']:7.1f} B/token  KL {f['kl']:.4f} "
                  f"(x{f['kl_over_oracle']:.4f})  top-1 kept {f['top1_kept']:.2%}  written in {f['write_s']:.2f} s", flush=True)
    comp = fronts["comparison"]
    figures = {
        "bytes_per_token": {name: round(r["parquet/zstd"], 1) for name, r in sizes.items()},
        "rskd_bytes_per_token": round(sizes["rskd50"]["parquet/zstd"], 1),
        "rskd_data_bytes_per_token": round(sizes["rskd50"]["parquet-data/zstd"], 1),
        "sizes": {name: {k: round(v, 1) for k, v in r.items()} for name, r in sizes.items()},
        "fidelity": {k: {m: ("inf" if math.isinf(v) else round(v, 5)) for m, v in f.items()} for k, f in fid.items()},
        "rskd_columns": rskd_columns,
        "rskd_distinct_ids_mean": round(float(distinct_all.mean()), 2),
        "rskd_distinct_ids_max": int(distinct_all.max()),
        "tokens": tokens,
        "heldout_tokens": counts["heldout"],
        "compact_k128_bytes": round(comp["k=128 compact6"]["bytes_per_token"], 1),
        "compact_k128_kl_over_oracle": round(comp["k=128 compact6"]["kl_over_oracle"], 4),
        "compact_k50_bytes": round(comp["k=50 compact6"]["bytes_per_token"], 1),
        "compact_k50_kl_over_oracle": round(comp["k=50 compact6"]["kl_over_oracle"], 4),
        "frontier": {corpus: {key: {m: round(v, 4) for m, v in f.items()} for key, f in rows.items()}
                     for corpus, rows in fronts.items()},
        "compact_parts_bytes_per_token": parts,
    }
    if not args.no_results:
        write_results(figures, teacher_name, torch.__version__)
    print(json.dumps(figures))


def write_results(figures: dict, teacher_name: str, torch_version: str) -> None:
    cmd = ".venv/bin/python benchmarks/storage.py " + " ".join(sys.argv[1:])
    out = io.StringIO()
    out.write(f"Command: `{cmd.strip()}`  \nMachine: {processor()} (shared with other work while measured), "
              f"{platform.machine()}, no GPU, torch {torch_version}\n\n")
    out.write(f"Teacher: {teacher_name}, V = 49152. Data: demo corpus (stdlib source), {figures['tokens']} tokens, "
              f"{figures['heldout_tokens']} of them held out for fidelity. Definitions: see the docstring of "
              "benchmarks/storage.py (reconstructions, KL/TVD/CE columns, reference student).\n\n")
    out.write("Bytes per token (every mode includes input_ids, tail_logmass, target_logprob). *file*: shard bytes on "
              "disk / tokens for this one-shard cache; *data*: Parquet column chunks only, what a large cache tends "
              "to; *raw*: the uncompressed arrays.\n\n")
    out.write("| mode | Parquet zstd file | Parquet zstd data | Parquet none file | Zarr zstd | Zarr none | raw |\n")
    out.write("|---|---|---|---|---|---|---|\n")
    for name, r in figures["sizes"].items():
        out.write(f"| {name} | {r['parquet/zstd']} | {r['parquet-data/zstd']} | {r['parquet/none']} | "
                  f"{r['zarr/zstd']} | {r['zarr/none']} | {r['raw']} |\n")
    hidden = figures["sizes"]["topk64-bf16+hidden"]["parquet/zstd"] - figures["sizes"]["topk64-bf16"]["parquet/zstd"]
    out.write(f"\nOne BF16 hidden layer (576 wide) adds {hidden:.1f} B/token with zstd (raw 1152). RS-KD: "
              f"{figures['rskd_distinct_ids_mean']} distinct ids per position on average (max "
              f"{figures['rskd_distinct_ids_max']}) of 50 draws.\n\n")
    cols = figures["rskd_columns"]
    samples = cols["sample_ids"] + cols["sample_counts"]
    out.write("RS-KD mode, Parquet zstd data bytes per token by column: "
              + ", ".join(f"{k} {v}" for k, v in cols.items())
              + f". The samples take {samples:.1f} B/token = {samples / figures['rskd_distinct_ids_mean']:.2f} B per "
              f"distinct id (the RS-KD paper counts 3 B per entry); the fields every cache holds (input_ids, target, "
              f"tail, which is 0 throughout a samples-only cache, doc_index) take {sum(cols.values()) - samples:.1f} B. "
              f"Next to a top-1 entry, as format 1.0 required (rskd50+top1), the same samples take "
              f"{figures['sizes']['rskd50+top1']['parquet/zstd']} B/token: the top-1 id and log-prob and a tail that is "
              "no longer constant cost the difference.\n\n")
    out.write("Published figures for comparison (their own accounting; ours also counts input_ids, target and tail): "
              + "; ".join(f"{k}: ~{v} B/token" for k, v in DISTILLKIT.items()) + ".\n\n")
    out.write("Fidelity on the held-out tokens (p = teacher, q = reconstruction, s = reference student):\n\n")
    out.write("| mode | reconstruction | KL(p‖q) nats/token | TVD(p, q) | CE rel. error | CE bias |\n|---|---|---|---|---|---|\n")
    for key, f in figures["fidelity"].items():
        mode, kind = key.split(" | ")
        kl = f["kl"] if f["kl"] == "inf" else f"{f['kl']:.4f}"
        out.write(f"| {mode} | {kind} | {kl} | {f['tvd']:.4f} | {f['ce_rel_err']:.4f} | {f['ce_bias']:+.4f} |\n")
    out.write("\nNotes: Arrow stores U8/U16 (and so BF16) columns as 4-byte INT32 Parquet values, which is why "
              "uncompressed BF16 Parquet is larger than F16 and than the raw arrays; zstd removes the zero halves. "
              "The top-k modes' KL(p‖q) with a uniform tail is dominated by the tail: most of it is the shape of the "
              "mass outside the top k, which no top-k cache keeps; the CE columns show the training-relevant error "
              "(the uniform tail overestimates CE, renormalising underestimates it). RS-KD's CE bias is ~0 (it is "
              "unbiased); its per-token error is larger than top-64's because 50 draws are a noisy estimate.\n")
    rskd = figures["rskd_bytes_per_token"]
    out.write(f"\n**rskd_bytes_per_token = {rskd}** (Parquet, zstd, file bytes; data bytes "
              f"{figures['rskd_data_bytes_per_token']}); goal <= 40: **{'met' if rskd <= 40 else 'not met'}**.")
    out.write(f" The samples take {samples:.1f} B/token ({figures['rskd_distinct_ids_mean']} distinct ids x "
              f"{samples / figures['rskd_distinct_ids_mean']:.2f} B; the paper counts 3 B per entry) and the fields "
              f"every cache holds {sum(cols.values()) - samples:.1f} B.")
    if rskd > 40:
        out.write(" This teacher on code draws more distinct ids per position than the paper's ~12; less would take "
                  "fewer draws.")
    out.write("\n\nHow the RS-KD figure came down (same corpus; `python benchmarks/storage.py --tokens 3000`, 3269 tokens, "
              "14.39 distinct ids per position, Parquet zstd file bytes per token; each row run at the commit that made it, the 1.0 row at e83f201):\n\n"
              "| format / writer | RS-KD B/token |\n|---|---|\n"
              "| 1.0: top-1 + 50 padded slots, zstd 3 (the format required k >= 1) | 53.1 |\n"
              "| 1.1: samples only (k = 0), zstd 9 on the samples, counts BYTE_STREAM_SPLIT | 41.1 |\n"
              "| 1.1: and Parquet stores the sample lists without their padding slots | 38.5 (Zarr, which keeps the "
              "padded slots: 42.6) |\n\n"
              "The figure depends on the text: this 3269-token slice draws 14.4 distinct ids per position, the "
              "12117 tokens above 13.3. Zarr keeps fixed padded slots (a flat sample axis would need a second "
              "offsets array per shard), so it stays 3-5 B/token above Parquet for RS-KD caches; its inner chunks of at most 256 KiB (shard_zarr.py: smaller chunks decode faster, benchmarks/loader.py) cost it 37.6 -> 39.2 B/token on the 12117 tokens, against 16384-row chunks.\n")
    out.write(frontier_markdown(figures))
    update_results("Storage size and fidelity", out.getvalue())


if __name__ == "__main__":
    main()
