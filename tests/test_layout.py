"""The library (`simplear/`) never imports the stages or the pipelines: they depend on it, not the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_library_imports_no_stage_and_no_pipeline():
    found = []
    for path in sorted((ROOT / "simplear").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("stages", "pipelines")]
    assert found == []
