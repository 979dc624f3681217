"""The package's structural rules (docs/architecture.md), checked on its source.

import-linter checks the layers in CI; these tests check what it cannot:
underscore imports, Celery's private names, key names, script calls and
module size.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_dlock.celery import compat

PACKAGE = Path(__file__).resolve().parents[1] / "celery_dlock"

#: "About 400 lines": no module may pass this.
MAX_LINES = 460

#: Underscore attributes of other libraries that are their public API.
FOREIGN_PUBLIC = {"_replace", "_sock"}

#: Redis key names that only lock/keyspace.py may spell: ``lock:<key>`` and the like.
KEY_NAME = re.compile(r"(?<![A-Za-z_])(lock|queue|parked|released|fence|stats|queues|history|done):(?! )")


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE.parent)), ast.parse(path.read_text(), filename=str(path))


def code_strings(tree: ast.Module) -> Iterator[ast.AST]:
    """String constants and f-strings that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in docstrings:
            yield node


def test_no_module_imports_another_modules_underscore_names() -> None:
    found = [
        f"{name}:{node.lineno} imports {alias.name} from {node.module}"
        for name, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not found, "\n".join(found)


def test_celery_private_names_are_used_only_in_compat() -> None:
    private = {attribute for _, attribute, _ in compat.PRIVATE_NAMES}
    found = []
    for name, tree in modules():
        if name.endswith("celery/compat.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("celery._"):
                found.append(f"{name}:{node.lineno} imports from {node.module}")
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in ("self", "cls"):
                if node.attr in private:
                    found.append(f"{name}:{node.lineno} uses Celery's {node.attr}")
            elif node.attr not in FOREIGN_PUBLIC:
                found.append(f"{name}:{node.lineno} reaches into {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_only_the_keyspace_spells_redis_key_names() -> None:
    found = []
    for name, tree in modules():
        if name.endswith("lock/keyspace.py"):
            continue
        for node in code_strings(tree):
            text = node.value if isinstance(node, ast.Constant) else ast.unparse(node)
            if isinstance(text, str) and KEY_NAME.search(text):
                found.append(f"{name}:{node.lineno} {text!r}")
    assert not found, "\n".join(found)


def test_scripts_are_called_only_through_their_wrappers() -> None:
    found = [
        f"{name}:{node.lineno}"
        for name, tree in modules()
        if not name.endswith("lock/script.py")
        for node in code_strings(tree)
        if isinstance(node, ast.Constant) and node.value in ("EVALSHA", "EVAL")
    ]
    assert not found, "\n".join(found)


def test_no_module_is_long() -> None:
    long = {
        name: lines
        for name, lines in ((str(path), len(path.read_text().splitlines())) for path in PACKAGE.rglob("*.py"))
        if lines > MAX_LINES
    }
    assert not long, long


def test_every_module_says_what_it_owns() -> None:
    missing = [name for name, tree in modules() if not ast.get_docstring(tree)]
    assert not missing, missing


@pytest.mark.parametrize(("owner", "attribute", "need"), compat.PRIVATE_NAMES)
def test_every_private_celery_name_exists_in_this_celery(owner: str, attribute: str, need: str) -> None:
    """Run on every Celery version CI installs: a rename breaks this test, not a worker."""
    module_name, _, class_name = owner.rpartition(".")
    try:
        module = importlib.import_module(owner)
        target: object = module
    except ModuleNotFoundError:
        target = getattr(importlib.import_module(module_name), class_name)
    present = hasattr(target, attribute) or attribute in getattr(target, "__annotations__", {})
    if not present and isinstance(target, type):
        # Instance attributes set in __init__ or as class-level defaults.
        present = any(attribute in vars(klass) for klass in target.__mro__) or _assigned_in_init(target, attribute)
    assert present or need == "optional", f"{owner}.{attribute} is gone from this Celery"


def _assigned_in_init(klass: type, attribute: str) -> bool:
    for base in klass.__mro__:
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if f"self.{attribute} =" in source:
            return True
    return False
