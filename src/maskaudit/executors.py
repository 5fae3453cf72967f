"""Run the grid of independent jobs: in this process, or as Ray tasks on a cluster.

A job is a plain function of picklable arguments (the kind of audit, the run directory and the job's name),
which reads everything else from the run directory; so the same function runs locally or
on any Ray worker that sees the run directory on shared storage. A job writes only its own
job folder, under the run directory's writer lock (:mod:`maskaudit.lock`) that the driver
holds for the whole stage; a job never takes the lock (a Ray worker is another process, which
the lock would refuse).

Both executors show the stage's progress (:mod:`maskaudit.progress`): job i of N with its
strategy and fold, elapsed and time left. Locally a job also counts its own steps (epochs,
images) on the display; on Ray the jobs run elsewhere, so only finished jobs are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from maskaudit import progress
from maskaudit.config import AuditConfig
from maskaudit.errors import MaskauditError


def job_label(args: tuple) -> str:
    """A job's arguments ``(..., strategy, fold)`` → ``no_roi fold 2``."""
    return f"{args[-2]} fold {args[-1]}" if len(args) >= 2 else " ".join(map(str, args))


class LocalExecutor:
    """Jobs one after the other in this process (the GPU, if any, serves one job at a time)."""

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], *, name: str, total: int | None = None,
            done: int = 0) -> list[Any]:
        """Run ``fn(*args)`` for each of ``calls`` (stage ``name``); ``total`` jobs in the stage, ``done`` before."""
        results = []
        with progress.stage(name, total if total is not None else len(calls) + done, done=done) as bar:
            for args in calls:
                bar.start_job(job_label(args))
                result = fn(*args)
                bar.end_job(result)
                results.append(result)
        return results


class RayExecutor:
    """Each job a Ray task (one GPU each where the cluster has GPUs); the run directory must be shared."""

    def __init__(self) -> None:
        try:
            import ray
        except ImportError:
            raise MaskauditError("executor: ray needs Ray installed: pip install 'maskaudit[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)  # RAY_ADDRESS, when set, names the cluster

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], *, name: str, total: int | None = None,
            done: int = 0) -> list[Any]:
        gpus = 1 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = self.ray.remote(num_gpus=gpus, max_retries=2)(fn)
        refs = [remote.remote(*args) for args in calls]
        args_of = dict(zip(refs, calls, strict=True))
        note = (f"{len(calls)} jobs on Ray; progress counts finished jobs (epochs and images run on the workers and "
                "are not visible here: `maskaudit status RUN` reads them from the job folders)")
        with progress.stage(name, total if total is not None else len(calls) + done, done=done, note=note) as bar:
            pending = list(refs)
            while pending:
                finished, pending = self.ray.wait(pending, num_returns=1)
                for ref in finished:
                    bar.job_finished_elsewhere(job_label(args_of[ref]), self.ray.get(ref))  # raises the job's error
        return self.ray.get(refs)


def make_executor(config: AuditConfig) -> LocalExecutor | RayExecutor:
    return RayExecutor() if config.executor == "ray" else LocalExecutor()
