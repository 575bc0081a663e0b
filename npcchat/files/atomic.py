"""Atomic file writes and checksums, for everything npcchat writes: sessions, KV snapshots,
bundles, eval reports, fitted heads.

A write goes to a temp file in the same directory, is fsynced, then renamed over the target
(and the directory fsynced), so a crash or a full disk mid-write leaves the old file whole.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from npcchat.errors import WriteError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (multi-GB GGUFs never sit in memory)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sweep(path: Path) -> None:
    """Remove the temp files of ``path`` (``.NAME.PID.*.tmp``) whose writer is gone, killed
    mid-write. Called when a file is opened, not on every write: a directory of thousands
    of sessions is listed once per session, not once per turn."""
    name = path.name
    directory = path.parent if str(path.parent) else Path(".")
    for tmp in directory.glob(f".{glob.escape(name)}.*.tmp"):
        pid = tmp.name[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: leave its file alone
    return True


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back while a file that keeps the user's work is written (a second
    Ctrl-C during eval's partial report used to lose the run); it lands right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once; keeps the old file's mode.

    A symlink stays a symlink: its target is replaced. Anything but a regular file (a FIFO,
    a device, a directory) is refused. The temp file's name carries the writer's pid, so
    :func:`sweep` can tell a dead writer's leftover from a live one's."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise WriteError(f"{path}: not a regular file; refusing to replace it")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory
        )
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    try:
        # mkstemp makes the file 0600: give it the mode the old file had, or the usual one
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(f"{path}: cannot write ({e.strerror}); the old file is intact") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
