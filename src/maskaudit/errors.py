"""The one exception a user can cause. The CLI prints its message in one line and exits 1.

:class:`DiskError` is the one for a write the file system refused (full, read-only, over quota,
not writable): :func:`disk_error` turns the ``OSError`` (or the errno-less ``RuntimeError`` of
``torch.save``) into one line that names the file, the space it needs and has, and what to do.
Standard library only: the CLI imports this module before anything heavy.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class MaskauditError(Exception):
    """A problem with the user's input (config, data, run directory), stated with what to do next."""


class DiskError(MaskauditError):
    """A write the file system refused: ``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES`` or ``EPERM``.

    Nothing was left half-written (every write goes through a temporary file and a rename), so
    the same command, once the cause is removed, continues where it stopped.
    """

    def __init__(self, message: str, path: Path, code: int) -> None:
        super().__init__(message)
        self.path, self.errno = Path(path), code


#: the errno values of a write the file system refused, whatever was written
DISK_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM)
    if code is not None
)
#: below this much free space, an errno-less write failure (``torch.save``) counts as a full disk
NEARLY_FULL = 1 << 20
AGAIN = "then run the same command again"


def human_size(n: float) -> str:
    """``1.2 GB``, ``340.0 MB``, ``12.0 kB``, ``512 B`` (powers of 1000, as ``df -H``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the file system the write goes to)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def free_bytes(path: Path) -> int | None:
    """Free space for this user on the file system of ``path`` (or of its nearest existing folder)."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def disk_message(code: int, path: Path, needed: int | None = None, free: int | None = None,
                 hint: str = "choose another --out", what: str | None = None, written: int | None = None) -> str:
    """The one line of a refused write of ``path``: ``needed`` bytes when known (else more than the ``written``
    bytes it reached), ``free`` bytes (default: measured now); ``what`` names it (default: ``path``)."""
    path = Path(path)
    free = free_bytes(path) if free is None else free
    what = str(path) if what is None else what
    if code == errno.ENOSPC:
        needs = (f"needs {human_size(needed)}" if needed else
                 f"needs more than {human_size(written)}" if written else "")
        numbers = [needs, f"{human_size(free)} free" if free is not None else ""]
        shown = ", ".join(n for n in numbers if n)
        return f"No space left on device writing {what}{f' ({shown})' if shown else ''}: free space or {hint}, {AGAIN}"
    if code == getattr(errno, "EDQUOT", None):
        shown = f" (needs {human_size(needed)})" if needed else ""
        return f"Disk quota exceeded writing {what}{shown}: free space within your quota or {hint}, {AGAIN}"
    if code == errno.EROFS:
        return f"Read-only file system writing {what}: remount it read-write or {hint}, {AGAIN}"
    return f"Permission denied writing {what}: make {_existing(path.parent)} writable or {hint}, {AGAIN}"


def disk_error(exc: BaseException, path: Path, needed: int | None = None,
               hint: str = "choose another --out", what: str | None = None) -> DiskError | None:
    """The :class:`DiskError` of a failed write of ``path``, or None when ``exc`` is not a refused write.

    An ``OSError`` counts by its errno (:data:`DISK_ERRNOS`). An ``OSError`` without errno, or a
    ``RuntimeError`` (``torch.save`` reports a full disk as ``unexpected pos …``), counts when the
    file system is read-only, or has less than :data:`NEARLY_FULL` (or ``needed``) bytes free.
    ``what`` is how the message names the write (default: ``path``).
    """
    if isinstance(exc, DiskError):
        return exc
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code not in DISK_ERRNOS:
        if not isinstance(exc, OSError | RuntimeError) or code is not None:
            return None
        free = free_bytes(path)
        if _read_only(path):
            code = errno.EROFS
        elif free is not None and free < max(NEARLY_FULL, needed or 0):
            code = errno.ENOSPC
        else:
            return None
    return DiskError(disk_message(code, path, needed, hint=hint, what=what), path, code)


def require_space(path: Path, needed: int, what: str | None = None, hint: str = "choose another --out") -> None:
    """Refuse, with the numbers, a write of ``needed`` bytes that the file system of ``path`` cannot hold.

    ``what`` is how the message names the write (default: ``path``). Call it before a memory map
    is allocated: a map on a full disk fails with SIGBUS at its first unbacked page, not an error.
    """
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskError(disk_message(errno.ENOSPC, path, needed, free, hint, what), Path(path), errno.ENOSPC)
