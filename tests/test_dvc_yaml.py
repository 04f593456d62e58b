"""dvc.yaml stays in step with the code: deps list every project module a stage imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from stages.config import parse_params

REPO = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
PROJECT_PACKAGES = ("stages", "deploy", "tools")


def _project_imports(path: Path, seen: set[Path]) -> set[Path]:
    """Return ``path`` and every project module it imports, directly or not (function-level imports too)."""
    if path in seen:
        return seen
    seen.add(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] not in PROJECT_PACKAGES:
                continue
            module = REPO.joinpath(*name.split(".")).with_suffix(".py")
            if module.is_file() and module.name != "__init__.py":
                _project_imports(module, seen)
    return seen


def _dep_paths(stage: dict) -> set[str]:
    return {dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_imports(name: str) -> None:
    stage = STAGES[name]
    match = re.search(r"python -m ([\w.]+)", stage["cmd"])
    assert match, f"stage {name}: cmd {stage['cmd']!r} does not run a module"
    entry = REPO.joinpath(*match.group(1).split(".")).with_suffix(".py")

    modules = {str(path.relative_to(REPO)) for path in _project_imports(entry, set())}
    missing = sorted(modules - _dep_paths(stage))
    assert missing == [], f"stage {name} imports {missing} but dvc.yaml does not list them as deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_exist(name: str) -> None:
    known = parse_params({})
    for key in STAGES[name].get("params", []):
        section, field = key.split(".")
        assert hasattr(getattr(known, section), field), f"stage {name} declares unknown param {key}"
