"""README's option tables are the settings dataclasses, rendered: a flag, default or help changed in code and not
in README (or the other way round) fails here. Regenerate them with `python -m tests.test_readme`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cache_builder.settings import BuildSettings, VllmOptions
from formats.settings import markdown_options
from kdcache.cli import build_parser
from student_trainer.settings import TrainSettings

README = Path(__file__).parents[1] / "README.md"
TABLES = {"build": (BuildSettings, ""), "build-vllm": (VllmOptions, "vllm"), "train": (TrainSettings, "")}
BLOCK = re.compile(r"<!-- options: (?P<name>[\w-]+) -->\n(?P<table>.*?)\n<!-- /options -->", re.S)


def rendered(text: str) -> str:
    return BLOCK.sub(lambda m: f"<!-- options: {m['name']} -->\n{markdown_options(*TABLES[m['name']])}\n"
                               "<!-- /options -->", text)


def test_readme_option_tables_are_the_settings_as_defined_in_code():
    text = README.read_text(encoding="utf-8")
    assert sorted(m["name"] for m in BLOCK.finditer(text)) == sorted(TABLES), "an option table is missing"
    for m in BLOCK.finditer(text):
        assert m["table"] == markdown_options(*TABLES[m["name"]]), (
            f"README's {m['name']} options differ from the code: run `python -m tests.test_readme`")


def test_every_flag_the_readme_mentions_exists():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {opt for sub in commands.values() for action in sub._actions for opt in action.option_strings}
    others = {"--nproc_per_node", "--vllm-"}  # torchrun's own flag; `--vllm-*` names the group
    # Slurm's and Ray's own commands (the section on building at scale) have flags of their own.
    text = re.sub(r"(#SBATCH|sbatch|srun|ray start)[^`\n]*", "", README.read_text(encoding="utf-8"))
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text))
    assert sorted(mentioned - flags - others) == [], "README mentions flags no command has"


if __name__ == "__main__":
    README.write_text(rendered(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{README}: option tables regenerated")
