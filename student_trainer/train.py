"""`kdcache train`: distill a student from a cache, no teacher in memory. Read top to bottom:
settings -> setup (cache, student, loss, optimizer, loader, resume) -> loop -> final HF folder.

One process trains on one device; under torchrun each rank trains its share of every batch (DDP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from formats.errors import KdError
from student_trainer.schedule import check_schedule, phase_at, value_at
from student_trainer.xtok_align import XTOK_KINDS, xtok_aligner


class TrainError(KdError):
    """Bad training settings or a cache/student that do not fit together."""


@dataclass
class TrainSettings:
    cache: str = ""  # cache directory or URL
    out: str = ""  # output folder: checkpoints, metrics.jsonl, final/ (HF folder)
    student: str = ""  # HF folder of the student; or derive one with student_layers + init_from_teacher
    student_layers: int = 0  # layers of a student derived from the teacher
    student_hidden: int = 0  # its hidden size (0: the teacher's, which lets weights be copied)
    init_from_teacher: str = ""  # teacher HF folder to derive the student from ('cache': the one the cache names)
    split: str = "train"  # cache split to train on
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max gradient norm (0: off)
    kd_kind: str = "fkl_ghost"  # fkl_ghost | fkl_renorm | rskd | rkl | jsd | skew_kl | tvd; uld | byte_align (any tokenizer)
    teacher_tokenizer: str = ""  # uld/byte_align: folder of the teacher's tokenizer ("": the teacher folder the cache names)
    alpha: float | dict = 0.0  # weight of CE on the real token (schedule allowed); KD gets 1 - alpha
    temperature: float | dict = 1.0  # KD temperature (schedule allowed)
    kd_weight: float | dict = 1.0  # multiplies the CE/KD mix (schedule allowed; phases set it to 0 for feature-only)
    hidden_weight: float | dict = 0.0  # weight of hidden-state alignment (schedule allowed)
    layer_map: str = ""  # student:teacher hidden layers, e.g. "2:10,4:20" or "uniform"; "" = off
    hidden_metric: str = "mse"  # mse | cosine
    jsd_beta: float = 0.5
    skew: float = 0.1
    phases: list = field(default_factory=list)  # [{name, steps, <overrides of the weights above>}]
    chunk_tokens: int = 256  # tokens per chunk of the output-head loss (memory bound)
    shuffle_blocks: int = 8  # loader shuffle window, in read blocks
    num_workers: int = 1  # loader processes
    seed: int = 0  # data order and initialisation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU | bf16: bf16 autocast on any device | fp32
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the student
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    log_every: int = 1  # optimizer steps between lines of metrics.jsonl
    report_to: str = ""  # also log to: tensorboard, wandb (comma-separated); metrics.jsonl is always written
    run_name: str = ""  # W&B run name (default: the output folder's name)
    wandb_project: str = "kdcache"
    checkpoint_every: int = 50  # optimizer steps between checkpoints (0: only at the end)
    resume: bool = False  # continue from the latest checkpoint in `out`
    verify: bool = False  # recompute every shard checksum before training
    allow_incomplete: bool = False  # train on a cache whose build has not finished
    progress: bool = True

    SCHEDULED = ("alpha", "temperature", "kd_weight", "hidden_weight")

    def validate(self) -> None:
        if not self.cache or not self.out:
            raise TrainError("--cache and --out are required")
        if bool(self.student) == bool(self.student_layers):
            raise TrainError("give either --student HF_DIR or --student-layers N with --init-from-teacher")
        if self.student_layers and not self.init_from_teacher:
            raise TrainError("--student-layers needs --init-from-teacher TEACHER_DIR")
        for name in ("steps", "batch_size", "grad_accum", "chunk_tokens", "shuffle_blocks"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)}")
        from student_trainer.losses import KD_LOSSES

        if self.kd_kind not in KD_LOSSES:
            raise TrainError(f"kd_kind must be one of {', '.join(KD_LOSSES)}, got {self.kd_kind!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        from student_trainer.reporting import parse_report_to

        parse_report_to(self.report_to)
        if self.hidden_metric not in ("mse", "cosine"):
            raise TrainError(f"hidden_metric must be mse or cosine, got {self.hidden_metric!r}")
        for name in self.SCHEDULED:
            check_schedule(name, getattr(self, name))
        for i, phase in enumerate(self.phases):
            if not isinstance(phase, dict) or not isinstance(phase.get("steps"), int) or phase["steps"] <= 0:
                raise TrainError(f"phases[{i}]: needs a positive integer 'steps'")
            unknown = set(phase) - {"name", "steps", *self.SCHEDULED}
            if unknown:
                raise TrainError(f"phases[{i}]: unknown keys {sorted(unknown)}; allowed: name, steps, {', '.join(self.SCHEDULED)}")
            for name in self.SCHEDULED:
                if name in phase:
                    check_schedule(f"phases[{i}].{name}", phase[name])


# transformers.TrainingArguments names people type from habit -> ours.
HF_NAMES = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "output_dir": "out",
            "gradient_checkpointing": "grad_checkpointing", "logging_steps": "log_every", "save_steps": "checkpoint_every"}


def load_settings(config_path: str | None, overrides: dict) -> TrainSettings:
    """Defaults <- YAML config <- command-line overrides; unknown keys and wrong types are errors."""
    values: dict = {}
    if config_path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TrainError(f"{config_path}: cannot read config ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise TrainError(f"{config_path}: the config must be a mapping of settings")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(TrainSettings)}
    for key, value in values.items():
        if key not in known:
            import difflib

            close = [k for k in known if k.replace("_", "") == key.replace("_", "").replace("-", "")]
            close = close or difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
            if not close and key in HF_NAMES:
                close = [HF_NAMES[key]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainError(f"{config_path or 'settings'}: unknown key {key!r}{hint}")
        default = getattr(TrainSettings(), key)
        number = (int, float, dict) if key in TrainSettings.SCHEDULED else (int, float)
        ok = (isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
              or isinstance(default, float) and isinstance(value, number) and not isinstance(value, bool)
              or isinstance(default, tuple) and isinstance(value, list))
        if not ok:
            raise TrainError(f"{config_path or 'settings'}: {key} must be {type(default).__name__}, got {value!r}")
        if isinstance(default, tuple):
            value = tuple(value)
        values[key] = value
    s = TrainSettings(**values)
    s.validate()
    return s


class DistillModel(nn.Module):
    """Student + hidden projector, with the whole loss in forward so DDP sees one module."""

    def __init__(self, student: nn.Module, projector: nn.Module | None, vocab: int, chunk_tokens: int):
        super().__init__()
        self.student = student
        self.projector = projector
        self.vocab = vocab
        self.chunk_tokens = chunk_tokens

    def forward(self, batch, kd_config, kd_weight: float, hidden_weight: float) -> tuple[torch.Tensor, dict]:
        from student_trainer.losses import chunked_kd_loss

        decoder = self.student.get_decoder()
        need_hidden = self.projector is not None and hidden_weight > 0
        # attention_mask=None: padding sits at the end, so causal attention never lets a real token see
        # it, and position_ids restarts tell transformers where packed documents begin.
        out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, output_hidden_states=need_hidden,
                      use_cache=False)
        h = out.last_hidden_state  # (B, T, H)
        loss = h.new_zeros((), dtype=torch.float32)
        parts = {}
        if kd_weight > 0:
            mix = chunked_kd_loss(h, self.student.get_output_embeddings().weight, batch.kd_mask, kd_config,
                                  labels=batch.labels, topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                                  tail_logmass=batch.tail_logmass, sample_ids=batch.sample_ids,
                                  sample_counts=batch.sample_counts, chunk_tokens=self.chunk_tokens)
            loss = loss + kd_weight * mix
            parts["kd_mix"] = float(mix.detach())
        if need_hidden:
            align = self.projector(out.hidden_states, batch.hidden, batch.kd_mask)
            loss = loss + hidden_weight * align
            parts["hidden"] = float(align.detach())
        return loss, parts


def _lr_factor(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    frac = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _weights(s: TrainSettings, step: int) -> dict[str, float]:
    name, overrides, start = phase_at(s.phases, step)
    out = {"phase": name}
    for key in s.SCHEDULED:
        spec = overrides.get(key, getattr(s, key))
        # Schedules inside a phase count steps from the phase's start.
        out[key] = value_at(spec, step - start if key in overrides else step)
    return out


def open_checked_cache(url: str, split: str, *, verify: bool, require_complete: bool = True, all_splits: bool = False):
    """The cache at `url`, opened for training or eval: refused, naming the shard, when its structure does not match
    the manifest (`split` only, or every split), when `verify` finds a bad checksum or value, or when `split` has
    no shards."""
    from formats.reader import open_cache

    cache = open_cache(url, require_complete=require_complete)
    cache.check_structure(None if all_splits else split)
    if verify:
        from formats.verify import verify_cache

        problems = verify_cache(url)
        if problems:
            raise TrainError(f"{url}: verify found {len(problems)} problem(s), first: {problems[0]}")
    if not cache.shards(split):
        raise TrainError(f"{url}: no shards in split {split!r} (splits: {', '.join(cache.manifest.splits())})")
    return cache


def check_output_rows(model: nn.Module, vocab_size: int, who: str) -> None:
    """The cache's ids index the student's logits: it needs at least `vocab_size` output rows."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise TrainError(f"{who} has {rows} output rows, fewer than the cache's vocabulary ({vocab_size})")


def build_student(s: TrainSettings):
    from student_trainer.student import load_student, student_from_teacher

    if s.student:
        model, tokenizer = load_student(s.student)
        return model, tokenizer, {"student": s.student}
    teacher = s.init_from_teacher
    if teacher == "cache":  # the teacher folder recorded in the cache's manifest
        from formats.reader import open_cache

        teacher = open_cache(s.cache).manifest.teacher.get("path", "")
        if not Path(teacher, "config.json").exists():
            raise TrainError(f"init_from_teacher 'cache': the teacher folder the cache names ({teacher!r}) is not here")
    model, tokenizer, info = student_from_teacher(teacher, s.student_layers, s.student_hidden or None, seed=s.seed)
    return model, tokenizer, info


def train(s: TrainSettings) -> dict:
    """Run the recipe; returns a summary (final loss, steps, tokens, seconds, output folder, trained DistillModel).

    Under torchrun the process group is created here and destroyed at the end, unless the caller created it.
    """
    from formats.tokenizer import tokenizer_info
    from student_trainer.loader import EpochReader, LoaderSettings
    from student_trainer.losses import HiddenProjector, KDConfig, parse_layer_map

    # ---- setup: distributed, device, cache
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
    own_group = False
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            own_group = True
    cache = open_checked_cache(s.cache, s.split, verify=s.verify, require_complete=not s.allow_incomplete,
                               all_splits=True)
    m = cache.manifest
    if s.kd_kind == "rskd" and m.sample_draws == 0:
        raise TrainError(f"{s.cache}: kd_kind rskd needs RS-KD samples; build the cache with --sample-draws")
    if s.kd_kind != "rskd" and m.top_k == 0:
        raise TrainError(f"{s.cache}: kd_kind {s.kd_kind} needs top-k log-probs, and this cache keeps only RS-KD "
                         "samples (top_k 0); use kd_kind rskd")

    # ---- student: same tokenizer as the teacher that made the cache, or any, paired by bytes (uld, byte_align)
    torch.manual_seed(s.seed)
    student, tokenizer, student_info = build_student(s)
    aligner = xtok_aligner(s.kd_kind, m, s.cache, tokenizer, s.teacher_tokenizer) if s.kd_kind in XTOK_KINDS else None
    vocab = len(tokenizer) if aligner else m.vocab_size
    tok = tokenizer_info(tokenizer)
    if aligner is None and tok["fingerprint"] != m.tokenizer["fingerprint"]:
        raise TrainError(f"student tokenizer ({tok['class']}, {tok['vocab_size']} tokens, fingerprint {tok['fingerprint'][:12]}) "
                         f"differs from the cache's ({m.tokenizer.get('vocab_size')} tokens, fingerprint "
                         f"{m.tokenizer['fingerprint'][:12]}); distill into a student with the teacher's tokenizer, or "
                         f"use kd_kind uld or byte_align (a cache built with --byte-offsets)")
    if aligner is not None and s.layer_map:
        raise TrainError(f"layer_map: hidden-state alignment needs the teacher's positions; kd_kind {s.kd_kind} "
                         "trains on the student's own tokens")
    check_output_rows(student, vocab, "student")
    if s.grad_checkpointing:
        student.gradient_checkpointing_enable()
    if s.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TrainError("lora_rank needs the peft package: pip install peft") from None
        student = get_peft_model(student, LoraConfig(r=s.lora_rank, target_modules="all-linear"))
    projector = None
    hidden_layers: list[int] = []
    if s.layer_map:
        available = [int(n.split("/")[1]) for n in m.fields if n.startswith("hidden/")]
        try:
            lmap = parse_layer_map(s.layer_map, student.config.num_hidden_layers, int(m.teacher["num_layers"]), available)
        except ValueError as e:
            raise TrainError(f"layer_map: {e}") from None
        projector = HiddenProjector(lmap, student.config.hidden_size, int(m.teacher["hidden_size"]), s.hidden_metric)
        hidden_layers = sorted(set(lmap.values()))
    model = DistillModel(student, projector, vocab, s.chunk_tokens).to(device)
    if s.compile:
        # In place (Module.compile), so parameter names and checkpoints stay the same; the decoder is what
        # DistillModel calls (the output head runs in the chunked loss, outside the compiled graph).
        model.student.get_decoder().compile()
    ddp = model
    if world > 1:
        # A step whose phase or schedule switches the KD or hidden path off leaves parameters without gradients.
        may_skip = projector is not None or bool(s.phases) or not isinstance(s.kd_weight, (int, float)) or s.kd_weight <= 0
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=may_skip)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)

    # ---- data and resume
    reader = EpochReader(s.cache, s.split, LoaderSettings(batch_size=s.batch_size, shuffle_blocks=s.shuffle_blocks,
                                                          seed=s.seed, num_workers=s.num_workers,
                                                          pin_memory=device.type == "cuda"), rank, world, hidden_layers)
    out = Path(s.out)
    step, epoch, micro = 0, 0, 0
    tokens_seen = 0
    if s.resume:
        from student_trainer.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer)
            loader_state = reader.check_resume(state["loader"])
            step, epoch, micro, tokens_seen = state["step"], loader_state.epoch, loader_state.step, state["tokens"]
    settings_json = {k: v for k, v in dataclasses.asdict(s).items()}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(settings_json, indent=1, default=str))

    # ---- loop
    from contextlib import nullcontext

    from tqdm import tqdm

    from student_trainer.reporting import Reporter

    batches = reader.batches(epoch, micro)
    bar = tqdm(total=s.steps, initial=step, disable=not s.progress or rank != 0, desc="train", unit="step")
    reporter = Reporter(out, s.report_to, step, settings_json, s.run_name, s.wandb_project) if rank == 0 else None
    t0, last = time.perf_counter(), {}
    bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    ddp.train()
    while step < s.steps:
        w = _weights(s, step)
        kd_config = KDConfig(kind=s.kd_kind, alpha=w["alpha"], temperature=w["temperature"],
                             capture_temperature=float(m.build.get("temperature", 1.0)), beta=s.jsd_beta, skew=s.skew,
                             vocab_size=vocab)
        for g in optimizer.param_groups:
            g["lr"] = s.lr * _lr_factor(step, s)
        total, parts_sum = 0.0, {}
        for i in range(s.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                epoch, micro = epoch + 1, 0
                batches = reader.batches(epoch, 0)
                batch = next(batches)
            micro += 1
            batch, counts = aligner.align(batch) if aligner else (batch, None)
            batch = batch.to(device)
            # DDP all-reduces gradients in backward; only the step's last micro-batch needs it.
            sync = nullcontext() if world == 1 or i == s.grad_accum - 1 else ddp.no_sync()
            with sync:
                with autocast:
                    loss, parts = ddp(batch, kd_config, w["kd_weight"], w["hidden_weight"])
                (loss / s.grad_accum).backward()
            if counts is not None:  # share of the student's targets paired with a teacher position
                parts["aligned_fraction"] = counts.aligned / max(1, counts.targets)
            total += float(loss.detach()) / s.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / s.grad_accum
            tokens_seen += batch.num_tokens * world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip) if s.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last = {"step": step, "epoch": epoch, "loss": round(total, 6), **{k: round(v, 6) for k, v in parts_sum.items()},
                "lr": optimizer.param_groups[0]["lr"], "tokens": tokens_seen, "phase": w["phase"],
                "alpha": w["alpha"], "temperature": w["temperature"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "seconds": round(time.perf_counter() - t0, 3)}
        if reporter and (step % s.log_every == 0 or step == s.steps):
            reporter.log(last)
        bar.set_postfix(loss=f"{total:.4f}")
        bar.update(1)
        if rank == 0 and s.checkpoint_every and (step % s.checkpoint_every == 0 or step == s.steps):
            from student_trainer.checkpoint import save_checkpoint

            save_checkpoint(out, step, model, optimizer,
                            {"loader": reader.state(epoch, micro).to_dict(), "tokens": tokens_seen, "settings": settings_json})
    bar.close()
    if reporter:
        reporter.close()

    # ---- final HF folder (loads in transformers and vLLM)
    if rank == 0:
        final = out / "final"
        student_out = model.student
        if s.lora_rank:
            student_out = student_out.merge_and_unload()
        student_out = getattr(student_out, "_orig_mod", student_out)
        student_out.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        (final / "kdcache_student.json").write_text(json.dumps({"cache": s.cache, "student": student_info,
                                                                 "steps": step, "tokens": tokens_seen}, indent=1))
    if own_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"steps": step, "tokens": tokens_seen, "last": last, "seconds": time.perf_counter() - t0, "out": str(out),
            "model": model}
