"""The README and docs/ cite only tests that exist."""

import ast
import re

from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def defined_tests(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_cited_test_exists():
    defined = {path.name: defined_tests(path) for path in (REPO / "tests").glob("test_*.py")}
    everywhere = set().union(*defined.values())
    missing = []
    for document in DOCUMENTS:
        text = document.read_text()
        for file, name in re.findall(r"tests/(test_\w+\.py)::(\w+)", text):
            if name not in defined.get(file, set()):
                missing.append(f"{document.name}: tests/{file}::{name}")
        for file in re.findall(r"tests/(test_\w+\.py)", text):
            if file not in defined:
                missing.append(f"{document.name}: tests/{file}")
        for name in re.findall(r"`(test_\w+)`", text):
            if name not in everywhere:
                missing.append(f"{document.name}: {name}")
    assert not missing, missing
    assert len(DOCUMENTS) >= 3
