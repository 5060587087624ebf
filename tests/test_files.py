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
from tests.subprocess_runs import run_suite

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
from tests.subprocess_runs import run_suite

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


def test_symbolic_link_keeps_pointing_to_new_content(tmp_path):
    target = tmp_path / "reports" / "real.json"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    files.write_text_atomic(link, "new\n")
    assert link.is_symlink()
    assert target.read_text(encoding="utf-8") == "new\n"


def test_special_file_is_not_replaced(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OSError, match="exists and is not a regular file"):
        files.write_text_atomic(pipe, "{}\n")
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_report_path_to_special_file_is_usage_error(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    completed = run_suite(
        "--adapter=tests.faults:Float32Kernel", "--cases=M1", f"--report={pipe}"
    )
    assert completed.returncode == 4
    assert f"--report: {pipe} exists and is not a regular file" in completed.stderr
    assert stat.S_ISFIFO(pipe.stat().st_mode)


def test_report_unwritable_at_end_is_usage_error(tmp_path):
    report = tmp_path / "out" / "report.json"
    completed = run_suite(
        "--adapter=tests.broken_adapters:ReplacesFolder",
        "--dtypes=float32",
        "--cases=M1",
        f"--report={report}",
        env={"NORMCONF_TEST_FOLDER": str(report.parent)},
    )
    assert completed.returncode == 4, completed.stdout[-2000:]
    assert f"ERROR: report: cannot write {report}:" in completed.stdout
    assert "Traceback" not in completed.stdout + completed.stderr
