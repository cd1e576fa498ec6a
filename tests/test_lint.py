"""Lint, format and type check, so that the test suite (and .ci/run through it) runs them.

ruff checks the whole repository with the rules in pyproject.toml; mypy checks the package
(lookahead_optax/, its settings in pyproject.toml). The same commands by hand, from the
repository root: `ruff check`, `ruff format --check`, `mypy`. Both tools come with the test
extra; without them these tests are skipped, saying which is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool: str, *args: str) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (the test extra installs it)")
    command = [sys.executable, "-m", tool, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"`{' '.join([tool, *args])}` failed (exit {result.returncode}):\n"
        f"{result.stdout}{result.stderr}"
    )


def test_ruff_check():
    _run("ruff", "check", "--no-cache", ".")


def test_ruff_format():
    _run("ruff", "format", "--check", "--no-cache", ".")


def test_mypy():
    # The files to check are in pyproject.toml ([tool.mypy] files); the cache, .mypy_cache/,
    # makes a rerun take a second or two instead of ten.
    _run("mypy")
