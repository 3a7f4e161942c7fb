"""The import rules docs/architecture.md states: lower layers never import the ones built on them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mcollapse"
FAMILIES = ("base", "qwen2audio", "llava", "ultravox", "prismatic", "causal_lm", "vit", "roles", "decoder",
            "paligemma")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(paths, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


@pytest.mark.parametrize(("files", "forbidden"), [
    ([PACKAGE / "models" / f"{name}.py" for name in FAMILIES],
     ("mcollapse.models.twins", "mcollapse.models.provision")),
    (sorted((PACKAGE / "analysis").glob("*.py")),
     ("mcollapse.models", "mcollapse.data", "mcollapse.extraction", "mcollapse.experiments", "mcollapse.pipeline")),
    (sorted(p for d in ("models", "data", "extraction", "analysis", "pipeline", "report")
            for p in (PACKAGE / d).rglob("*.py")),
     ("mcollapse.experiments",)),
], ids=["families-never-import-twins-or-provisioning", "analysis-is-pure-math", "only-the-cli-reaches-experiments"])
def test_no_layer_imports_one_built_on_it(files, forbidden):
    assert offending(files, forbidden) == {}


def test_the_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from mcollapse.models import twins\n")
    assert "mcollapse.models.twins" in imported_modules(module)
