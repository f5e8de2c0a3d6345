"""The package's shape: the floors hold (the import contracts of pyproject.toml, run by `make lint`), every stage
module keeps the stage contract, and no function outgrows a screen."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LONGEST = 60  # lines, docstring included (conventions: "functions under ~60")


def test_no_function_of_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted((ROOT / "posttrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LONGEST:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions: " + "; ".join(long)


def test_every_registered_stage_has_the_stage_contract():
    from posttrain import registry
    from posttrain.runner import stage_module

    files = {p.stem for p in (ROOT / "posttrain" / "stages").glob("*.py")} - {"__init__"}
    assert files == set(registry.NAMES)  # one registry, one module per stage
    for name in registry.NAMES:
        module = stage_module(name)
        assert list(inspect.signature(module.main).parameters) == ["recipe", "parents"], name
        assert callable(module.parents) and callable(module.stage_config), name


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout
