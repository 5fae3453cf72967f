"""Pools of worker processes that start clean and end with the process that made them.

Two parts of an audit run in worker processes on this machine: preparation decodes images in them
(:func:`maskaudit.data.store.prepare_store`), and the local executor runs several jobs at once in them
(``local.jobs``, :class:`maskaudit.executors.LocalExecutor`). Both take their pool from :func:`pool`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def pool_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """Worker processes start clean (no threads or locks inherited from this process, no CUDA state).

    A fork server, where the platform has one, imports ``preload`` once and forks workers
    from it, so a second pool in the same process starts its workers at once (the server is one per process: the
    modules of the first pool that starts it are the ones preloaded); elsewhere, spawn. The server and the resource
    tracker end by themselves once this process and every worker have (end of file on their pipes); the workers end
    with this process (:func:`die_with_parent`), so a killed run leaves no process behind.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        return context
    return multiprocessing.get_context("spawn")


def die_with_parent(lifeline: Any) -> None:
    """End this worker as soon as the process that made its pool ends, however it ends (SIGKILL included).

    ``lifeline`` is the read end of a pipe (a ``multiprocessing`` connection) whose only write end
    is in the parent process: a thread waits on it and ends this process at its end of file, which
    the kernel delivers when the parent closes it or dies. The kernel's parent-death
    signal alone would not do: a worker's parent is the fork server, which lives on as long as any
    worker does (each holds the server's "alive" pipe), so killed parents used to leave the server,
    the resource tracker and the workers running forever. On Linux the worker also asks for SIGKILL
    when its own parent (the fork server) dies (``prctl(PR_SET_PDEATHSIG)``).
    """
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    if lifeline is None:
        return

    def watch() -> None:
        try:
            lifeline.recv_bytes()  # nothing is ever sent: this returns (EOFError) when the write end closes
        except (EOFError, OSError):
            pass
        os._exit(1)  # at once: no clean-up is owed to a parent that has ended

    threading.Thread(target=watch, name="maskaudit-lifeline", daemon=True).start()


def _start(lifeline: Any, initializer: Callable[..., None], initargs: tuple) -> None:
    die_with_parent(lifeline)
    initializer(*initargs)


@contextlib.contextmanager
def pool(workers: int, preload: Sequence[str], initializer: Callable[..., None], initargs: tuple = (),
         ) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` processes (:func:`pool_context`), each tied to this process (:func:`die_with_parent`)
    and then set up by ``initializer(*initargs)``; it waits for its running tasks when the block ends."""
    context = pool_context(preload)
    lifeline, alive = context.Pipe(duplex=False)  # the workers' lifeline; this process alone writes it
    with contextlib.closing(alive), contextlib.closing(lifeline), ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start, initargs=(lifeline, initializer, initargs)
    ) as executor:
        yield executor
