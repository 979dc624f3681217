"""Where the test suite lives, and the import path of the processes it starts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_DIR", "TESTS_DIR", "import_path"]

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = TESTS_DIR.parent


def import_path(app_dir: Path) -> list[str]:
    """``PYTHONPATH`` entries for a subprocess running an app module of ``app_dir``.

    The app's own directory (``-A worker_app``), ``tests/`` (for
    :mod:`support`) and the repository (for a checkout that is not installed).
    """
    return [os.fspath(app_dir), os.fspath(TESTS_DIR), os.fspath(REPO_DIR)]
