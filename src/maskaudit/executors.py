"""Run the grid of independent jobs: in this process, or as Ray tasks on a cluster.

A job is a plain function of picklable arguments (the run directory and the job's name),
which reads everything else from the run directory; so the same function runs locally or
on any Ray worker that sees the run directory on shared storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from maskaudit.config import AuditConfig
from maskaudit.errors import MaskauditError


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


class LocalExecutor:
    """Jobs one after the other in this process (the GPU, if any, serves one job at a time)."""

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        results = []
        with _progress() as bar:
            task = bar.add_task(fn.__name__.removeprefix("run_").replace("_", " "), total=len(calls))
            for args in calls:
                bar.update(task, description=f"{fn.__name__.removeprefix('run_')} {args[1]}/fold_{args[2]}")
                results.append(fn(*args))
                bar.advance(task)
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

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        gpus = 1 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = self.ray.remote(num_gpus=gpus, max_retries=2)(fn)
        refs = [remote.remote(*args) for args in calls]
        with _progress() as bar:
            task = bar.add_task(f"{fn.__name__} on ray", total=len(refs))
            pending = list(refs)
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                self.ray.get(done)  # raises the job's error here
                bar.advance(task)
        return self.ray.get(refs)


def make_executor(config: AuditConfig) -> LocalExecutor | RayExecutor:
    return RayExecutor() if config.executor == "ray" else LocalExecutor()
