"""Pools of worker processes that start clean and end with the process that made them.

Two parts of an audit run in worker processes on this machine: preparation decodes images in them
(:func:`maskaudit.data.store.prepare_store`), and the local executor runs several jobs at once in them
(``local.jobs``, :class:`maskaudit.executors.LocalExecutor`). Both take their pool from :func:`pool`; the jobs
share the machine's CPU cores through a :class:`CoreShare`.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.context
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from maskaudit.errors import MaskauditError

#: why a pool broke when none of its workers got as far as starting: what is nearly always the cause, and its remedy
NEVER_STARTED = (
    "maskaudit's worker processes all died as they started, before their first task (each printed its error above); "
    "a Python script that runs maskaudit with several processes (local.jobs or workers above 1) must do so under "
    "`if __name__ == \"__main__\":`, because each worker imports the script again "
    "(https://docs.python.org/3/library/multiprocessing.html#the-spawn-and-forkserver-start-methods)"
)


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
    import threading

    libc = _glibc()
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if lifeline is None:
        return

    def watch() -> None:
        try:
            lifeline.recv_bytes()  # nothing is ever sent: this returns (EOFError) when the write end closes
        except (EOFError, OSError):
            pass
        os._exit(1)  # at once: no clean-up is owed to a parent that has ended

    threading.Thread(target=watch, name="maskaudit-lifeline", daemon=True).start()


class CoreShare:
    """The CPU cores of this machine, shared among the jobs that run at once in a pool's processes.

    A running job takes ``cores // running`` torch threads (at least one), re-read before each of its batches
    (:func:`take_cores`), so that the jobs left when fewer remain than processes take the cores the finished ones
    left idle: the study's grid of 5 folds on 2 processes ends with one job alone, which on one thread ran a third
    of the grid's time with one core idle (``benchmarks/bench_job.py``). A job's result may change with its
    thread count in float summation order only (the convolutions split their sums by thread), as it already did
    between ``local.jobs: 1`` and 2; a ResNet-18 trains bit for bit alike on 1 and 2 threads here.

    Made in the parent process and given to each worker with its pool's ``initargs`` (the counter is shared
    memory, which a process receives when it starts); :meth:`attach` in the worker, :func:`running_job` around a
    job.
    """

    def __init__(self, context: multiprocessing.context.BaseContext, cores: int) -> None:
        self.cores = max(1, cores)
        self._running = context.Value("i", 0)

    def attach(self) -> None:
        """This worker process's jobs share the cores from now on (:func:`take_cores`)."""
        global _share
        _share = self

    def count(self, change: int) -> None:
        with self._running.get_lock():
            self._running.value += change

    def threads(self) -> int:
        """A running job's share now: ``cores // running``, at least one."""
        return max(1, self.cores // max(1, self._running.value))


#: this worker process's share of the cores (:meth:`CoreShare.attach`); None outside a job pool
_share: CoreShare | None = None


@contextlib.contextmanager
def running_job() -> Iterator[None]:
    """One job of this worker process, counted among those that share the cores while it runs (outside a job pool,
    just the job)."""
    share = _share
    if share is None:
        yield
        return
    share.count(+1)
    try:
        take_cores()
        yield
    finally:
        share.count(-1)


def take_cores() -> None:
    """In a job of a pool that shares the cores (:class:`CoreShare`): torch's threads set to the job's share now;
    elsewhere nothing. Called before each batch (:func:`maskaudit.loader.batches`); it reads one shared integer."""
    if _share is None:
        return
    import torch

    threads = _share.threads()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


#: glibc's ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, and the largest mmap threshold
#: it accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX: 4 * 1024 * 1024 * sizeof(long))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 << 20
#: free memory at the top of the heap this process keeps instead of returning it to the kernel
KEPT_FREE = 1 << 30


def keep_freed_memory() -> None:
    """Let this process reuse the memory it frees instead of giving it back to the kernel and faulting it in again.

    A training step on the CPU frees and allocates again every gradient and activation: with glibc's defaults
    (https://man7.org/linux/man-pages/man3/mallopt.3.html), blocks above the mmap threshold are mapped and unmapped
    each time and a large free heap top is trimmed, so each step faults its memory in anew, zeroed by the kernel
    (measured on ResNet-18 at 64 px, batch 2: about 4,600 page faults and 14 ms of system time a step, none after
    this; the step about 1.25x faster). Blocks up to 32 MB (every parameter tensor of the study's models) come
    from the heap, and up to :data:`KEPT_FREE` bytes of free heap are kept for the next step. A no-op where the C
    library is not glibc. Nothing is held that a step did not use."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE)


@functools.cache
def _glibc() -> Any:
    """This process's C library on Linux (``ctypes``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a process without a C library to open
        return None


def _start(started: Any, lifeline: Any, initializer: Callable[..., None], initargs: tuple) -> None:
    with started.get_lock():
        started.value += 1
    die_with_parent(lifeline)
    initializer(*initargs)


class WorkerPool(ProcessPoolExecutor):
    """A :class:`ProcessPoolExecutor` that knows whether any of its workers got as far as starting."""

    def __init__(self, workers: int, context: multiprocessing.context.BaseContext, lifeline: Any,
                 initializer: Callable[..., None], initargs: tuple) -> None:
        self._started = context.Value("i", 0)
        super().__init__(workers, mp_context=context, initializer=_start,
                         initargs=(self._started, lifeline, initializer, initargs))

    def none_started(self) -> bool:
        """No worker has reached its initializer: each died while Python made it (importing the main module again,
        unpickling), which is where a script without a main guard fails (:data:`NEVER_STARTED`)."""
        return self._started.value == 0

    def broken(self, died: str) -> MaskauditError:
        """The one line for this pool's :class:`BrokenProcessPool`: :data:`NEVER_STARTED` when no worker started,
        else ``died`` (what died, what to do next)."""
        return MaskauditError(NEVER_STARTED if self.none_started() else died)


@contextlib.contextmanager
def pool(workers: int, preload: Sequence[str], initializer: Callable[..., None], initargs: tuple = (), *,
         died: str) -> Iterator[WorkerPool]:
    """A pool of ``workers`` processes (:func:`pool_context`), each tied to this process (:func:`die_with_parent`)
    and then set up by ``initializer(*initargs)``; it waits for its running tasks when the block ends.

    A pool that breaks (a worker killed, out of memory, or dead as it started) raises one line instead of
    :class:`BrokenProcessPool`, from a task's result or from a submission to the broken pool alike
    (:meth:`WorkerPool.broken`): ``died``, or :data:`NEVER_STARTED` when no worker got as far as starting.
    """
    context = pool_context(preload)
    lifeline, alive = context.Pipe(duplex=False)  # the workers' lifeline; this process alone writes it
    with contextlib.closing(alive), contextlib.closing(lifeline), \
            WorkerPool(workers, context, lifeline, initializer, initargs) as executor:
        try:
            yield executor
        except BrokenProcessPool:
            raise executor.broken(died) from None
