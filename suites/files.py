"""Write files atomically, so that an interrupted run never leaves a truncated one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replaceable_target(path: Path) -> Path:
    """Return the file that writing `path` replaces: `path` itself, or the file a
    symbolic link at `path` points to. Raises OSError when that is not a regular
    file (a folder, a device such as /dev/full, a named pipe or a socket), which a
    rename would replace with a plain file."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise OSError(f"{path} exists and is not a regular file")
    return target


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write` writes to the binary handle it
    gets. The bytes go to a temporary file in the same folder, which is renamed to
    `path` only after it is complete and flushed to disk. If `write` raises, `path`
    keeps its old content and the temporary file is removed. A symbolic link at
    `path` keeps pointing to its file, which gets the new content."""
    path = replaceable_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # NamedTemporaryFile creates the file readable by its owner only; give it
        # the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Create or replace `path` with `text` in UTF-8, atomically (see write_atomic)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))
