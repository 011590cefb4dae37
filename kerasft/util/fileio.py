"""Atomic file and directory writes: build beside the target, then rename."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


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


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; use what open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary path beside `path` (same suffix), then renames it to
    `path`: a reader never sees a half-written file, and a failed write leaves nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; use what open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LockError(RuntimeError):
    """Another live process is writing the same target."""


@contextlib.contextmanager
def target_lock(target: str | Path, what: str = "Output directory"):
    """Holds an exclusive lock on `target` (a `.<name>.lock` file beside it) while writing it.

    A second writer is refused at once with a `LockError` naming the holder's pid. The lock is
    an `flock`, which the kernel releases when its holder dies (`kill -9`, OOM, lost VM), so a
    lock left by a dead process is taken over, with a log line naming that process.

    Raises:
        LockError: a live process holds the lock.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(
                f"{what} {str(target)!r} is being written by another kerasft process "
                f"({holder}; lock file {str(path)!r}). Wait for it to finish or stop it."
            ) from None
        try:  # the holder before us unlinks the file on release: lock the file that is there
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if previous:
        log.warning("%s: taking over the lock left by %s, which is no longer running.",
                    target, previous)  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def remove_stale_temp_dirs(target: str | Path) -> list[Path]:
    """Removes temporary directories that killed writers of `target` left beside it.

    Call it while holding `target_lock(target)`: then no live writer owns them. The run's
    `.<name>.partial` directory is not touched (`--resume` continues from it).

    Returns:
        The removed paths (each is also logged).
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if path.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            log.warning("removed %s, left by a writer that was killed", path)
    return removed


@contextlib.contextmanager
def publish_target(
    target: str | Path,
    overwrite: bool = False,
    what: str = "Output directory",
    *,
    work: str | Path | None = None,
    keep_work: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Builds a directory beside `target` and publishes it there atomically: the one sequence
    every writer of a run, export or report follows.

    Under `target_lock(target)`: removes temporary directories that killed writers left,
    refuses a non-empty `target` unless `overwrite`, yields the work directory, and when the
    block ends without an error renames it to `target` (`publish_dir`). On an error the work
    directory is removed, unless `keep_work(work)` says it holds something to resume from.

    Args:
        target: the directory to create or replace.
        overwrite: replace a non-empty `target`.
        what: how messages name `target` ("Run directory", "Export directory", ...).
        work: the work directory to use and keep across attempts (a run's `.NAME.partial`;
            created if missing, its content left as it is); None: a fresh temporary one.
        keep_work: called with the work directory after an error; True keeps it.

    Yields:
        The work directory.

    Raises:
        LockError: another live process is writing `target`.
        FileExistsError: `target` is not empty and `overwrite` is False.

    Example:
        >>> with publish_target("exports/x", overwrite=True, what="Export directory") as tmp:
        ...     (tmp / "model.onnx").write_bytes(data)
    """
    with target_lock(target, what):
        remove_stale_temp_dirs(target)
        check_target_dir(target, overwrite, what)
        if work is None:
            tmp = temp_dir_beside(target)
        else:
            tmp = Path(work)
            tmp.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            publish_dir(tmp, target)
        except BaseException:
            if tmp.exists() and not (keep_work is not None and keep_work(tmp)):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
