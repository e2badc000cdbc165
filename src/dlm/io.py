"""Files every stage writes: atomic writes with the user's umask, strict JSON, and exclusive locks.

Readers see the old file or the complete new one, never half of it. Files get the mode an ordinary
``open(path, "w")`` would give (0o666 minus the umask), so shared data and run directories stay readable
to colleagues; JSON is strict (no NaN/Infinity: a non-finite value is written as null by the caller).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlm.errors import DlmError


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, executable: bool = False) -> None:
    """chmod ``path`` to what ``open()`` (0o666) or ``mkdir()`` (0o777, ``executable``) would have given it:
    ``tempfile.mkstemp`` / ``mkdtemp`` create 0o600 / 0o700 whatever the umask."""
    os.chmod(path, (0o777 if executable else 0o666) & ~current_umask())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory (created if missing),
    flushed and fsynced, given the umask's mode, then renamed over ``path`` (``os.replace``, atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``write_bytes_atomic`` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_line(obj: Any) -> str:
    """Strict JSON on one line (``allow_nan=False``: a NaN or infinity is a bug of the caller)."""
    return json.dumps(obj, allow_nan=False)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (no NaN/Infinity) so readers see the old file or the complete new one."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


def finite_or_none(x: float | None) -> float | None:
    """``x`` when it is a finite number, else None (JSON null)."""
    return x if x is not None and math.isfinite(x) else None


@contextlib.contextmanager
def exclusive_lock(lock_file: str | Path, what: str | Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``lock_file`` for the block; the file holds our pid.

    Another process holding it raises ``DlmError("WHAT is in use by another dlm process (pid N)")``.
    The lock file is removed on exit; a lock file left by a killed process is simply locked again.
    (After locking, the file must still be the one at ``lock_file``: a process that opened it just before
    the holder removed it would otherwise hold a lock on a deleted file.)
    """
    lock_file = Path(lock_file)
    for _ in range(10):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # a read-only or missing directory
            raise DlmError(f"cannot create the lock file {lock_file}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise DlmError(f"cannot lock {lock_file}: {e.strerror or e}") from None
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise DlmError(f"{what} is in use by another dlm process (pid {pid})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just removed: try again with the current one
    else:
        raise DlmError(f"cannot lock {lock_file}: it keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(fd)
