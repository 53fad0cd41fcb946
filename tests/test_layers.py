"""The layers hold: the core (config, model, adapter format, images, io) at the bottom; `data` and `inference` above
it and independent of each other; `train` and `eval` on top, `eval` never importing `train`; the CLI over all.
Static tools cannot follow pyproject's package-dir mapping (train/ is qwen_image_lora.train), so this walks every
import statement, deferred ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qwen_image_lora"
FOLDERS = {"data": "data", "inference": "inference", "train": "train", "eval": "eval"}
# layer -> the layers it must not import (a CLI module is the top of its layer: it may wire in what it runs)
FORBIDDEN = {
    "core": {"data", "inference", "train", "eval"},
    "data": {"inference", "train", "eval"},
    "inference": {"data", "train", "eval"},
    "eval": {"train"},
    "train": set(),
}
# The core's command line wires the whole toolkit together.
CLI_MODULES = {ROOT / PACKAGE / "cli.py"}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "core"


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base == PACKAGE else base) for alias in node.names]
    return found


def _modules(root: Path):
    for layer, folder in [("core", PACKAGE), *FOLDERS.items()]:
        for path in sorted((root / folder).glob("*.py")):
            name = f"{PACKAGE}.{path.stem}" if layer == "core" else f"{PACKAGE}.{layer}.{path.stem}"
            yield layer, path, name


def upward_imports(root: Path = ROOT) -> list[str]:
    problems = []
    for layer, path, name in _modules(root):
        if path in CLI_MODULES:
            continue
        for line, target in _imports(path, name):
            if _layer_of(target) in FORBIDDEN[layer]:
                problems.append(f"{path.relative_to(root)}:{line} ({layer}) imports {target}")
    return problems


def test_no_layer_imports_one_above_or_beside_it():
    assert upward_imports() == []


@pytest.mark.parametrize(
    "folder, statement",
    [
        ("data", "from qwen_image_lora.inference.generator import Generator"),
        ("inference", "from qwen_image_lora.train import adapter"),
        ("eval", "from qwen_image_lora.train.checkpoint import Checkpointer"),
        ("qwen_image_lora", "from .data import sources"),
    ],
)
def test_a_planted_upward_import_is_caught(tmp_path, folder, statement):
    for name in (PACKAGE, *FOLDERS.values()):
        (tmp_path / name).mkdir()
    planted = tmp_path / folder / "planted.py"
    planted.write_text(f"def f():\n    {statement}\n")  # deferred inside a function: still an import
    (problem,) = upward_imports(tmp_path)
    assert problem.startswith(f"{folder}/planted.py:2 ")
