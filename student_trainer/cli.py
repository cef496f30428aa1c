"""Subcommands of the trainer: `kdcache train` and `kdcache eval` (heavy imports stay in the handlers)."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a student from a cache (no teacher in memory)")
    p.add_argument("--config", help="YAML file of training settings (see student_trainer/train.py TrainSettings)")
    p.add_argument("--cache", help="cache directory or URL")
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--student", help="HF folder of the student")
    p.add_argument("--student-layers", type=int, help="derive a student with this many layers from the teacher")
    p.add_argument("--student-hidden", type=int, help="hidden size of the derived student (default: the teacher's)")
    p.add_argument("--init-from-teacher", help="teacher folder to derive the student from ('cache': the one the cache names)")
    p.add_argument("--split", help="cache split to train on (default train)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--kd-kind", help="fkl_ghost | fkl_renorm | rskd | rkl | jsd | skew_kl | tvd")
    p.add_argument("--alpha", type=float, help="CE weight (KD gets 1 - alpha)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--layer-map", help="hidden alignment 'student:teacher,...' or 'uniform'")
    p.add_argument("--hidden-weight", type=float)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--precision", help="auto (bf16 autocast on GPU) | bf16 | fp32")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute activations in backward")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the student")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (needs peft) instead of all weights")
    p.add_argument("--report-to", help="also log metrics to tensorboard and/or wandb (comma-separated)")
    p.add_argument("--run-name", help="W&B run name")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint in --out")
    p.add_argument("--verify", action="store_true", default=None, help="recompute shard checksums before training")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="compare a student with the cached teacher on a split")
    p.add_argument("--student", required=True, help="HF folder of the student")
    p.add_argument("--cache", required=True)
    p.add_argument("--split", default="heldout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--verify", action="store_true", help="recompute shard checksums before evaluating")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="cache the embedded teacher over real text, distill a student, compare with CE only")
    p.add_argument("--out", default="demo_out", help="folder for the corpus, cache, students and report")
    p.add_argument("--quick", action="store_true", help="a ~2-minute version (used in tests)")
    p.add_argument("--corpus", help="your own corpus instead of the standard library's sources")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"), help="teacher runtime for the cache")
    p.set_defaults(func=cmd_demo)


TRAIN_KEYS = ("cache", "out", "split", "student", "student_layers", "student_hidden", "init_from_teacher", "steps", "batch_size",
              "grad_accum", "lr", "kd_kind", "alpha", "temperature", "layer_map", "hidden_weight", "num_workers", "seed",
              "device", "checkpoint_every", "precision", "grad_checkpointing", "compile", "lora_rank", "report_to", "run_name",
              "resume", "verify", "progress")


def cmd_train(args: argparse.Namespace) -> int:
    from student_trainer.train import load_settings, train

    settings = load_settings(args.config, {k: getattr(args, k) for k in TRAIN_KEYS})
    summary = train(settings)
    print(f"kdcache train: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.1f} s, "
          f"last loss {summary['last'].get('loss')} -> {summary['out']}/final")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from student_trainer.evaluate import evaluate, format_table

    result = evaluate(args.student, args.cache, args.split, args.batch_size, args.device, verify=args.verify)
    if not args.json:
        print(format_table({args.student: result}))
    print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from student_trainer.demo import run_demo

    run_demo(args.out, quick=args.quick, corpus=args.corpus, backend=args.backend)
    return 0
