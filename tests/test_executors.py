"""The executors run the same job functions with the same results: one after the other in this process, several at
once in worker processes (``local.jobs``), or on Ray; settings are checked early and failures are one line. (A real
two-node Ray cluster: ``test_ray_cluster.py``.)"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit import processes
from maskaudit.cli import app
from maskaudit.config import LocalConfig, RayConfig, config_from_dict, load_config
from maskaudit.errors import MaskauditError
from maskaudit.executors import LocalExecutor, RayExecutor, head_endpoint, init_address
from maskaudit.processes import CoreShare, running_job, take_cores

KEYS = ["split", "train_strategy", "fold", "test_strategy", "image_id", "class"]


@pytest.mark.slow
def test_jobs_at_once_in_processes_give_the_grid_of_jobs_one_after_the_other(tmp_path: Path):
    config = {**TINY, "strategies": ["full", "only_roi"]}
    results = {}
    for jobs in (1, 2):
        path = tmp_path / f"jobs{jobs}.yaml"
        path.write_text(yaml.safe_dump({**config, "local": {"jobs": jobs}}))
        out = tmp_path / f"jobs{jobs}"
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        results[jobs] = pd.read_parquet(out / "predictions.parquet")
        log = (out / "logs" / "maskaudit.log").read_text()
        # the workers' epoch lines reach the run's log
        assert "only_roi fold 1 epoch 2/2: train loss" in log, log[-2000:]
    one, two = results[1], results[2]
    pd.testing.assert_frame_equal(one[KEYS], two[KEYS])
    # one thread per worker instead of this process's two: equal up to float summation order
    assert (one["probability"] - two["probability"]).abs().max() < 1e-3
    # local.jobs says how the run executes, not what it makes: a rerun with the other count is up to date
    rerun = CliRunner().invoke(app, ["run", str(tmp_path / "jobs1.yaml"), "--out", str(tmp_path / "jobs2")])
    assert rerun.exit_code == 0 and "train: running" not in rerun.output


def test_jobs_in_processes_return_in_order_and_fail_in_one_line(tmp_path: Path):
    executor = LocalExecutor(LocalConfig(jobs=2), device="cpu")
    assert executor.map(divmod, [(7, 2), (9, 4), (5, 5)], name="predict") == [(3, 1), (2, 1), (1, 0)]
    # the job's own MaskauditError, as the job raised it
    with pytest.raises(MaskauditError, match=f"^config file not found: {tmp_path / 'none.yaml'}$"):
        executor.map(load_config, [(tmp_path / "none.yaml",), (tmp_path / "none.yaml",)], name="train")
    # a worker that dies: one line naming a job and what to do
    with pytest.raises(MaskauditError) as caught:
        executor.map(os._exit, [(3,), (3,)], name="train")  # os._exit(3) ends the worker process at once
    text = str(caught.value)
    assert text.startswith("job 3: the process running it died (killed, or out of memory") and "\n" not in text
    assert "the next run resumes each unfinished job after its last saved epoch" in text


def test_a_script_without_a_main_guard_is_told_so(tmp_path: Path):
    """Each worker imports the main module again, so an unguarded script's workers die as they start; the line says
    that, not that a worker was killed or ran out of memory."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from maskaudit.config import LocalConfig
        from maskaudit.errors import MaskauditError
        from maskaudit.executors import LocalExecutor

        try:
            print("RESULT:", LocalExecutor(LocalConfig(jobs=2), device="cpu").map(divmod, [(7, 2)] * 2, name="train"))
        except MaskauditError as error:
            print("ERROR:", error)
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    said = [line for line in done.stdout.splitlines() if line.startswith(("RESULT:", "ERROR:"))]
    assert said == [f"ERROR: {processes.NEVER_STARTED}"], done.stdout + done.stderr
    assert "if __name__ == \"__main__\":" in processes.NEVER_STARTED


def test_a_submission_to_a_broken_pool_is_the_pool_s_one_line():
    """A worker dies while the caller handles another task's result: its next submission, not a result, finds the
    pool broken, and is the same one line."""
    with pytest.raises(MaskauditError, match="^a worker died; resume$"), \
            processes.pool(1, [], int, died="a worker died; resume") as pool:
        with pytest.raises(BrokenProcessPool):
            pool.submit(os._exit, 3).result()  # os._exit(3) ends the worker process at once
        pool.submit(divmod, 7, 2)


def _signal(folder: Path, name: str) -> None:
    (folder / name).touch()


def _wait(folder: Path, name: str) -> None:
    """Until another job has signalled ``name`` (bounded: a minute)."""
    for _ in range(1200):
        if (folder / name).exists():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no signal {name!r} in {folder}")


def threads_in_a_job(folder: Path, job: int) -> tuple[int, int]:
    """A job of the test below: its torch threads at two batches (as before each batch, :func:`take_cores`), each
    looked at at a known point of the three jobs' schedule. The jobs signal each other through files, so the
    schedule is the same however slowly the worker processes start (a loaded CI machine took more than 0.5 s)."""
    import torch

    def look() -> int:
        take_cores()
        return torch.get_num_threads()

    _signal(folder, f"started {job}")
    if job == 0:  # runs beside job 1, then ends, letting job 2 start
        _wait(folder, "started 1")
        first = second = look()
        _signal(folder, "looked 0")
        _wait(folder, "looked 1")
    elif job == 1:  # runs beside job 0, then beside job 2, then ends
        _wait(folder, "started 0")
        first = look()
        _signal(folder, "looked 1")
        _wait(folder, "started 2")
        second = look()
        _wait(folder, "looked 2")
    else:  # runs beside job 1, then alone
        first = look()
        _signal(folder, "looked 2")
        for _ in range(1200):  # until job 1 has ended (bounded: a minute)
            second = look()
            if second != first:
                break
            time.sleep(0.05)
    return first, second


def test_jobs_at_once_share_the_cores_and_the_last_one_takes_them_all(tmp_path: Path):
    """Two jobs at once take half the cores each; the third, started while the second runs, takes every core once it
    runs alone (the grid's tail leaves no core idle)."""
    cores = os.cpu_count() or 1
    executor = LocalExecutor(LocalConfig(jobs=2), device="cpu")
    first, second, third = executor.map(threads_in_a_job, [(tmp_path, job) for job in range(3)], name="train")
    half = max(1, cores // 2)
    assert (first, second, third) == ((half, half), (half, half), (half, cores))


def test_a_share_of_the_cores_follows_the_jobs_running():
    import torch

    before = torch.get_num_threads()
    share = CoreShare(multiprocessing.get_context("spawn"), cores=6)
    try:
        share.attach()
        with running_job():
            assert torch.get_num_threads() == 6
            share.count(+2)  # two more jobs start
            take_cores()
            assert torch.get_num_threads() == 2
            share.count(+4)  # more jobs than cores: one thread each
            take_cores()
            assert torch.get_num_threads() == 1
            share.count(-6)
        assert share.threads() == 6
    finally:
        processes._share = None
        torch.set_num_threads(before)
    take_cores()  # outside a job pool: nothing
    assert torch.get_num_threads() == before


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """After keep_freed_memory, training steps (ResNet-18, batch 2, the study's Adam) take no new pages from the
    kernel: each step reuses the memory the last one freed (glibc; elsewhere it is a no-op)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    script = textwrap.dedent("""
        import resource

        import torch
        from torch import nn
        import torchvision
        from maskaudit.processes import keep_freed_memory
        torch.manual_seed(0)
        torch.set_num_threads(1)  # one thread, one malloc arena: the count is the same every run
        model = torchvision.models.resnet18(num_classes=1)
        opt = torch.optim.Adam(model.parameters(), fused=True)
        x, y = torch.rand(2, 3, 64, 64), torch.ones(2, 1)
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults()
        default = faults()
        keep_freed_memory()
        faults()
        print(default, faults())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    default, kept = map(int, done.stdout.split())
    assert default > 5 * 1000 and kept < default / 20, (default, kept)


ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install maskaudit[ray]`")


@pytest.mark.slow
def test_ray_grid_equals_local_grid(tmp_path: Path):
    config = {**TINY, "strategies": ["full", "only_roi"]}
    results = {}
    for executor in ("local", "ray"):
        path = tmp_path / f"{executor}.yaml"
        # ray.address local: a Ray of its own in this process, never another one running on this machine
        path.write_text(yaml.safe_dump({**config, "executor": executor, "ray": {"address": "local"}}))
        out = tmp_path / executor
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        results[executor] = pd.read_parquet(out / "predictions.parquet")
    ray.shutdown()
    local, remote = results["local"], results["ray"]
    pd.testing.assert_frame_equal(local[KEYS], remote[KEYS])
    # Ray workers may run torch with another thread count: equal up to float summation order
    assert (local["probability"] - remote["probability"]).abs().max() < 1e-3


def test_ray_settings_are_checked_when_the_config_is_read():
    ok = config_from_dict({**TINY, "ray": {"address": "head-node", "num_gpus": 0.25, "num_cpus": 2}}).ray
    assert (ok.address, ok.num_gpus, ok.num_cpus, ok.max_retries) == ("head-node", 0.25, 2, 2)
    for ray_section, words in (({"address": "http://head:8265"}, "ray.address: 'http://head:8265' is not a Ray "
                                                                 "cluster's address (http:// is, for example, the "
                                                                 "dashboard's"),
                               ({"address": "head:"}, "expected host:port of the head (port 6379 by default)"),
                               ({"num_gpus": 1.5}, "ray.num_gpus: 1.5: above 1, Ray reserves whole devices only"),
                               ({"num_cpus": 0}, "ray.num_cpus: Input should be greater than 0"),
                               ({"max_retries": -1}, "ray.max_retries: Input should be greater than or equal to 0")):
        with pytest.raises(MaskauditError, match=words.replace("(", r"\(").replace(")", r"\)")):
            config_from_dict({**TINY, "ray": ray_section})


def test_a_ray_address_gets_ray_s_default_ports():
    assert head_endpoint("head") == ("head", 6379) and head_endpoint("ray://head") == ("head", 10001)
    assert head_endpoint("[fd00::1]:7000") == ("fd00::1", 7000) and head_endpoint("auto") is None
    assert [init_address(a) for a in ("head", "ray://10.0.0.5", "10.0.0.5:7000", "auto", None)] == \
        ["head:6379", "ray://10.0.0.5:10001", "10.0.0.5:7000", "auto", None]


def test_a_ray_address_where_nothing_answers_is_one_line_naming_it():
    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if ray.is_initialized():
        ray.shutdown()
    address = f"127.0.0.1:{port}"
    with pytest.raises(MaskauditError) as caught:
        RayExecutor(RayConfig(address=address))
    text = str(caught.value)
    assert text.startswith(f"ray.address {address!r}: nothing answers at 127.0.0.1:{port} (") and "\n" not in text
    assert f"ray start --head --port={port}" in text and not ray.is_initialized()


def test_a_run_with_a_dead_ray_address_stops_before_preparing(tmp_path: Path):
    """`maskaudit run` connects to the cluster first: a wrong ``ray.address`` is its one line before any stage ran."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if ray.is_initialized():
        ray.shutdown()
    cfg, out = tmp_path / "audit.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump({**TINY, "executor": "ray", "ray": {"address": f"127.0.0.1:{port}"}}))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out)])
    assert result.exit_code != 0 and f"nothing answers at 127.0.0.1:{port}" in result.output
    assert not (out / "prepared").exists() and not ray.is_initialized()


@pytest.mark.slow
def test_a_failed_ray_job_is_one_line(tmp_path: Path):
    if ray.is_initialized():
        ray.shutdown()
    executor = RayExecutor(RayConfig(address="local", max_retries=0))
    try:
        # the job's own MaskauditError, as the job raised it (not Ray's wrapper with the worker's traceback)
        with pytest.raises(MaskauditError, match=f"^config file not found: {tmp_path / 'none.yaml'}$"):
            executor.map(load_config, [(tmp_path / "none.yaml",)], name="train")
        # a worker that dies past ray.max_retries: one line naming the job, Ray's error and where to look
        with pytest.raises(MaskauditError) as caught:
            executor.map(os._exit, [(3,)], name="train")  # os._exit(3) ends the worker process at once
        text = str(caught.value)
        assert text.startswith("job 3 failed on Ray after 1 attempt (ray.max_retries=0): "
                               "WorkerCrashedError: ") and "\n" not in text, text
        assert executor.map(divmod, [(7, 2)], name="predict") == [(3, 1)] and executor.placements[0]["attempt"] == 0
    finally:
        ray.shutdown()


def test_models_are_grouped_as_many_as_fit_in_the_memory_budget(monkeypatch):
    """:func:`maskaudit.predict.loaded_groups`: a group closes when the next model would pass the budget or the
    ``at_once`` cap; a model larger than the budget still gets a group of its own."""
    import torch

    from maskaudit import predict
    from maskaudit.executors import job_label

    class Models:  # what loaded_groups asks of a Context: one model per job
        def model(self, strategy, fold, device):
            return torch.nn.Linear(250, 1 if strategy == "small" else 4)  # 1004 or 4016 bytes of float32

    jobs = [("small", 0), ("small", 1), ("big", 0), ("small", 2)]
    monkeypatch.setattr(predict, "memory_budget", lambda device: 5000)
    groups = [list(g) for g in predict.loaded_groups(Models(), jobs, torch.device("cpu"))]
    assert groups == [[("small", 0), ("small", 1)], [("big", 0)], [("small", 2)]]
    monkeypatch.setattr(predict, "memory_budget", lambda device: 1)
    assert [len(g) for g in predict.loaded_groups(Models(), jobs, torch.device("cpu"))] == [1, 1, 1, 1]
    monkeypatch.setattr(predict, "memory_budget", lambda device: 1 << 40)
    assert [len(g) for g in predict.loaded_groups(Models(), jobs, torch.device("cpu"), at_once=3)] == [3, 1]
    assert job_label(("Audit", "/run", "predictions", tuple(jobs))) == "4 models: small fold 0 … small fold 2"
    assert job_label(("Audit", "/run", "predictions", (("full", 1),))) == "full fold 1"
