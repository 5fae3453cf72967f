"""One writer per run directory: a lock that every command writing into a run holds while it runs.

Two commands writing one run directory at once corrupt it: two preparations write the same
memory-mapped files (the loser dies of SIGBUS), two trainings train every job twice, one
resuming from the other's ``last.pt``. So every writer (``run``, ``probe``, ``demo``, each stage
command, ``reader create``, ``reader analyse``, and :meth:`maskaudit.pipeline.Audit.run_all`)
holds :func:`run_lock`; a second writer stops at once with a :class:`MaskauditError` naming the
holder. Readers (``status``, ``check``, ``report --compare``, ``reader serve``) never take it.

The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when its holder ends in
any way, SIGKILL included, so a lock left by a dead process is simply taken (nothing is stale;
no PID check, no time-out). The file says who holds it (PID, host, command, start time, one JSON
object), written when the lock is taken and emptied when it is released; the file itself stays.

Within one process the lock is re-entrant (``maskaudit run`` holds it, then ``Audit.run_all``
takes it again), counted per run directory. It belongs to the process that took it: a child
(a Ray worker, a forked process) that asks for it is a second writer and is refused. Job
functions (``run_train_job``, ``run_predict_job``) never ask for it: they write their own job
folder under the driver's lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maskaudit.errors import MaskauditError, disk_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock's file name inside the run directory."""

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # a file system without flock


@dataclass
class _Held:
    fd: int | None  # None: the file system could not lock, the run goes on without
    pid: int
    depth: int = 1


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


def lock_path(run_dir: Path | str) -> Path:
    """The lock file of a run directory."""
    return Path(run_dir) / LOCK_FILE


def command_line(default: str) -> str:
    """This process's command as typed when it is the ``maskaudit`` command, else ``default``."""
    argv = sys.argv
    program = Path(argv[0]) if argv and argv[0] else Path()
    if program.name == "maskaudit" or (program.name == "__main__.py" and program.parent.name == "maskaudit"):
        return shlex.join(["maskaudit", *argv[1:]])
    return default


def python_command(what: str) -> str:
    """How a Python caller is named in the lock: ``what`` and this process's command line."""
    return command_line(f"{what} in {shlex.join([Path(sys.executable).name, *sys.argv])}")


def holder(run_dir: Path | str) -> dict[str, Any] | None:
    """Who holds the run directory's lock now (pid, host, command, started), or None when nobody does."""
    path = lock_path(run_dir)
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path) or {}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The holder's description in the lock file; None when empty or unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    try:
        # raw_decode: the first object alone (a holder writes its line, then cuts what an older one left)
        found, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_ended(info: dict[str, Any]) -> bool:
    """Whether the holder named in ``info`` is a process of this host that has ended."""
    try:
        return info.get("host") == socket.gethostname() and not _is_running(int(info["pid"]))
    except (KeyError, TypeError, ValueError):
        return False


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    ended = ", which has ended, but a process it started still holds the lock" if _pid_ended(info) else ""
    return (f"PID {info.get('pid', '?')}{ended} on host {info.get('host', '?')} (`{info.get('command', '?')}`, "
            f"started {info.get('started', '?')})")


def _busy(run_dir: Path, path: Path) -> MaskauditError:
    """The error of a second writer: the run directory and its holder, in one line."""
    info = None
    for _ in range(20):  # the holder writes its name right after taking the lock: give it a moment
        info = _read_holder(path)
        if info and not _pid_ended(info):  # (a dead PID is what a killed holder left; the new one is writing)
            break
        time.sleep(0.05)
    return MaskauditError(f"run directory {run_dir} is in use by {_describe(info)}: one command at a time writes a "
                          f"run; wait for it to end or stop it, then start again (`maskaudit status {run_dir}` shows "
                          "where it stands)")


def _acquire(run_dir: Path, command: str) -> _Held:
    path = lock_path(run_dir)
    if fcntl is None:  # pragma: no cover - not POSIX
        log.warning("no file locking on this platform: nothing stops two commands writing %s at once", run_dir)
        return _Held(None, os.getpid())
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (O_CLOEXEC)
        except OSError as exc:  # a read-only or full run directory: one line, as every write says it
            raise disk_error(exc, path) or exc from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(run_dir, path) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                log.warning("%s: this file system cannot lock files (%s): nothing stops two commands writing this "
                            "run directory at once", path, exc.strerror)
                return _Held(None, os.getpid())
            raise MaskauditError(f"cannot lock {path}: {exc.strerror}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed or replaced between open and lock: lock the one there now
    else:  # pragma: no cover - the file keeps vanishing
        raise MaskauditError(f"cannot lock {path}: it keeps being removed")
    previous = _read_holder(path)
    if previous:  # a holder that releases the lock empties the file: this one ended without (killed)
        log.info("%s: taking over the lock of %s, which ended without releasing it", run_dir, _describe(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
    data = (json.dumps(info) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    return _Held(fd, os.getpid())


def _release(held: _Held) -> None:
    if held.fd is None:
        return
    try:
        os.ftruncate(held.fd, 0)  # before unlocking, so that the next holder's name is never cut
    finally:
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


@contextlib.contextmanager
def run_lock(run_dir: Path | str, command: str) -> Iterator[None]:
    """Hold the run directory's writer lock for the block (the directory is created if needed).

    ``command`` names the holder to a second writer (``maskaudit train --out runs/x``). Re-entrant
    within this process.

    Raises
    ------
    MaskauditError
        When another process holds the lock: one line naming the run directory and the holder's
        PID, host, command and start time.
    """
    root = Path(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full disk: one line
        raise disk_error(exc, root) or exc from None
    key = root.resolve()
    with _guard:
        held = _held.get(key)
        if held is not None and held.pid == os.getpid():
            held.depth += 1
        else:  # not held, or held by the process this one was forked from: take it (or be refused)
            held = _held[key] = _acquire(root, command)
    try:
        yield
    finally:
        with _guard:
            held.depth -= 1
            if held.depth == 0:
                if _held.get(key) is held:
                    del _held[key]
                _release(held)
