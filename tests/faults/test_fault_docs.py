"""docs/guarantees.md names the tests that back its claims: they must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults]

TESTS = Path(__file__).resolve().parent.parent
GUARANTEES = TESTS.parent / "docs" / "guarantees.md"


def test_functions() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        found[path.relative_to(TESTS.parent).as_posix()] = names
    return found


test_functions.__test__ = False  # type: ignore[attr-defined]


def test_every_test_the_guarantees_page_names_exists() -> None:
    text = GUARANTEES.read_text()
    functions = test_functions()
    every = set().union(*functions.values())
    qualified = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", text)
    assert qualified, "the page names no test"
    for path, name in qualified:
        assert name in functions.get(path, set()), f"{path}::{name} is named in guarantees.md but does not exist"
    for name in re.findall(r"`(test_\w+)`", text):
        assert name in every, f"{name} is named in guarantees.md but no test has that name"
