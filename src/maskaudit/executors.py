"""Run the grid of independent jobs: in this process, in worker processes on this machine, or as Ray tasks on a
cluster.

A job is a plain function of picklable arguments (the kind of audit, the run directory and the job's name),
which reads everything else from the run directory; so the same function runs locally or
on any Ray worker that sees the run directory on shared storage. A job writes only its own
job folder, under the run directory's writer lock (:mod:`maskaudit.lock`) that the driver
holds for the whole stage; a job never takes the lock (a Ray worker is another process, which
the lock would refuse).

Both executors show the stage's progress (:mod:`maskaudit.progress`): job i of N with its
strategy and fold, elapsed and time left. Locally a job also counts its own steps (epochs,
images) on the display; on Ray the jobs run elsewhere, so only finished jobs are counted, each
with the node it ran on and, when its worker died and Ray ran it again, which attempt finished it.

On Ray (``executor: ray``, settings in ``ray:``, :class:`maskaudit.config.RayConfig`) each job is one task
(https://docs.ray.io/en/latest/ray-core/tasks.html) reserving ``ray.num_cpus`` and ``ray.num_gpus``; fractions
below 1 share a device (https://docs.ray.io/en/latest/ray-core/scheduling/resources.html). When the worker
process running a job dies (killed, out of memory, its node lost), Ray runs the task again, up to
``ray.max_retries`` times (``max_retries``, https://docs.ray.io/en/latest/ray-core/fault_tolerance/tasks.html;
past them ``ray.get`` raises ``WorkerCrashedError``). A retried training job resumes after the last epoch its
killed attempt saved (``last.pt``, :func:`maskaudit.train.train_job`): every file of a job folder is written
whole, beside its old content, then renamed into place (:func:`maskaudit.rundir.atomic_path`), so a killed
attempt leaves each file either as it was or complete, and the retry ends with the weights of an unbroken
run. An exception raised by the job itself (a config error, a full disk) is not retried
(``retry_exceptions=False``, Ray's default): it would fail again the same way.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from maskaudit import processes, progress
from maskaudit.config import AuditConfig, LocalConfig, RayConfig
from maskaudit.errors import MaskauditError

log = logging.getLogger(__name__)

#: Ray's default ports: the head's GCS (``ray start --head``) and its Ray Client server (``ray://``).
GCS_PORT, CLIENT_PORT = 6379, 10001
#: Seconds to wait for the head's port to answer before ``ray.init``, which would retry for minutes.
CONNECT_TIMEOUT = 10.0


def job_label(args: tuple) -> str:
    """A job's arguments ``(..., strategy, fold)`` → ``no_roi fold 2``; a group's ``(..., ((strategy, fold), …))`` →
    ``3 models: full fold 0 … no_roi fold 1``."""
    if args and isinstance(args[-1], tuple) and args[-1] and isinstance(args[-1][0], tuple):
        jobs = args[-1]
        if len(jobs) == 1:
            return job_label(jobs[0])
        return f"{len(jobs)} models: {job_label(jobs[0])} … {job_label(jobs[-1])}"
    return f"{args[-2]} fold {args[-1]}" if len(args) >= 2 else " ".join(map(str, args))


class LocalExecutor:
    """Jobs on this machine: one after the other in this process (``local.jobs: 1``, the default), or ``local.jobs``
    at once, each in a worker process of its own (:func:`maskaudit.processes.pool`).

    Several at once is the local way to pack jobs on a device, as ``ray.num_gpus: 0.25`` is Ray's: a training at the
    study's batch of 2 keeps neither a GPU nor a second CPU core busy. The running jobs share the CPU cores: each
    takes cores / (jobs running) torch threads, re-read before each batch (:class:`~maskaudit.processes.CoreShare`),
    so the last job of a grid takes the cores the others left (measured on 2 cores, ``benchmarks/bench_job.py``:
    two jobs at once each run about 1.4× slower than one alone on both cores, so packing gains little there
    beyond the tail); on a machine with several GPUs, worker *i* sees GPU *i* modulo their number
    (``CUDA_VISIBLE_DEVICES``) when ``train.device`` is ``auto`` or ``cuda``. A job writes only its own folder, as
    on Ray; the workers end with this process. A job's own error is raised as the job raised it; a worker that dies
    (killed, out of memory) stops the stage with one line, and the next run resumes the job after its last saved
    epoch.

    Parameters
    ----------
    settings : LocalConfig, optional
        The config's ``local`` section (default: one job at a time).
    device : str
        ``train.device``, which says whether the workers may be spread over the GPUs.
    """

    def __init__(self, settings: LocalConfig | None = None, device: str = "auto") -> None:
        self.settings = settings or LocalConfig()
        self.device = device

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], *, name: str, total: int | None = None,
            done: int = 0) -> list[Any]:
        """Run ``fn(*args)`` for each of ``calls`` (stage ``name``); ``total`` jobs in the stage, ``done`` before.
        The results come in the order of ``calls``."""
        total = total if total is not None else len(calls) + done
        at_once = min(self.settings.jobs, len(calls))
        if at_once > 1:
            return self._in_processes(fn, calls, at_once, name=name, total=total, done=done)
        results = []
        with progress.stage(name, total, done=done) as bar:
            for args in calls:
                bar.start_job(job_label(args))
                result = fn(*args)
                bar.end_job(result)
                results.append(result)
        return results

    def _in_processes(self, fn: Callable[..., Any], calls: Sequence[tuple], at_once: int, *, name: str, total: int,
                      done: int) -> list[Any]:
        threads = max(1, (os.cpu_count() or 1) // at_once)
        gpus = visible_gpus() if self.device in ("auto", "cuda") else []
        if len(gpus) < 2:
            gpus = []  # one GPU or none: every worker sees what this process sees
        spread = f", spread over {len(gpus)} GPUs" if gpus else ""
        note = (f"{len(calls)} jobs, {at_once} at once in processes of their own ({threads} CPU thread"
                f"{'s' if threads != 1 else ''} each while {at_once} run, more once fewer do{spread}); progress counts "
                "finished jobs (`maskaudit status RUN` reads the epochs of running ones from their job folders)")
        context = processes.pool_context(PRELOAD)
        slots = context.SimpleQueue()
        for slot in range(at_once):
            slots.put(slot)
        cores = processes.CoreShare(context, os.cpu_count() or 1)
        results: dict[int, Any] = {}
        died = (f"died (killed, or out of memory: the system log says which; local.jobs: {at_once} runs that many "
                "at once); the next run resumes each unfinished job after its last saved epoch")
        with progress.stage(name, total, done=done, note=note) as bar, \
                processes.pool(at_once, PRELOAD, _init_job_process, (threads, gpus, slots, cores),
                               died=f"a job process {died}") as pool:
            futures = {pool.submit(_sharing_cores, fn, args): i for i, args in enumerate(calls)}
            try:
                for future in as_completed(futures):
                    label = job_label(calls[futures[future]])
                    try:
                        out = future.result()
                    except BrokenProcessPool:
                        raise pool.broken(f"job {label}: the process running it {died}") from None
                    replay(out["log"])
                    results[futures[future]] = out["result"]
                    bar.job_finished_elsewhere(label, out["result"])
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return [results[i] for i in range(len(calls))]


#: what a job process's fork server imports once (the jobs' own modules: torch with them)
PRELOAD = ("maskaudit.pipeline",)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (its entries, else 0..n-1); none
    without CUDA. Counting does not make a CUDA context here (workers are started clean, never forked from here)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    named = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named or [str(i) for i in range(torch.cuda.device_count())]


def _init_job_process(threads: int, gpus: list[str], slots: Any, cores: processes.CoreShare) -> None:
    """A job process: its share of the CPU threads (then, job by job, of the cores: :class:`~maskaudit.processes.
    CoreShare`) and, over several GPUs, its one GPU (taken before CUDA starts)."""
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    cores.attach()


def _sharing_cores(fn: Callable[..., Any], args: tuple) -> dict:
    """:func:`capture` of one job in a job process, counted among the jobs that share the cores while it runs."""
    with processes.running_job():
        return capture(fn, args)


# ------------------------------------------------------------------------------------------ connecting


def head_endpoint(address: str | None) -> tuple[str, int] | None:
    """The (host, port) that ``ray.address`` names, its default port added; None for ``auto``, ``local`` or none.

    Examples
    --------
    >>> head_endpoint("head-node"), head_endpoint("ray://10.0.0.5"), head_endpoint("[::1]:6380")
    (('head-node', 6379), ('10.0.0.5', 10001), ('::1', 6380))
    """
    if address is None or address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    if rest.startswith("["):  # an IPv6 address: [::1]:6379
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = rest.partition(":")
    return host, int(port) if port else (CLIENT_PORT if address.startswith("ray://") else GCS_PORT)


def init_address(address: str | None) -> str | None:
    """What ``ray.init(address=...)`` is given for ``ray.address``: the default port added to a bare host."""
    endpoint = head_endpoint(address)
    if endpoint is None:
        return address
    host, port = endpoint
    host = f"[{host}]" if ":" in host else host
    return f"ray://{host}:{port}" if address.startswith("ray://") else f"{host}:{port}"


def connect(settings: RayConfig, timeout: float = CONNECT_TIMEOUT) -> None:
    """Attach this process to the cluster of ``ray.address`` (``ray.init``; see its ``address`` rules,
    https://docs.ray.io/en/latest/ray-core/api/doc/ray.init.html), or start a Ray here.

    A named head is first asked for a TCP connection (at most ``timeout`` seconds): ``ray.init`` itself retries an
    address where nothing answers for minutes.

    Raises
    ------
    MaskauditError
        One line naming ``ray.address`` and what went wrong: nothing answers there, no cluster runs on this machine
        (``auto``), or Ray refused the connection (e.g. another Ray or Python version on the cluster).
    """
    import ray

    address = settings.address
    endpoint = head_endpoint(address)
    if endpoint is not None:
        host, port = endpoint
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise MaskauditError(f"ray.address {address!r}: nothing answers at {host}:{port} ({reason}); start the "
                                 f"cluster's head there (`ray start --head --port={port}`) or correct ray.address"
                                 ) from None
    try:
        ray.init(address=init_address(address), ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("; start one with `ray start --head`, or name its head: ray.address: host:port" if address == "auto"
                else "")
        raise MaskauditError(f"ray.address {address!r}: cannot join the Ray cluster: {first}{hint}") from None


# ------------------------------------------------------------------------------------------ on a worker


class _Keep(logging.Handler):
    """Keeps the records a job logs, as (logger, level, message, detail), to be written again by the driver."""

    def __init__(self, into: list) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        self.into.append((record.name, record.levelno, message, bool(getattr(record, "maskaudit_detail", False))))


def _attempt() -> int | None:
    """Which run of the current Ray task this is (0: the first); None where this Ray does not say.

    Read from the worker's core worker (``get_current_task_attempt_number``): Ray's runtime context does not expose it.
    """
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - another Ray version: the attempt is only reported, never needed
        return None


def capture(fn: Callable[..., Any], args: tuple) -> dict:
    """``fn(*args)`` in a worker process, with what it logged: ``{"result", "pid", "log"}``.

    The ``maskaudit`` loggers' records (INFO and above: each epoch, a resumed job's ``resuming after epoch 3``)
    are kept off the worker's stderr (which Ray copies to the driver's console) and returned with the result:
    the driver writes them to the run's log (``logs/maskaudit.log``) when the job ends (:func:`replay`).
    """
    records: list = []
    handler = _Keep(records)
    logger = logging.getLogger("maskaudit")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        result = fn(*args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return {"result": result, "pid": os.getpid(), "log": records}


def replay(records: Sequence[tuple]) -> None:
    """A finished job's log records (:func:`capture`), written into this process's log."""
    for logger, level, message, detail in records:
        logging.getLogger(logger).log(level, "%s", message, extra=progress.DETAIL if detail else None)


def run_on_worker(fn: Callable[..., Any], args: tuple) -> dict:
    """One job in a Ray worker: :func:`capture` of ``fn(*args)``, with where it ran (node id) and which attempt."""
    import ray

    return {**capture(fn, args), "node": ray.get_runtime_context().get_node_id(), "attempt": _attempt()}


# ------------------------------------------------------------------------------------------ the executor


class RayExecutor:
    """Each job a Ray task on the cluster of ``ray.address``; the run directory must be on storage every node mounts
    at the same path (the driver holds its writer lock, :mod:`maskaudit.lock`; the jobs only write their folders).

    Parameters
    ----------
    settings : RayConfig, optional
        The config's ``ray`` section (default: Ray's own lookup of a cluster, one CPU per job, one GPU per job on a
        cluster with GPUs, two retries).

    Attributes
    ----------
    placements : list of dict
        Of the last :meth:`map`, per job in the order they finished: ``job`` (``no_roi fold 2``), ``node`` (Ray's node
        id), ``pid`` (of the worker that finished it) and ``attempt`` (0: the first; 1 and more: Ray ran it again
        after a worker died).
    """

    def __init__(self, settings: RayConfig | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MaskauditError("executor: ray needs Ray installed: pip install 'maskaudit[ray]'") from None
        self.ray = ray
        self.settings = settings or RayConfig()
        self.placements: list[dict] = []
        if not ray.is_initialized():  # else: this process is attached already (a notebook, a test), and stays so
            connect(self.settings)

    def resources(self) -> tuple[float, float]:
        """CPUs and GPUs each job reserves: ``ray.num_cpus``, and ``ray.num_gpus`` or one GPU where the cluster has
        one. A job that no node can hold waits until one joins (an autoscaling cluster adds it): warned here."""
        ray = self.ray
        gpus = self.settings.num_gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        cpus = self.settings.num_cpus
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            shapes = Counter((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes)
            has = ", ".join(f"{count} with {c:g} CPU and {g:g} GPU" for (c, g), count in sorted(shapes.items()))
            log.warning("ray: each job reserves %g CPU and %g GPU (ray.num_cpus, ray.num_gpus), but no node of the "
                        "cluster has that many (its nodes: %s): the jobs wait until such a node joins", cpus, gpus,
                        has or "none")
        return cpus, gpus

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], *, name: str, total: int | None = None,
            done: int = 0) -> list[Any]:
        """Run ``fn(*args)`` for each of ``calls`` as Ray tasks (stage ``name``), waiting for each with ``ray.wait``
        (https://docs.ray.io/en/latest/ray-core/api/doc/ray.wait.html); the results in the order of ``calls``.

        On the first job that fails, the jobs still pending or running are cancelled (``ray.cancel``: a running
        training resumes from its last epoch next time) and the failure is raised: the job's own
        :class:`MaskauditError` as it was raised, any other exception of the job as Ray wraps it
        (``RayTaskError``, with the worker's traceback), and a job Ray gave up on (its worker died more than
        ``ray.max_retries`` times, its node was lost) as one line.
        """
        ray, settings = self.ray, self.settings
        cpus, gpus = self.resources()
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=settings.max_retries,
                            retry_exceptions=False)(run_on_worker)
        # the task's name is its worker's process title while it runs (`ray::maskaudit train no_roi fold 2`, in ps)
        refs = [remote.options(name=f"maskaudit {name} {job_label(args)}").remote(fn, args) for args in calls]
        args_of = dict(zip(refs, calls, strict=True))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        note = (f"{len(calls)} jobs on Ray ({nodes} node{'s' if nodes != 1 else ''}; each job reserves {cpus:g} CPU "
                f"and {gpus:g} GPU, and runs again up to {settings.max_retries} times if its worker dies); progress "
                "counts finished jobs (epochs and images run on the workers and are not visible here: "
                "`maskaudit status RUN` reads them from the job folders)")
        self.placements = []
        results: dict[Any, Any] = {}
        with progress.stage(name, total if total is not None else len(calls) + done, done=done, note=note) as bar:
            pending = list(refs)
            try:
                while pending:
                    finished, pending = ray.wait(pending, num_returns=1)
                    for ref in finished:
                        label = job_label(args_of[ref])
                        out = self._get(ref, label)
                        results[ref] = out["result"]
                        self._finished(bar, label, out)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise
        retried = [p for p in self.placements if p["attempt"]]
        if retried:
            log.warning("%s: %d job%s ran again after a worker running %s died, and finished: %s", name, len(retried),
                        "s" if len(retried) != 1 else "", "them" if len(retried) != 1 else "it",
                        ", ".join(f"{p['job']} (attempt {p['attempt'] + 1})" for p in retried))
        return [results[ref] for ref in refs]

    def _get(self, ref: Any, label: str) -> dict:
        """``ray.get`` of one finished job, its failures as :meth:`map` says."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:  # raised by the job itself: the job's own error, not Ray's
            if isinstance(exc.cause, MaskauditError):
                raise exc.cause from None
            raise
        except exceptions.RayError as exc:  # WorkerCrashedError past the retries, NodeDiedError, OutOfMemoryError
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            attempts = self.settings.max_retries + 1
            raise MaskauditError(f"job {label} failed on Ray after {attempts} attempt{'s' if attempts != 1 else ''} "
                                 f"(ray.max_retries={self.settings.max_retries}): {type(exc).__name__}: {first}; the "
                                 "logs of the worker's node say why (Ray's session folder, logs/worker-*.err; e.g. "
                                 "out of memory); the next run resumes the job after its last saved epoch") from None

    def _finished(self, bar: Any, label: str, out: dict) -> None:
        """One job back: its log records into this process's log, its line on the display, its placement kept."""
        replay(out.get("log", ()))
        attempt = out.get("attempt") or 0
        where = f"{label} on node {str(out.get('node'))[:8]}"
        if attempt:
            where += f" (attempt {attempt + 1} of {self.settings.max_retries + 1}: a worker running it died)"
        self.placements.append({"job": label, "node": out.get("node"), "pid": out.get("pid"), "attempt": attempt})
        bar.job_finished_elsewhere(where, out["result"])


def make_executor(config: AuditConfig) -> LocalExecutor | RayExecutor:
    if config.executor == "ray":
        return RayExecutor(config.ray)
    return LocalExecutor(config.local, config.train.device)
