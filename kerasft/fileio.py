"""Atomic file and directory writes: build beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def temp_dir_beside(target: str | Path) -> Path:
    """Creates and returns an empty hidden temporary directory next to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def check_target_dir(target: str | Path, overwrite: bool, what: str = "Output directory") -> None:
    """Raises `FileExistsError` if `target` exists and is not an empty dir, unless `overwrite`."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{what} {str(target)!r} exists and is not empty. Pass --overwrite "
            "(overwrite=True) to replace it."
        )


def publish_dir(tmp: str | Path, target: str | Path) -> None:
    """Moves the finished `tmp` directory to `target`, replacing what was there.

    A reader sees either the old complete directory or the new complete one: the old one is
    renamed aside first, the new one renamed in, and only then is the old one deleted.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, target)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
