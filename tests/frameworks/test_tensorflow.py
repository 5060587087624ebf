"""Checks of the TensorFlow adapter that run before it imports TensorFlow.

The adapter checks KERAS_BACKEND before importing Keras or TensorFlow, so these
tests need neither installed. Each runs in a subprocess because the check happens
once, at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_adapter(keras_backend: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "KERAS_BACKEND": keras_backend}
    return subprocess.run(
        [sys.executable, "-c", "import adapters.tensorflow"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_other_keras_backend_rejected():
    completed = import_adapter("jax")

    assert completed.returncode != 0
    assert "ImportError" in completed.stderr
    assert "KERAS_BACKEND is 'jax'" in completed.stderr
    assert "set it to 'tensorflow'" in completed.stderr
    # The check runs before the imports, so it fails the same way without Keras.
    assert "ModuleNotFoundError" not in completed.stderr
