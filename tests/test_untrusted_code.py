"""A cache, teacher or student from someone else runs none of their code (issue #7, Untrusted caches).

The source of every package is scanned (as syntax trees, so comments and strings do not count): no pickle (or
its relatives) is imported, `torch.load` is only called with weights_only=True, numpy never unpickles, and every
Hugging Face `from_pretrained` passes trust_remote_code explicitly and never as a literal True. Then the defaults
are checked, and a folder shipping code behind `auto_map` is refused by the builder and the student loader
without that code running.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "cache_builder", "student_trainer")
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def sources() -> list[tuple[str, ast.AST]]:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) >= 30
    return [(str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p))) for p in files]


def _name(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'from_pretrained' for X.from_pretrained(...)."""
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_module_imports_pickle_or_a_relative_of_it():
    offenders = []
    for path, tree in sources():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path}:{node.lineno} imports {n}" for n in names if n in UNPICKLERS]
    assert offenders == []


def test_torch_load_only_with_weights_only_and_numpy_never_unpickles():
    offenders = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name.endswith("torch.load") and not _is_true(_keyword(node, "weights_only")):
                offenders.append(f"{path}:{node.lineno}: {name} without weights_only=True")
            if _keyword(node, "allow_pickle") is not None and not (
                    isinstance(_keyword(node, "allow_pickle"), ast.Constant) and _keyword(node, "allow_pickle").value is False):
                offenders.append(f"{path}:{node.lineno}: {name} with allow_pickle")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):  # the builtins, not Module.eval()
                offenders.append(f"{path}:{node.lineno}: {name}()")
    assert offenders == []


def test_every_from_pretrained_passes_trust_remote_code_and_never_a_literal_true():
    calls, offenders = 0, []
    for path, tree in sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            value = _keyword(node, "trust_remote_code")  # any call: from_pretrained, vLLM's engine arguments, ...
            if _is_true(value):
                offenders.append(f"{path}:{node.lineno}: {_name(node.func)} with trust_remote_code=True")
            if _name(node.func).endswith("from_pretrained"):
                calls += 1
                if value is None:  # transformers' own default asks on a terminal; we refuse instead
                    offenders.append(f"{path}:{node.lineno}: {_name(node.func)} leaves trust_remote_code to the library")
    assert calls >= 8, "the scan found too few model loads; has the code moved?"
    assert offenders == []


def test_trust_remote_code_is_off_unless_asked_for():
    from cache_builder.settings import BuildSettings
    from formats.settings import given
    from kdcache.cli import build_parser

    def settings(*extra: str) -> BuildSettings:
        args = build_parser().parse_args(["build", "--teacher", "t", "--corpus", "c", "--out", "o", *extra])
        return BuildSettings(**given(args, BuildSettings))

    assert BuildSettings(teacher="t", corpus=["c"], out="o").trust_remote_code is False
    assert settings().trust_remote_code is False
    assert settings("--trust-remote-code").trust_remote_code is True
    train = build_parser().parse_args(["train", "--cache", "c", "--out", "o"])
    assert not any("remote" in k for k in vars(train)), "train has no way to run a student's code"


@pytest.fixture
def folder_with_code(tmp_path) -> Path:
    """A model folder whose config names an unknown model type whose code ships in the folder; running that code
    (importing it) would leave a file EXECUTED beside it. Tokenizer files are the real SmolLM2 ones."""
    from cache_builder.default_teacher import default_teacher_dir

    folder = tmp_path / "model-with-code"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_teacher_dir() / name).exists():
            shutil.copy(default_teacher_dir() / name, folder / name)
    code = "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('ran')\n"
    (folder / "modeling_evil.py").write_text(code + "from transformers import LlamaConfig as EvilConfig\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "kdcache_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (folder / "model.safetensors").write_bytes(b"")  # the builder's folder check looks for a weight file first
    return folder


def test_a_student_folder_shipping_code_is_refused_without_running_it(folder_with_code):
    from student_trainer.student import StudentError, load_student, student_from_teacher

    with pytest.raises(StudentError, match="custom code"):
        load_student(str(folder_with_code))
    with pytest.raises(StudentError, match="custom code"):
        student_from_teacher(str(folder_with_code), 1)
    assert not (folder_with_code / "EXECUTED").exists()


def test_a_teacher_folder_shipping_code_is_refused_by_the_builder_without_running_it(folder_with_code, tmp_path):
    from cache_builder.build import run_build
    from cache_builder.errors import BuildError
    from cache_builder.settings import BuildSettings

    corpus = tmp_path / "doc.txt"
    corpus.write_text("some text to cache")
    with pytest.raises(BuildError, match="custom code"):
        run_build(BuildSettings(teacher=str(folder_with_code), corpus=[str(corpus)], out=str(tmp_path / "out"),
                                progress=False))
    assert not (folder_with_code / "EXECUTED").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
