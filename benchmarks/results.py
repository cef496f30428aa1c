"""Updating one section of benchmarks/RESULTS.md while keeping the others."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure here comes from the command shown beside it, run on the machine named.\n"


def processor() -> str:
    """The CPU's model name as `lscpu` gives it, and how many cores this process may use."""
    name = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{len(os.sched_getaffinity(0))}-core {name}"


def update_results(section: str, body: str) -> None:
    """Replace the `## section` block of RESULTS.md with `body` (dated), or append it."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    block = f"## {section}\n\n_Measured {stamp}._\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")
