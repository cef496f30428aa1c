"""Updating one section of benchmarks/RESULTS.md while keeping the others, and naming the machine a figure came from."""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure here comes from the command shown beside it, run on the machine named.\n"


def update_results(section: str, body: str) -> None:
    """Replace the `## section` block of RESULTS.md with `body` (dated), or append it."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    block = f"## {section}\n\n_Measured {stamp}._\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")


def update_subsection(section: str, body: str) -> None:
    """Replace, in `## section`, the `### ...` subsection whose heading is `body`'s first line (one per machine and
    setting), keeping the section's other subsections; the section's date is today's."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    found = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", old, re.S | re.M)
    heading = body.splitlines()[0]
    kept = []
    if found:
        for sub in re.split(r"^(?=### )", found.group(1), flags=re.M)[1:]:
            if sub.splitlines()[0] != heading:
                kept.append(sub.strip() + "\n")
    update_results(section, "\n".join(kept + [body.strip() + "\n"]))


def processor() -> str:
    """The CPU (lscpu's model name), the cores this process may use and the CPU's bf16 units, and the GPU if a
    benchmark that loaded torch sees one."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    cpu = f"{len(os.sched_getaffinity(0))}-core {model}" + (f" with {', '.join(units)}" if units else "")
    torch = sys.modules.get("torch")  # not imported here: the benchmarks without torch stay fast to start
    if torch is not None and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}; {cpu}"
    return cpu
