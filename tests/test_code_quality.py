"""The code stays lint-clean (ruff) and type-clean (mypy), as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_actors_and_the_domain_are_strictly_typed() -> None:
    # --follow-imports=silent: the strict rules for these packages, not for what they import
    result = run("mypy", "--strict", "--follow-imports=silent", "app/actors", "app/events")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_storage_and_the_views_are_strictly_typed() -> None:
    # --follow-imports=silent: the strict rules for these packages, not for what they import
    result = run("mypy", "--strict", "--follow-imports=silent", "app/storage", "app/projections")
    assert result.returncode == 0, result.stdout + result.stderr
