"""`kdcache train`: distill a student from a cache, no teacher in memory. Read top to bottom:
settings -> setup (cache, student, loss, optimizer, loader, resume) -> loop -> final HF folder.

One process trains on one device; under torchrun each rank trains its share of every batch (DDP).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from formats.errors import CacheError
from formats.overlap import check_no_overlap
from formats.reader import open_cache
from formats.teacher_identity import find_teacher
from formats.tokenizer import tokenizer_info
from student_trainer.batch import Batch
from student_trainer.cache_check import check_output_rows, check_split, open_checked_cache
from student_trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from student_trainer.errors import TrainError, TrainInterrupted
from student_trainer.evaluate import evaluate_model
from student_trainer.head_loss import chunked_kd_loss
from student_trainer.hidden_align import HiddenProjector, parse_layer_map
from student_trainer.kd_mix import KDConfig
from student_trainer.loader import EpochReader, LoaderSettings
from student_trainer.reporting import Reporter
from student_trainer.run_folder import check_run_folder, claim_run_folder
from student_trainer.schedule import lr_factor, scheduled_values
from student_trainer.settings import TrainSettings
from student_trainer.student import load_student, resolve_device, save_student, student_from_teacher
from student_trainer.xtok_align import XTOK_KINDS, xtok_aligner


class DistillModel(nn.Module):
    """Student + hidden projector, with the whole loss in forward so DDP sees one module."""

    def __init__(self, student: nn.Module, projector: nn.Module | None, vocab: int, chunk_tokens: int):
        super().__init__()
        self.student = student
        self.projector = projector
        self.vocab = vocab
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: Batch, kd_config: KDConfig, kd_weight: float,
                hidden_weight: float) -> tuple[torch.Tensor, dict]:
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


def build_student(s: TrainSettings):
    """(model, tokenizer, info): the student folder, or one derived from the teacher (the cache's, with 'cache')."""
    if s.student:
        model, tokenizer = load_student(s.student)
        return model, tokenizer, {"student": s.student}
    teacher = s.init_from_teacher
    if teacher == "cache":  # the cache's teacher, found by its fingerprint (the builder's folder need not exist here)
        try:
            teacher = str(find_teacher(open_cache(s.cache).manifest.teacher))
        except CacheError as e:
            raise TrainError(f"init_from_teacher 'cache': {e}") from None
    model, tokenizer, info = student_from_teacher(teacher, s.student_layers, s.student_hidden or None, seed=s.seed)
    return model, tokenizer, info


def train(s: TrainSettings) -> dict:
    """Run the recipe; returns a summary (final loss, steps, tokens, seconds, output folder, trained DistillModel).

    Under torchrun the process group is created here and destroyed at the end, unless the caller created it.
    Ctrl-C stops the loader workers and raises TrainInterrupted, which says where the run stopped.
    """
    # ---- setup: distributed, device, output folder (checked only: it is claimed once the inputs are), cache
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(s.out)
    teacher = "" if s.init_from_teacher == "cache" else s.init_from_teacher  # 'cache': found later, by fingerprint
    check_no_overlap("--out", s.out, {"--cache": [s.cache], "--student": [s.student], "--init-from-teacher": [teacher],
                                      "--teacher-tokenizer": [s.teacher_tokenizer]}, TrainError)
    check_run_folder(out, s.resume, probe_lock=rank == 0)
    device = resolve_device(s.device)
    own_group = False
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            own_group = True
    cache = open_checked_cache(s.cache, s.split, verify=s.verify, require_complete=not s.allow_incomplete,
                               all_splits=True)
    if s.eval_every:
        check_split(cache, s.eval_split, "evaluate")
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

    # ---- output folder (locked for this run), data and resume
    run = claim_run_folder(out, s.resume) if rank == 0 else None
    step, checkpointed, batches, reporter = 0, 0, None, None
    try:
        reader = EpochReader(s.cache, s.split, LoaderSettings(batch_size=s.batch_size, shuffle_blocks=s.shuffle_blocks,
                                                              seed=s.seed, num_workers=s.num_workers,
                                                              pin_memory=device.type == "cuda"), rank, world,
                             hidden_layers)
        epoch, micro, tokens_seen = 0, 0, 0
        if s.resume:
            state = load_checkpoint(latest_checkpoint(out), model, optimizer)  # there is one: checked at the start
            loader_state = reader.check_resume(state["loader"])
            step, epoch, micro, tokens_seen = state["step"], loader_state.epoch, loader_state.step, state["tokens"]
            checkpointed = step
        settings_json = {k: v for k, v in dataclasses.asdict(s).items()}
        if rank == 0:
            (out / "settings.json").write_text(json.dumps(settings_json, indent=1, default=str))

        # ---- loop
        batches = reader.batches(epoch, micro)
        bar = tqdm(total=s.steps, initial=step, disable=not s.progress or rank != 0, desc="train", unit="step")
        reporter = Reporter(out, s.report_to, step, settings_json, s.run_name, s.wandb_project) if rank == 0 else None
        t0, last, tokens_at_start = time.perf_counter(), {}, tokens_seen
        bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        schedules = {key: getattr(s, key) for key in s.SCHEDULED}
        ddp.train()
        while step < s.steps:
            w = scheduled_values(schedules, s.phases, step)
            kd_config = KDConfig(kind=s.kd_kind, alpha=w["alpha"], temperature=w["temperature"],
                                 capture_temperature=float(m.build.get("temperature", 1.0)), beta=s.jsd_beta,
                                 skew=s.skew, vocab_size=vocab)
            for g in optimizer.param_groups:
                g["lr"] = s.lr * lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio)
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
            last = {"step": step, "epoch": epoch, "loss": round(total, 6),
                    **{k: round(v, 6) for k, v in parts_sum.items()}, "lr": optimizer.param_groups[0]["lr"],
                    "tokens": tokens_seen, "phase": w["phase"], "alpha": w["alpha"], "temperature": w["temperature"],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "seconds": round(time.perf_counter() - t0, 3)}
            evaluated = rank == 0 and s.eval_every and (step % s.eval_every == 0 or step == s.steps)
            if evaluated:
                result = evaluate_model(model.student, tokenizer, s.cache, s.eval_split, m, s.batch_size,
                                        s.eval_batches, aligner)
                last.update({f"eval_{k}": v for k, v in result.items() if k != "split"})
            if reporter and (step % s.log_every == 0 or step == s.steps or evaluated):
                reporter.log(last)
            # tok/s: every rank's tokens this run (a resumed run's earlier tokens not counted) over its wall time.
            tok_s = (tokens_seen - tokens_at_start) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if rank == 0 and s.checkpoint_every and (step % s.checkpoint_every == 0 or step == s.steps):
                save_checkpoint(out, step, model, optimizer, {"loader": reader.state(epoch, micro).to_dict(),
                                                              "tokens": tokens_seen, "settings": settings_json})
                checkpointed = step
        bar.close()

        # ---- final HF folder (loads in transformers and vLLM)
        if rank == 0:
            student_out = model.student
            if s.lora_rank:
                student_out = student_out.merge_and_unload()
            student_out = getattr(student_out, "_orig_mod", student_out)
            save_student(out / "final", student_out, tokenizer, {"cache": s.cache, "student": student_info,
                                                                 "steps": step, "tokens": tokens_seen})
    except KeyboardInterrupt:
        resume = f"the last checkpoint is step {checkpointed}: --resume continues from it" if checkpointed else \
            "no checkpoint was written yet"
        raise TrainInterrupted(f"at step {step} of {s.steps} ({resume})") from None
    finally:
        if batches is not None:
            batches.close()  # stops the loader workers now, not when the interpreter exits
        if reporter is not None:
            reporter.close()  # flushes every sink, an interrupted run's too
        if run is not None:
            run.release()
    if own_group:
        dist.destroy_process_group()
    return {"steps": step, "tokens": tokens_seen, "last": last, "seconds": time.perf_counter() - t0, "out": str(out),
            "model": model}
