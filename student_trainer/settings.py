"""What a training run can be asked to do: `TrainSettings`, each setting defined once (default, help, choices,
bounds). `kdcache train` flags, YAML loading and the checks all come from these fields; the resolved settings
are saved with every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from formats.settings import check, check_value, coerce, setting
from student_trainer.errors import TrainError
from student_trainer.reporting import parse_report_to
from student_trainer.schedule import SCHEDULE_KEYS, check_schedule

# The KD losses by name (student_trainer/losses.py maps each to its function; a test keeps the two equal).
# uld and byte_align train a student with any tokenizer (xtok_losses.py); the others need the teacher's.
KD_KINDS = ("fkl_ghost", "fkl_renorm", "rskd", "rkl", "jsd", "skew_kl", "tvd", "uld", "byte_align")
_TEACHER_TOKENIZER = ("folder holding the teacher's tokenizer (default: the teacher folder the cache names; give it "
                      "when the cache has moved)")


@dataclass
class TrainSettings:
    cache: str = setting("", "cache directory or URL")
    out: str = setting("", "output folder: checkpoints, metrics.jsonl, final/ (a Hugging Face folder)")
    student: str = setting("", "HF folder of the student (or derive one with --student-layers and "
                               "--init-from-teacher)")
    student_layers: int = setting(0, "layers of a student derived from the teacher", min=0)
    student_hidden: int = setting(0, "hidden size of the derived student (0: the teacher's, so weights can be "
                                     "copied)", min=0)
    init_from_teacher: str = setting("", "teacher folder to derive the student from ('cache': the one the cache "
                                         "names)")
    split: str = setting("train", "cache split to train on")
    steps: int = setting(100, "optimizer steps", above=0)
    batch_size: int = setting(8, "sequences per rank per micro-batch", above=0)
    grad_accum: int = setting(1, "micro-batches per optimizer step", above=0)
    lr: float = setting(3e-4, "peak learning rate (AdamW)", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", min=0, below=1, parse=lambda t: tuple(
        float(x) for x in t.split(",")), metavar="B1,B2")
    warmup_steps: int = setting(10, "linear warmup steps (capped at --steps), then cosine decay", min=0)
    min_lr_ratio: float = setting(0.1, "the cosine decay ends at this fraction of --lr", min=0, max=1)
    grad_clip: float = setting(1.0, "max gradient norm (0: off)", min=0)
    kd_kind: str = setting("fkl_ghost", "KD loss", choices=KD_KINDS)
    teacher_tokenizer: str = setting("", "uld, byte_align: " + _TEACHER_TOKENIZER)
    alpha: float | dict = setting(0.0, "weight of CE on the real token, KD gets 1 - alpha (a schedule in YAML)",
                                  min=0, max=1)
    temperature: float | dict = setting(1.0, "KD temperature (a schedule in YAML)", above=0)
    kd_weight: float | dict = setting(1.0, "multiplies the CE/KD mix (a schedule in YAML; phases set it to 0 for "
                                           "feature-only steps)", min=0)
    hidden_weight: float | dict = setting(0.0, "weight of hidden-state alignment (a schedule in YAML)", min=0)
    layer_map: str = setting("", "hidden alignment 'student:teacher,...' (e.g. '2:10,4:20') or 'uniform'; "
                                 "empty: off")
    hidden_metric: str = setting("mse", "hidden alignment distance", choices=("mse", "cosine"))
    jsd_beta: float = setting(0.5, "jsd: mixture weight of the teacher", min=0, max=1)
    skew: float = setting(0.1, "skew_kl: weight of the teacher in the skewed mixture", min=0, below=1)
    phases: list = setting(list, "[{name, steps, <overrides of alpha, temperature, kd_weight, hidden_weight>}]",
                           cli=False)
    chunk_tokens: int = setting(256, "tokens per chunk of the output-head loss (bounds its memory)", above=0)
    shuffle_blocks: int = setting(8, "loader shuffle window, in read blocks", above=0)
    num_workers: int = setting(1, "loader processes (0: read in the training process)", min=0)
    seed: int = setting(0, "data order and initialisation", min=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    precision: str = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU | bf16: bf16 autocast on any "
                                     "device | fp32", choices=("auto", "bf16", "fp32"))
    grad_checkpointing: bool = setting(False, "recompute activations in backward")
    compile: bool = setting(False, "torch.compile the student")
    lora_rank: int = setting(0, "train LoRA adapters of this rank (needs peft) instead of all weights", min=0)
    log_every: int = setting(1, "optimizer steps between lines of metrics.jsonl", above=0)
    report_to: str = setting("", "also log metrics to tensorboard and/or wandb (comma-separated)")
    run_name: str = setting("", "W&B run name (default: the output folder's name)")
    wandb_project: str = setting("kdcache", "W&B project")
    checkpoint_every: int = setting(50, "optimizer steps between checkpoints, and one at the last step (0: none)",
                                    min=0)
    eval_every: int = setting(0, "optimizer steps between evaluations on --eval-split, and one at the last step, "
                                 "logged to metrics.jsonl as eval_ce, eval_kl_to_teacher, ... (0: none)", min=0)
    eval_split: str = setting("heldout", "cache split of those evaluations")
    eval_batches: int = setting(0, "batches of each evaluation (0: the whole split)", min=0)
    resume: bool = setting(False, "continue from the latest checkpoint in --out (an error when there is none)")
    verify: bool = setting(False, "recompute every shard checksum before training")
    allow_incomplete: bool = setting(False, "train on a cache whose build has not finished")
    progress: bool = setting(True, "show a progress bar")

    SCHEDULED = ("alpha", "temperature", "kd_weight", "hidden_weight")

    def validate(self) -> None:
        # Values first (bounds, finite numbers), so a bad value is named even when other settings are missing too.
        fields = {f.name: f for f in dataclasses.fields(self)}
        check(self, TrainError, flags=False)  # a schedule (dict) is checked below, value by value
        for name in self.SCHEDULED:
            check_schedule(name, getattr(self, name))
            _check_schedule_values(name, getattr(self, name), fields[name].metadata)
        if not self.cache or not self.out:
            raise TrainError("--cache and --out are required")
        if bool(self.student) == bool(self.student_layers):
            raise TrainError("give either --student HF_DIR or --student-layers N with --init-from-teacher")
        if self.student_layers and not self.init_from_teacher:
            raise TrainError("--student-layers needs --init-from-teacher TEACHER_DIR")
        parse_report_to(self.report_to)
        for i, phase in enumerate(self.phases):
            if not isinstance(phase, dict) or not isinstance(phase.get("steps"), int) or phase["steps"] <= 0:
                raise TrainError(f"phases[{i}]: needs a positive integer 'steps'")
            unknown = set(phase) - {"name", "steps", *self.SCHEDULED}
            if unknown:
                raise TrainError(f"phases[{i}]: unknown keys {sorted(unknown)}; allowed: name, steps, "
                                 f"{', '.join(self.SCHEDULED)}")
            for name in self.SCHEDULED:
                if name in phase:
                    check_schedule(f"phases[{i}].{name}", phase[name])
                    _check_schedule_values(f"phases[{i}].{name}", phase[name], fields[name].metadata)


def _check_schedule_values(name: str, spec, meta) -> None:
    """Every value a schedule can take (start, end, value, values) obeys the setting's bounds."""
    if not isinstance(spec, dict):
        return
    keys = SCHEDULE_KEYS[spec["kind"]] - {"steps", "boundaries"}
    for key in sorted(keys):
        for v in spec[key] if isinstance(spec[key], list) else [spec[key]]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TrainError(f"schedule {name!r}: {key} must be numbers, got {v!r}")
            check_value(f"schedule {name!r} {key}", float(v), meta, TrainError)


# transformers.TrainingArguments names people type from habit -> ours.
HF_NAMES = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "output_dir": "out",
            "gradient_checkpointing": "grad_checkpointing", "logging_steps": "log_every", "save_steps": "checkpoint_every"}


def load_settings(config_path: str | None, overrides: dict) -> TrainSettings:
    """Defaults <- YAML config <- command-line overrides (None: not given); unknown keys and wrong types are
    errors naming the file and key."""
    values: dict = {}
    if config_path:
        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except OSError as e:
            raise TrainError(f"{config_path}: cannot read config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise TrainError(f"{config_path}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(loaded, dict):
            raise TrainError(f"{config_path}: the config must be a mapping of settings")
        values.update(coerce(TrainSettings, loaded, config_path, HF_NAMES, TrainError))
    values.update(coerce(TrainSettings, {k: v for k, v in overrides.items() if v is not None}, "settings",
                         HF_NAMES, TrainError))
    s = TrainSettings(**values)
    s.validate()
    return s


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The YAML error in one line, with its line and column (a tab in indentation is the common one)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    # PyYAML names a tab as the escaped character: "found character '\\t' that cannot start any token".
    hint = "; indent with spaces, not tabs" if any(t in problem for t in ("\t", "\\t", "tab")) else ""
    return f"{where}{problem}{hint}"



@dataclass
class EvalSettings:
    student: str = setting("", "HF folder of the student", required=True)
    cache: str = setting("", "cache directory or URL", required=True)
    split: str = setting("heldout", "cache split to evaluate on")
    batch_size: int = setting(8, "sequences per batch", above=0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    teacher_tokenizer: str = setting("", "a student with another tokenizer: " + _TEACHER_TOKENIZER)
    json: bool = setting(False, "print the result as JSON only")
    verify: bool = setting(False, "recompute shard checksums before evaluating")

    def validate(self) -> None:
        check(self, TrainError)
