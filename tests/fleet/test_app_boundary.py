"""fleet is the inventory the migrations build on: it never imports the migrations app."""

from __future__ import annotations

import ast
from pathlib import Path

import fleet


def test_no_fleet_module_imports_migrations_app():
    importers = []
    for path in Path(fleet.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.split(".")[0] == "migrations_app" for name in names):
                importers.append(f"{path}:{node.lineno}")

    assert importers == []
