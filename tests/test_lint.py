"""The tree passes ruff, and the package mypy, with the settings in pyproject.toml (scripts/test
runs them like any test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=TOP,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing():
    """The files and settings are [tool.mypy]'s; its cache (.mypy_cache) makes a run after small changes fast."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=TOP, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
