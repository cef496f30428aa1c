"""Where training metrics go: metrics.jsonl always; TensorBoard and Weights & Biases when asked for.

Each sink takes the same flat dict per logged step. On resume every sink continues the same run without
duplicates: metrics.jsonl drops lines after the checkpoint's step, TensorBoard purges events after it
(`purge_step`), W&B reopens the run id stored in the output folder.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from formats.errors import KdError

SINKS = ("tensorboard", "wandb")


class ReportError(KdError):
    """A metrics sink that was asked for but cannot be used."""


def parse_report_to(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ReportError(f"report_to: unknown sink {unknown[0]!r}; choose from {', '.join(SINKS)} (comma-separated)")
    return names


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class Reporter:
    """Writes one record per logged step to every sink; `close()` flushes them."""

    def __init__(self, out: Path, report_to: str, step: int, config: dict, run_name: str = "", project: str = "kdcache"):
        self.sinks = parse_report_to(report_to)
        self.jsonl = _open_jsonl(out / "metrics.jsonl", step)
        self.tb = self.wandb_run = None
        if "tensorboard" in self.sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ReportError("report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
            # purge_step: events a killed run wrote after its last checkpoint are hidden when it resumes.
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
        if "wandb" in self.sinks:
            try:
                import wandb
            except ImportError:
                raise ReportError("report_to wandb needs the wandb package: pip install wandb") from None
            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if step and id_file.exists() else uuid.uuid4().hex[:12]
            self.wandb_run = wandb.init(project=project, name=run_name or out.name, id=run_id, resume="allow",
                                        dir=str(out), config=config)
            id_file.write_text(run_id)

    def log(self, metrics: dict) -> None:
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        step = int(metrics["step"])
        values = _numbers(metrics)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _open_jsonl(path: Path, step: int):
    """metrics.jsonl for appending, keeping only lines up to `step`: a resumed run redoes the steps after its
    checkpoint (and a kill may have cut the last line short); a fresh run (step 0) starts empty."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    path.write_text("".join(kept))
    return open(path, "a")
