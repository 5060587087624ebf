"""Atomic writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from suites import files

ROOT = Path(__file__).resolve().parents[1]


def test_write_creates_file_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "report.json"
    files.write_text_atomic(path, "{}\n")
    assert path.read_text(encoding="utf-8") == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old\n", encoding="utf-8")

    def half_then_fail(handle):
        handle.write(b"new and incomp")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        files.write_atomic(path, half_then_fail)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# A process that dies by SIGKILL halfway through writing a report: no cleanup code
# runs, as when a CI job is cancelled or the machine runs out of memory.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from suites import files

def half_then_die(handle):
    handle.write(b'{"results": [')
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

files.write_atomic(Path(sys.argv[1]), half_then_die)
"""


def test_killed_writer_leaves_old_report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"results": []}\n', encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, timeout=60
    )
    assert completed.returncode == -signal.SIGKILL
    assert path.read_text(encoding="utf-8") == '{"results": []}\n'
    # The partial temporary file stays behind, hidden, beside the report.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "report.json"]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".report.json.")
