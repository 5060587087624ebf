"""Run the conformance suite in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = [sys.executable, "-m", "pytest", "suites", "-p", "no:cacheprovider"]


def run_suite(
    *arguments: str, python_path: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `pytest suites` with `arguments` from the repository root.

    `python_path`, when given, becomes PYTHONPATH, so that adapter modules written
    by a test import. `env` adds environment variables.
    """
    environment = dict(os.environ, **(env or {}))
    if python_path is not None:
        environment["PYTHONPATH"] = str(python_path)
    return subprocess.run(
        [*SUITE, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
