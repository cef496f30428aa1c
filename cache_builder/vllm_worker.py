"""The part of the vLLM backend that runs inside vLLM's worker processes (one per GPU).

`CaptureExtension` is passed to the engine as `worker_extension_cls`: vLLM adds it to the bases of its
worker class, so the driver calls its methods with `LLM.collective_rpc`. The first
`kdcache_configure` wraps two methods of that worker's (V1) model runner, on the instance only:

- `execute_model` marks a real engine step (the runner also calls the model to profile and warm up);
- `_model_forward` returns the step's output: the final hidden states (after the model's last norm)
  of every scheduled token, flattened over the running requests in the order of
  `input_batch.req_ids`, request i owning rows `query_start_loc[i] : query_start_loc[i + 1]`, which
  hold its positions from `num_computed_tokens[i]` on.

Our requests are the ones whose `SamplingParams.extra_args` carry a "kdcache" entry (key, token after
the row, RS-KD seed); vLLM's own request ids never leave the worker. A request's rows are kept until
its whole prompt has been seen: chunked prefill may split a prompt over several steps, and a preempted
request is recomputed from an earlier position (its rows are then replaced). Then the LM head runs on
the rows, `row_chunk` rows at a time, and `capture.capture_rows` turns each chunk into the stored
record on the device: chunks and generator use match the transformers backend exactly. Only these
compact records leave the worker, through `kdcache_collect`.

Intermediate hidden states (HF index L < num_layers: the input of decoder layer L) come from forward
pre-hooks on the decoder layers, as the residual stream `hidden_states + residual` (vLLM's layers pass
the residual separately). Hooks only run when the model runs eagerly: a compiled graph does not call
them, so the driver starts the engine with enforce_eager for them and `kdcache_configure` refuses
otherwise.

With tensor parallelism every rank runs the LM head (its gather is a collective) and TP rank 0 keeps
the records; with pipeline parallelism each stage keeps the layers it holds, the last stage the
records, and the driver merges what the workers return.
"""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_builder.capture import CaptureSettings, capture_rows, to_numpy
from cache_builder.dtypes import torch_dtype

TAG = "kdcache"  # the key in SamplingParams.extra_args that marks our requests


class CaptureExtension:
    """Methods added to vLLM's worker class; `self` is the worker. Names start with `kdcache_` so
    they cannot collide with the worker's own (vLLM asserts there is no collision)."""

    def kdcache_configure(self, config: dict) -> str | None:
        """Set what the next requests capture. Returns an error message, or None."""
        state = getattr(self, "_kdcache_state", None)
        if state is None:
            runner = self.model_runner
            if not (hasattr(runner, "input_batch") and hasattr(runner, "_model_forward")):
                return (f"vLLM model runner {type(runner).__name__} is not the V1 runner this capture reads "
                        "(set VLLM_USE_V2_MODEL_RUNNER=0)")
            state = self._kdcache_state = WorkerCapture(runner)
        return state.configure(config)

    def kdcache_collect(self, keys: list[str]) -> dict:
        """Hand over (and forget) the finished records of `keys`: {"records": {key: {field: array}},
        "errors": {key: message}}, arrays packed by `pack`. Ranks that keep no records answer with empty dicts."""
        state = getattr(self, "_kdcache_state", None)
        if state is None:
            return {"records": {}, "errors": {}}
        return state.collect(keys)


@dataclass
class _Request:
    """Rows of one of our requests, gathered over the steps that compute its prompt."""

    key: str
    prompt: list[int]
    next_id: int  # token after the row, -1 when none
    seed: int  # RS-KD seed
    filled: int = 0  # positions 0 .. filled-1 are held
    blocks: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # (first position, rows)

    def add(self, start: int, rows: dict[str, torch.Tensor], keep: bool) -> None:
        if start > self.filled:
            raise RuntimeError(f"positions {self.filled}..{start - 1} of a request were never computed")
        if start < self.filled:  # recomputed after a preemption: drop what is computed again
            kept = []
            for first, blk in self.blocks:
                if first < start:
                    kept.append((first, {k: v[: start - first] for k, v in blk.items()}))
            self.blocks = kept
        # Rows that must outlive this step are copied: the runner may reuse its output buffers.
        self.blocks.append((start, {k: v.clone() if keep else v for k, v in rows.items()}))
        self.filled = start + next(iter(rows.values())).shape[0]

    def rows(self) -> dict[str, torch.Tensor]:
        names = self.blocks[0][1].keys()
        return {k: torch.cat([blk[k] for _, blk in self.blocks]) for k in names}  # (T, d) each


class WorkerCapture:
    """Capture state of one worker: configuration, requests in flight, finished records."""

    def __init__(self, runner):
        from vllm.config import CompilationMode
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        self.runner = runner
        self.model = runner.get_model()
        self.is_last_stage = get_pp_group().is_last_rank
        self.keeps_records = get_tensor_model_parallel_rank() == 0
        self.eager = runner.vllm_config.compilation_config.mode == CompilationMode.NONE
        self.num_layers = int(runner.model_config.hf_text_config.num_hidden_layers)
        self.cs: CaptureSettings | None = None
        self.layers: list[int] = []
        self.hidden_dtype = torch.bfloat16
        self.hooks: dict[int, object] = {}
        self.in_step = False
        self.step_rows: dict[int, torch.Tensor] = {}  # layer -> (num_tokens, d) residual stream this step
        self.requests: dict[str, _Request] = {}  # vLLM request id -> rows so far
        self.done: dict[str, dict[str, torch.Tensor]] = {}
        self.errors: dict[str, str] = {}
        self._wrap_runner()

    # --- driver calls --------------------------------------------------------------------------------

    def configure(self, config: dict) -> str | None:
        self.cs = CaptureSettings(**config["capture"])
        self.hidden_dtype = torch_dtype(config["hidden_dtype"])
        layers = sorted(int(x) for x in config["layers"])
        if layers != self.layers:
            err = self._hook_layers([x for x in layers if x < self.num_layers])
            if err:
                return err
            self.layers = layers
        return None

    def collect(self, keys: list[str]) -> dict:
        records, errors = {}, {}
        for key in keys:
            if key in self.errors:
                errors[key] = self.errors.pop(key)
            rec = self.done.pop(key, None)
            if rec is not None and self.keeps_records:
                records[key] = {name: pack(to_numpy(t)) for name, t in rec.items()}
        wanted = set(keys)
        for rid in [r for r, q in self.requests.items() if q.key in wanted]:
            q = self.requests.pop(rid)
            errors.setdefault(q.key, f"the engine finished the request after {q.filled} of {len(q.prompt)} positions")
        return {"records": records, "errors": errors}

    # --- inside the engine step ----------------------------------------------------------------------

    def _wrap_runner(self) -> None:
        runner = self.runner
        execute_model, model_forward = runner.execute_model, runner._model_forward

        def execute_model_marked(*args, **kwargs):
            self.in_step = True
            try:
                return execute_model(*args, **kwargs)
            finally:
                self.in_step = False
                self.step_rows.clear()

        def model_forward_captured(*args, **kwargs):
            output = model_forward(*args, **kwargs)
            if self.in_step and self.cs is not None:
                self._on_step(output)
            return output

        runner.execute_model = execute_model_marked
        runner._model_forward = model_forward_captured

    def _hook_layers(self, layers: list[int]) -> str | None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks = {}
        if not layers:
            return None
        if not self.eager:
            return ("intermediate hidden layers need the engine to run eagerly (a compiled model does not call "
                    "the hooks that read them); drop --no-vllm-enforce-eager, or use --backend hf")
        stack = _decoder_layers(self.model, self.num_layers)
        if stack is None:
            return (f"cannot find the {self.num_layers} decoder layers of {type(self.model).__name__} to read "
                    "intermediate hidden states; use --backend hf for them")
        from vllm.model_executor.models.utils import PPMissingLayer

        for layer in layers:
            module = stack[layer]
            if isinstance(module, PPMissingLayer):  # lives on another pipeline stage
                continue
            params = list(inspect.signature(module.forward).parameters)
            if "hidden_states" not in params:
                return (f"decoder layer {type(module).__name__} takes no hidden_states argument; "
                        "use --backend hf for intermediate hidden states")
            self.hooks[layer] = module.register_forward_pre_hook(self._layer_hook(layer, params), with_kwargs=True)
        return None

    def _layer_hook(self, layer: int, params: list[str]):
        def hook(module, args, kwargs):
            if self.in_step:
                bound = dict(zip(params, args), **kwargs)
                hidden, residual = bound["hidden_states"], bound.get("residual")
                self.step_rows[layer] = hidden if residual is None else hidden + residual  # (num_tokens, d)
        return hook

    def _on_step(self, output) -> None:
        if not (self.is_last_stage or self.hooks):  # a pipeline stage with nothing to capture
            return
        runner = self.runner
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.np[: n + 1]  # rows of request i: starts[i] : starts[i + 1]
        computed = batch.num_computed_tokens_cpu[:n]  # position of each request's first row
        final = None
        if self.is_last_stage:
            final = output[0] if isinstance(output, tuple) else output  # (num_tokens_padded, d)
        for i, rid in enumerate(batch.req_ids[:n]):
            req = self.requests.get(rid) or self._adopt(rid)
            if req is None:
                continue
            a, b, start = int(starts[i]), int(starts[i + 1]), int(computed[i])
            count = min(b - a, len(req.prompt) - start)  # rows past the prompt (decoding) are not ours
            if count <= 0:
                continue
            rows = {f"hidden/{layer}": t[a : a + count] for layer, t in self.step_rows.items()}
            if final is not None:
                rows["final"] = final[a : a + count]
            if not rows:
                continue
            try:
                req.add(start, rows, keep=start + count < len(req.prompt))
            except RuntimeError as e:
                self.errors[req.key] = str(e)
                del self.requests[rid]
                continue
            if req.filled == len(req.prompt):
                del self.requests[rid]
                self._finish(req)

    def _adopt(self, rid: str) -> _Request | None:
        state = self.runner.requests.get(rid)
        params = getattr(state, "sampling_params", None)
        tag = (params.extra_args or {}).get(TAG) if params is not None else None
        if tag is None:
            return None
        key, next_id, seed = tag
        req = self.requests[rid] = _Request(key=str(key), prompt=list(state.prompt_token_ids),
                                            next_id=int(next_id), seed=int(seed))
        return req

    def _finish(self, req: _Request) -> None:
        """All rows of a request are here: LM head, records, hidden states (kept on TP rank 0)."""
        rows = req.rows()
        rec: dict[str, torch.Tensor] = {}
        final = rows.pop("final", None)
        if final is not None:
            try:
                rec.update(self._records(final, req))
            except Exception:  # reported to the driver, which raises BuildError; the engine keeps running
                self.errors[req.key] = traceback.format_exc(limit=3)
            if self.num_layers in self.layers:
                rows[f"hidden/{self.num_layers}"] = final
        for name, t in rows.items():
            rec[name] = t.to(self.hidden_dtype)
        if self.keeps_records:
            self.done.setdefault(req.key, {}).update(rec)

    def _records(self, final: torch.Tensor, req: _Request) -> dict[str, torch.Tensor]:
        cs = self.cs
        device = final.device
        next_ids = torch.tensor(req.prompt[1:] + [req.next_id], dtype=torch.long, device=device)  # (T,)
        gen = None
        if cs.sample_draws:
            gen = torch.Generator(device=device)
            gen.manual_seed(req.seed)
        parts: list[dict[str, torch.Tensor]] = []
        error = None
        for start in range(0, final.shape[0], cs.row_chunk):
            # Every TP rank must run the head (its gather is a collective), even after an error here.
            logits = self.model.compute_logits(final[start : start + cs.row_chunk])  # (n, V_model) or None
            if logits is None or not self.keeps_records or error is not None:
                continue
            try:
                parts.append(capture_rows(logits, next_ids[start : start + cs.row_chunk], cs, gen))
            except ValueError as e:  # e.g. more distinct RS-KD ids than sample slots
                error = e
        if error is not None:
            raise error
        if not parts:
            return {}
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def pack(a: np.ndarray) -> list:
    """An array as [dtype, shape, bytes]: the engine's RPC answers are msgpack, which carries bytes as
    they are but hands numpy arrays back undecoded."""
    return [a.dtype.str, list(a.shape), a.tobytes()]


def unpack(packed: list) -> np.ndarray:
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers: the ModuleList of `num_layers` entries (named `layers` if
    there are several)."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    named = [m for name, m in found if name.split(".")[-1] == "layers"]
    if named:
        return named[0]
    return found[0][1] if len(found) == 1 else None
