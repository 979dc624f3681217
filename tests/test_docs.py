"""The documentation checked against the code, so the two cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from celery_dlock.celery.options import SingleFlightOptions
from celery_dlock.celery.settings import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under ``heading``, keyed by their first cell."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= {"-"} and cells[0] not in ("setting", "option"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_setting_is_documented_with_its_type_and_default() -> None:
    documented = table((DOCS / "configuration.md").read_text(), "App settings")
    names = Settings.names()
    assert sorted(documented) == sorted(names)
    for field in fields(Settings):
        kind, default, meaning = documented[Settings.PREFIX + field.name]
        assert meaning, field.name
        if field.name == "redis_url":
            assert field.default == ()  # derived from the broker or backend, never a default address
            assert "never guessed" in default
            continue
        assert default == f"`{field.default!r}`".replace("'", '"'), field.name
        if field.default is not None:
            assert kind == type(field.default).__name__, field.name


def test_every_task_option_is_documented() -> None:
    documented = table((DOCS / "configuration.md").read_text(), "Per-task options")
    assert sorted(documented) == sorted(field.name for field in fields(SingleFlightOptions))
    for field in fields(SingleFlightOptions):
        _, setting, meaning = documented[field.name]
        assert meaning
        if setting != "–":
            own_name = f"default_{field.name}" if field.name in ("ttl", "limit") else field.name
            assert setting.strip("`") == Settings.PREFIX + own_name, field.name
        assert field.default is None or field.default is MISSING


def test_readme_settings_table_matches_the_reference() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(dlock_\w+)`", section, re.MULTILINE)) == set(Settings.names())


def test_every_public_name_is_exported_with_a_docstring() -> None:
    import celery_dlock

    for name in celery_dlock.__all__:
        value = getattr(celery_dlock, name)
        assert (value.__doc__ or "").strip(), f"celery_dlock.{name} has no docstring"
